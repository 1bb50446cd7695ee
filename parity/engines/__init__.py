"""parity.engines."""
