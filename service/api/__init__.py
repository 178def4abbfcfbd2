"""HTTP routes: one router per concern (score, events, health/metrics)."""
