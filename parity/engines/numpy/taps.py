"""Named graph tensors of the numpy engine (Implementation.tensors, issue 14): record, and replace (replay).

Every architecture's forward calls `tap(op, il, x)` where llama.cpp's graph calls `cb(cur, op, il)` on the
tensor that finally carries that name (src/models/*.cpp; a later `cb` on the same or a later tensor wins, so
`Qcur-L` is the query after RoPE and `ffn_out-L` in llama is the FFN's down projection, the residual sum
being renamed `l_out-L`). The plain path taps with `no_tap`, which returns its argument: the forward is the
same computation with one Python call per tap point.

Layouts follow ggml's: a tensor of ne = [hd, heads, n_tokens] flattens per token as heads one after another,
each hd wide, which is numpy's (n, heads, hd).reshape(n, heads * hd).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np

from parity.engines.base import TENSOR_GLOBALS, TENSOR_OPS
from parity.engines.numpy.ops import Array
from parity.errors import UsageError

# "embd": the pinned llama.cpp names the token embedding rows `embd` (build_inp_embd); its `inp_embd` is the
# input tensor of the vector-embedding path, which a token batch never fills.
DEFAULT_OPS = frozenset(TENSOR_OPS) | frozenset(TENSOR_GLOBALS) | {"embd"}


def tensor_name(op: str, il: int) -> str:
    """llama.cpp's graph name: `op-il` inside layer il, `op` for layer-less tensors (il < 0)."""
    return f"{op}-{il}" if il >= 0 else op


def op_of(name: str) -> str:
    """The op part of a graph name ("attn_norm-3" -> "attn_norm")."""
    head, sep, tail = name.rpartition("-")
    return head if sep and tail.isdigit() else name


class Recorder:
    """A tap that records selected tensors as float32 (n_tokens, width) and substitutes replaced ones.

    `names`: exact names or fnmatch patterns; None selects every tensor whose op is a default op. `replace`:
    name -> array of that tensor's (n_tokens, width) shape; the own value is recorded first (when selected),
    then the forward continues with the given one, cast to the engine dtype.
    """

    def __init__(self, n_tokens: int, names: Sequence[str] | None, replace: Mapping[str, np.ndarray] | None) -> None:
        self.n_tokens = n_tokens
        self.names = None if names is None else list(names)
        self.replace = dict(replace or {})
        self.recorded: dict[str, Array] = {}
        self.seen: list[str] = []

    def selected(self, name: str) -> bool:
        if self.names is None:
            return op_of(name) in DEFAULT_OPS
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in self.names)

    def __call__(self, op: str, il: int, x: Array) -> Array:
        name = tensor_name(op, il)
        self.seen.append(name)
        if self.selected(name):
            self.recorded[name] = np.array(x.reshape(self.n_tokens, -1), dtype=np.float32)  # a copy
        given = self.replace.get(name)
        if given is None:
            return x
        width = x.size // self.n_tokens
        arr = np.asarray(given)
        if arr.shape != (self.n_tokens, width):
            raise UsageError(
                f"replacement for tensor '{name}' has shape {arr.shape}, expected ({self.n_tokens}, {width})",
                fix="pass one row per token, flattened as llama.cpp lays the tensor out",
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise UsageError(f"replacement for tensor '{name}' is {arr.dtype}", fix="pass a float array")
        return arr.astype(x.dtype).reshape(x.shape)

    def finish(self) -> dict[str, Array]:
        """The recorded tensors, after checking every replaced name exists in this graph."""
        unknown = sorted(set(self.replace) - set(self.seen))
        if unknown:
            raise UsageError(
                f"cannot replace tensor '{unknown[0]}': the numpy engine's graph has no tensor of that name "
                f"({len(unknown)} unknown)",
                fix="replace names this graph records (call tensors() with names=['*'] to list them)",
            )
        return self.recorded
