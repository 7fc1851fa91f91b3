"""Upstream sources of ticks: the built-in simulator, the /ingest endpoint, publishers."""
