"""Per-item verdicts of a suite, the worst items, and the KLD histogram of the receipt.

Two rules (`--verdict`, as `parity run`; README, "Suites"):

- `calibrated` (the default): an item passes when it sits within k = 3 times the reference's own variation on
  it, by the rule of parity.compare.calibrate (README, "Verdicts"): its mean KL(ref || impl) and its max
  |dlogit| over its scored positions are each at most k x the item's floor, and every top-1 flip is within k x
  the reference's own lead movement at that position (or its top-2 probabilities differ by less than
  `--tie-margin`). The item's floor is the rounding model of the reference's working precision on the item's
  own logits (sigma = u sqrt(n) std(logits), eps = u sqrt(n) max|logit| per position), scaled up by how far
  the reference's measured variation exceeded that model on a sample of the suite's items (parity.suite.calibrate:
  stepwise and repack-off evaluations through check/floor.py, cached per user). The per-position evidence
  this needs (`evidence()`, computed where the logits are, in the worker) is kept in the item's record.
  An item's `ratio` is its largest check in floor units (mean KL, max |dlogit|): it passes when ratio <= k and
  no top-1 flip is decisive.
- `fixed` (`--verdict fixed`, or `--max-mean-kld`/`--max-kld-p99`/`--min-same-top` given without a mode): the
  user's thresholds, for the quantisation question (how far may a Q4_0 file drift from F16 before it is not
  good enough is the user's call, not the reference's noise). An item passes when its mean KLD (reference ||
  implementation, nats per scored position) is at most `--max-mean-kld` (default 1e-3: far above the ~1e-9
  of a correct port of the same F32 file, far below a real bug or a 4-bit quantisation's ~1e-2), and, when
  given, its 99th KLD percentile at most `--max-kld-p99` and its same-top fraction at least `--min-same-top`.

An item whose evaluation failed is an error. Statistics per item are parity.suite.stats.summarize over that
item's positions (llama-perplexity's definitions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.compare import calibrate, metrics
from parity.suite import stats

DEFAULT_MAX_MEAN_KLD = 1e-3
KL32_MIN = 1e-5  # an item's mean KL from which its evidence computes KL with float32 exponentials (evidence())
Z = 3.0  # standard errors of an item's mean KL the calibrated floor allows for (verdicts.judge)
N_WORST = 10
# log10 bins of per-position KLD in nats: 1e-12 .. 1e2, four per decade
HIST_EDGES = tuple(10.0 ** (-12 + k / 4) for k in range(4 * 14 + 1))


@dataclass(frozen=True)
class Thresholds:
    """The fixed rule (`--verdict fixed`)."""

    max_mean_kld: float = DEFAULT_MAX_MEAN_KLD
    max_kld_p99: float | None = None
    min_same_top: float | None = None
    mode = "fixed"

    def to_dict(self) -> dict[str, float | None]:
        return {"max_mean_kld": self.max_mean_kld, "max_kld_p99": self.max_kld_p99, "min_same_top": self.min_same_top}

    def rule(self) -> str:
        parts = [f"mean KLD <= {self.max_mean_kld:g}"]
        if self.max_kld_p99 is not None:
            parts.append(f"KLD 99th percentile <= {self.max_kld_p99:g}")
        if self.min_same_top is not None:
            parts.append(f"same top >= {self.min_same_top:g}")
        return "an item passes when its " + " and ".join(parts) + " (nats per scored position)"


@dataclass(frozen=True)
class Calibrated:
    """The calibrated rule (the default): `floor` is the suite's floor record (parity.suite.calibrate.measure:
    `status`, `rounding.relative` = u sqrt(n), `scale` = the measured variation over the rounding model)."""

    floor: Mapping[str, Any] = field(default_factory=dict)
    tie_margin: float = 0.01
    k: float = calibrate.K
    mode = "calibrated"

    def to_dict(self) -> dict[str, float | None]:
        return {"k": self.k, "tie_margin": self.tie_margin}

    def rule(self) -> str:
        return (
            f"an item passes within k = {self.k:g} x the reference's own variation on it "
            f"(mean KL, max |dlogit|, top-1 flips; tie margin {self.tie_margin:g})"
        )

    def dispersion(self) -> float:
        """The reference's per-position KL dispersion (sd / mean) measured on the sample; 1 when unmeasured."""
        cv = self.floor.get("dispersion")
        return 1.0 if cv is None else float(cv)

    def scale(self, name: str) -> float:
        """How far the reference's measured variation exceeded the rounding model on the sample (>= 0)."""
        return float((self.floor.get("scale") or {}).get(name) or 0.0)


Rule = Thresholds | Calibrated


def evidence(ref_rows: np.ndarray, impl_rows: np.ndarray, values: stats.PositionStats) -> dict[str, Any]:
    """What a calibrated verdict needs of one item, per scored position (computed in the worker, where the rows
    are, and kept in the item's record): `kl` KL(ref || impl) (the statistics' own in their float64 encoding,
    else computed here, as llama-perplexity's 16-bit numerics are far coarser than an F32 floor: with float32
    exponentials when the item's mean KL is at least KL32_MIN, else in float64);
    `scale` max |ref logit| and `std` the std of the ref logits (the rounding model's inputs); `max_abs` max
    |impl - ref|; `flips`: where the top-1 tokens differ, the reference's logit lead of its top-1 over the
    implementation's and the gap of their probabilities."""
    ref = np.asarray(ref_rows)
    impl = np.asarray(impl_rows)
    n = ref.shape[0]
    if values.encoding == "float64":
        kl = np.asarray(values.kld, dtype=np.float64)
    else:  # float32 exponentials where their ~2e-8 error is < 0.2% of the item's mean KL, else float64
        kl = metrics.kl_divergence_f32(impl, ref)
        if not (kl.size and kl.mean() >= KL32_MIN):
            kl = _kl64(impl, ref)
    scale = np.abs(ref).max(axis=-1) if n else np.zeros(0)
    std = ref.std(axis=-1) if n else np.zeros(0)  # float32 sums: ample for a rounding model's scale
    max_abs = np.array([float(np.abs(impl[i] - ref[i]).max()) for i in range(n)])
    top_ref, top_impl = ref.argmax(axis=-1), impl.argmax(axis=-1)
    flips = []
    for i in np.flatnonzero(top_ref != top_impl).tolist():
        row = np.asarray(ref[i], dtype=np.float64)
        p = np.exp(row - row.max())
        a, b = int(top_ref[i]), int(top_impl[i])
        flips.append({"i": i, "ref_lead": float(row[a] - row[b]), "ref_prob_gap": float((p[a] - p[b]) / p.sum())})
    return {
        "version": 1,
        "kl": [float(x) for x in np.maximum(kl, 0.0)],
        "scale": [float(x) for x in scale],
        "std": [float(x) for x in std],
        "max_abs": [float(x) for x in max_abs],
        "flips": flips,
    }


def _kl64(impl: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(ref || impl) per row in float64, in blocks of rows (bounded temporaries)."""
    step = max(1, (1 << 22) // max(ref.shape[1], 1))
    parts = [metrics.kl_divergence(impl[i : i + step], ref[i : i + step]) for i in range(0, ref.shape[0], step)]
    return np.concatenate(parts) if parts else np.zeros(0)


def judge(ev: Mapping[str, Any], rule: Calibrated) -> dict[str, Any]:
    """An item's calibrated checks from its evidence: each of mean KL and max |dlogit| against k x
    max(measured, rounding model) (compare.calibrate.floor_check; `measured` is the rounding model times the
    sample's measured scale), the top-1 flips split into ties and decisive ones (compare.calibrate.is_tie), the
    first scored position out of its own floor (index into the scored positions), the reason line."""
    rel = float(rule.floor["rounding"]["relative"])
    kl, scale = np.asarray(ev["kl"], dtype=np.float64), np.asarray(ev["scale"], dtype=np.float64)
    sigma = rel * np.asarray(ev["std"], dtype=np.float64)
    max_abs = np.asarray(ev["max_abs"], dtype=np.float64)
    s_kl, s_abs, s_lead = rule.scale("mean_kl"), rule.scale("max_abs"), rule.scale("lead_move")
    # the floor of a MEAN over this item's m positions, with its sampling error: z standard errors of the
    # reference's own per-position dispersion (measured on the sample; 1 when nothing moved there)
    allowance = 1.0 + Z * rule.dispersion() / math.sqrt(max(kl.size, 1))
    rounding_kl = allowance * float(np.mean(0.5 * sigma**2)) if sigma.size else 0.0
    rounding_abs = rel * float(scale.max(initial=0.0))
    checks = [
        calibrate.floor_check("mean_kl", float(kl.mean()) if kl.size else 0.0, s_kl * rounding_kl, rounding_kl, rule.k),
        calibrate.floor_check("max_abs", float(max_abs.max(initial=0.0)), s_abs * rounding_abs, rounding_abs, rule.k),
    ]
    ties: list[dict[str, Any]] = []
    decisive: list[dict[str, Any]] = []
    for f in ev["flips"]:
        i = int(f["i"])
        floor_row = {"lead_move": s_lead * math.sqrt(2.0) * sigma[i], "sigma": sigma[i]}
        row = {"pos": i, "ref_lead": f["ref_lead"], "ref_prob_gap": f["ref_prob_gap"]}
        tie = calibrate.is_tie(f["ref_lead"], f["ref_prob_gap"], floor_row, rule.k, rule.tie_margin)
        (ties if tie else decisive).append(row)
    flips = {"flips": len(ties) + len(decisive), "ties": ties, "decisive": decisive}
    passed = all(c["passed"] for c in checks) and not decisive
    first = None
    if not passed:
        one = 1.0 + Z * rule.dispersion()  # a single position's allowance
        out = (kl > rule.k * max(s_kl, 1.0) * one * 0.5 * sigma**2) | (max_abs > rule.k * max(s_abs, 1.0) * rel * scale)
        out[[f["pos"] for f in decisive]] = True
        first = int(np.flatnonzero(out)[0]) if out.any() else None
    ratios = [c["ratio"] for c in checks]
    return {
        "passed": passed,
        "ratio": None if None in ratios else max(r for r in ratios if r is not None),
        "checks": checks,
        "top1": flips,
        "first": first,
        "failed": [c["statistic"] for c in checks if not c["passed"]] + (["top1"] if decisive else []),
        "reason": calibrate.reason_line(checks[0], checks[1], flips, rule.k),
    }


def item_row(
    index: int,
    item_id: str,
    n_tokens: int,
    values: stats.PositionStats | None,
    error: str | None,
    rule: Rule,
    ev: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the receipt's `items` (status pass | fail | error | missing); `ev` the item's evidence()."""
    row: dict[str, Any] = {"index": index, "id": item_id, "n_tokens": n_tokens, "n_scored": 0, "reason": None}
    for k in ("mean_kld", "max_kld", "kld_p99", "same_top", "rms_dp", "ppl_ref", "ppl_impl", "seconds"):
        row[k] = None
    if isinstance(rule, Calibrated):
        row.update(ratio=None, floor=None, calibrated=None)
    if values is None:
        row["status"] = "error" if error else "missing"
        row["reason"] = error
        return row
    s = stats.summarize(values)
    row["n_scored"] = s["positions"]
    if not s["positions"]:
        row["status"], row["reason"] = "error", "no scored position"
        return row
    row.update(
        mean_kld=s["kld"]["mean"],
        max_kld=s["kld"]["max"],
        kld_p99=s["kld"]["percentiles"]["99.0"],
        same_top=s["same_top"]["p"],
        rms_dp=s["dp"]["rms"],
        ppl_ref=s["ppl_ref"]["value"],
        ppl_impl=s["ppl_impl"]["value"],
    )
    if isinstance(rule, Calibrated):
        return _calibrated_row(row, values, rule, ev)
    why = []
    if row["mean_kld"] > rule.max_mean_kld:
        why.append(f"mean KLD {row['mean_kld']:.3g} > {rule.max_mean_kld:g}")
    if rule.max_kld_p99 is not None and row["kld_p99"] > rule.max_kld_p99:
        why.append(f"KLD p99 {row['kld_p99']:.3g} > {rule.max_kld_p99:g}")
    if rule.min_same_top is not None and row["same_top"] < rule.min_same_top:
        why.append(f"same top {row['same_top']:.4g} < {rule.min_same_top:g}")
    row["status"] = "fail" if why else "pass"
    row["reason"] = "; ".join(why) or None
    return row


def _calibrated_row(
    row: dict[str, Any], values: stats.PositionStats, rule: Calibrated, ev: Mapping[str, Any] | None
) -> dict[str, Any]:
    if rule.floor.get("status") != "measured":
        row["status"] = "error"
        row["reason"] = f"the reference's own variation could not be measured: {rule.floor.get('error')}"
        return row
    if ev is None or len(ev.get("kl", ())) != len(values):
        row["status"] = "error"
        row["reason"] = (
            "no calibration evidence in this item's record (computed under --verdict fixed): judge it with "
            "--verdict fixed, or compute it again in a new --out-dir"
        )
        return row
    j = judge(ev, rule)
    first = None if j["first"] is None else int(values.position[j["first"]])
    kl_check, abs_check = j["checks"]
    row.update(ratio=j["ratio"], floor=kl_check["floor"], status="pass" if j["passed"] else "fail")
    row["calibrated"] = {
        "mean_kl": kl_check["value"],
        "mean_kl_floor": kl_check["floor"],
        "mean_kl_ratio": kl_check["ratio"],
        "max_abs": abs_check["value"],
        "max_abs_floor": abs_check["floor"],
        "max_abs_ratio": abs_check["ratio"],
        "ties": len(j["top1"]["ties"]),
        "decisive": [int(values.position[f["pos"]]) for f in j["top1"]["decisive"]],
        "first": first,
        "failed": j["failed"],
    }
    row["reason"] = j["reason"] + ("" if first is None else f"; first at position {first}")
    return row


_RANK = {"error": 0, "fail": 1, "pass": 2, "missing": 3}


def _badness(r: Mapping[str, Any]) -> float:
    """What ranks items of one status: the calibrated ratio when the row has one, else its mean KLD."""
    v = r.get("ratio") if r.get("ratio") is not None else r.get("mean_kld")
    return float(v) if v is not None else math.inf


def worst(rows: list[dict[str, Any]], n: int = N_WORST) -> list[int]:
    """Indices of the worst items: errors, then failures, then passes, each by ratio in floor units (calibrated)
    or mean KLD (fixed), highest first."""
    ranked = [r for r in rows if r["status"] != "missing"]
    ranked.sort(key=lambda r: (_RANK[r["status"]], -_badness(r), r["index"]))
    return [r["index"] for r in ranked[:n]]


def histogram(kld: np.ndarray) -> dict[str, Any]:
    """Counts of per-position KLD in HIST_EDGES' bins, with what falls below and above them."""
    edges = np.asarray(HIST_EDGES)
    counts, _ = np.histogram(kld[(kld >= edges[0]) & (kld < edges[-1])], bins=edges)
    return {
        "quantity": "kld",
        "edges": list(HIST_EDGES),
        "counts": [int(c) for c in counts],
        "below": int(np.count_nonzero(kld < edges[0])),
        "above": int(np.count_nonzero(kld >= edges[-1])),
    }


def overall(rows: list[dict[str, Any]], rule: Rule) -> dict[str, Any]:
    """The run's verdict: error > fail > incomplete > pass, with counts and a one-line reason (calibrated: the
    largest ratio and its item)."""
    count = {s: sum(1 for r in rows if r["status"] == s) for s in ("pass", "fail", "error", "missing")}
    if count["error"]:
        status, reason = "error", f"{count['error']} item(s) could not be evaluated (a side failed); see their reasons"
    elif count["fail"]:
        status, reason = "fail", f"{count['fail']} of {len(rows)} item(s) fail the rule ({rule.rule()})"
    elif count["missing"]:
        status, reason = "incomplete", f"{count['missing']} of {len(rows)} item(s) are not done"
    elif not rows:
        status, reason = "incomplete", "no items"
    else:
        status, reason = "pass", f"all {len(rows)} item(s) pass ({rule.rule()})"
    out: dict[str, Any] = {
        "mode": rule.mode,
        "rule": rule.rule(),
        "thresholds": rule.to_dict(),
        "status": status,
        "n_pass": count["pass"],
        "n_fail": count["fail"],
        "n_error": count["error"],
        "reason": reason,
    }
    if isinstance(rule, Calibrated):
        judged = [r for r in rows if r.get("ratio") is not None]
        top = max(judged, key=lambda r: (r["ratio"], -r["index"]), default=None)
        out.update(k=rule.k, statistic=calibrate.STATISTIC, max_ratio=None if top is None else top["ratio"])
        out["max_ratio_item"] = None if top is None else {"index": top["index"], "id": top["id"]}
        if top is not None:
            out["reason"] += f"; largest ratio {top['ratio']:.3g} (k = {rule.k:g}) at #{top['index']} {top['id']}"
    return out


def floor_line(floor: dict[str, Any] | None) -> str:
    """One line: how the reference's own variation was measured, its scales, cost (calibrated receipts)."""
    if not floor:
        return "none (--verdict fixed)"
    if floor.get("status") != "measured":
        return f"could not be measured: {floor.get('error')}"
    sc, rnd = floor.get("scale") or {}, floor.get("rounding") or {}
    samples = floor.get("samples") or []
    moved = sorted({c["name"].split(":")[0] for c in floor.get("configs") or [] if c.get("moved")})
    hits = sum(1 for x in samples if x.get("cache_hit"))
    cv = floor.get("dispersion")
    return (
        f"rounding model u = {rnd.get('unit_roundoff', 0):.3g} ({rnd.get('format')}) x sqrt({rnd.get('n_matmul')}) matmuls; "
        f"measured on {len(samples)} sampled item(s) ({sum(x['n_tokens'] for x in samples)} tokens; "
        f"{', '.join(moved) or 'no configuration'} moved the logits) at {sc.get('mean_kl', 0):.3g}x the model in mean KL, "
        f"{sc.get('max_abs', 0):.3g}x in max |dlogit|, {sc.get('lead_move', 0):.3g}x in lead movement; per-position "
        f"dispersion {'n/a (1 assumed)' if cv is None else f'{cv:.2g}'}; {floor.get('seconds', 0):.2f} s "
        f"({hits} of {len(samples)} from the cache)"
    )


EXIT_CODES = {"pass": 0, "fail": 1, "error": 1, "incomplete": 2}
