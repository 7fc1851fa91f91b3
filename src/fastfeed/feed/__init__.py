"""Upstream sources of ticks and the sinks they write to (docs/sources.md): the
built-in simulator, the /ingest endpoint, the Redis bus's subscriber, publishers,
recordings (record.py writes them, replay.py plays them back)."""
