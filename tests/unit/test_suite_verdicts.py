"""The suite's calibrated per-item verdict without processes: evidence, the item floor, flips, the rule's
resolution, the sample and its summary, the receipt, text and HTML (parity.suite.verdicts / calibrate)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.compare import metrics
from parity.errors import UsageError
from parity.suite import calibrate, command, receipt, report, stats, verdicts
from parity.suite.inputs import Item
from parity.suite.store import Store

REL = 2.0**-24 * 4.0  # u sqrt(n): F32, 16 matmuls


def _floor(scale: float = 0.0, lead: float = 0.0, cv: float | None = 0.5, status: str = "measured") -> dict[str, Any]:
    return {
        "version": calibrate.FLOOR_VERSION,
        "status": status,
        "error": None if status == "measured" else "WorkerError: the reference crashed",
        "rounding": {"unit_roundoff": 2.0**-24, "format": "F32", "n_matmul": 16, "relative": REL},
        "scale": {"mean_kl": scale, "max_abs": scale, "lead_move": lead},
        "dispersion": cv,
        "configs": [{"name": "stepwise:stepwise:{}", "moved": True}],
        "samples": [{"index": 0, "id": "a", "n_tokens": 9, "cache_hit": True}],
        "seconds": 0.5,
    }


def _logits(n: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, vocab)) * 4).astype(np.float32)


def _item(ref: np.ndarray, impl: np.ndarray, index: int = 0) -> tuple[stats.PositionStats, dict[str, Any]]:
    """Per-position statistics and evidence of an item whose scored rows are `ref` / `impl`."""
    n = ref.shape[0]
    tokens = np.arange(n + 1) % ref.shape[1]
    values = stats.compute(ref, impl, tokens, mode="all", item=index)
    return values, verdicts.evidence(ref, impl, values)


def _noisy(ref: np.ndarray, times: float, seed: int = 1) -> np.ndarray:
    """ref perturbed like `times` x the rounding model: relative noise REL x std(logits) per position, in float64."""
    rng = np.random.default_rng(seed)
    ref64 = ref.astype(np.float64)
    return ref64 + times * REL * ref64.std(axis=-1, keepdims=True) * rng.normal(size=ref.shape)


def test_evidence_kl_is_the_exact_kl_in_either_encoding() -> None:
    ref = _logits(6)
    impl = ref + np.float32(0.01) * _logits(6, seed=2)
    _, ev = _item(ref, impl)
    assert np.allclose(ev["kl"], metrics.kl_divergence(impl, ref), rtol=1e-9, atol=0)  # stats' own float64 KL
    # llama-perplexity's 16-bit numerics: the evidence holds the exact KL, not the coarse one; in float32
    # (error ~4e-7 nats) where the item's mean KL is >= KL32_MIN, else in float64
    tokens = np.arange(13) % 64
    for impl12, precise in ((_logits(12, seed=3), False), (_logits(12) + np.float32(1e-4) * _logits(12, seed=4), True)):
        ppl = stats.compute(_logits(12), impl12, tokens, mode="all", encoding="uint16")
        ev16 = verdicts.evidence(_logits(12), impl12, ppl)
        exact = metrics.kl_divergence(impl12, _logits(12))
        assert (exact.mean() >= verdicts.KL32_MIN) is not precise
        assert np.allclose(ev16["kl"], exact, rtol=1e-9 if precise else 1e-6, atol=0 if precise else 2e-6)
        assert precise or not np.allclose(ev16["kl"], exact, rtol=1e-9, atol=0)  # the float32 path ran
    assert ev["scale"] == [float(x) for x in np.abs(ref).max(axis=-1)]
    assert ev["max_abs"] == pytest.approx(np.abs(impl - ref).max(axis=-1).tolist())


@pytest.mark.parametrize("noise", [0.3, 0.03, 0.003])
def test_float32_exponentials_kl_is_within_5e_8_of_float64(noise: float) -> None:
    rng = np.random.default_rng(5)
    ref = (rng.normal(size=(20, 4096)) * 3 + 5).astype(np.float32)
    impl = (ref + noise * rng.normal(size=ref.shape)).astype(np.float32)
    exact = metrics.kl_divergence(impl, ref)
    assert np.abs(metrics.kl_divergence_f32(impl, ref, rows=7) - exact).max() < 5e-8


def test_a_port_as_precise_as_the_reference_passes_and_ten_times_its_noise_fails() -> None:
    ref = _logits(40)
    rule = verdicts.Calibrated(_floor())
    values, ev = _item(ref, _noisy(ref, 1.0))
    ok = verdicts.item_row(0, "a", 41, values, None, rule, ev)
    assert ok["status"] == "pass", ok["reason"]
    assert 0.2 < ok["calibrated"]["mean_kl_ratio"] < ok["ratio"] <= 3.0  # ~1 (noise as large as the model)
    values, ev = _item(ref, _noisy(ref, 10.0))
    bad = verdicts.item_row(0, "a", 41, values, None, rule, ev)
    assert bad["status"] == "fail" and bad["ratio"] > 30  # KL grows with the square of the noise
    assert "mean_kl" in bad["calibrated"]["failed"] and bad["calibrated"]["first"] is not None
    assert "the reference's own variation" in bad["reason"] and "first at position" in bad["reason"]


def test_the_measured_scale_and_the_sampling_allowance_raise_the_floor() -> None:
    ref = _logits(40)
    _, ev = _item(ref, _noisy(ref, 10.0))
    plain = verdicts.judge(ev, verdicts.Calibrated(_floor(scale=0.5)))  # below the model: the model holds
    scaled = verdicts.judge(ev, verdicts.Calibrated(_floor(scale=200.0)))  # the reference moved 200x the model
    assert scaled["checks"][0]["floor"] == pytest.approx(200 * plain["checks"][0]["floor"])
    assert not plain["passed"] and scaled["passed"]
    # a mean over fewer positions has a larger sampling error: its floor allows z standard errors of it
    few = verdicts.judge({k: v[:4] if isinstance(v, list) else v for k, v in ev.items()}, verdicts.Calibrated(_floor()))
    per_model_many = plain["checks"][0]["floor"] / np.mean(0.5 * (REL * np.asarray(ev["std"])) ** 2)
    per_model_few = few["checks"][0]["floor"] / np.mean(0.5 * (REL * np.asarray(ev["std"][:4])) ** 2)
    assert per_model_many == pytest.approx(1 + verdicts.Z * 0.5 / math.sqrt(40))
    assert per_model_few == pytest.approx(1 + verdicts.Z * 0.5 / 2)
    # no measured dispersion (nothing moved on the sample): 1 is assumed
    assert verdicts.Calibrated(_floor(cv=None)).dispersion() == 1.0


def test_top1_flips_within_the_references_lead_movement_are_ties() -> None:
    ref = _logits(8)
    impl = ref.astype(np.float64).copy()
    a, b = int(ref[3].argmax()), int(np.argsort(ref[3])[-2])
    impl[3, b] = ref[3, a] + 1e-3  # the implementation's top-1 is the reference's second
    _, ev = _item(ref, impl)
    assert [f["i"] for f in ev["flips"]] == [3]
    assert ev["flips"][0]["ref_lead"] == pytest.approx(float(ref[3, a] - ref[3, b]))
    lead = ev["flips"][0]["ref_lead"]
    sigma = REL * ev["std"][3]
    big_scale = 1.01 * lead / (3 * math.sqrt(2) * sigma)  # the reference's own lead moved just enough
    tie = verdicts.judge(ev, verdicts.Calibrated(_floor(scale=1e12, lead=big_scale), tie_margin=0.0))
    assert tie["top1"]["ties"] and not tie["top1"]["decisive"] and "top1" not in tie["failed"]
    decisive = verdicts.judge(ev, verdicts.Calibrated(_floor(scale=1e12, lead=big_scale / 1.1), tie_margin=0.0))
    assert decisive["top1"]["decisive"] == [
        {"pos": 3, "ref_lead": lead, "ref_prob_gap": ev["flips"][0]["ref_prob_gap"]}
    ]
    assert not decisive["passed"] and decisive["failed"] == ["top1"] and decisive["first"] == 3
    # --tie-margin: a flip where the reference's top-2 probabilities are closer than it is a tie
    margin = verdicts.judge(ev, verdicts.Calibrated(_floor(scale=1e12), tie_margin=1.0))
    assert margin["top1"]["ties"] and not margin["top1"]["decisive"]


def test_an_unmeasured_floor_or_missing_evidence_is_an_error_never_a_pass() -> None:
    ref = _logits(10)
    values, ev = _item(ref, ref)
    broken = verdicts.item_row(0, "a", 11, values, None, verdicts.Calibrated(_floor(status="error")), ev)
    assert broken["status"] == "error" and "could not be measured" in broken["reason"]
    fixed_run = verdicts.item_row(0, "a", 11, values, None, verdicts.Calibrated(_floor()), None)
    assert fixed_run["status"] == "error" and "--verdict fixed" in fixed_run["reason"]
    same = verdicts.item_row(0, "a", 11, values, None, verdicts.Calibrated(_floor()), ev)
    assert same["status"] == "pass" and same["ratio"] == 0.0  # identical logits: 0 floors away


def test_overall_and_worst_rank_by_ratio() -> None:
    ref = _logits(30)
    rule = verdicts.Calibrated(_floor())
    rows = []
    for i, times in enumerate((1.0, 20.0, 2.0)):
        values, ev = _item(ref, _noisy(ref, times, seed=i), index=i)
        rows.append(verdicts.item_row(i, f"it{i}", 31, values, None, rule, ev))
    rows.append(verdicts.item_row(3, "gone", 31, None, "WorkerError: crashed", rule))
    assert [r["status"] for r in rows] == ["pass", "fail", "pass", "error"]
    assert verdicts.worst(rows) == [3, 1, 2, 0]
    v = verdicts.overall(rows[:3], rule)
    assert v["mode"] == "calibrated" and v["status"] == "fail" and v["k"] == 3.0
    assert v["max_ratio"] == rows[1]["ratio"] and v["max_ratio_item"] == {"index": 1, "id": "it1"}
    assert "largest ratio" in v["reason"] and "#1 it1" in v["reason"]
    assert verdicts.overall([rows[0], rows[2]], rule)["status"] == "pass"


def test_verdict_mode_resolution_matches_parity_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PARITY_VERDICT", "PARITY_TIE_MARGIN", "PARITY_COS_TOL", "PARITY_MSE_TOL"):
        monkeypatch.delenv(var, raising=False)
    none = {"max_mean_kld": None, "max_kld_p99": None, "min_same_top": None}
    assert command._mode(None, None, none) == ("calibrated", 0.01)
    assert command._mode("fixed", 0.2, none) == ("fixed", 0.2)
    assert command._mode(None, None, {**none, "max_mean_kld": 0.05})[0] == "fixed"  # thresholds select fixed
    with pytest.raises(UsageError, match="--max-mean-kld only apply with --verdict fixed") as err:
        command._mode("calibrated", None, {**none, "max_mean_kld": 0.05})
    assert err.value.exit_code == 2
    monkeypatch.setenv("PARITY_VERDICT", "fixed")
    assert command._mode(None, None, none)[0] == "fixed"
    with pytest.raises(UsageError, match="not a C\\+\\+ backend") as err:
        calibrate.check_reference("numpy")
    assert err.value.exit_code == 2 and "--verdict fixed" in (err.value.fix or "")
    calibrate.check_reference("llama:type_k=f16")


def test_the_sample_is_spread_over_the_whole_suite_and_its_summary_scales() -> None:
    items = [Item(i, f"i{i}", tuple(range(1, 20))) for i in range(10)]
    assert [it.index for it in calibrate.sample(items)] == [0, 4, 9]  # first, middle, last: every shard alike
    assert [it.index for it in calibrate.sample(items[:2])] == [0, 1]

    def record(kl_times: float, abs_times: float, lead: float) -> dict[str, Any]:
        rows = [{"kl": kl_times * 0.5, "sigma": 1.0, "lead_move": lead * math.sqrt(2)} for _ in range(4)]
        rows[0]["kl"] = kl_times * 1.5  # per-position dispersion
        summary = {"mean_kl": kl_times * 0.75, "rounding_mean_kl": 0.5, "max_abs": abs_times * 2.0}
        summary.update(rounding_max_abs=2.0, max_lead_move=lead, top1_flips=0)
        return {
            "rows": rows,
            "summary": summary,
            "rounding": _floor()["rounding"],
            "configs": [],
            "cache": {"hit": True},
        }

    s = calibrate.summarize([(items[0], 19, record(2.0, 0.5, 3.0)), (items[4], 19, record(0.5, 4.0, 1.0))])
    assert s["scale"] == {"mean_kl": pytest.approx(3.0), "max_abs": pytest.approx(4.0), "lead_move": pytest.approx(3.0)}
    pooled = [6.0, 2.0, 2.0, 2.0, 1.5, 0.5, 0.5, 0.5]  # KL over 0.5 sigma^2 at every sampled position
    assert s["dispersion"] == pytest.approx(np.std(pooled) / np.mean(pooled))
    assert s["rounding"]["relative"] == pytest.approx(REL)
    assert [x["index"] for x in s["samples"]] == [0, 4] and all(x["cache_hit"] for x in s["samples"])


_INPUT = {"mode": "prompts", "path": "/x.jsonl", "sha256": "b" * 64, "ctx": None}


def _manifest(n_items: int) -> dict[str, Any]:
    side = {"spec": "numpy", "label": "numpy", "model": {"path": "/m.gguf", "sha256": "a" * 64}}
    return {
        "kind": "parity-suite-manifest",
        "suite_key": "d" * 64,
        "mode": "all",
        "shard": None,
        "sides": {"implementation": side, "reference": {**side, "spec": "llama", "label": "llama"}},
        "items": [[f"i{i}", 13] for i in range(n_items)],
        "input": {**_INPUT, "n_items": n_items, "n_tokens": 13 * n_items},
    }


def test_receipt_text_and_html_show_mode_floor_and_ratios(tmp_path: Path) -> None:
    st = Store.open_write(tmp_path, _manifest(3), resume=False)
    for i, times in enumerate((1.0, 1.5, 40.0)):
        ref = _logits(12, seed=10 + i)
        values, ev = _item(ref, _noisy(ref, times), index=i)
        st.save(i, f"i{i}", 13, values, 0.1, ev)
    rule = verdicts.Calibrated(_floor(scale=0.8, lead=2.0))
    rec = receipt.build([st], rule, {"kind": "local", "workers": 1})
    assert not receipt.receipts.validation_errors(rec, receipt.SCHEMA_PATH)
    assert rec["version"] == 2 and rec["floor"]["scale"]["mean_kl"] == 0.8
    assert rec["verdict"]["mode"] == "calibrated" and rec["status"] == "fail" and rec["worst"][0] == 2
    assert all(r["ratio"] is not None and r["floor"] > 0 for r in rec["items"])
    text = receipt.render(rec)
    assert "floor: rounding model" in text and "measured on 1 sampled item(s)" in text
    assert "worst items (ratio to the item's floor" in text and f"#2 i2: {rec['items'][2]['ratio']:.3g}x" in text
    html = report.render(rec)
    assert "ratio to floor" in html and "mean-KL floor" in html and "k x the median item" in html
    # the same items judged fixed: no floor, the thresholds' rule; the receipt still validates
    fixed = receipt.build([st], verdicts.Thresholds(1e-3), {"kind": "local", "workers": 1})
    assert fixed["floor"] is None and fixed["verdict"]["mode"] == "fixed" and "ratio" not in fixed["items"][0]
    assert not receipt.receipts.validation_errors(fixed, receipt.SCHEMA_PATH)
    assert "floor:" not in receipt.render(fixed)
    # a version 1 receipt (before the calibrated verdict) still validates
    old = {k: v for k, v in fixed.items() if k != "floor"} | {"version": 1}
    assert not receipt.receipts.validation_errors(old, receipt.SCHEMA_PATH)


def test_cli_calibrated_needs_a_cpp_reference_and_merge_reads_the_shards_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from parity import cli

    monkeypatch.chdir(tmp_path)
    for var in ("PARITY_VERDICT", "PARITY_COS_TOL", "PARITY_MSE_TOL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "p.jsonl").write_text('{"tokens": [1, 2, 3]}\n', encoding="utf-8")
    base = ["suite", "--prompts", "p.jsonl", "--out-dir", str(tmp_path / "o")]
    assert cli.main([*base, "--reference", "numpy"]) == 2
    assert "not a C++ backend" in capsys.readouterr().err
    assert cli.main([*base, "--verdict", "calibrated", "--max-kld-p99", "0.1"]) == 2
    assert "--max-kld-p99 only apply with --verdict fixed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything ran

    shards = []
    for k in (1, 2):
        manifest = _manifest(4) | {"shard": [k, 2]}
        st = Store.open_write(tmp_path / f"s{k}", manifest, resume=False)
        for i in range(k - 1, 4, 2):
            ref = _logits(12, seed=20 + i)
            values, ev = _item(ref, _noisy(ref, 1.0), index=i)
            st.save(i, f"i{i}", 13, values, 0.1, ev)
        shards.append(str(tmp_path / f"s{k}"))
    merge = ["suite", "merge", *shards, "--format", "json"]
    assert cli.main([*merge, "--out-dir", str(tmp_path / "m0")]) == 2  # calibrated, but no shard holds a floor
    assert "--verdict fixed" in capsys.readouterr().err
    assert cli.main([*merge, "--out-dir", str(tmp_path / "m1"), "--verdict", "fixed"]) == 0
    assert '"mode": "fixed"' in capsys.readouterr().out
    (tmp_path / "s2" / calibrate.FLOOR_FILE).write_text(json.dumps(_floor()), encoding="utf-8")
    assert cli.main([*merge, "--out-dir", str(tmp_path / "m2")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["verdict"]["mode"] == "calibrated" and rec["floor"] == _floor() and rec["n_done"] == 4
    assert all(row["status"] == "pass" and row["ratio"] > 0 for row in rec["items"])


class _FailingSide:
    """A reference whose worker cannot start: a parity error (a crash) or a bug."""

    spec, plan, params, model = "llama", None, None, "/m.gguf"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def open(self, worker_name: str = "") -> Any:
        raise self.exc


def test_a_reference_that_fails_the_floor_is_an_error_record_and_a_bug_is_raised(tmp_path: Path) -> None:
    from parity.errors import WorkerError

    items = [Item(0, "a", (1, 2, 3))]
    crashed = calibrate.Background(
        _FailingSide(WorkerError("worker died (signal 11)\nstderr...")), items, "a" * 64, tmp_path
    )  # type: ignore[arg-type]
    rec = crashed.result()
    assert rec["status"] == "error" and rec["error"] == "WorkerError: worker died (signal 11)"
    assert calibrate.read([tmp_path]) == rec  # written for merge, as a measured one is
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / calibrate.FLOOR_FILE).write_text(json.dumps(_floor()), encoding="utf-8")
    assert calibrate.read([tmp_path, tmp_path / "other"]) == _floor()  # a shard's measured floor wins
    bug = calibrate.Background(_FailingSide(RuntimeError("a bug")), items, "a" * 64, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a bug"):
        bug.result()
