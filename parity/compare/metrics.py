"""Per-position comparison of two logit matrices (ours = implementation under test, ref = C++ backend)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

TOPK = 5
TOP1_MARGIN = 0.05  # top-1 agreement counts only where the reference's top-1 logit leads by this much


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)  # (n, 1)
    z = x - m  # (n, V)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (n, V)
    return out


METRICS = ("mse", "kl", "topk")


def parse_metrics(spec: str) -> frozenset[str]:
    """`--metrics mse,kl,topk`: cosine, L2, MSE and max-abs are always computed; KL and top-k on request."""
    names = frozenset(m.strip() for m in spec.split(",") if m.strip())
    unknown = names - set(METRICS)
    if unknown or not names:
        from parity.errors import UsageError

        raise UsageError(
            f"--metrics {spec!r}: unknown metric(s) {sorted(unknown)}", fix=f"use a comma list of {', '.join(METRICS)}"
        )
    return names


def _top(row: np.ndarray, k: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest values, largest first, ties broken by the lower index (as a stable sort).

    A partition keeps this O(V) per position: a full sort of a 262k vocabulary per position dominated runs.
    `scratch` (row's shape and dtype) saves an allocation per call.
    """
    k = min(k, row.shape[0])
    neg = np.negative(row, out=scratch)
    neg.partition(k - 1)  # neg[k - 1]: the k-th smallest of -row (NaN sorts last, as in argpartition)
    # The k-th value may be tied with values outside the top k: take every index tied with it, then order.
    kth = -neg[k - 1]
    cand = np.flatnonzero(row >= kth)  # (>= k,)
    order = np.lexsort((cand, -row[cand]))  # by value desc, then index asc
    return cand[order][:k]


@dataclass(frozen=True)
class Distances:
    """The distances between two logit matrices at every position, in float64: the one place they are computed."""

    ours: np.ndarray  # (n, V)
    ref: np.ndarray  # (n, V)
    cosine: np.ndarray  # (n,)
    diff: np.ndarray  # (n, V): ours - ref
    logp_ref: np.ndarray  # (n, V): log_softmax(ref)
    kl: np.ndarray  # (n,): KL(ref || ours), unclamped (rounding can make it -1e-17)


def distances(ours: np.ndarray, ref: np.ndarray) -> Distances:
    """Cosine, difference and KL(ref || ours) per position of two (n, V) logit matrices of the same shape."""
    if ours.shape != ref.shape:
        raise ValueError(f"logit shapes differ: {ours.shape} vs {ref.shape}")
    a = ours.astype(np.float64)  # (n, V)
    b = ref.astype(np.float64)  # (n, V)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-300)  # (n,)
    lp_a, lp_b = _log_softmax(a), _log_softmax(b)  # (n, V)
    return Distances(ours=a, ref=b, cosine=cos, diff=a - b, logp_ref=lp_b, kl=_kl(lp_a, lp_b))


CHUNK_ELEMENTS = 1 << 20  # elements per float64 buffer of iter_distances (8 MiB; 4 rows of a 262k vocabulary)


@dataclass(frozen=True)
class ChunkDistances(Distances):
    """distances() of rows start .. start + n of the two matrices, plus max |diff| per row."""

    start: int
    max_abs: np.ndarray  # (n,): max |ours - ref|


def _log_softmax_into(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """_log_softmax(x) written to `out`, `tmp` as scratch: the same operations, without temporaries."""
    np.subtract(x, x.max(axis=-1, keepdims=True), out=out)  # z (n, V)
    np.exp(out, out=tmp)  # (n, V)
    np.subtract(out, np.log(tmp.sum(axis=-1, keepdims=True)), out=out)


def iter_distances(ours: np.ndarray, ref: np.ndarray, rows: int | None = None) -> Iterator[ChunkDistances]:
    """distances() a few rows at a time in six reused float64 buffers (no matrix-sized temporaries: on a 262k
    vocabulary those cost more in page faults than in arithmetic). The numbers are distances()' to the bit:
    every per-row value comes from the same operations, in the same order, on the same contiguous row
    (tests/unit/test_metrics_chunks.py). The arrays of a chunk are overwritten by the next one: copy what
    must outlive it. `rows` per chunk defaults to CHUNK_ELEMENTS // V (at least 1)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        raise ValueError(f"logit shapes differ: {ours.shape} vs {ref.shape}")
    n, width = ours.shape
    step = rows or max(1, CHUNK_ELEMENTS // max(width, 1))
    bufs = np.empty((6, min(step, n), width))  # a, b, diff, log p(ours), log p(ref), scratch
    for i in range(0, n, step):
        k = min(step, n - i)
        a, b, diff, lp_a, lp_b, tmp = (buf[:k] for buf in bufs)
        np.copyto(a, ours[i : i + k])
        np.copyto(b, ref[i : i + k])
        np.multiply(a, b, out=tmp)
        dot = tmp.sum(-1)  # (k,)
        np.multiply(a, a, out=tmp)  # np.linalg.norm(axis=-1): sqrt(add.reduce(x * x))
        norm_a = np.sqrt(np.add.reduce(tmp, axis=-1))
        np.multiply(b, b, out=tmp)
        norm_b = np.sqrt(np.add.reduce(tmp, axis=-1))
        cos = dot / (norm_a * norm_b + 1e-300)  # (k,)
        _log_softmax_into(a, lp_a, tmp)
        _log_softmax_into(b, lp_b, tmp)
        np.subtract(a, b, out=diff)
        np.exp(lp_b, out=tmp)  # _kl: (exp(lp_ref) * (lp_ref - lp_ours)).sum(-1)
        np.subtract(lp_b, lp_a, out=lp_a)
        np.multiply(tmp, lp_a, out=tmp)
        kl = tmp.sum(-1)  # (k,)
        np.abs(diff, out=tmp)
        yield ChunkDistances(
            ours=a, ref=b, cosine=cos, diff=diff, logp_ref=lp_b, kl=kl, start=i, max_abs=tmp.max(axis=-1)
        )


def _kl(lp_ours: np.ndarray, lp_ref: np.ndarray) -> np.ndarray:
    out: np.ndarray = (np.exp(lp_ref) * (lp_ref - lp_ours)).sum(-1)  # (n,)
    return out


def kl_divergence(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(ref || ours) per position of two (n, V) logit matrices in float64: distances()' KL without the rest."""
    return _kl(_log_softmax(ours.astype(np.float64)), _log_softmax(ref.astype(np.float64)))


def kl_divergence_f32(ours: np.ndarray, ref: np.ndarray, rows: int = 16) -> np.ndarray:
    """KL(ref || ours) per position with float32 exponentials and float64 sums, `rows` rows at a time:
    sum_i p_i (ref_i - ours_i) - lse(ref) + lse(ours), two exponentials per element instead of kl_divergence's
    three in float64. Its error is ~2e-8 nats absolute (the float32 exponentials; measured on rows of 4k and
    262k tokens), at a quarter of the cost: the suite's calibrated verdict uses it where an item's KL is far
    above that."""
    a, b = np.asarray(ref, dtype=np.float32), np.asarray(ours, dtype=np.float32)
    out = np.empty(a.shape[0])
    for i in range(0, a.shape[0], rows):
        x, y = a[i : i + rows], b[i : i + rows]
        mx, my = x.max(axis=-1), y.max(axis=-1)
        ex = np.exp(x - mx[:, None])
        zx = ex.sum(axis=-1, dtype=np.float64)
        zy = np.exp(y - my[:, None]).sum(axis=-1, dtype=np.float64)
        mean_diff = (ex * (x - y)).sum(axis=-1, dtype=np.float64) / zx
        out[i : i + rows] = mean_diff - (mx + np.log(zx)) + (my + np.log(zy))
    return out


def row_distances(ours: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position (n,): cosine, max |ours - ref| and KL(ref || ours), unclamped; iter_distances' numbers."""
    chunks = [(c.cosine, c.max_abs, c.kl) for c in iter_distances(ours, ref)]
    cos, max_abs, kl = (np.concatenate([c[j] for c in chunks]) if chunks else np.zeros(0) for j in range(3))
    return cos, max_abs, kl


def logit_gap(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """min cosine, max |delta| and mean KL(ref || ours) over positions (a receipt's `engine_shape_gap` numbers)."""
    cos, max_abs, kl = row_distances(ours, ref)
    return {"min_cosine": float(cos.min()), "max_abs": float(max_abs.max()), "mean_kl": float(kl.mean())}


def position_rows(
    ours: np.ndarray, ref: np.ndarray, tokens: list[int], metrics: frozenset[str] = frozenset(METRICS)
) -> list[dict[str, Any]]:
    """One row per position: cosine, L2, MSE, max-abs, KL(ref || ours), top-k agreement and top-1 margin.

    KL is null unless "kl" is in `metrics`, top-k agreement null unless "topk" is (top-5 ids are always kept).
    The distances come from iter_distances (a few rows at a time, the same numbers as distances()).
    """
    rows = []
    scratch = np.empty(np.shape(ours)[-1])  # (V,) one row, reused
    for chunk in iter_distances(ours, ref):
        a, b, diff, cos, lp_b, kl = chunk.ours, chunk.ref, chunk.diff, chunk.cosine, chunk.logp_ref, chunk.kl
        sse = np.add.reduce(np.square(diff, out=diff), axis=-1)  # diff is this chunk's buffer: not read again
        for j in range(a.shape[0]):
            i = chunk.start + j
            top_a = _top(a[j], TOPK, scratch)
            top_b = _top(b[j], TOPK, scratch)
            second_b = b[j, top_b[1]] if b.shape[1] > 1 else b[j, top_b[0]]
            p_b = np.exp(lp_b[j, top_b[:2]])  # probabilities of the reference's top-2
            rows.append(
                {
                    "pos": i,
                    "token_id": int(tokens[i]),
                    "cosine": float(cos[j]),
                    # sqrt of numpy's pairwise sum, not np.linalg.norm: BLAS's dot splits over its threads, so
                    # the last bits of l2 moved with the thread count (32 of 40 test rows); mse is that sum / V
                    "l2": float(np.sqrt(sse[j])),
                    "mse": float(sse[j] / diff.shape[1]),
                    "max_abs": float(chunk.max_abs[j]),
                    "kl": float(max(kl[j], 0.0)) if "kl" in metrics else None,
                    "top1_agree": bool(top_a[0] == top_b[0]),
                    "topk_agree": float(len(set(top_a.tolist()) & set(top_b.tolist())) / TOPK)
                    if "topk" in metrics
                    else None,
                    "ref_top1_margin": float(b[j, top_b[0]] - second_b),
                    "ref_top1_prob_margin": float(p_b[0] - p_b[-1]),
                    "top5_ours": [int(t) for t in top_a],
                    "top5_ref": [int(t) for t in top_b],
                }
            )
    return rows


@dataclass(frozen=True)
class Thresholds:
    """A lane passes when every position has cosine >= cos_tol and MSE <= mse_tol."""

    cos_tol: float
    mse_tol: float

    def to_dict(self) -> dict[str, float]:
        return {"cos_tol": self.cos_tol, "mse_tol": self.mse_tol, "top1_margin": TOP1_MARGIN}


def divergence_record(r: dict[str, Any]) -> dict[str, Any]:
    """The summary's `first_divergence` entry for the position row `r`."""
    return {
        "pos": r["pos"],
        "cosine": r["cosine"],
        "mse": r["mse"],
        "token_id": r["token_id"],
        "ours_top1": r["top5_ours"][0],
        "ref_top1": r["top5_ref"][0],
    }


def summarize(rows: list[dict[str, Any]], th: Thresholds) -> dict[str, Any]:
    """Aggregate rows; find the first divergent position."""
    first = None
    for r in rows:
        if r["cosine"] < th.cos_tol or r["mse"] > th.mse_tol:
            first = divergence_record(r)
            break
    decisive = [r for r in rows if r["ref_top1_margin"] > TOP1_MARGIN]
    return {
        "all_passed": first is None,
        "first_divergence": first,
        "positions": len(rows),
        "min_cosine": min(r["cosine"] for r in rows),
        "mean_cosine": float(np.mean([r["cosine"] for r in rows])),
        "max_abs": max(r["max_abs"] for r in rows),
        "mean_mse": float(np.mean([r["mse"] for r in rows])),
        "mean_kl": float(np.mean([r["kl"] for r in rows])) if rows[0]["kl"] is not None else None,
        "max_kl": max(r["kl"] for r in rows) if rows[0]["kl"] is not None else None,
        "top1_agreement": float(np.mean([r["top1_agree"] for r in rows])),
        # null, not 100%, when no position was decisive: agreement over nothing proves nothing
        "top1_agreement_decisive": float(np.mean([r["top1_agree"] for r in decisive])) if decisive else None,
        "decisive_positions": len(decisive),
        "mean_topk_agreement": float(np.mean([r["topk_agree"] for r in rows]))
        if rows[0]["topk_agree"] is not None
        else None,
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First index where two token sequences differ (or where one ends), None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def greedy_check(
    ours: list[int], theirs: list[int], ref_logits: np.ndarray, n_prompt: int, tie_margin: float
) -> dict[str, Any]:
    """Compare two greedy continuations of the same prompt; the rule a lane's greedy decode is judged by.

    `ref_logits` are the reference's logits over prompt + `ours` (row i predicts token i + 1), so row
    n_prompt - 1 + k is the reference's distribution at step k given exactly the context both decodes shared
    up to their first difference k. The verdict is "identical"; "tie_flip" when, at step k, the reference's
    top-2 probabilities differ by less than `tie_margin` (rounding can decide a near-tie either way, so the
    lane may still pass); else "mismatch", which fails the lane.
    """
    k = first_difference(ours, theirs)
    out: dict[str, Any] = {
        "ours": list(ours),
        "theirs": list(theirs),
        "first_difference": k,
        "verdict": "identical",
        "ref_prob_gap": None,
        "tie_margin": tie_margin,
    }
    if k is None:
        return out
    row = np.asarray(ref_logits[n_prompt - 1 + k], dtype=np.float64)  # (V,)
    p = np.exp(row - row.max())
    p /= p.sum()
    top2 = np.sort(p)[-2:] if p.shape[0] > 1 else np.array([0.0, p[0]])
    gap = float(top2[1] - top2[0])
    out["ref_prob_gap"] = gap
    out["verdict"] = "tie_flip" if gap < tie_margin else "mismatch"
    return out
