"""compare/calibrate.py: the floor statistics and the calibrated verdict, on hand-built logit matrices."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest

from parity.compare import calibrate, metrics, receipts
from tests.unit.test_receipts import v1, v2

N, V = 12, 50


def _ref(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ref = rng.normal(0.0, 3.0, (N, V))  # (N, V)
    ref[:, 7] += 8.0  # a clear favourite at every position: top-1 decisive everywhere
    return ref


def _floor(ref: np.ndarray, sigma: float, u: float = calibrate.U_F32, n_mm: int = 16) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    configs = {"stepwise": ref + rng.normal(0.0, sigma, ref.shape), "repack_off": ref.copy()}
    eps = calibrate.rounding_epsilon(ref, u, n_mm)
    _, rows, summary = calibrate.measure_floor(ref, configs, eps)
    return {"rows": rows, "summary": summary}


def test_activation_roundoff_is_the_coarsest_format() -> None:
    assert calibrate.activation_roundoff(["F32", "F32"]) == (2.0**-24, "F32")
    assert calibrate.activation_roundoff(["F32", "F16"]) == (2.0**-11, "F16")
    assert calibrate.activation_roundoff(["Q4_K", "F16", "Q6_K"]) == (1 / 254, "Q4_K")
    assert calibrate.activation_roundoff([]) == (2.0**-24, "F32")


def test_rounding_epsilon_is_u_sqrt_n_times_the_logit_scale() -> None:
    ref = np.array([[1.0, -4.0, 2.0], [0.5, 0.25, 0.0]])
    eps = calibrate.rounding_epsilon(ref, 0.01, 16)
    assert eps.tolist() == pytest.approx([0.01 * 4 * 4.0, 0.01 * 4 * 0.5])


def test_floor_rows_are_the_largest_distance_over_configurations() -> None:
    ref = _ref()
    rng = np.random.default_rng(5)
    a, b = ref + rng.normal(0, 1e-3, ref.shape), ref + rng.normal(0, 1e-2, ref.shape)
    eps = calibrate.rounding_epsilon(ref, calibrate.U_F32, 4)
    per, rows, summary = calibrate.measure_floor(ref, {"a": a, "b": b, "same": ref.copy()}, eps)
    da, db = metrics.distances(a, ref), metrics.distances(b, ref)
    for i, row in enumerate(rows):
        assert row["kl"] == pytest.approx(max(da.kl[i], db.kl[i], 0.0))
        assert row["max_abs"] == pytest.approx(max(np.abs(da.diff[i]).max(), np.abs(db.diff[i]).max()))
        assert row["epsilon"] == pytest.approx(eps[i])
    assert [(s["name"], s["moved"]) for s in per] == [("a", True), ("b", True), ("same", False)]
    assert summary["moved"] == ["a", "b"]
    assert summary["mean_kl"] == pytest.approx(
        max(float(np.maximum(da.kl, 0).mean()), float(np.maximum(db.kl, 0).mean()))
    )
    assert summary["top1_flips"] == 0


def test_implementation_at_the_floor_passes_and_ten_times_it_fails() -> None:
    ref = _ref()
    fl = _floor(ref, 1e-3)
    rng = np.random.default_rng(9)
    near = calibrate.verdict(ref + rng.normal(0, 1e-3, ref.shape), ref, fl["rows"], fl["summary"], 0.01)
    assert near["passed"] and near["mode"] == "calibrated" and near["k"] == calibrate.K
    assert 0.3 < near["ratio"] < 3 and near["margin"] > 0 and near["first"] is None
    assert "the reference's own variation (k = 3; floor measured)" in near["reason"]
    far = calibrate.verdict(ref + rng.normal(0, 1e-2, ref.shape), ref, fl["rows"], fl["summary"], 0.01)
    assert not far["passed"] and "mean_kl" in far["failed"] and far["ratio"] > calibrate.K and far["margin"] < 0
    assert far["first"] is not None


def test_zero_floor_falls_back_to_the_rounding_model_and_stays_tight() -> None:
    ref = _ref()
    eps = calibrate.rounding_epsilon(ref, calibrate.U_F32, 16)
    _, rows, summary = calibrate.measure_floor(ref, {"stepwise": ref.copy()}, eps)
    assert summary["mean_kl"] == 0.0 and summary["max_abs"] == 0.0
    assert 0 < summary["rounding_max_abs"] < 1e-4  # F32 at logit scale ~20: micro-logits, not a tolerance
    ok = calibrate.verdict(ref + 1e-7, ref, rows, summary, 0.01)
    assert ok["passed"]
    bad = calibrate.verdict(ref + np.where(np.arange(V) == 3, 1e-4, 0.0), ref, rows, summary, 0.01)
    assert not bad["passed"] and "max_abs" in bad["failed"]


def test_flips_within_the_reference_movement_are_ties_others_decisive() -> None:
    ref = np.zeros((2, 4))
    ref[:, 0], ref[:, 1] = 1.0, 0.9  # the reference's lead: 0.1 logits at both positions
    rows = [
        {"lead_move": 0.05, "epsilon": 0.0},  # the reference itself moves its lead 0.05: 3 x 0.05 covers 0.1
        {"lead_move": 0.01, "epsilon": 0.0},  # 3 x 0.01 does not
    ]
    ours = ref.copy()
    ours[:, 1] = 1.2  # the implementation prefers token 1 at both positions
    flips = calibrate.top1_flips(ours, ref, rows, calibrate.K, tie_margin=0.0)
    assert [f["pos"] for f in flips["ties"]] == [0] and [f["pos"] for f in flips["decisive"]] == [1]
    assert flips["decisive"][0]["ref_lead"] == pytest.approx(0.1)
    # the fixed --tie-margin still counts: a probability gap below it is a tie
    assert calibrate.top1_flips(ours, ref, rows, calibrate.K, tie_margin=0.1)["decisive"] == []


def test_greedy_mismatch_within_the_reference_movement_is_a_tie_flip() -> None:
    greedy = {"first_difference": 1, "verdict": "mismatch", "ref_prob_gap": 0.2}
    rows = [{"ref_top1_margin": 5.0, "lead_move": 0.0, "epsilon": 0.0}] * 3 + [
        {"ref_top1_margin": 0.25, "lead_move": 0.1, "epsilon": 0.0}
    ]
    assert calibrate.greedy_with_floor(greedy, rows, n_prompt=3, k=3.0)["verdict"] == "tie_flip"
    assert calibrate.greedy_with_floor(greedy, rows, n_prompt=2, k=3.0)["verdict"] == "mismatch"
    identical = {"first_difference": None, "verdict": "identical"}
    assert calibrate.greedy_with_floor(identical, rows, 3, 3.0) == identical


def test_fixed_verdict_is_the_tolerance_rule() -> None:
    ok = calibrate.fixed_verdict({"all_passed": True, "first_divergence": None, "min_cosine": 1.0}, 0.999, 0.01)
    assert ok["passed"] and ok["mode"] == "fixed" and ok["k"] is None
    fd = {"pos": 0, "cosine": 0.99983, "mse": 0.0141}
    bad = calibrate.fixed_verdict({"all_passed": False, "first_divergence": fd, "min_cosine": 0.99}, 0.999, 0.01)
    assert not bad["passed"] and "position 0" in bad["reason"] and "--cos-tol 0.999" in bad["reason"]


def test_a_zero_floor_with_zero_logits_has_no_ratio() -> None:
    check = calibrate.floor_check("max_abs", 1.0, 0.0, 0.0, 3.0)
    assert check["ratio"] is None and not check["passed"]
    assert calibrate.floor_check("max_abs", 0.0, 0.0, 0.0, 3.0)["ratio"] == 0.0


def test_receipt_v3_with_floor_and_verdict_validates_and_v1_v2_still_do() -> None:
    ref = _ref()
    fl = _floor(ref, 1e-3)
    v = calibrate.verdict(ref, ref, fl["rows"], fl["summary"], 0.01)
    r = copy.deepcopy(v2())
    r["version"] = 3
    r["floor"] = {
        "configs": [{"name": "stepwise", "status": "measured"}, {"name": "repack_off", "status": "unavailable"}],
        "rows": fl["rows"],
        "summary": fl["summary"],
        "rounding": {"unit_roundoff": calibrate.U_F32, "format": "F32", "n_matmul": 16},
        "cache": {"hit": False, "key": "0" * 64, "path": None},
        "seconds": 0.5,
    }
    r["verdict"] = v
    assert receipts.validation_errors(r) == []
    assert receipts.validation_errors(v1()) == [] and receipts.validation_errors(v2()) == []
    broken = copy.deepcopy(r)
    broken["verdict"]["mode"] = "vibes"
    assert receipts.validation_errors(broken)
    broken = copy.deepcopy(r)
    del broken["floor"]["rows"][0]["epsilon"]
    assert receipts.validation_errors(broken)
    assert math.isfinite(v["ratio"])


def test_tolerances_without_a_mode_select_the_fixed_verdict(tmp_path: Any) -> None:
    from parity.errors import UsageError
    from parity.options import resolve

    none = tmp_path / "pyproject.toml"  # no [tool.parity]: the defaults
    assert resolve({}, none).verdict == "calibrated"
    assert resolve({"cos_tol": 0.9}, none).verdict == "fixed"
    assert resolve({"mse_tol": 0.5, "verdict": "fixed"}, none).verdict == "fixed"
    with pytest.raises(UsageError, match="--cos-tol only apply with --verdict fixed"):
        resolve({"cos_tol": 0.9, "verdict": "calibrated"}, none)
    with pytest.raises(UsageError, match="--verdict must be calibrated or fixed"):
        resolve({"verdict": "loose"}, none)
    # the project's own [tool.parity] leaves the mode open, so a script's --cos-tol still means fixed
    assert resolve({}).verdict == "calibrated" and resolve({"cos_tol": 0.9}).verdict == "fixed"


def test_storage_roundoff_of_kv_cache_types() -> None:
    """A K/V cache stored in F16 or a quantized type rounds more coarsely than F32 activations."""
    assert calibrate.storage_roundoff(["F32", "F32"]) == (calibrate.U_F32, "F32")
    assert calibrate.storage_roundoff(["F16", "F32"]) == (calibrate.U_F16, "F16")
    assert calibrate.storage_roundoff(["Q8_0"])[0] == 1 / 254
    assert calibrate.storage_roundoff(["Q4_0", "Q8_0"]) == (1 / 14, "Q4_0")
    assert calibrate.storage_roundoff(["Q5_1"])[0] == 1 / 30
