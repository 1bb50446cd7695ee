"""A py: engine whose amount of work is known: each `greedy` runs parity's numpy engine PASSES times (same answer).

    PYTHONPATH=tests/integration/engines parity bench --impl py:workload:create            # 4 passes
    PYTHONPATH=tests/integration/engines parity bench --impl py:workload:create_slower     # 5: 25% more work

`create_slower` does a quarter more real work per evaluation, so its throughput is 20 % lower: the slowdown the
bench gate must catch (README, "The bench rule"). Nothing in parity knows about it: no hook, no sleep.
"""

from __future__ import annotations

import numpy as np

PASSES = 4


class Workload:
    def __init__(self, model_path: str, passes: int) -> None:
        from parity.engines.numpy.engine import NumpyEngine

        self.engine, self.passes = NumpyEngine(model_path), passes

    def describe(self) -> dict[str, str]:
        return {"name": f"workload-{self.passes}", "version": "1"}

    def capabilities(self) -> list[str]:
        return ["greedy"]

    def logits(self, tokens: list[int]) -> np.ndarray:
        return np.asarray(self.engine.logits(tokens), dtype="<f4")

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        out: list[int] = []
        for _ in range(self.passes):
            out = [int(t) for t in self.engine.greedy(tokens, n)]
        return out


def create(model_path: str) -> Workload:
    return Workload(model_path, PASSES)


def create_slower(model_path: str) -> Workload:
    return Workload(model_path, PASSES + 1)
