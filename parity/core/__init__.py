"""parity.core."""
