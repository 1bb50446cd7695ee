"""parity.check."""
