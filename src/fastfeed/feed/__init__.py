"""Upstream sources of ticks: the built-in simulator, the /ingest endpoint, publishers,
recordings (record.py writes them, replay.py plays them back)."""
