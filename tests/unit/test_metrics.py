from __future__ import annotations

import numpy as np

from parity import metrics


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


def test_first_difference() -> None:
    assert metrics.first_difference([1, 2], [1, 2]) is None
    assert metrics.first_difference([1, 2], [1, 3]) == 1
    assert metrics.first_difference([1], [1, 3]) == 1
