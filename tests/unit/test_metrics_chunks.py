"""The chunked comparison (metrics.iter_distances and its users) gives the numbers of the whole-matrix code to the
bit. The oracles below are the implementations it replaced, kept verbatim on metrics.distances()."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from parity.compare import calibrate, metrics


def _rows_oracle(ours: np.ndarray, ref: np.ndarray, tokens: list[int], want: frozenset[str]) -> list[dict[str, Any]]:
    dist = metrics.distances(ours, ref)
    a, b, diff, cos, lp_b, kl = dist.ours, dist.ref, dist.diff, dist.cosine, dist.logp_ref, dist.kl
    rows = []
    for i in range(a.shape[0]):
        top_a = _top_oracle(a[i], metrics.TOPK)
        top_b = _top_oracle(b[i], metrics.TOPK)
        second_b = b[i, top_b[1]] if b.shape[1] > 1 else b[i, top_b[0]]
        p_b = np.exp(lp_b[i, top_b[:2]])
        rows.append(
            {
                "pos": i,
                "token_id": int(tokens[i]),
                "cosine": float(cos[i]),
                "l2": float(np.sqrt(np.add.reduce(diff[i] ** 2))),
                "mse": float(np.mean(diff[i] ** 2)),
                "max_abs": float(np.max(np.abs(diff[i]))),
                "kl": float(max(kl[i], 0.0)) if "kl" in want else None,
                "top1_agree": bool(top_a[0] == top_b[0]),
                "topk_agree": float(len(set(top_a.tolist()) & set(top_b.tolist())) / metrics.TOPK)
                if "topk" in want
                else None,
                "ref_top1_margin": float(b[i, top_b[0]] - second_b),
                "ref_top1_prob_margin": float(p_b[0] - p_b[-1]),
                "top5_ours": [int(t) for t in top_a],
                "top5_ref": [int(t) for t in top_b],
            }
        )
    return rows


def _top_oracle(row: np.ndarray, k: int) -> np.ndarray:
    k = min(k, row.shape[0])
    part = np.argpartition(-row, k - 1)[:k]
    kth = row[part].min()
    cand = np.flatnonzero(row >= kth)
    order = np.lexsort((cand, -row[cand]))
    return cand[order][:k]


def test_top_equals_the_argpartition_top() -> None:
    rng = np.random.default_rng(5)
    rows = [rng.normal(size=1000), np.round(rng.normal(size=300), 1), np.zeros(9), np.array([1.0, -0.0, 0.0, 0.0])]
    with_nan = rng.normal(size=50)
    with_nan[[3, 7]] = np.nan
    rows += [with_nan, np.array([np.nan, 1.0, np.nan]), np.array([2.0])]
    for row in rows:
        for k in (1, 2, 5):
            assert metrics._top(row, k).tolist() == _top_oracle(row, k).tolist()
            assert metrics._top(row, k, np.empty_like(row)).tolist() == _top_oracle(row, k).tolist()


def _config_distance_oracle(base: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    d = metrics.distances(np.asarray(other), np.asarray(base))
    rows = np.arange(d.ref.shape[0])
    a, b = calibrate._top2(d.ref)
    return {
        "kl": np.maximum(d.kl, 0.0),
        "max_abs": np.abs(d.diff).max(axis=-1),
        "lead_move": np.abs((d.ref[rows, a] - d.ref[rows, b]) - (d.ours[rows, a] - d.ours[rows, b])),
        "top1_flip": d.ours.argmax(axis=-1) != a,
    }


def _top1_flips_oracle(
    ours: np.ndarray, ref: np.ndarray, floor_rows: list[dict[str, Any]], k: float, tie_margin: float
) -> dict[str, Any]:
    ours64, ref64 = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    mine, theirs = ours64.argmax(axis=-1), ref64.argmax(axis=-1)
    ties: list[dict[str, Any]] = []
    decisive: list[dict[str, Any]] = []
    for i in np.flatnonzero(mine != theirs).tolist():
        lead = float(ref64[i, theirs[i]] - ref64[i, mine[i]])
        p = np.exp(ref64[i] - ref64[i].max())
        gap = float((p[theirs[i]] - p[mine[i]]) / p.sum())
        row = {"pos": i, "ref_lead": lead, "ref_prob_gap": gap, "ref_lead_move": floor_rows[i]["lead_move"]}
        (ties if calibrate.is_tie(lead, gap, floor_rows[i], k, tie_margin) else decisive).append(row)
    return {"flips": len(ties) + len(decisive), "ties": ties, "decisive": decisive}


def _logits(rng: np.random.Generator, n: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logit pairs shaped like a lane's: a heavy-tailed reference, ours a small perturbation of it, with
    exact ties at the top of some rows and a flipped top-1 at another (the paths _top and top1_flips take)."""
    ref = (rng.standard_t(4, size=(n, vocab)) * 3.0).astype(np.float32)
    ours = (ref + rng.normal(scale=1e-3, size=(n, vocab))).astype(np.float32)
    ref[1, :7] = ref[1].max() + 1.0  # seven-way tie at the top: the lower index wins
    ours[2, 5] = ref[2].max() + 0.5  # top-1 flip
    return ours, ref


@pytest.mark.parametrize(("n", "vocab", "chunk"), [(5, 262_144, None), (7, 50, 3), (5, 1000, 1), (6, 33, 64)])
def test_position_rows_equal_the_whole_matrix_rows(n: int, vocab: int, chunk: int | None) -> None:
    ours, ref = _logits(np.random.default_rng(n), n, vocab)
    tokens = list(range(100, 100 + n))
    old = metrics.CHUNK_ELEMENTS
    try:
        if chunk is not None:
            metrics.CHUNK_ELEMENTS = chunk * vocab
        for want in (frozenset(metrics.METRICS), frozenset({"mse"})):
            assert metrics.position_rows(ours, ref, tokens, want) == _rows_oracle(ours, ref, tokens, want)
    finally:
        metrics.CHUNK_ELEMENTS = old


def test_iter_distances_equals_distances_bit_for_bit() -> None:
    ours, ref = _logits(np.random.default_rng(3), 11, 4096)
    whole = metrics.distances(ours, ref)
    for rows in (1, 4, 11, 50):
        chunks = list(metrics.iter_distances(ours, ref, rows))  # each chunk's arrays are overwritten by the next
        assert [c.start for c in chunks] == list(range(0, 11, rows))
        parts = [(c.cosine.copy(), c.kl.copy(), c.max_abs.copy()) for c in metrics.iter_distances(ours, ref, rows)]
        for j, name in enumerate(("cosine", "kl")):
            assert np.array_equal(np.concatenate([p[j] for p in parts]), getattr(whole, name))
        assert np.array_equal(np.concatenate([p[2] for p in parts]), np.abs(whole.diff).max(axis=-1))
    for c in metrics.iter_distances(ours, ref, 4):
        k = slice(c.start, c.start + c.ours.shape[0])
        for name in ("ours", "ref", "diff", "logp_ref"):
            assert np.array_equal(getattr(c, name), getattr(whole, name)[k])


def test_verdict_floor_and_gap_equal_the_whole_matrix_code() -> None:
    ours, ref = _logits(np.random.default_rng(4), 6, 20_000)
    metrics.CHUNK_ELEMENTS, old = 2 * 20_000, metrics.CHUNK_ELEMENTS
    try:
        got = calibrate.config_distance(ref, ours)
        want = _config_distance_oracle(ref, ours)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        d = metrics.distances(ours, ref)
        assert metrics.logit_gap(ours, ref) == {
            "min_cosine": float(d.cosine.min()),
            "max_abs": float(np.abs(d.diff).max()),
            "mean_kl": float(d.kl.mean()),
        }
        eps = calibrate.rounding_epsilon(ref, calibrate.U_INT8, 100)
        _, floor_rows, summary = calibrate.measure_floor(ref, {"other": ours + np.float32(1e-3)}, eps)
        v = calibrate.verdict(ours, ref, floor_rows, summary, tie_margin=0.01)
        kl, max_abs = np.maximum(d.kl, 0.0), np.abs(d.diff).max(axis=-1)
        assert v["checks"][0]["value"] == float(kl.mean()) and v["checks"][1]["value"] == float(max_abs.max())
        assert v["top1"] == _top1_flips_oracle(ours, ref, floor_rows, calibrate.K, 0.01)
        for wanted in (frozenset(metrics.METRICS), frozenset({"mse"})):  # from the lane's rows, or without KL in them
            rows = metrics.position_rows(ours, ref, list(range(6)), wanted)
            assert calibrate.verdict(ours, ref, floor_rows, summary, tie_margin=0.01, rows=rows) == v
        exact = np.zeros((3, 8))  # KL exactly 0 (and its sign) the same from rows as computed
        assert calibrate.verdict(
            exact, exact, floor_rows[:3], summary, 0.01, rows=metrics.position_rows(exact, exact, [1, 2, 3])
        ) == calibrate.verdict(exact, exact, floor_rows[:3], summary, 0.01)
        assert {f["pos"] for f in v["top1"]["ties"] + v["top1"]["decisive"]} >= {2}  # the planted flip is seen
    finally:
        metrics.CHUNK_ELEMENTS = old


def test_empty_and_mismatched_inputs() -> None:
    assert metrics.position_rows(np.zeros((0, 8), np.float32), np.zeros((0, 8), np.float32), []) == []
    assert calibrate.config_distance(np.zeros((0, 8)), np.zeros((0, 8)))["kl"].shape == (0,)
    with pytest.raises(ValueError, match="logit shapes differ"):
        metrics.position_rows(np.zeros((2, 8)), np.zeros((2, 9)), [1, 2])
