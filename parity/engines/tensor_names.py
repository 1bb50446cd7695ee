"""Which graph tensors a `tensors()` request means (Implementation.tensors, docs/PROTOCOL.md `tensors`).

Every implementation kind resolves the request the same way against the names its graph computed, in
llama.cpp's naming: None = the default names (TENSOR_OPS with a layer suffix, TENSOR_GLOBALS) the graph has;
otherwise each entry is an exact name or an fnmatch pattern (`*`, `?`, `[...]`, case-sensitive). An exact
name or a pattern that names nothing the graph computed is bad input (UsageError, exit 2) naming it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

import numpy as np

from parity.engines.base import TENSOR_GLOBALS, TENSOR_OPS, Implementation
from parity.errors import UsageError

_LAYER = re.compile(r"^(?P<op>.+)-(?P<layer>\d+)$")
_PATTERN_CHARS = frozenset("*?[")


def can_capture(impl: Implementation) -> bool:
    """Whether `impl.tensors()` can answer at all, known without running anything: it overrides the base
    method, and an external engine (cmd:/py:) announced `tensors` in its hello. Use it to raise Unsupported
    (exit 2) before a run starts."""
    if type(impl).tensors is Implementation.tensors:
        return False
    caps = getattr(impl, "capabilities", None)
    return caps is None or "tensors" in caps


def split_name(name: str) -> tuple[str, int | None]:
    """("attn_norm", 3) for "attn_norm-3"; (name, None) for a layer-less tensor such as "result_output"."""
    m = _LAYER.match(name)
    return (m["op"], int(m["layer"])) if m else (name, None)


def is_pattern(name: str) -> bool:
    return any(ch in _PATTERN_CHARS for ch in name)


def default_names(available: Sequence[str]) -> list[str]:
    """The names localisation compares by default that this graph computed, in graph order."""
    out = []
    for name in available:
        op, layer = split_name(name)
        if (layer is not None and op in TENSOR_OPS) or (layer is None and name in TENSOR_GLOBALS):
            out.append(name)
    return out


def _listing(available: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(available[:limit])
    return shown + (f", ... ({len(available)} in all)" if len(available) > limit else "")


def select(names: Sequence[str] | None, available: Sequence[str], who: str) -> list[str]:
    """The exact names `names` means against `available` (graph order, no repeats)."""
    if names is None:
        return default_names(available)
    if isinstance(names, str):
        raise UsageError(f"tensor names for {who} must be a list, got the string {names!r}")
    chosen: set[str] = set()
    for item in names:
        hits = [n for n in available if fnmatch.fnmatchcase(n, item)] if is_pattern(item) else [item]
        if not hits or (not is_pattern(item) and item not in available):
            what = "pattern" if is_pattern(item) else "tensor"
            raise UsageError(
                f"{who}: {what} '{item}' names no per-token tensor its graph computed",
                fix=f"use names it has: {_listing(list(available))}",
            )
        chosen.update(hits)
    return [n for n in available if n in chosen]


def check_replace(
    replace: Mapping[str, np.ndarray] | None, n_tokens: int, who: str, available: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """`replace` as float32 C-contiguous (n_tokens, width) arrays keyed by exact names, or UsageError."""
    out: dict[str, np.ndarray] = {}
    for name, value in (replace or {}).items():
        if is_pattern(name) or (available is not None and name not in available):
            raise UsageError(
                f"{who}: cannot replace '{name}': replacements take exact names of tensors its graph computed",
                fix=f"use names it has: {_listing(list(available or []))}",
            )
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n_tokens:
            raise UsageError(f"{who}: replacement for '{name}' must be ({n_tokens}, width), got {arr.shape}")
        out[name] = arr
    return out
