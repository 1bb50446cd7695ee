"""Localisation (issue 14.3): which (layer, op) of an implementation's graph first leaves the reference's noise.

Pure analysis over named graph tensors (parity.engines.base.Implementation.tensors: float32 (n_tokens, width)
arrays in llama.cpp's naming, "attn_norm-3"); parity.check.locate captures them and calls this.

**Metric.** An op's error is the largest per-token relative error

    error(x, ref) = max_i ||x_i - ref_i||_2 / ||ref_i||_2        (rows i = tokens)

It is scale-free, so one tolerance serves an op type in every layer although activations grow through the
layers (and Gemma's span orders of magnitude between tokens); it is per token, so a bug that shows at late
positions only (RoPE is the identity at position 0, a sliding window only bites past its width) is not
averaged away by the early ones; the maximum, because a bug at one position is a bug.

**Op type** = the name without its layer suffix ("attn_norm-5" -> "attn_norm"). **Noise** of an op type = the
largest error between two evaluations of the REFERENCE under two configurations that compute the same function
(parity.check.locate: micro-batch size, threads, weight repacking), over every layer of that type:
- free-running mode: both configurations run freely, so the noise includes what the layers above propagate;
- replay mode: configuration B is teacher-forced with configuration A's tensors, so the noise is local too.

**Tolerance** = K x noise + EPS_REL. EPS_REL is float32 rounding at the tensor's own scale: the metric is
relative to the row's norm, so EPS_REL = EPS_ULPS ulps of float32 (2^-24 each) stands for the different
summation orders of two correct float32 implementations (a dot product of a few hundred terms accumulated in
another order moves its result by tens of ulps of the row's norm). Below it nothing is told apart, which
keeps an F32 model, whose reference noise is often exactly 0, from failing on rounding.

An op is out of tolerance when error > tolerance; the report names the first in graph order, its error, the
noise of its op type and the ops after it (the error's path downstream).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

K_DEFAULT = 3.0  # tolerance = K x the reference's own noise (+ EPS_REL); see K_NOTE
K_NOTE = (
    "k = 3: the noise of an op type is the largest of one sample per configuration (over layers and tokens), "
    "and a correct implementation whose rounding is as large as the reference's own lands at ~1x it (the "
    "numpy engine vs llama.cpp's dequantized-weights configuration on Gemma 3 270M); 3x leaves room for the "
    "sample, as the calibrated logit verdict's k = 3 (compare/calibrate.py)"
)
EPS_ULPS = 64.0
EPS_REL = EPS_ULPS * 2.0**-24  # ~3.8e-6 of the row's norm
N_NEXT = 3  # ops named after the first one

MODES = ("free", "replay")


def split_name(name: str) -> tuple[str, int | None]:
    """("attn_norm-3") -> ("attn_norm", 3); a layer-less name ("result_norm") -> (name, None)."""
    head, sep, tail = name.rpartition("-")
    return (head, int(tail)) if sep and head and tail.isdigit() else (name, None)


def op_type(name: str) -> str:
    return split_name(name)[0]


def row_errors(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-row relative error ||x_i - ref_i|| / ||ref_i|| (float64). A zero reference row: 0 if x_i is zero too,
    else inf. Shapes must agree (a ValueError names them otherwise)."""
    a = np.asarray(x, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape {a.shape} vs the reference's {r.shape}")
    a = a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1)
    r = r.reshape(a.shape)
    diff = np.linalg.norm(a - r, axis=1)
    norm = np.linalg.norm(r, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(norm > 0, diff / np.where(norm > 0, norm, 1.0), np.where(diff > 0, np.inf, 0.0))
    bad = ~np.isfinite(a).all(axis=1)  # NaN/inf in the implementation's row is an infinite error
    out[bad] = np.inf
    return np.asarray(out, dtype=np.float64)


def op_error(x: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """The op's error (the largest per-row relative error) and the row (token position) where it occurs."""
    e = row_errors(x, ref)
    if e.size == 0:
        return 0.0, 0
    i = int(np.argmax(e))
    return float(e[i]), i


def graph_order(names: Iterable[str]) -> list[str]:
    """Names sorted by layer (layer-less inputs first, layer-less outputs last), keeping the given order of the
    names within a layer: the capture's order, which is the order the graph computed them."""
    listed = list(dict.fromkeys(names))

    def key(item: tuple[int, str]) -> tuple[float, int]:
        i, n = item
        layer = split_name(n)[1]
        if layer is not None:
            return float(layer), i
        # layer-less: inputs (embeddings) before layer 0, outputs (result_*) after the last layer
        return (float("inf"), i) if n.startswith("result") else (-1.0, i)

    return [n for _, n in sorted(enumerate(listed), key=key)]


def noise_levels(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per op type: the reference's own variation between configurations A and B (the largest error over the
    layers of that type), with the tensor where it is largest and how many tensors were measured."""
    out: dict[str, dict[str, Any]] = {}
    for name in graph_order(n for n in a if n in b):
        err, _ = op_error(b[name], a[name])
        t = op_type(name)
        cur = out.setdefault(t, {"noise": 0.0, "worst": name, "tensors": 0})
        cur["tensors"] += 1
        if err > cur["noise"]:
            cur.update(noise=err, worst=name)
    return out


def tolerance(noise: float, k: float = K_DEFAULT, eps: float = EPS_REL) -> float:
    return k * noise + eps


@dataclass(frozen=True)
class Localisation:
    """The analysis of one mode: a row per compared tensor in graph order, the first out of tolerance."""

    mode: str
    rows: list[dict[str, Any]]
    first: dict[str, Any] | None
    next: list[str]
    k: float
    eps: float
    missing: list[str]  # reference tensors the implementation did not produce

    @property
    def status(self) -> str:
        return "ok" if self.first is None else "out_of_tolerance"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "status": self.status,
            "k": self.k,
            "eps": self.eps,
            "first": self.first,
            "next": self.next,
            "rows": self.rows,
            "missing": self.missing,
        }


def localise(
    impl: Mapping[str, np.ndarray],
    ref: Mapping[str, np.ndarray],
    noise: Mapping[str, Mapping[str, Any]],
    mode: str,
    *,
    k: float = K_DEFAULT,
    eps: float = EPS_REL,
    n_next: int = N_NEXT,
) -> Localisation:
    """Compare each tensor of `impl` with `ref` (reference configuration A) against its op type's tolerance.

    `noise` comes from noise_levels() for the same mode. An op type the noise measurement did not see gets the
    float32 epsilon alone (its noise is recorded as null). A tensor whose shape differs from the reference's is
    an infinite error (the two graphs disagree on what the tensor is).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows: list[dict[str, Any]] = []
    names = graph_order(ref)
    missing = [n for n in names if n not in impl]
    for name in names:
        if name not in impl:
            continue
        t, layer = split_name(name)
        try:
            err, pos = op_error(impl[name], ref[name])
        except ValueError:
            err, pos = float("inf"), 0
        nz = noise.get(t)
        level = None if nz is None else float(nz["noise"])
        tol = tolerance(level or 0.0, k, eps)
        ratio_noise = None if not level else err / level
        rows.append(
            {
                "name": name,
                "layer": layer,
                "op": t,
                "error": _finite(err),
                "position": pos,
                "noise": level,
                "tolerance": tol,
                "ratio": _finite(err / tol),
                "noise_ratio": _finite(ratio_noise) if ratio_noise is not None else None,
                "out_of_tolerance": bool(err > tol),
            }
        )
    out = [i for i, r in enumerate(rows) if r["out_of_tolerance"]]
    first = rows[out[0]] if out else None
    nxt = [rows[i]["name"] for i in out[1 : 1 + n_next]]
    return Localisation(mode, rows, first, nxt, k, eps, missing)


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite error (NaN rows, shape mismatch) is recorded as null."""
    return float(x) if np.isfinite(x) else None


def summary_line(loc: Mapping[str, Any]) -> str:
    """One line for the lane summary, e.g. "first op out of tolerance: attn_norm-5 (replay error 2.1e-2 = 40x
    the reference's own 5.2e-4 for attn_norm); next: Qcur-5, Kcur-5"."""
    status = loc.get("status")
    if status == "unavailable":
        return f"localisation unavailable: {loc.get('reason')}"
    if status == "error":
        return f"localisation failed: {loc.get('reason')}"
    first = loc.get("first")
    mode = loc.get("mode", "replay")
    n = len(loc.get("rows", []))
    if first is None:
        worst = max(loc.get("rows", []), key=lambda r: r["ratio"] if r["ratio"] is not None else np.inf, default=None)
        tail = f"; closest {worst['name']} at {_fmt(worst['ratio'])}x its tolerance" if worst and worst["ratio"] else ""
        return f"every op within tolerance ({mode}, {n} tensors){tail}"
    err = "inf" if first["error"] is None else _fmt(first["error"])
    if first["noise"]:
        size = "inf" if first["noise_ratio"] is None else _fmt(first["noise_ratio"])
        why = f"{mode} error {err} = {size}x the reference's own {_fmt(first['noise'])} for {first['op']}"
    else:
        why = f"{mode} error {err} > {_fmt(first['tolerance'])}, float32 rounding (the reference's own variation is 0)"
    nxt = ", ".join(loc.get("next") or []) or "none"
    return f"first op out of tolerance: {first['name']} ({why}); next: {nxt}"


def _fmt(x: float) -> str:
    return f"{x:.2g}" if abs(x) < 100 else f"{x:.0f}"


def noise_table(noise: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The receipt's form of noise_levels(): one row per op type."""
    return [{"op": t, **dict(v)} for t, v in noise.items()]


def common_names(*tensor_sets: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Names present in every set, in the first set's order."""
    first, *rest = (list(s) for s in tensor_sets)
    others = [set(s) for s in rest]
    return [n for n in first if all(n in o for o in others)]
