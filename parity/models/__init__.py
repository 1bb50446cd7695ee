"""parity.models."""
