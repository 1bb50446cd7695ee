"""The Implementation interface: what every command compares (docs/ARCHITECTURE.md, "Layers").

An implementation turns token ids into logits at every position (`logits`; `logits_at` for chosen positions
only, by default a slice of `logits`) and decodes greedily. The numpy engine and
each bridged C++ backend (under any context parameters) are implementations; parity.engines.registry makes
them from spec strings such as `numpy:dtype=float64` or `llama:type_k=f16,flash_attn=on`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np

from parity.errors import Unsupported

# The graph tensors localisation compares by default, in llama.cpp's graph naming (`cb(cur, "attn_norm", il)`
# in src/models/*.cpp gives "attn_norm-3"; layer-less tensors have no suffix). Architectures name only the
# ones their graph has (gemma3 has attn_post_norm, sa_out, ffn_post_norm; llama has ffn_inp).
TENSOR_OPS = (
    "attn_norm",
    "Qcur",
    "Kcur",
    "Vcur",
    "Qcur_normed",
    "Kcur_normed",
    "kqv_out",
    "attn_out",
    "attn_post_norm",
    "sa_out",
    "ffn_inp",
    "ffn_norm",
    "ffn_out",
    "ffn_post_norm",
    "l_out",
)
TENSOR_GLOBALS = (
    "embd",
    "inp_embd",
    "inp_scaled",
    "result_norm",
    "result_output",
)  # embd: mainline; inp_embd: the 2024 fork


class Implementation(ABC):
    """One engine under one configuration. Use as a context manager, or call close()."""

    spec: str  # the spec string it was made from (recorded in receipts)

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What goes in receipts: kind, spec and whatever identifies the engine and its configuration."""

    @abstractmethod
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of `tokens`: float array (len(tokens), vocab)."""

    def logits_at(self, tokens: Sequence[int], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits at `positions` only (strictly increasing indexes into `tokens`): float array (len(positions),
        vocab), row k for position positions[k], from the same evaluation of the whole sequence as `logits`.

        The default slices `logits(tokens)`, so every implementation has it. An engine that can skip the rows
        nobody reads overrides it (the bridged llama.cpp: only those positions go through the output head, as
        llama-perplexity evaluates; parity suite's `--score perplexity` asks for half a chunk's rows). An
        override's rows may differ from `logits`' in the last bits, never in meaning.
        """
        arr = np.asarray(self.logits(tokens))
        return np.ascontiguousarray(arr[np.asarray(positions, dtype=np.int64)])

    @abstractmethod
    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """The argmax continuation of `prompt_ids`, `n` tokens."""

    def tensors(
        self,
        tokens: Sequence[int],
        names: Sequence[str] | None = None,
        replace: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Named graph tensors of ONE batch evaluation of `tokens`, in llama.cpp's graph naming ("attn_norm-3").

        Each value is a float32 array of shape (len(tokens), width): row i belongs to token i (a tensor with
        more dimensions per token is flattened per row). `names` selects what is returned (exact names or
        fnmatch patterns; None = every tensor of TENSOR_OPS / TENSOR_GLOBALS the graph has). `replace` maps
        names to arrays of that shape: when the graph computes such a tensor it records its own value, then
        continues with the given one, so every op downstream sees the reference's inputs (replay: the
        recorded value of each replaced name is then that op's output on the reference's inputs).
        Implementations that cannot do this raise Unsupported (exit 2) naming themselves.
        """
        raise Unsupported(
            f"implementation '{self.spec}' cannot capture graph tensors",
            fix="run without --locate, or implement the `tensors` request (docs/PROTOCOL.md)",
        )

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
