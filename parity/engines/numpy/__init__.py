"""parity.engines.numpy."""
