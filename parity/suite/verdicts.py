"""Per-item verdicts of a suite, the worst items, and the KLD histogram of the receipt.

The verdict is `fixed`: the user's thresholds, which is what a quantisation question needs (how far may a
Q4_0 file drift from F16 before it is not good enough is the user's call, not the reference's noise). An item
passes when its mean KLD (reference || implementation, nats per scored position) is at most `--max-mean-kld`
(default 1e-3: far above the ~1e-9 of a correct port of the same F32 file, far below a real bug or a 4-bit
quantisation's ~1e-2), and, when given, its 99th KLD percentile at most `--max-kld-p99` and its same-top
fraction at least `--min-same-top`. An item whose evaluation failed is an error. Statistics per item are
parity.suite.stats.summarize over that item's positions (llama-perplexity's definitions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.suite import stats

DEFAULT_MAX_MEAN_KLD = 1e-3
N_WORST = 10
# log10 bins of per-position KLD in nats: 1e-12 .. 1e2, four per decade
HIST_EDGES = tuple(10.0 ** (-12 + k / 4) for k in range(4 * 14 + 1))


@dataclass(frozen=True)
class Thresholds:
    max_mean_kld: float = DEFAULT_MAX_MEAN_KLD
    max_kld_p99: float | None = None
    min_same_top: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"max_mean_kld": self.max_mean_kld, "max_kld_p99": self.max_kld_p99, "min_same_top": self.min_same_top}

    def rule(self) -> str:
        parts = [f"mean KLD <= {self.max_mean_kld:g}"]
        if self.max_kld_p99 is not None:
            parts.append(f"KLD 99th percentile <= {self.max_kld_p99:g}")
        if self.min_same_top is not None:
            parts.append(f"same top >= {self.min_same_top:g}")
        return "an item passes when its " + " and ".join(parts) + " (nats per scored position)"


def item_row(
    index: int, item_id: str, n_tokens: int, values: stats.PositionStats | None, error: str | None, th: Thresholds
) -> dict[str, Any]:
    """One row of the receipt's `items` (status pass | fail | error | missing)."""
    row: dict[str, Any] = {"index": index, "id": item_id, "n_tokens": n_tokens, "n_scored": 0, "reason": None}
    for k in ("mean_kld", "max_kld", "kld_p99", "same_top", "rms_dp", "ppl_ref", "ppl_impl", "seconds"):
        row[k] = None
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
    why = []
    if row["mean_kld"] > th.max_mean_kld:
        why.append(f"mean KLD {row['mean_kld']:.3g} > {th.max_mean_kld:g}")
    if th.max_kld_p99 is not None and row["kld_p99"] > th.max_kld_p99:
        why.append(f"KLD p99 {row['kld_p99']:.3g} > {th.max_kld_p99:g}")
    if th.min_same_top is not None and row["same_top"] < th.min_same_top:
        why.append(f"same top {row['same_top']:.4g} < {th.min_same_top:g}")
    row["status"] = "fail" if why else "pass"
    row["reason"] = "; ".join(why) or None
    return row


_RANK = {"error": 0, "fail": 1, "pass": 2, "missing": 3}


def worst(rows: list[dict[str, Any]], n: int = N_WORST) -> list[int]:
    """Indices of the worst items: errors, then failures, then passes, each by mean KLD (highest first)."""
    ranked = [r for r in rows if r["status"] != "missing"]
    ranked.sort(
        key=lambda r: (_RANK[r["status"]], -(r["mean_kld"] if r["mean_kld"] is not None else np.inf), r["index"])
    )
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


def overall(rows: list[dict[str, Any]], th: Thresholds) -> dict[str, Any]:
    """The run's verdict: error > fail > incomplete > pass, with counts and a one-line reason."""
    count = {s: sum(1 for r in rows if r["status"] == s) for s in ("pass", "fail", "error", "missing")}
    if count["error"]:
        status, reason = "error", f"{count['error']} item(s) could not be evaluated (a side failed); see their reasons"
    elif count["fail"]:
        status, reason = "fail", f"{count['fail']} of {len(rows)} item(s) fail the rule ({th.rule()})"
    elif count["missing"]:
        status, reason = "incomplete", f"{count['missing']} of {len(rows)} item(s) are not done"
    elif not rows:
        status, reason = "incomplete", "no items"
    else:
        status, reason = "pass", f"all {len(rows)} item(s) pass ({th.rule()})"
    return {
        "mode": "fixed",
        "rule": th.rule(),
        "thresholds": th.to_dict(),
        "status": status,
        "n_pass": count["pass"],
        "n_fail": count["fail"],
        "n_error": count["error"],
        "reason": reason,
    }


EXIT_CODES = {"pass": 0, "fail": 1, "error": 1, "incomplete": 2}
