"""The Implementation interface: what every command compares (docs/ARCHITECTURE.md, "Layers").

An implementation turns token ids into logits at every position and decodes greedily. The numpy engine and
each bridged C++ backend (under any context parameters) are implementations; parity.engines.registry makes
them from spec strings such as `numpy:dtype=float64` or `llama:type_k=f16,flash_attn=on`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np


class Implementation(ABC):
    """One engine under one configuration. Use as a context manager, or call close()."""

    spec: str  # the spec string it was made from (recorded in receipts)

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What goes in receipts: kind, spec and whatever identifies the engine and its configuration."""

    @abstractmethod
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens`: float array (len(tokens), vocab)."""

    @abstractmethod
    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """The argmax continuation of `prompt_ids`, `n` tokens."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int] | None:
        """The implementation's own token ids for `text`, or None when it has no tokenizer."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: most implementations hold nothing to release
        """Release processes and memory (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
