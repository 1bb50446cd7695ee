"""parity.gguf."""
