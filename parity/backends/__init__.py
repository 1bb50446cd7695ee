"""parity.backends."""
