"""The main job (`parity run`, `parity parity-both`): job (prepare once, one lane per backend, receipts,
exit code) and summary (text and JSON). Imports parity.options and below.
"""
