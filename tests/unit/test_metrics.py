from __future__ import annotations

import numpy as np

from parity.compare import metrics


def test_identical_logits() -> None:
    x = np.random.default_rng(0).normal(size=(3, 50))
    rows = metrics.position_rows(x, x.copy(), [1, 2, 3])
    s = metrics.summarize(rows, metrics.Thresholds(0.999, 1e-6))
    assert s["all_passed"] and s["first_divergence"] is None
    assert abs(s["min_cosine"] - 1.0) < 1e-12 and s["max_abs"] == 0.0 and s["mean_kl"] < 1e-12
    assert s["top1_agreement"] == 1.0
    assert rows[0]["top5_ours"] == rows[0]["top5_ref"]


def test_values_against_hand_computation() -> None:
    a = np.array([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    b = np.array([[1.0, 2.0, 4.0, 0.0, 0.0, 0.0]])
    r = metrics.position_rows(a, b, [7])[0]
    assert np.isclose(r["mse"], 1.0 / 6)
    assert r["max_abs"] == 1.0 and np.isclose(r["l2"], 1.0)
    assert np.isclose(r["cosine"], 17.0 / (np.sqrt(14) * np.sqrt(21)))
    pa, pb = np.exp(a[0]) / np.exp(a[0]).sum(), np.exp(b[0]) / np.exp(b[0]).sum()
    assert np.isclose(r["kl"], float((pb * np.log(pb / pa)).sum()))
    assert r["ref_top1_margin"] == 2.0 and r["token_id"] == 7


def test_first_divergence_reported() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 20))
    b = a.copy()
    b[2] = -b[2]
    s = metrics.summarize(metrics.position_rows(a, b, [1, 2, 3, 4]), metrics.Thresholds(0.999, 1.0))
    assert not s["all_passed"]
    assert s["first_divergence"]["pos"] == 2 and s["first_divergence"]["token_id"] == 3


def test_mse_threshold_alone_fails_a_lane() -> None:
    a = np.ones((1, 10))
    s = metrics.summarize(metrics.position_rows(a, a * 2, [0]), metrics.Thresholds(0.5, 0.1))
    assert s["min_cosine"] > 0.999 and not s["all_passed"]


def test_top1_agreement_only_counts_decisive_positions() -> None:
    a = np.array([[1.0, 1.01, 0.0], [0.0, 3.0, 0.0]])
    b = np.array([[1.01, 1.0, 0.0], [0.0, 3.0, 0.0]])
    s = metrics.summarize(metrics.position_rows(a, b, [0, 1]), metrics.Thresholds(0.9, 1.0))
    assert s["top1_agreement"] == 0.5
    assert s["top1_agreement_decisive"] == 1.0 and s["decisive_positions"] == 1


def test_top1_agreement_is_null_without_a_decisive_position() -> None:
    a = np.array([[1.0, 1.01, 0.0]])  # the reference's lead is below the decisive margin
    s = metrics.summarize(metrics.position_rows(a, a[:, ::-1].copy(), [0]), metrics.Thresholds(0.1, 10.0))
    assert s["decisive_positions"] == 0 and s["top1_agreement_decisive"] is None


def _ref(n_prompt: int, steps: list[list[float]]) -> np.ndarray:
    """Reference logits over prompt + generated: rows n_prompt-1+k hold step k's distribution."""
    v = len(steps[0])
    rows = np.zeros((n_prompt + len(steps), v))
    for k, logits in enumerate(steps):
        rows[n_prompt - 1 + k] = logits
    return rows


def test_greedy_identical() -> None:
    g = metrics.greedy_check([2, 1], [2, 1], _ref(3, [[0, 0, 5.0], [0, 5.0, 0]]), 3, 0.1)
    assert g["verdict"] == "identical" and g["first_difference"] is None and g["ref_prob_gap"] is None


def test_greedy_flip_at_a_decisive_step_is_a_mismatch() -> None:
    # step 1: the reference prefers token 1 by far (p ~ 0.99); ours took token 0
    ref = _ref(3, [[0, 0, 5.0], [0, 5.0, 0]])
    g = metrics.greedy_check([2, 0], [2, 1], ref, 3, 0.1)
    assert g["verdict"] == "mismatch" and g["first_difference"] == 1
    assert g["ref_prob_gap"] > 0.9


def test_greedy_flip_at_a_near_tie_is_a_tie_flip() -> None:
    ref = _ref(3, [[0, 0, 5.0], [2.0, 2.01, -9.0]])  # top-2 probabilities differ by ~0.005
    g = metrics.greedy_check([2, 0], [2, 1], ref, 3, 0.1)
    assert g["verdict"] == "tie_flip" and 0 < g["ref_prob_gap"] < 0.01
    # the same flip with a zero margin is a mismatch: the margin decides, nothing else
    assert metrics.greedy_check([2, 0], [2, 1], ref, 3, 0.0)["verdict"] == "mismatch"


def test_greedy_length_difference_is_judged_at_the_missing_step() -> None:
    ref = _ref(2, [[0, 9.0, 0], [9.0, 0, 0]])
    g = metrics.greedy_check([1, 0], [1], ref, 2, 0.1)
    assert g["first_difference"] == 1 and g["verdict"] == "mismatch"


def test_first_difference() -> None:
    assert metrics.first_difference([1, 2], [1, 2]) is None
    assert metrics.first_difference([1, 2], [1, 3]) == 1
    assert metrics.first_difference([1], [1, 3]) == 1
