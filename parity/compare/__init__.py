"""Comparing logits: per-position metrics and verdict rules, and receipts with their JSON Schemas.
Imports parity.core and parity.errors.
"""
