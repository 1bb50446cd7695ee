"""GGUF files: the validating reader, the ggml type table and dequantizers (one per type, each naming the C
function it mirrors), and the bitnet.cpp fork's ternary formats. Imports parity.core and parity.errors.
"""
