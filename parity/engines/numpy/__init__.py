"""The numpy reference engine: ops (shared operations and weight access), llama, gemma3, bitnet (one graph
each), numerics (exact or mirrored rounding), engine (NumpyEngine and the architecture registry).
"""
