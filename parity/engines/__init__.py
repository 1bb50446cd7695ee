"""Implementations parity checks. engines.numpy: the numpy reference engine (ops, one module per
architecture, numerics modes). Imports parity.backends and below.
"""
