"""The calibrated verdict: the implementation's distance from the reference in units of the reference's own noise.

Pure statistics on logit matrices; running the reference configurations is parity.check.floor's job.

The floor. The reference evaluates the same token sequence under configurations that compute the same function
in another evaluation order (one token per decode instead of one batch, weight repacking off, ...). Per
position, the floor is the largest distance any configuration lands from the lane's own evaluation: KL(base ||
config), max |dlogit|, and how far the reference's top-1 vs top-2 logit lead moves. Where the reference is
bit-identical across orders (F32 at this size, or integer dot products such as Q8_0 x Q8_0) the measured floor
is 0, so it is bounded below by a rounding model of the reference's working precision (`rounding_epsilon`):
with u the unit roundoff of the coarsest format its CPU kernels round activations to (2^-24 for F32, 2^-11
for F16, 2^-8 for BF16, half a step of 127 levels for the 8-bit formats every quantized type is multiplied
in) and n the number of matrix multiplies on the path of a token (the model's 2-D weight tensors), the logit
vector is perturbed by a relative r = u * sqrt(n) (one rounding of relative size u per matmul, independent,
adding in quadrature): at most eps = r * max |logit| on any one logit, and sigma = r * std(logits) in rms over
the vocabulary. In KL that costs about sigma^2 / 2 (KL ~ Var_p(dlogit) / 2), and the reference's top-1 vs
top-2 lead moves by about sqrt(2) * sigma. Nothing in it is measured on, or tuned to, a machine.

The verdict (mode calibrated). Three checks, each against k times the effective floor max(measured, model):
- mean KL(ref || impl) over positions (THE statistic, the one the summary line names),
- max |dlogit| over positions,
- top-1 at decisive positions: where the implementation's top-1 differs from the reference's, the
  reference's logit lead of its top-1 over the implementation's must be within k times how far the
  reference itself moves its top-2 lead at that position (max(measured, sqrt(2) sigma)); else it is a decisive flip
  and fails the lane. The same rule turns a greedy-decode mismatch into a tie flip.
K = 3, from the statistic: if the implementation and each reference configuration are independent rounding
perturbations of the same function with rms sigma_i and sigma_r, KL(ref || impl) ~ (sigma_i^2 + sigma_r^2) / 2
while the floor (config vs base) ~ sigma_r^2, so an implementation exactly as precise as the reference scores
1, a more precise one 0.5, and k = 3 admits rounding noise up to sqrt(2k - 1) = 2.2x the reference's in rms,
with room for the floor's own sampling error (a mean over a few dozen heavy-tailed positions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from parity.compare import metrics

K = 3.0
STATISTIC = "mean_kl"

# Unit roundoff of the format ggml's CPU kernels round a matmul's activations to, by weight type name
# (type_traits_cpu[type].vec_dot_type): F32 and F16 and BF16 multiply in their own format; every quantized
# type converts activations to an 8-bit format (Q8_0, Q8_1, Q8_K; bitnet's I2_S to int8), whose rounding
# error is at most half a step of 127 levels relative to the block's largest value.
U_F32 = 2.0**-24
U_F16 = 2.0**-11
U_BF16 = 2.0**-8
U_INT8 = 1.0 / 254.0
_FLOAT_ROUNDOFF = {"F32": U_F32, "F64": U_F32, "F16": U_F16, "BF16": U_BF16}


def activation_roundoff(weight_types: Iterable[str]) -> tuple[float, str]:
    """The coarsest activation rounding among the matmul weight types (names as gguf-py spells them)."""
    best, name = 0.0, "F32"
    for t in weight_types:
        u = _FLOAT_ROUNDOFF.get(t.upper(), U_INT8)
        if u > best:
            best, name = u, t.upper()
    return (best or U_F32), name


def storage_roundoff(stored_types: Iterable[str]) -> tuple[float, str]:
    """The coarsest rounding of values STORED in these formats (a K/V cache): floats as above; a quantized
    cache keeps 2^(b-1)-1 levels per block (Q4: 7, Q5: 15, Q8: 127), half a level relative to the block's max."""
    best, name = 0.0, "F32"
    for t in stored_types:
        key = t.upper()
        u = _FLOAT_ROUNDOFF.get(key)
        if u is None:
            bits = 4 if key.startswith(("Q4", "IQ4")) else 5 if key.startswith("Q5") else 8
            u = 1.0 / (2 * (2 ** (bits - 1) - 1))
        if u > best:
            best, name = u, key
    return (best or U_F32), name


def rounding_epsilon(ref: np.ndarray, unit_roundoff: float, n_matmul: int) -> np.ndarray:
    """Per position (n,): eps = u * sqrt(n_matmul) * max |logit| (the module docstring's rounding model)."""
    scale = np.abs(np.asarray(ref, dtype=np.float64)).max(axis=-1)  # (n,)
    out: np.ndarray = unit_roundoff * math.sqrt(max(n_matmul, 1)) * scale
    return out


def _top2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the largest and second-largest value per row (n,), (n,)."""
    part = np.argpartition(-x, 1, axis=-1)[:, :2]  # (n, 2) unordered
    rows = np.arange(x.shape[0])
    swap = x[rows, part[:, 1]] > x[rows, part[:, 0]]
    first = np.where(swap, part[:, 1], part[:, 0])
    second = np.where(swap, part[:, 0], part[:, 1])
    return first, second


def config_distance(base: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: KL(base || other), max |dlogit|, the move of base's top-1 vs top-2 lead, top-1 flip."""
    parts: dict[str, list[np.ndarray]] = {"kl": [], "max_abs": [], "lead_move": [], "top1_flip": []}
    for d in metrics.iter_distances(np.asarray(other), np.asarray(base)):  # a few rows at a time, same numbers
        rows = np.arange(d.ref.shape[0])
        a, b = _top2(d.ref)
        lead_base = d.ref[rows, a] - d.ref[rows, b]  # (k,)
        lead_other = d.ours[rows, a] - d.ours[rows, b]  # (k,)
        parts["kl"].append(np.maximum(d.kl, 0.0))
        parts["max_abs"].append(d.max_abs)
        parts["lead_move"].append(np.abs(lead_base - lead_other))
        parts["top1_flip"].append(d.ours.argmax(axis=-1) != a)
    empty = {"kl": np.zeros(0), "max_abs": np.zeros(0), "lead_move": np.zeros(0), "top1_flip": np.zeros(0, bool)}
    return {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}


def measure_floor(
    base: np.ndarray, configs: Mapping[str, np.ndarray], epsilon: np.ndarray
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(per-config summaries, per-position floor rows, summary) of the reference against itself.

    `configs` maps a configuration's name to its logits on the same sequence as `base`; `epsilon` is
    rounding_epsilon(base, ...). A position's floor is the largest distance over the configurations.
    Each row also carries the rounding model: `epsilon` (max |dlogit|) and `sigma` (rms dlogit)."""
    base = np.asarray(base, dtype=np.float64)
    n = base.shape[0]
    scale = np.abs(base).max(axis=-1) if n else np.zeros(0)  # (n,)
    rel = np.divide(np.asarray(epsilon, dtype=np.float64), scale, out=np.zeros(n), where=scale > 0)  # (n,): u sqrt(n)
    sigma = rel * (base.std(axis=-1) if n else np.zeros(0))  # (n,)
    per: dict[str, dict[str, np.ndarray]] = {name: config_distance(base, x) for name, x in configs.items()}
    summaries: list[dict[str, Any]] = []
    for name, dist in per.items():
        summaries.append(
            {
                "name": name,
                "moved": bool(dist["max_abs"].max(initial=0.0) > 0.0),
                "mean_kl": float(dist["kl"].mean()) if n else 0.0,
                "max_kl": float(dist["kl"].max(initial=0.0)),
                "max_abs": float(dist["max_abs"].max(initial=0.0)),
                "max_lead_move": float(dist["lead_move"].max(initial=0.0)),
                "top1_flips": int(dist["top1_flip"].sum()),
            }
        )
    zeros = np.zeros(n)
    kl = np.max([d["kl"] for d in per.values()], axis=0) if per else zeros
    max_abs = np.max([d["max_abs"] for d in per.values()], axis=0) if per else zeros
    move = np.max([d["lead_move"] for d in per.values()], axis=0) if per else zeros
    flip = np.any([d["top1_flip"] for d in per.values()], axis=0) if per else zeros.astype(bool)
    a, b = _top2(base)
    margin = base[np.arange(n), a] - base[np.arange(n), b]
    rows = [
        {
            "pos": i,
            "kl": float(kl[i]),
            "max_abs": float(max_abs[i]),
            "lead_move": float(move[i]),
            "top1_flip": bool(flip[i]),
            "ref_top1_margin": float(margin[i]),
            "epsilon": float(epsilon[i]),
            "sigma": float(sigma[i]),
        }
        for i in range(n)
    ]
    # The floor of a mean is the largest mean over configurations (each is one legitimate evaluation order).
    summary = {
        "mean_kl": max((s["mean_kl"] for s in summaries), default=0.0),
        "max_kl": float(kl.max(initial=0.0)),
        "max_abs": float(max_abs.max(initial=0.0)),
        "max_lead_move": float(move.max(initial=0.0)),
        "top1_flips": int(flip.sum()),
        "flip_max_lead": float(margin[flip].max(initial=0.0)),
        "moved": [s["name"] for s in summaries if s["moved"]],
        "rounding_mean_kl": float(np.mean(0.5 * sigma**2)) if n else 0.0,
        "rounding_max_abs": float(np.max(epsilon, initial=0.0)),
    }
    return summaries, rows, summary


def floor_check(statistic: str, value: float, measured: float, rounding: float, k: float) -> dict[str, Any]:
    """One check of a verdict: `value` against k x max(measured floor, rounding model), with its ratio."""
    floor = max(measured, rounding)
    threshold = k * floor
    return {
        "statistic": statistic,
        "value": value,
        "floor": floor,
        "measured_floor": measured,
        "rounding_floor": rounding,
        "threshold": threshold,
        # null when the floor is 0 (all-zero logits): no finite ratio exists
        "ratio": value / floor if floor > 0 else (0.0 if value == 0 else None),
        "passed": bool(value <= threshold),
    }


def _sigma(row: Mapping[str, Any]) -> float:
    """The row's rms rounding perturbation (rows written before it existed: the max-entry bound eps)."""
    return float(row["sigma"] if row.get("sigma") is not None else row["epsilon"])


def is_tie(ref_lead: float, prob_gap: float | None, floor_row: Mapping[str, Any], k: float, tie_margin: float) -> bool:
    """A top-1 flip the reference itself could make: its lead (logits) within k x its own lead movement at
    that position (max(measured, sqrt(2) sigma)), or its top-2 probability gap below --tie-margin."""
    move = max(float(floor_row["lead_move"]), math.sqrt(2.0) * _sigma(floor_row))
    return ref_lead <= k * move or (prob_gap is not None and prob_gap < tie_margin)


def _argmax64(x: np.ndarray) -> np.ndarray:
    """argmax per row of x as float64 (n,), without a float64 copy of x where the conversion is exact (the
    same index: an exact, order-preserving conversion keeps the first maximum first)."""
    x = np.asarray(x)
    exact = x.dtype in (np.float16, np.float32, np.float64)
    out: np.ndarray = (x if exact else np.asarray(x, dtype=np.float64)).argmax(axis=-1)
    return out


def top1_flips(
    ours: np.ndarray, ref: np.ndarray, floor_rows: list[dict[str, Any]], k: float, tie_margin: float
) -> dict[str, Any]:
    """Positions where the implementation's top-1 differs from the reference's: ties vs decisive flips."""
    mine, theirs = _argmax64(ours), _argmax64(ref)
    ties: list[dict[str, Any]] = []
    decisive: list[dict[str, Any]] = []
    for i in np.flatnonzero(mine != theirs).tolist():
        r = np.asarray(ref[i], dtype=np.float64)  # (V,)
        lead = float(r[theirs[i]] - r[mine[i]])
        p = np.exp(r - r.max())
        gap = float((p[theirs[i]] - p[mine[i]]) / p.sum())
        row = {"pos": i, "ref_lead": lead, "ref_prob_gap": gap, "ref_lead_move": floor_rows[i]["lead_move"]}
        (ties if is_tie(lead, gap, floor_rows[i], k, tie_margin) else decisive).append(row)
    return {"flips": len(ties) + len(decisive), "ties": ties, "decisive": decisive}


def greedy_with_floor(
    greedy: dict[str, Any], floor_rows: list[dict[str, Any]], n_prompt: int, k: float
) -> dict[str, Any]:
    """metrics.greedy_check's result, where a mismatch at a step the reference's own lead movement covers is
    a tie flip (`floor_tie` true)."""
    step = greedy.get("first_difference")
    out = dict(greedy)
    if greedy.get("verdict") != "mismatch" or step is None:
        return out
    pos = n_prompt - 1 + step
    if pos < len(floor_rows):
        row = floor_rows[pos]
        if is_tie(float(row["ref_top1_margin"]), None, row, k, 0.0):
            out.update(verdict="tie_flip", floor_tie=True)
    return out


def verdict(
    ours: np.ndarray,
    ref: np.ndarray,
    floor_rows: list[dict[str, Any]],
    floor_summary: Mapping[str, Any],
    tie_margin: float,
    k: float = K,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The calibrated verdict of a lane (see the module docstring) with its one-line reason.

    `first` is the first position to look at when the lane fails (a decisive flip, or KL or max |dlogit|
    above k x that position's own floor), None when it passes. `rows`: metrics.position_rows of the same
    ours and ref, whose KL and max |dlogit| are these (the same numbers: the KL clamped at 0 either way),
    so they are not computed again; without them (or without KL in them) they are."""
    if rows is not None and len(rows) == len(ours) and all(r["kl"] is not None for r in rows):
        kl = np.maximum(np.array([r["kl"] for r in rows], dtype=np.float64), 0.0)  # (n,)
        max_abs = np.array([r["max_abs"] for r in rows], dtype=np.float64)  # (n,)
    else:
        _, max_abs, kl = metrics.row_distances(ours, ref)  # (n,) each
        kl = np.maximum(kl, 0.0)
    flips = top1_flips(ours, ref, floor_rows, k, tie_margin)
    checks = [
        floor_check(
            "mean_kl",
            float(kl.mean()) if kl.size else 0.0,
            float(floor_summary["mean_kl"]),
            float(floor_summary["rounding_mean_kl"]),
            k,
        ),
        floor_check(
            "max_abs",
            float(max_abs.max(initial=0.0)),
            float(floor_summary["max_abs"]),
            float(floor_summary["rounding_max_abs"]),
            k,
        ),
    ]
    main = checks[0]
    passed = all(c["passed"] for c in checks) and not flips["decisive"]
    first = None
    if not passed:
        decisive = {f["pos"] for f in flips["decisive"]}
        for i, row in enumerate(floor_rows):
            sigma = _sigma(row)
            if (
                i in decisive
                or kl[i] > k * max(float(row["kl"]), 0.5 * sigma * sigma)
                or max_abs[i] > k * max(float(row["max_abs"]), float(row["epsilon"]))
            ):
                first = i
                break
    ratios = [c["ratio"] for c in checks]
    return {
        "mode": "calibrated",
        "statistic": STATISTIC,
        "k": k,
        "value": main["value"],
        "floor": main["floor"],
        "ratio": main["ratio"],
        "margin": None if None in ratios else k - max(r for r in ratios if r is not None),
        "passed": passed,
        "failed": [c["statistic"] for c in checks if not c["passed"]] + (["top1"] if flips["decisive"] else []),
        "first": first,
        "reason": reason_line(main, checks[1], flips, k),
        "checks": checks,
        "top1": flips,
    }


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2g}x"


def _floor_note(check: Mapping[str, Any]) -> str:
    """Which floor set the bar: the measured one, or the rounding model where it is larger."""
    if check["rounding_floor"] > check["measured_floor"]:
        return f"rounding model {check['rounding_floor']:.2g} > measured {check['measured_floor']:.2g}"
    return "measured"


def reason_line(kl: Mapping[str, Any], dlogit: Mapping[str, Any], flips: Mapping[str, Any], k: float) -> str:
    """One line, in floor units: why a lane passed or failed."""
    return (
        f"mean KL {kl['value']:.2g} = {_x(kl['ratio'])} the reference's own variation (k = {k:g}; floor "
        f"{_floor_note(kl)}); max |dlogit| {dlogit['value']:.2g} = {_x(dlogit['ratio'])} ({_floor_note(dlogit)}); "
        f"{len(flips['decisive'])} decisive top-1 flips ({len(flips['ties'])} within the reference's own movement)"
    )


def fixed_verdict(summary: Mapping[str, Any], cos_tol: float, mse_tol: float) -> dict[str, Any]:
    """`--verdict fixed`: every position meets --cos-tol and --mse-tol (the rule before calibration)."""
    fd = summary.get("first_divergence")
    passed = bool(summary.get("all_passed"))
    reason = (
        f"every position has cosine >= {cos_tol} and MSE <= {mse_tol}"
        if passed
        else f"position {fd['pos']}: cosine {fd['cosine']:.8f}, MSE {fd['mse']:.3g} (--cos-tol {cos_tol}, --mse-tol {mse_tol})"
        if fd
        else "no positions"
    )
    return {
        "mode": "fixed",
        "statistic": "cosine_mse",
        "k": None,
        "value": summary.get("min_cosine"),
        "floor": None,
        "ratio": None,
        "margin": None,
        "passed": passed,
        "failed": [] if passed else ["cosine_mse"],
        "reason": reason,
    }
