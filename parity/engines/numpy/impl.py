"""The numpy engine as an Implementation (spec `numpy[:dtype=float32|float64]`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from parity.engines.base import Implementation
from parity.engines.numpy.engine import NumpyEngine


class NumpyImplementation(Implementation):
    """The plain numpy reference path: a full forward pass per call."""

    def __init__(self, engine: NumpyEngine, spec: str = "numpy") -> None:
        self.engine = engine
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        return {"name": "numpy", "dtype": self.engine.dtype, "spec": self.spec}

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.logits(list(tokens))

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        return self.engine.greedy(list(prompt_ids), n) if n else []

    def tensors(
        self,
        tokens: Sequence[int],
        names: Sequence[str] | None = None,
        replace: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        return self.engine.tensors(list(tokens), names, replace)
