"""Tests of pipeline/ (and the public commands end to end)."""
