"""Models: the lock (lock/models.lock.json) and fetcher, the embedded default model, the ternary family
(quantized by each engine's own llama-quantize). Imports parity.backends and below.
"""
