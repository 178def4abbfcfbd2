"""Datasets: the declared spec, columnar ingestion, the feature schema, built-in sources."""
