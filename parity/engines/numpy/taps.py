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

from parity.engines import tensor_names
from parity.engines.numpy.ops import Array
from parity.errors import UsageError

WHO = "the numpy engine"


def tensor_name(op: str, il: int) -> str:
    """llama.cpp's graph name: `op-il` inside layer il, `op` for layer-less tensors (il < 0)."""
    return f"{op}-{il}" if il >= 0 else op


class Recorder:
    """A tap that records selected tensors as float32 (n_tokens, width) and substitutes replaced ones.

    `names` and `replace` mean what they mean for every implementation (parity.engines.tensor_names): exact
    names or fnmatch patterns, None = the default names; replacements keyed by exact names, (n_tokens, width).
    The own value is recorded first (when selected), then the forward continues with the given one, cast to
    the engine dtype.
    """

    def __init__(self, n_tokens: int, names: Sequence[str] | None, replace: Mapping[str, np.ndarray] | None) -> None:
        self.n_tokens = n_tokens
        self.names = names
        if isinstance(names, str):
            tensor_names.select(names, [], WHO)  # raises: a list is required
        self.replace = tensor_names.check_replace(replace, n_tokens, WHO)
        self.recorded: dict[str, Array] = {}
        self.seen: list[str] = []

    def selected(self, name: str) -> bool:
        if self.names is None:
            return bool(tensor_names.default_names([name]))
        return any(name == p or (tensor_names.is_pattern(p) and fnmatch.fnmatchcase(name, p)) for p in self.names)

    def __call__(self, op: str, il: int, x: Array) -> Array:
        name = tensor_name(op, il)
        self.seen.append(name)
        if self.selected(name):
            self.recorded[name] = np.array(x.reshape(self.n_tokens, -1), dtype=np.float32)  # a copy
        given = self.replace.get(name)
        if given is None:
            return x
        width = x.size // self.n_tokens
        if given.shape != (self.n_tokens, width):
            raise UsageError(
                f"{WHO}: replacement for '{name}' must be ({self.n_tokens}, {width}), got {given.shape}",
                fix="pass one row per token, flattened as llama.cpp lays the tensor out",
            )
        return given.astype(x.dtype).reshape(x.shape)

    def finish(self) -> dict[str, Array]:
        """The recorded tensors in graph order, after checking every requested and replaced name exists."""
        tensor_names.check_replace(self.replace, self.n_tokens, WHO, self.seen)
        chosen = tensor_names.select(self.names, self.seen, WHO)
        return {name: self.recorded[name] for name in chosen}
