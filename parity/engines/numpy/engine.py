"""The numpy engine: one builder per architecture (llama, gemma3, bitnet) behind `NumpyEngine`.

The plain reference path: a full forward pass per call. Faster paths are checked against it, never the
other way round. Each architecture module holds its graph; parity.engines.numpy.ops the shared operations.
Every forward pass runs numpy's BLAS (OpenBLAS) on one thread (ops.bound, engines/numpy/blas.py): its results
then do not depend on the thread count (they did, by float32 rounding), and a forward pass is a hundred or more
BLAS calls, each of which, split over one thread per core on a shared machine, waits for a partner thread that
is not scheduled. Measured here (2-core EPYC, load average 9) for Gemma 3 270M, 16 prompt + 8 generated tokens:
greedy 1.0 s and logits 0.5 s of CPU on one thread, 3.4 s and 2.0-2.3 s on the default two.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from parity.engines.numpy.bitnet import build_bitnet
from parity.engines.numpy.gemma3 import build_gemma3
from parity.engines.numpy.llama import build_llama
from parity.engines.numpy.ops import DTYPES, Array, Bound, FloatType, KVCache, no_tap
from parity.engines.numpy.taps import Recorder
from parity.errors import ModelFormatError, UsageError
from parity.gguf.reader import GGUFFile, open_gguf

__all__ = ["ARCHITECTURES", "DTYPES", "NumpyEngine"]

# One builder per architecture: (gguf, dtype) -> the forward bound to the dequantized weights.
ARCHITECTURES: dict[str, Callable[[GGUFFile, FloatType], Bound]] = {
    "llama": build_llama,
    "gemma3": build_gemma3,
    "bitnet": build_bitnet,
}


class NumpyEngine:
    """The reference implementation under test: a full forward pass per call, in numpy."""

    name = "numpy"

    def __init__(self, model: GGUFFile | str | os.PathLike[str], *, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise UsageError(f"unsupported numpy engine dtype '{dtype}'", fix=f"use one of {', '.join(DTYPES)}")
        self.gguf = model if isinstance(model, GGUFFile) else open_gguf(model)
        self.architecture = self.gguf.architecture
        self.dtype = dtype
        builder = ARCHITECTURES.get(self.architecture)
        if builder is None:
            raise ModelFormatError(
                f"unsupported architecture '{self.architecture}' in {self.gguf.path}: "
                f"the numpy engine supports {', '.join(ARCHITECTURES)}",
                fix="use a model of a supported architecture",
            )
        built = builder(self.gguf, DTYPES[dtype])
        self._forward, self.params, self.weights = built.forward, built.params, built.weights
        self.n_vocab, self.n_ctx_train = built.params.n_vocab, built.params.n_ctx_train

    def _check_tokens(self, tokens: Sequence[int], n_extra: int = 0) -> Array:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise UsageError(f"token ids must be a flat sequence, got shape {ids.shape}", fix="pass a list of ints")
        if ids.size == 0:
            raise UsageError("no tokens to evaluate", fix="pass a non-empty list of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"token ids must be integers, got {ids.dtype}", fix="pass a list of int token ids")
        bad = np.flatnonzero((ids < 0) | (ids >= self.n_vocab))
        if bad.size:
            i = int(bad[0])
            raise UsageError(
                f"token id {int(ids[i])} at position {i} is outside the vocabulary [0, {self.n_vocab})",
                fix="tokenize with this model's vocabulary",
            )
        if ids.size + n_extra > self.n_ctx_train:
            raise UsageError(
                f"{ids.size + n_extra} positions exceed the model's training context {self.n_ctx_train}",
                fix="use a shorter prompt or fewer new tokens",
            )
        return ids.astype(np.int64)

    def logits(self, tokens: Sequence[int]) -> npt.NDArray[np.float64]:
        """Logits for every position of one forward pass: (len(tokens), n_vocab), returned as float64."""
        ids = self._check_tokens(tokens)
        out: npt.NDArray[np.float64] = self._forward(ids, False, no_tap, None).astype(np.float64)
        return out

    def tensors(
        self, tokens: Sequence[int], names: Sequence[str] | None = None, replace: Mapping[str, Array] | None = None
    ) -> dict[str, Array]:
        """Named graph tensors of one forward pass over `tokens` (contract: Implementation.tensors).

        `replace` substitutes tensors (teacher forcing); names it holds that this graph lacks are a UsageError.
        """
        ids = self._check_tokens(tokens)
        rec = Recorder(int(ids.size), names, replace)
        self._forward(ids, False, rec, None)
        return rec.finish()

    def greedy(self, tokens: Sequence[int], n_new: int) -> list[int]:
        """Argmax continuation of `n_new` tokens: the prompt in one pass, then one token per pass over a KV cache.

        Checked against `greedy_reference` (tests/unit/test_engine_fast.py, test_engine_qrows.py): the prompt pass
        is the plain computation bit for bit, except that quantized matrices (QRows) multiply up to 4 rows (the
        head's last row, short prompts) block by block; each later step multiplies one query row against the
        cached keys instead of recomputing the prefix, so its logits differ from the reference's by float
        rounding only.
        """
        ids = self._greedy_ids(tokens, n_new)
        if not n_new:
            return []
        p = self.params
        kv = KVCache(p.n_layer, ids.size + n_new - 1, p.n_head_kv, p.head_dim, DTYPES[self.dtype])
        last = self._forward(ids, True, no_tap, kv)[0]  # (V,)
        out = [int(np.argmax(last))]
        while len(out) < n_new:
            last = self._forward(np.asarray(out[-1:], dtype=np.int64), True, no_tap, kv)[0]  # (V,)
            out.append(int(np.argmax(last)))
        return out

    def greedy_reference(self, tokens: Sequence[int], n_new: int) -> list[int]:
        """The plain path's greedy: every step recomputes the whole forward pass (the yardstick of `greedy`)."""
        ids = list(self._greedy_ids(tokens, n_new).tolist())
        out: list[int] = []
        for _ in range(n_new):
            last = self._forward(np.asarray(ids, dtype=np.int64), True, no_tap, None)[0]  # (V,)
            nxt = int(np.argmax(last))
            out.append(nxt)
            ids.append(nxt)
        return out

    def _greedy_ids(self, tokens: Sequence[int], n_new: int) -> Array:
        if n_new < 0:
            raise UsageError(f"n_new must be >= 0, got {n_new}", fix="ask for zero or more new tokens")
        # the last generated token is never fed back, so it needs no position of its own
        return self._check_tokens(tokens, max(n_new - 1, 0))
