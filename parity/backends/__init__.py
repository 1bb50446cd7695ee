"""The C++ reference engines: the lock (lock/backends.toml) and source acquisition, the CMake build, the tools
tree (llama-bench, llama-quantize), the cffi bridge and the worker process each backend runs in.
Imports parity.compare, parity.tokenize, parity.gguf and below.
"""
