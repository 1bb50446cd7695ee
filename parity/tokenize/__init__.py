"""Tokenizers: the HF tokenizer and its authority, the token parity check, prompt templates (named and the
model's own chat template in a sandbox), the deterministic BPE trainer and the GGUF vocabulary export.
Imports parity.gguf and below.
"""
