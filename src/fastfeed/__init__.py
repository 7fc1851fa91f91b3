"""fastfeed: a real-time market-data WebSocket gateway with a compiled hot path."""

__version__ = "0.1.0"
