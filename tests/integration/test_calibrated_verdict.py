"""The calibrated verdict end to end (issue 14.1-2): real llama.cpp floors on the default model, the on-disk
floor cache, an implementation perturbed by a multiple of the measured floor, and --verdict fixed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.backends.worker import RemoteModel, Worker
from parity.check import floor as noise_floor
from parity.compare import calibrate, receipts

from .conftest import run_cli

pytestmark = [pytest.mark.compile, pytest.mark.model]


def _run(out: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = run_cli("run", "--out-dir", str(out), "--format", "json", *args)
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, summary, proc.stderr


@pytest.fixture(scope="module")
def f32_receipt(llama_plan: build.BuildPlan, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("f32")
    code, _, err = _run(out)
    assert code == 0, err
    return receipts.load(out / "receipt_llama.json")


def test_floor_is_cached_by_what_determines_it(f32_receipt: dict[str, Any], tmp_path: Path) -> None:
    """Cold: the floor is measured and written; warm: read back, identical, for a fraction of the cost."""
    cached = Path(f32_receipt["floor"]["cache"]["path"])
    cached.unlink(missing_ok=True)
    code, _, err = _run(tmp_path / "cold")
    assert code == 0, err
    cold = receipts.load(tmp_path / "cold" / "receipt_llama.json")["floor"]
    assert cold["cache"] == {"hit": False, "key": f32_receipt["floor"]["cache"]["key"], "path": str(cached)}
    assert cached.is_file() and cold["seconds"] == cold["measured_seconds"] > 0
    code, _, err = _run(tmp_path / "warm")
    assert code == 0, err
    warm = receipts.load(tmp_path / "warm" / "receipt_llama.json")["floor"]
    assert warm["cache"]["hit"] is True and warm["rows"] == cold["rows"] and warm["summary"] == cold["summary"]
    assert warm["seconds"] < cold["measured_seconds"] / 10, (warm["seconds"], cold["measured_seconds"])
    print(f"floor cost: measured {cold['measured_seconds']:.2f} s, from the cache {warm['seconds']:.4f} s")


def test_floor_cache_key_changes_with_what_the_floor_depends_on(llama_plan: build.BuildPlan) -> None:
    def key(**change: Any) -> str:
        args: dict[str, Any] = {
            "model_sha256": "0" * 64,
            "plan": llama_plan,
            "system_info": "AVX2 = 1",
            "params": BackendParams(),
            "eval_shape": "batch",
            "tokens": [1, 2, 3],
            "configs": ["stepwise"],
        }
        return noise_floor.cache_key(**{**args, **change})

    same = key()
    assert key() == same
    for change in (
        {"model_sha256": "1" * 64},
        {"system_info": "AVX512 = 1"},
        {"params": BackendParams(n_threads=3)},
        {"eval_shape": "stepwise"},
        {"tokens": [1, 2, 4]},
        {"configs": ["stepwise", "repack_off"]},
    ):
        assert key(**change) != same, change


def test_f32_floor_is_real_and_the_verdict_stays_tight(f32_receipt: dict[str, Any]) -> None:
    fl, v = f32_receipt["floor"], f32_receipt["verdict"]
    configs = {c["name"]: c for c in fl["configs"]}
    assert set(configs) == {"stepwise", "repack_off"} and all(c["status"] == "measured" for c in configs.values())
    assert configs["stepwise"]["moved"]  # one token per decode rounds differently from one batch, even in F32
    assert fl["rounding"] == {"unit_roundoff": 2.0**-24, "format": "F32", "n_matmul": 16, "model": calibrate.__name__}
    assert v["mode"] == "calibrated" and v["passed"] and v["k"] == calibrate.K
    max_abs = next(c for c in v["checks"] if c["statistic"] == "max_abs")
    assert max_abs["value"] <= 1e-4 and max_abs["threshold"] <= 1e-4, max_abs  # as tight as the F32 bar
    assert len(f32_receipt["floor"]["rows"]) == f32_receipt["positions"]


def _perturbed_npz(plan: build.BuildPlan, receipt: dict[str, Any], times_floor: float, path: Path) -> Path:
    """llama.cpp's own logits for the receipt's sequence, one non-top-1 logit per position moved by
    `times_floor` x the lane's max |dlogit| floor: an implementation exactly that far from the reference."""
    ids = receipt["token_ids"]
    rc = receipt["run_config"]
    params = BackendParams(**{k: rc[k] for k in BackendParams().to_dict()})
    with Worker("llama", plan.bridge_path) as w:
        ref = np.asarray(RemoteModel(w, receipt["model"]["path"], params).eval(ids), dtype=np.float64)
    check = next(c for c in receipt["verdict"]["checks"] if c["statistic"] == "max_abs")
    bumped = ref.copy()
    col = np.argsort(ref, axis=1)[:, -3]  # (n,): the third-ranked token never becomes top-1 at these sizes
    bumped[np.arange(len(ids)), col] += times_floor * check["floor"]
    np.savez(path, tokens=np.asarray(ids), logits=bumped.astype(np.float32))
    return path


@pytest.mark.parametrize(("times_floor", "passes"), [(0.5, True), (2 * calibrate.K, False)])
def test_an_implementation_above_k_floors_fails_and_below_passes(
    llama_plan: build.BuildPlan, f32_receipt: dict[str, Any], tmp_path: Path, times_floor: float, passes: bool
) -> None:
    npz = _perturbed_npz(llama_plan, f32_receipt, times_floor, tmp_path / "planted.npz")
    code, summary, err = _run(tmp_path / "out", "--impl", f"logits:{npz}")
    r = receipts.load(tmp_path / "out" / "receipt_llama.json")
    v = r["verdict"]
    assert (code == 0) is passes and (r["status"] == "pass") is passes, (err, v["reason"])
    max_abs = next(c for c in v["checks"] if c["statistic"] == "max_abs")
    assert max_abs["ratio"] == pytest.approx(times_floor, rel=0.2), max_abs  # float32 storage rounds the bump
    if not passes:
        assert "max_abs" in v["failed"] and r["summary"]["first_divergence"]["pos"] == 0
        assert summary["lanes"]["llama"]["verdict"]["reason"] == v["reason"]


def test_fixed_verdict_is_the_old_rule(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, summary, err = _run(tmp_path / "fixed", "--verdict", "fixed")
    assert code == 0, err
    r = receipts.load(tmp_path / "fixed" / "receipt_llama.json")
    assert r["verdict"]["mode"] == "fixed" and "floor" not in r and r["thresholds"]["cos_tol"] == 0.999
    assert summary["lanes"]["llama"]["verdict"]["mode"] == "fixed"
    proc = run_cli("run", "--out-dir", str(tmp_path / "both"), "--verdict", "calibrated", "--cos-tol", "0.9")
    assert proc.returncode == 2 and "--cos-tol only apply with --verdict fixed" in proc.stderr, proc.stderr
