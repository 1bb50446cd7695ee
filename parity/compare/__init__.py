"""parity.compare."""
