"""Planted bugs: the numpy engine with one op changed (issue 14.3). Tests only, never product code.

Each bug wraps a function the numpy engine's graphs call through their module's globals (the block function,
`attention`, `gelu_tanh`), so the engine's own forward runs unchanged around it and its tensors() taps still
record llama.cpp's names. `planted(bug)` applies one bug in-process and undoes it on exit (the Gemma tests share
one loaded engine across bugs); `factory_<bug>` serves the bug as a protocol-v2 implementation:
`--impl py:tests.planted.bugs:factory_rope_base` (each py: process applies its bug for its lifetime).

`expected(bug, params)` names the (layer, op) localisation must report for a model with `params`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.engines.numpy import gemma3, llama

Array = np.ndarray
ARCH_MODULES = {"llama": llama, "gemma3": gemma3}
BLOCK = {"llama": "llama_block", "gemma3": "gemma3_block"}

RMS_EPS_FACTOR = 10.0  # epsilon 10x too large (e.g. llama's default 1e-5 for Gemma's 1e-6)
ROPE_BASE_FACTOR = 1.01  # RoPE base off by 1% (Gemma: the global layers' base; llama: the only base)
ATTN_SCALE_FACTOR = 1.05  # attention scale 5% too large (Gemma: global layers only)
NORM_WEIGHT_FACTOR = 1.02  # one layer's ffn_norm weights scaled by 2%
GATE_WEIGHT_FACTOR = 1.05  # one layer's ffn_gate weights scaled by 5% (a quantized matmul's weights)


def scaled_layer(n_layer: int) -> int:
    """The layer whose weights are scaled: the middle one."""
    return n_layer // 2


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    archs: tuple[str, ...]  # architectures where the bug exists (GELU only in Gemma's FFN)


BUGS: dict[str, Bug] = {
    b.name: b
    for b in (
        Bug("rms_eps", f"RMSNorm epsilon {RMS_EPS_FACTOR:g}x too large, every norm", ("llama", "gemma3")),
        Bug("rope_base", "RoPE base off by 1% (Gemma: global layers' base)", ("llama", "gemma3")),
        Bug("attn_scale", "attention scale 5% too large (Gemma: global layers only)", ("llama", "gemma3")),
        Bug("gelu_erf", "GELU computed with erf instead of the tanh approximation", ("gemma3",)),
        Bug("gqa_map", "GQA: query head j reads KV head j % n_kv instead of j // (n_head / n_kv)", ("llama", "gemma3")),
        Bug("norm_weights", "the middle layer's ffn_norm weights scaled by 1.02", ("llama", "gemma3")),
        Bug("gate_weights", "the middle layer's ffn_gate weights scaled by 1.05", ("llama", "gemma3")),
    )
}


NORMS = ("attn_norm", "Qcur_normed", "Kcur_normed", "attn_post_norm", "ffn_norm", "ffn_post_norm")


def expected(bug: str, arch: str, params: Any) -> tuple[str, ...]:
    """The graph tensors localisation may name first: the first op whose output the bug changes (for the
    epsilon, planted in every RMSNorm, any norm of layer 0: which one shows it first depends on the rows' scale)."""
    mid = scaled_layer(params.n_layer)
    first_global = next((il for il, swa in enumerate(getattr(params, "is_swa", ())) if not swa), 0)
    return {
        "rms_eps": tuple(f"{op}-0" for op in NORMS),
        "rope_base": (f"Qcur-{first_global}",),
        "attn_scale": (f"kqv_out-{first_global}",),
        "gelu_erf": ("ffn_out-0",),
        "gqa_map": ("kqv_out-0",),
        "norm_weights": (f"ffn_norm-{mid}",),
        "gate_weights": (f"ffn_out-{mid}",),
    }[bug]


def _gelu_erf(x: Array) -> Array:
    t = x.dtype.type
    erf = np.vectorize(math.erf, otypes=[np.float64])
    out: Array = (t(0.5) * x * (t(1.0) + erf(x.astype(np.float64) / math.sqrt(2.0)).astype(x.dtype))).astype(x.dtype)
    return out


def _gqa_wrong(orig: Callable[..., Array]) -> Callable[..., Array]:
    def attention(q: Array, k: Array, v: Array, scale: Any, allowed: Array | None = None, **kw: Any) -> Array:
        group = q.shape[1] // k.shape[1]
        # np.tile: head j gets KV head j % n_kv; the correct mapping (np.repeat) gives j // group
        return orig(q, np.tile(k, (1, group, 1)), np.tile(v, (1, group, 1)), scale, allowed, **kw)

    return attention


def _scaled_attention(orig: Callable[..., Array]) -> Callable[..., Array]:
    def attention(q: Array, k: Array, v: Array, scale: Any, allowed: Array | None = None, **kw: Any) -> Array:
        return orig(q, k, v, scale * ATTN_SCALE_FACTOR, allowed, **kw)

    return attention


def _block_wrapper(arch: str, bug: str, orig: Callable[..., Array]) -> Callable[..., Array]:
    def block(x: Array, layer: Any, p: Any, cos: Array, sin: Array, *args: Any) -> Array:
        il = (
            args[0] if arch == "llama" else args[1]
        )  # llama_block(..., sin, il, ...); gemma3_block(..., allowed, il, ...)
        if bug == "rms_eps":
            p = dataclasses.replace(p, rms_eps=p.rms_eps * RMS_EPS_FACTOR)
        elif bug == "attn_scale" and arch == "gemma3" and not p.is_swa[il]:
            p = dataclasses.replace(p, attn_scale=p.attn_scale * ATTN_SCALE_FACTOR)
        elif bug == "norm_weights" and il == scaled_layer(p.n_layer):
            layer = dataclasses.replace(layer, ffn_norm=layer.ffn_norm * layer.ffn_norm.dtype.type(NORM_WEIGHT_FACTOR))
        elif bug == "gate_weights" and il == scaled_layer(p.n_layer):
            layer = dataclasses.replace(layer, w_gate=layer.w_gate * layer.w_gate.dtype.type(GATE_WEIGHT_FACTOR))
        return orig(x, layer, p, cos, sin, *args)

    return block


def _rope_wrapper(arch: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    def rope_cos_sin(positions: Array, n_rot: int, base: float, *args: Any) -> Any:
        # gemma3_forward asks for the global base first, then the sliding layers' (freq scale 1.0, no factors)
        global_call = arch == "llama" or state["rope_calls"] % 2 == 0
        state["rope_calls"] += 1
        return orig(positions, n_rot, base * ROPE_BASE_FACTOR if global_call else base, *args)

    state = {"rope_calls": 0}
    return rope_cos_sin


def patches(bug: str) -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """(module, attribute, wrap(original) -> replacement) for every architecture module the bug touches."""
    out: list[tuple[Any, str, Callable[[Any], Any]]] = []
    for arch, mod in ARCH_MODULES.items():
        if bug not in BUGS or arch not in BUGS[bug].archs:  # "none": the control
            continue
        if bug in ("rms_eps", "norm_weights", "gate_weights") or (bug == "attn_scale" and arch == "gemma3"):
            out.append((mod, BLOCK[arch], functools.partial(_block_wrapper, arch, bug)))
        elif bug == "attn_scale":
            out.append((mod, "attention", _scaled_attention))
        elif bug == "rope_base":
            out.append((mod, "rope_cos_sin", functools.partial(_rope_wrapper, arch)))
        elif bug == "gelu_erf":
            out.append((mod, "gelu_tanh", lambda f: _gelu_erf))
        elif bug == "gqa_map":
            out.append((mod, "attention", _gqa_wrong))
    return out


def apply(bug: str) -> Callable[[], None]:
    """Plant `bug`; returns the function that removes it."""
    undo: list[tuple[Any, str, Any]] = []
    for mod, attr, wrap in patches(bug):
        orig = getattr(mod, attr)
        undo.append((mod, attr, orig))
        setattr(mod, attr, wrap(orig))

    def remove() -> None:
        for mod, attr, orig in reversed(undo):
            setattr(mod, attr, orig)

    return remove


@contextmanager
def planted(bug: str) -> Iterator[None]:
    remove = apply(bug)
    try:
        yield
    finally:
        remove()


class PlantedEngine:
    """A protocol-v2 implementation object (engines/pyhost.py): the numpy engine with one bug, for a py: lane."""

    def __init__(self, model_path: str, bug: str) -> None:
        from parity.engines.numpy.engine import NumpyEngine

        apply(bug)  # this process serves one bug for its lifetime
        self.bug = bug
        self.engine = NumpyEngine(model_path)

    def describe(self) -> dict[str, str]:
        return {"name": f"numpy+{self.bug}", "version": "planted"}

    def logits(self, tokens: Sequence[int]) -> Array:
        return self.engine.logits(list(tokens))

    def greedy(self, tokens: Sequence[int], n: int) -> list[int]:
        return self.engine.greedy(list(tokens), n)

    def tensors(
        self, tokens: Sequence[int], names: Sequence[str] | None = None, replace: Mapping[str, Array] | None = None
    ) -> dict[str, Array]:
        return self.engine.tensors(list(tokens), names, replace)


def _factory(bug: str) -> Callable[[str], PlantedEngine]:
    def make(model_path: str) -> PlantedEngine:
        return PlantedEngine(model_path, bug)

    return make


factory_rms_eps = _factory("rms_eps")
factory_rope_base = _factory("rope_base")
factory_attn_scale = _factory("attn_scale")
factory_gelu_erf = _factory("gelu_erf")
factory_gqa_map = _factory("gqa_map")
factory_norm_weights = _factory("norm_weights")
factory_gate_weights = _factory("gate_weights")


def factory_clean(model_path: str) -> PlantedEngine:
    """The unmodified numpy engine through the same py: path (the control)."""
    return PlantedEngine(model_path, "none")
