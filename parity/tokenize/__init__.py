"""parity.tokenize."""
