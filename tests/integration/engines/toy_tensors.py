"""A small deterministic engine with a named graph, for the protocol v2 `tensors` request (test_protocol_tensors).

Its graph (llama.cpp's naming): inp_embd -> per layer attn_norm (RMS norm), ffn_out (tanh of a projection),
l_out (residual) -> result_output (the logits). `tensors` records each named tensor, then continues with the
replacement when one is given (teacher forcing). Served three ways: `py:toy_tensors:create` (pyhost),
`cmd:python toy_tensors.py` (the example's own protocol loop, examples/protocol_v2/echo_numpy.py), and with
TOY_FAULT=crash_tensors it dies inside `tensors`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

VOCAB, WIDTH, LAYERS = 16, 8, 2


class Toy:
    def __init__(self, model_path: str) -> None:
        rng = np.random.default_rng(7)
        self.embd = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
        self.w = [rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 3 for _ in range(LAYERS)]
        self.out = rng.standard_normal((WIDTH, VOCAB)).astype(np.float32)

    def describe(self) -> dict[str, str]:
        return {"name": "toy_tensors", "version": "1"}

    def capabilities(self) -> list[str]:
        return ["tensors"]

    def _forward(self, tokens: list[int], replace: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen: dict[str, np.ndarray] = {}

        def tap(name: str, value: np.ndarray) -> np.ndarray:
            seen[name] = value.astype(np.float32)
            return np.asarray(replace[name], dtype=np.float32) if name in replace else value

        x = tap("inp_embd", self.embd[np.asarray(tokens)])
        for layer in range(LAYERS):
            norm = tap(f"attn_norm-{layer}", x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6))
            ffn = tap(f"ffn_out-{layer}", np.tanh(norm @ self.w[layer]))
            x = tap(f"l_out-{layer}", x + ffn)
        tap("result_output", x @ self.out)
        return seen

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self._forward(tokens, {})["result_output"]

    def tensors(
        self, tokens: list[int], names: list[str] | None, replace: Mapping[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        if os.environ.get("TOY_FAULT") == "crash_tensors":
            print("toy_tensors: crashing inside tensors", file=sys.stderr, flush=True)
            os._exit(3)
        seen = self._forward(tokens, replace or {})
        unknown = sorted(set(replace or {}) - set(seen))
        if unknown:
            raise KeyError(f"cannot replace {unknown}: not in this graph")
        return {n: v for n, v in seen.items() if names is None or n in names}


def create(model_path: str) -> Toy:
    return Toy(model_path)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "protocol_v2"))
    import echo_numpy  # type: ignore[import-not-found]

    echo_numpy.create = create  # the example's protocol loop, this engine
    sys.exit(echo_numpy.main())
