"""parity.bench."""
