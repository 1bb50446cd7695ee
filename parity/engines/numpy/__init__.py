"""The numpy reference engine: ops (shared operations and weight access), llama, gemma3, bitnet (one graph
each), numerics (exact or mirrored rounding), engine (NumpyEngine and the architecture registry), loader
(dequantizing to float) and qrows (Q8_0/Q5_0/Q4_0 matrices kept quantized).
"""
