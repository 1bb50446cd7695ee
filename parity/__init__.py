"""parity: prove an LLM inference implementation computes what the C++ reference engines compute."""

from __future__ import annotations

__version__ = "0.1.0"
