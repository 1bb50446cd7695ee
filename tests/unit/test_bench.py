"""parity bench without running anything: statistics, the gate rule, baselines, llama-bench parsing, schema."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.backends import build
from parity.backends import lock as backends
from parity.backends import tools as build_tools
from parity.bench import command as bench_command
from parity.bench import gate as bench_gate
from parity.bench import inputs as bench_inputs
from parity.bench import lanes as bench_lanes
from parity.bench import llama_bench, protocol_probe
from parity.bench import main as bench
from parity.bench import report as bench_report
from parity.engines.spec import parse
from parity.errors import UsageError

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "llama_bench_sample.json"
SHA = "ab" * 32


# ------------------------------------------------------------------------------------------ statistics


def test_summarize_median_range_spread() -> None:
    s = bench_gate.summarize([100.0, 90.0, 110.0, 105.0, 95.0])
    assert s["median"] == 100.0 and s["min"] == 90.0 and s["max"] == 110.0 and s["mean"] == 100.0
    assert s["spread"] == pytest.approx(0.2) and s["mad"] == pytest.approx(0.05) and s["q75"] == 105.0
    # one pre-empted repetition widens the range, not the MAD
    assert bench_gate.summarize([100.0, 101.0, 99.0, 100.0, 5.0])["mad"] == pytest.approx(0.01)
    assert s["stdev"] == pytest.approx(7.9057, rel=1e-4)
    assert bench_gate.summarize([5.0])["spread"] == 0.0 and bench_gate.summarize([5.0])["stdev"] == 0.0
    with pytest.raises(ValueError):
        bench_gate.summarize([])


def test_ratio_samples_pair_repetitions() -> None:
    assert bench_gate.ratio_samples([10.0, 20.0], [5.0, 10.0]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="pair up"):
        bench_gate.ratio_samples([1.0], [1.0, 2.0])


# -------------------------------------------------------------------------------------------- gate rule


# The rule itself (pass, FAIL, too noisy) is tested on recorded-like sample sets in tests/unit/test_bench_noise.py.


def _counts(stats: dict[str, Any], k: int = 10) -> dict[str, Any]:
    """What a version-2 figure records about the evaluations behind it (one warm-up per sample + calibration)."""
    n = len(stats["samples"])
    return {**stats, "evals_per_sample": k, "warmup_evals": n + 3, "timed_evals": n * k}


def _stats(median: float, spread: float = 0.02) -> dict[str, Any]:
    half = median * spread / 2
    return _counts(bench_gate.summarize([median - half, median, median + half]))


def make_receipt(
    numpy_pp: float = 1000.0,
    llama_pp: float = 4000.0,
    spread: float = 0.02,
    slug: str = "test-cpu-2cpu",
    timestamp: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    """A complete, schema-valid receipt with synthetic figures (numpy and llama on one model)."""
    np_pp = _counts(bench_gate.summarize([numpy_pp * f for f in (1 - spread / 2, 1.0, 1 + spread / 2)]))
    ll_pp = _counts(bench_gate.summarize([llama_pp * f for f in (1 - spread / 2, 1.0, 1 + spread / 2)]))
    ratio = bench_gate.summarize(bench_gate.ratio_samples(np_pp["samples"], ll_pp["samples"]))
    return {
        "kind": "parity-bench",
        "version": 2,
        "timestamp": timestamp,
        "machine": {
            "slug": slug,
            "hostname": "h",
            "cpu_model": "Test CPU",
            "cpu_flags": ["avx2"],
            "n_cpus": 2,
            "platform": "Linux",
            "python": "3.11.7",
            "numpy_blas": {"numpy": "2.0", "blas": None, "threadpools": None, "env": {}},
        },
        "settings": {
            "prompt_tokens": 64,
            "gen_tokens": 16,
            "reps": 3,
            "min_sample_s": 0.05,
            "threads": 2,
            "numpy_dtype": "float32",
            "threshold": 0.1,
            "numpy_blas_threads": {"threads": 2, "method": "threadpoolctl"},
        },
        "models": [{"name": "default-f32", "path": "/m.gguf", "sha256": SHA, "size_bytes": 1, "architecture": "llama"}],
        "results": [
            {"model_sha256": SHA, "impl": "numpy", "status": "ok", "reason": None, "pp": np_pp, "tg": _stats(100.0)},
            {"model_sha256": SHA, "impl": "llama", "status": "ok", "reason": None, "pp": ll_pp, "tg": _stats(900.0)},
        ],
        "ratios": [{"model_sha256": SHA, "name": "numpy/llama", "metric": "pp", "stats": ratio}],
        "llama_bench": [],
        "cross_check": [],
        "gate": {"baseline": None, "note": "", "threshold": 0.1, "rows": []},
        "status": "no-baseline",
        "exit_code": 0,
    }


def _row(rows: list[bench_gate.GateRow], kind: str, subject: str, metric: str = "pp") -> bench_gate.GateRow:
    return next(r for r in rows if (r.kind, r.subject, r.metric) == (kind, subject, metric))


def test_compare_identical_runs_pass() -> None:
    rows = bench_gate.compare(make_receipt(), make_receipt())
    assert rows and all(r.status == "pass" for r in rows) and not bench_gate.gate_failed(rows)


def test_compare_fails_numpy_regression_beyond_noise() -> None:
    rows = bench_gate.compare(make_receipt(), make_receipt(numpy_pp=700.0))
    assert _row(rows, "throughput", "numpy").status == "FAIL"
    assert _row(rows, "ratio", "numpy/llama").status == "FAIL"
    assert _row(rows, "throughput", "llama").status == "pass"
    assert bench_gate.gate_failed(rows)


def test_compare_too_noisy_to_judge() -> None:
    # 15 % slower, but each run's samples spread over 30 %: the noise band is wider than the 10 % threshold
    rows = bench_gate.compare(make_receipt(spread=0.3), make_receipt(numpy_pp=850.0, spread=0.3))
    row = _row(rows, "throughput", "numpy")
    assert row.status == "noisy" and row.band is not None and row.band > 0.1 and "wider than the 10%" in row.reason
    assert bench_gate.gate_noisy(rows)
    # the same-run ratio cancels what both lanes' samples share (here: all of it), so it still resolves the drop
    assert _row(rows, "ratio", "numpy/llama").status == "FAIL"


def test_ratio_gate_catches_what_machine_noise_hides() -> None:
    # The whole machine is 40 % slower (both absolute figures fail), but numpy relative to llama.cpp is intact.
    rows = bench_gate.compare(make_receipt(), make_receipt(numpy_pp=600.0, llama_pp=2400.0))
    assert _row(rows, "throughput", "numpy").status == "FAIL"
    assert _row(rows, "ratio", "numpy/llama").status == "pass"
    # numpy alone 20 % slower: the ratio fails too
    rows = bench_gate.compare(make_receipt(), make_receipt(numpy_pp=800.0))
    assert _row(rows, "ratio", "numpy/llama").status == "FAIL"


def test_compare_reports_missing_and_new_figures() -> None:
    base, cur = make_receipt(), make_receipt()
    cur["results"][0].update(status="error", reason="worker crashed", pp=None, tg=None)
    cur["ratios"] = []
    rows = bench_gate.compare(base, cur)
    assert _row(rows, "throughput", "numpy").status == "missing" and bench_gate.gate_failed(rows)
    rows = bench_gate.compare(cur, base)
    assert _row(rows, "throughput", "numpy").status == "new" and not bench_gate.gate_failed(rows)


# -------------------------------------------------------------------------------------------- baselines


def test_baseline_name_and_slug() -> None:
    assert bench_gate.baseline_name("20260102", "amd-epyc-2cpu") == "20260102-amd-epyc-2cpu.json"
    assert bench_gate.slugify("AMD EPYC 7B13 64-Core Processor-2cpu") == "amd-epyc-7b13-64-core-processor-2cpu"
    with pytest.raises(ValueError):
        bench_gate.baseline_name("2026-01-02", "x")


def test_find_baseline_picks_newest_matching(tmp_path: Path) -> None:
    older = make_receipt(timestamp="2026-01-01T00:00:00Z")
    newer = make_receipt(timestamp="2026-01-05T00:00:00Z")
    other_settings = make_receipt(timestamp="2026-01-09T00:00:00Z")
    other_settings["settings"]["prompt_tokens"] = 32
    other_machine = make_receipt(slug="other-cpu-8cpu", timestamp="2026-01-09T00:00:00Z")
    for name, r in (
        ("20260101-test-cpu-2cpu.json", older),
        ("20260105-test-cpu-2cpu.json", newer),
        ("20260109-test-cpu-2cpu.json", other_settings),
        ("20260109-other-cpu-8cpu.json", other_machine),
    ):
        (tmp_path / name).write_text(json.dumps(r))
    (tmp_path / "20260110-test-cpu-2cpu.json").write_text("not json")
    path, note = bench_gate.find_baseline(make_receipt(), tmp_path)
    assert path == tmp_path / "20260105-test-cpu-2cpu.json" and "2026-01-05" in note


def test_find_baseline_explains_a_miss(tmp_path: Path) -> None:
    path, note = bench_gate.find_baseline(make_receipt(), tmp_path / "none")
    assert path is None and "no baseline for machine test-cpu-2cpu" in note
    other = make_receipt()
    other["results"] = other["results"][:1]
    (tmp_path / "20260101-test-cpu-2cpu.json").write_text(json.dumps(other))
    path, note = bench_gate.find_baseline(make_receipt(), tmp_path)
    assert path is None and "none with the same settings, models and implementations" in note


def test_finish_baseline_then_pass_then_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(tmp_path / "baselines"))
    out = tmp_path / "out"
    out.mkdir()
    code = bench.finish(make_receipt(), bench.BenchOptions(out_dir=str(out), baseline=True))
    written = list((tmp_path / "baselines").glob("*-test-cpu-2cpu.json"))
    assert code == 0 and len(written) == 1 and "baseline written" in capsys.readouterr().out
    assert bench.finish(make_receipt(), bench.BenchOptions(out_dir=str(out))) == 0
    assert "bench: PASS (exit 0)" in capsys.readouterr().out
    assert bench.finish(make_receipt(numpy_pp=500.0), bench.BenchOptions(out_dir=str(out))) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "numpy/llama" in text and "regressed or missing vs the baseline" in text
    saved = json.loads((out / "bench.json").read_text())
    assert saved["status"] == "fail" and saved["exit_code"] == 1 and not bench.validation_errors(saved)
    assert "<svg" in (out / "report.html").read_text()


def test_finish_too_noisy_to_judge_exits_7(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every lane waited 40 % of its runnable time for a CPU (a busy machine): not a pass, not a failure."""
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(tmp_path / "baselines"))
    assert bench.finish(make_receipt(), bench.BenchOptions(out_dir=str(tmp_path), baseline=True)) == 0
    busy = make_receipt(numpy_pp=800.0)  # 20 % slower, but nobody can tell on this machine
    for r in busy["results"]:
        for metric in ("pp", "tg"):
            r[metric]["cpu_wait"] = 0.4
    busy["ratios"][0]["stats"]["cpu_wait"] = 0.64
    capsys.readouterr()
    assert bench.finish(busy, bench.BenchOptions(out_dir=str(tmp_path))) == 7
    text = capsys.readouterr().out
    assert "bench: TOO NOISY TO JUDGE (exit 7): 5 figure(s) vs the baseline" in text and "CPU was busy" in text
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert (saved["status"], saved["exit_code"]) == ("too-noisy", 7) and not bench.validation_errors(saved)
    assert {g["status"] for g in saved["gate"]["rows"]} == {"noisy"} and all(
        g["band"] > 0.1 for g in saved["gate"]["rows"]
    )
    # a failure still wins over noise: exit 1
    busy["results"][1].update(status="error", reason="llama worker was killed by signal SIGSEGV", pp=None, tg=None)
    assert bench.finish(busy, bench.BenchOptions(out_dir=str(tmp_path))) == 1


def test_finish_without_baseline_exits_0_and_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(tmp_path / "empty"))
    assert bench.finish(make_receipt(), bench.BenchOptions(out_dir=str(tmp_path), format="json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "no-baseline" and "parity bench --baseline" in printed["gate"]["note"]


def test_finish_fails_on_an_implementation_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(tmp_path / "empty"))
    r = make_receipt()
    r["results"][1].update(status="error", reason="llama worker was killed by signal SIGSEGV", pp=None, tg=None)
    assert bench.finish(r, bench.BenchOptions(out_dir=str(tmp_path))) == 1


# ----------------------------------------------------------------------------------- measurement, env


class FakeLane(bench_lanes.Lane):
    """A lane whose evaluations take `seconds` each (no sleeping); logs every call."""

    def __init__(self, label: str, calls: list[str], seconds: float = 0.01) -> None:
        super().__init__(label, label, 512, "llama", {})
        self.calls, self.seconds = calls, seconds

    def _evaluate(self, tokens: list[int], n_new: int, count: int) -> list[float]:
        self.calls.append(f"{self.label}:{len(tokens)}:{n_new}x{count}")
        return [self.seconds] * count

    def pids(self) -> list[int]:
        return []

    def close(self) -> dict[str, Any]:
        return {}


def test_time_greedy_times_each_evaluation_where_it_runs() -> None:
    """The worker's timed mode (and the numpy lane) time each greedy call on its own, one duration per call."""
    from parity.backends.worker import time_greedy

    calls: list[tuple[list[int], int]] = []

    class Model:
        def greedy(self, tokens: list[int], n_new: int) -> list[int]:
            calls.append((tokens, n_new))
            return [0] * n_new

    seconds = time_greedy(Model(), [1, 2, 3], 4, 5)
    assert len(seconds) == 5 and all(s >= 0 for s in seconds) and calls == [([1, 2, 3], 4)] * 5


def test_calibrate_chooses_evaluations_per_sample_and_counts_the_warm_up() -> None:
    calls: list[str] = []
    fast, slow = FakeLane("llama", calls, 0.002), FakeLane("numpy", calls, 0.2)
    figures = bench_lanes.calibrate([fast, slow], 8, 4, min_sample_s=0.05)
    # one warm-up, then single evaluations until they add up to half a sample (at least one)
    assert figures["llama"]["pp"].evals_per_sample == 25 and figures["llama"]["pp"].warmup_evals == 1 + 13
    assert figures["numpy"]["pp"].evals_per_sample == 1 and figures["numpy"]["pp"].warmup_evals == 2
    assert figures["llama"]["tg"].n_tokens == 4 and figures["llama"]["pp"].n_tokens == 8
    assert fast.evaluations == 2 * 14 and slow.evaluations == 2 * 2


def test_measure_interleaves_warms_up_each_sample_and_records_what_ran() -> None:
    calls: list[str] = []
    lanes = [FakeLane("numpy", calls), FakeLane("llama", calls, 0.002)]
    figures = {
        "numpy": {"pp": bench_lanes.Figure(8, 1, 2), "tg": bench_lanes.Figure(4, 1, 2)},
        "llama": {"pp": bench_lanes.Figure(8, 5, 3), "tg": bench_lanes.Figure(4, 2, 3)},
    }
    bench_lanes.measure(lanes, figures, 8, 4, 2, lambda: calls.append("llama-bench"))
    # per round and lane: one untimed warm-up evaluation, then one sample of evals_per_sample evaluations
    rnd = ["numpy:8:1x1", "numpy:8:1x1", "llama:8:1x1", "llama:8:1x5", "llama-bench"]
    rnd_tg = ["numpy:1:4x1", "numpy:1:4x1", "llama:1:4x1", "llama:1:4x2"]
    assert calls == rnd * 2 + rnd_tg * 2
    np_pp, ll_pp, ll_tg = figures["numpy"]["pp"], figures["llama"]["pp"], figures["llama"]["tg"]
    assert np_pp.samples == [pytest.approx(800.0)] * 2 and ll_pp.samples == [pytest.approx(4000.0)] * 2
    assert ll_tg.samples == [pytest.approx(2000.0)] * 2
    assert (ll_pp.warmup_evals, ll_pp.timed_evals, ll_tg.timed_evals) == (3 + 2, 10, 4)
    stats = ll_pp.stats()
    assert (stats["evals_per_sample"], stats["warmup_evals"], stats["timed_evals"]) == (5, 5, 10)
    # the lanes counted every evaluation: calibration (the Figure's initial warm-up) is not part of this call
    assert lanes[1].evaluations == 2 * (1 + 5) + 2 * (1 + 2)


def test_blas_threads_are_limited_and_restored() -> None:
    found = bench_lanes._openblas_setters()
    if found is None:
        pytest.fail("numpy is not linked against OpenBLAS here: install numpy's PyPI wheel (it bundles OpenBLAS)")
    _setter, getter, _path = found
    before = getter()
    with bench_lanes.blas_threads(1) as info:
        assert info["threads"] == 1 and getter() == 1
    assert getter() == before


def test_cpu_info_parses_proc_cpuinfo() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n"
    assert bench_lanes.cpu_info(text) == ("AMD EPYC 7B13", ["fpu", "avx2", "fma"])


def test_prompt_ids_are_in_vocabulary() -> None:
    ids = bench_lanes.prompt_ids(64, 512)
    assert len(ids) == 64 and all(0 <= i < 512 for i in ids) and len(set(ids)) > 32


def test_options_validate() -> None:
    with pytest.raises(UsageError, match="--reps"):
        bench.BenchOptions(reps=0).validate()
    with pytest.raises(UsageError, match="--prompt-tokens"):
        bench.BenchOptions(prompt_tokens=0).validate()


def test_cli_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            *("bench", "--model", "a.gguf", "--model", "gemma3-270m-q4_k_m", "--impl", "numpy", "--impl", "llama"),
            *("--impl", "llama:type_k=f16,flash_attn=on", "--reps", "3", "--no-llama-bench", "--format", "json"),
            "--baseline",
        ]
    )
    opts = bench_command.options_from_args(args)
    assert opts.models == ("a.gguf", "gemma3-270m-q4_k_m")
    assert opts.impls == ("numpy", "llama", "llama:type_k=f16,flash_attn=on")
    assert opts.reps == 3 and not opts.llama_bench and opts.baseline and opts.format == "json"
    assert bench_command.options_from_args(parser.parse_args(["bench"])).models == ("default-f32",)


# ------------------------------------------------------------------------------------ implementation specs


def test_default_lanes_keep_the_names_baselines_know() -> None:
    """No --impl: numpy, llama, bitnet, each labelled as before, so a baseline's (model, impl) pairs still match."""
    assert [s.label for s in bench_inputs.parse_impls(())] == ["numpy", "llama", "bitnet"]
    assert [s.text for s in bench_inputs.parse_impls(("numpy", "llama"))] == ["numpy", "llama"]
    receipt = make_receipt()
    labels = [
        bench._result(bench_inputs.ModelRef("m", Path("/m"), SHA, 1), s)["impl"]
        for s in map(parse, ("numpy", "llama", "bitnet"))
    ]
    assert labels == ["numpy", "llama", "bitnet"]
    assert bench_gate.match_key(receipt)[-1] == ((SHA, "llama"), (SHA, "numpy"))


def test_impl_specs_become_lane_labels_and_context_parameters() -> None:
    opts = bench.BenchOptions(threads=2, prompt_tokens=64, gen_tokens=16)
    specs = bench_inputs.parse_impls(
        ("llama:type_k=f16,flash_attn=on", "numpy:dtype=float64", "llama", "bitnet:type_v=q8_0", "llama")
    )
    assert [s.label for s in specs] == [
        "llama-type_k-f16-flash_attn-on",
        "numpy-dtype-float64",
        "llama",
        "bitnet-type_v-q8_0",
    ]
    base = bench.lane_params(parse("llama"), opts)
    assert base is not None and (base.type_k, base.type_v, base.flash_attn, base.n_threads) == (0, 0, 0, 2)
    assert base.n_ctx >= 80 and base.n_batch == base.n_ctx  # one batch of prompt + generated tokens
    f16 = bench.lane_params(specs[0], opts)
    assert f16 is not None and (f16.type_k, f16.type_v, f16.flash_attn) == (1, 0, 1)
    assert f16 == dataclasses.replace(base, type_k=1, flash_attn=1)  # the rest is the bench's base configuration
    bitnet = bench.lane_params(specs[3], opts)
    assert bitnet is not None and (bitnet.type_k, bitnet.type_v) == (0, 8)  # K stays F32 (check.job.PRECISE_KV)
    threads = bench.lane_params(parse("llama:threads=3,n_ubatch=16"), opts)
    assert threads is not None and (threads.n_threads, threads.n_ubatch) == (3, 16)
    assert bench.lane_params(specs[1], opts) is None  # numpy: no C++ context
    # the cross-check lane is the llama kind's base, whatever specs the run has
    x = bench.xcheck_params(opts)
    assert (x.type_k, x.type_v, x.flash_attn, x.n_batch, x.n_threads) == (1, 1, 0, 80, 1)
    result = bench._result(bench_inputs.ModelRef("m", Path("/m"), SHA, 1), specs[0])
    assert result["impl"] == "llama-type_k-f16-flash_attn-on" and result["spec"] == "llama:type_k=f16,flash_attn=on"


def test_select_impls_one_build_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[str, bool]] = []

    def plan(kind: str, optional: bool, verbose: bool, source: str | None = None) -> Any:
        built.append((kind, optional))
        return None if kind == "bitnet" else f"plan-{kind}"

    monkeypatch.setattr(bench_inputs, "_plan", plan)
    impls = bench_inputs.select_impls(("numpy:dtype=float64", "llama:type_k=f16", "llama"))
    assert list(impls) == ["numpy-dtype-float64", "llama-type_k-f16", "llama"] and built == [("llama", False)]
    assert impls["numpy-dtype-float64"].plan is None and impls["llama"].plan == impls["llama-type_k-f16"].plan
    llama = impls["llama"].plan
    assert llama is not None and (lane := bench.llama_lane(impls)) is not None and lane.plan is llama
    built.clear()
    assert list(bench_inputs.select_impls(())) == ["numpy", "llama"]  # bitnet: only where built
    assert built == [("llama", False), ("bitnet", True)]


def test_numpy_lane_is_opened_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from parity.engines import registry
    from parity.engines.numpy.impl import NumpyImplementation

    opened: list[tuple[str, Any]] = []

    class Engine:
        n_vocab, architecture = 512, "llama"

        def __init__(self, dtype: str) -> None:
            self.dtype = dtype

        def greedy(self, tokens: list[int], n_new: int) -> list[int]:
            return [0] * n_new

    def open_implementation(spec: Any, ctx: Any, engine: Any = None) -> NumpyImplementation:
        opened.append((spec.text, ctx))
        return NumpyImplementation(Engine(spec.get("dtype") or ctx.dtype), spec.text)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "open_implementation", open_implementation)
    spec = bench_lanes.LaneSpec("numpy-dtype-float64", parse("numpy:dtype=float64"), None, Path("/m"), None, Path("/l"))
    lane = bench_lanes.open_lane(spec)
    assert isinstance(lane, bench_lanes.InProcessLane) and lane.label == "numpy-dtype-float64" and lane.impl == "numpy"
    assert lane.record["config"] == {"dtype": "float64"} and opened[0][0] == "numpy:dtype=float64"
    assert opened[0][1].model == Path("/m") and lane.evaluate([1, 2], 3, 2) and lane.evaluations == 2


def test_ratios_and_receipts_name_spec_lanes() -> None:
    samples = {
        label: {"pp": [100.0, 110.0], "tg": [10.0, 11.0]}
        for label in ("numpy", "llama", "llama-type_k-f16", bench.XCHECK_LABEL)
    }
    model = bench_inputs.ModelRef("m", Path("/m"), SHA, 1)
    names = [(q["name"], q["metric"]) for q in bench.ratios(model, samples)]
    assert names == [(n, m) for n in ("numpy/llama", "llama-type_k-f16/llama") for m in ("pp", "tg")]
    r = make_receipt()
    f16 = {**copy.deepcopy(r["results"][1]), "impl": "llama-type_k-f16", "spec": "llama:type_k=f16"}
    r["results"].append(f16)
    r["ratios"] += [{**q, "model_sha256": SHA} for q in bench.ratios(model, samples)]
    assert bench.validation_errors(r) == []
    assert ("throughput", "llama-type_k-f16", "pp") in {(g.kind, g.subject, g.metric) for g in bench_gate.compare(r, r)}
    assert "llama-type_k-f16" in bench_report.render_text(
        r
    ) and "default-f32 · llama-type_k-f16" in bench_report.render_html(r)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpu", "unknown implementation 'gpu'"),
        ("llama:type_k=f99", "implementation spec 'llama:type_k=f99': type_k='f99' is not valid"),
        ("numpy:type_k=f16", "numpy has no option 'type_k'"),
        ("llama:eval_shape=stepwise", "--impl llama:eval_shape=stepwise: eval_shape does not apply"),
        ("cmd:./engine", "--impl cmd:./engine: command './engine' not found"),  # exit 2 now, not a lane later
        ("logits:x.npz", "--impl logits:x.npz: parity bench times an implementation computing logits"),
    ],
)
def test_a_bad_impl_spec_exits_2_naming_it(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from parity import cli

    assert cli.main(["bench", "--impl", "numpy", "--impl", spec]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(UsageError, match=re.escape(message)):
        bench.BenchOptions(impls=(spec,)).validate()


# ------------------------------------------------------------------------------------------ llama-bench


def test_parse_captured_llama_bench_output() -> None:
    tests = llama_bench.parse_llama_bench(SAMPLE.read_text())
    assert [(t["n_prompt"], t["n_gen"]) for t in tests] == [(64, 0), (0, 16)]
    assert tests[0]["build_number"] == 5 and tests[0]["type_k"] == "f16" and tests[0]["flash_attn"] == 0
    pp = llama_bench.summarize_tests(tests[:1])
    assert pp["median"] > 0 and len(pp["samples"]) == 1 and pp["avg_ts"] == pytest.approx(tests[0]["avg_ts"])
    assert (pp["evals_per_sample"], pp["warmup_evals"], pp["timed_evals"]) == (3, 1, 3)


def test_parse_ignores_log_lines_around_the_json() -> None:
    text = "load_backend: loaded CPU backend\n" + SAMPLE.read_text() + "\nsome trailing log\n"
    assert len(llama_bench.parse_llama_bench(text)) == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("avg_ts"), "lacks field 'avg_ts'"),
        (lambda t: t.update(n_prompt="64"), "field 'n_prompt' is str"),
        (lambda t: t.update(samples_ts=1.0), "field 'samples_ts' is float"),
        (lambda t: t.update(n_gen=16), "neither a pp nor a tg test"),
    ],
)
def test_parse_rejects_another_format(mutate: Any, message: str) -> None:
    tests = json.loads(SAMPLE.read_text())
    mutate(tests[0])
    with pytest.raises(llama_bench.LlamaBenchFormatError, match=message):
        llama_bench.parse_llama_bench(json.dumps(tests, indent=2))
    with pytest.raises(llama_bench.LlamaBenchFormatError, match="no JSON array"):
        llama_bench.parse_llama_bench("| model | size |\n")


def test_llama_bench_command_lines() -> None:
    cmd = llama_bench.llama_bench_command(Path("/b/llama-bench"), Path("/m.gguf"), 64, 16, 5, 2, ["-fa", "0"])
    assert " ".join(cmd) == "/b/llama-bench -m /m.gguf -p 64 -n 16 -r 5 -t 2 -o json -fa 0"
    params = {"type_k": 1, "type_v": 1, "flash_attn": 0, "n_batch": 128, "n_ubatch": 128}
    flags = "-ctk f16 -ctv f16 -fa 0 -b 128 -ub 128 --poll 0"  # poll 0: the bridge's thread pool sleeps when idle
    assert " ".join(llama_bench.matched_flags(params)) == flags
    with pytest.raises(UsageError, match="cannot express"):
        llama_bench.matched_flags({**params, "type_k": 0})


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARITY_THIRD_PARTY", str(tmp_path / "tp"))
    monkeypatch.delenv("PARITY_LLAMA_SRC", raising=False)
    return tmp_path


def _tools_plan(fp: Any) -> build_tools.ToolsPlan:
    fp.register([fp.any()], stdout="c++ (Debian 12.2.0-14) 12.2.0\n")  # `c++ --version`
    return build_tools.tools_plan(build.plan(backends.get_spec("llama"), None))


def test_tools_build_commands(fp: Any, isolated: Path) -> None:
    tp = _tools_plan(fp)
    assert tp.tools_dir == isolated / "cache" / f"llama-{tp.lib.lib_key}-tools"
    assert tp.cmake["LLAMA_BUILD_TOOLS"] == "ON" and tp.cmake["LLAMA_BUILD_COMMON"] == "ON"
    assert tp.cmake["BUILD_SHARED_LIBS"] == "OFF" and tp.cmake["GGML_NATIVE"] == "ON"
    src = Path("/src")
    b = str(tp.build_dir)
    assert build_tools.commands(tp, src, 2) == [
        ["cmake", "-S", "/src", "-B", b, "-G", "Ninja", "-C", str(tp.tools_dir / "init-cache.cmake")],
        ["cmake", "--build", b, "--target", "llama-bench", "--parallel", "2"],
    ]
    assert 'set(LLAMA_BUILD_TOOLS "ON" CACHE STRING "" FORCE)' in build_tools.init_cache(tp)
    assert not build_tools.is_built(tp)


def test_llama_bench_runner_interleaves_and_cross_checks(fp: Any, isolated: Path) -> None:
    tp = _tools_plan(fp)
    sample = SAMPLE.read_text()
    params = {"type_k": 1, "type_v": 1, "flash_attn": 0, "n_batch": 128, "n_ubatch": 128, "n_threads": 2}
    # -r 3: the matched lane's evaluations per sample; the sample output has 3 repetitions per test
    base = llama_bench.llama_bench_command(tp.binary, Path("/m.gguf"), 64, 16, 3, 2, [])
    fp.register(base + llama_bench.matched_flags(params), stdout=sample, occurrences=3)
    fp.register(base, stdout=sample, occurrences=3)
    runner = llama_bench.LlamaBenchRunner(tp, Path("/m.gguf"), 64, 16, 2, params, reps_per_invocation=3)
    for _ in range(3):
        runner.run_once()
    # the faked invocations used no CPU: as if llama-bench had waited for a core all along
    assert runner.cpu_wait("matched") == pytest.approx(1.0)
    runner.cpu = {"matched": [0.9, 1.0], "default": [1.0, 1.0]}  # 0.9 CPU s in 1 s of wall time x threads
    runner.psi = {"matched": [0.0, 1e6], "default": [2e5, 1e6]}  # the machine stalled 0 and 0.2 s of 1 s
    runs = runner.results(isolated, "default-f32")
    assert runs[0]["pp"]["cpu_wait"] == pytest.approx(0.1) and runs[1]["tg"]["cpu_wait"] == 0.0
    assert runs[0]["pp"]["cpu_pressure"] == 0.0 and runs[1]["tg"]["cpu_pressure"] == pytest.approx(0.2)
    runner.cpu["matched"] = [1.0, 1.0]
    runs = runner.results(isolated, "default-f32")
    assert [(r["config"], r["invocations"]) for r in runs] == [("matched", 3), ("default", 3)]
    assert runs[0]["command"] == base + llama_bench.matched_flags(params) and runs[1]["command"] == base
    assert runs[0]["settings"]["type_k"] == "f16" and runs[0]["build_commit"]
    pp = runs[0]["pp"]
    # one sample per invocation: its 3 repetitions' tokens over their summed time (one pre-empted 33 ms
    # repetition among 1.4 ms ones is averaged in, not a sample of its own); one warm-up per invocation
    ns = json.loads(sample)[0]["samples_ns"]
    assert pp["samples"] == [pytest.approx(64 * 3 / (sum(ns) / 1e9))] * 3
    assert (pp["evals_per_sample"], pp["warmup_evals"], pp["timed_evals"]) == (3, 3, 9)
    assert pp["avg_ts"] == pytest.approx(json.loads(sample)[0]["avg_ts"])
    assert (isolated / "llama-bench_default-f32_matched.txt").read_text() == sample * 3
    theirs = pp["median"]  # the medians are compared
    ours = {"config": params, "pp": bench_gate.summarize([theirs * 0.97] * 3), "tg": runs[0]["tg"]}
    rows = llama_bench.cross_check(SHA, ours, runs)
    assert [(r["metric"], r["status"]) for r in rows] == [("pp", "pass"), ("tg", "info")]
    ours["pp"] = bench_gate.summarize([theirs * 0.5] * 3)
    assert llama_bench.cross_check(SHA, ours, runs)[0]["status"] == "FAIL"
    ours["pp"] = {**bench_gate.summarize([theirs * 0.97] * 3), "cpu_wait": 0.3}  # our lane waited 30 % for a CPU
    row = llama_bench.cross_check(SHA, ours, runs)[0]
    assert row["status"] == "noisy" and "CPU was busy" in row["reason"]


# ----------------------------------------------------------------------------------------- schema, report


def version1_receipt() -> dict[str, Any]:
    """A receipt as version 1 wrote it: the test hook slowdown_s and the constant warmup_reps, no counts."""
    r = make_receipt()
    r["version"] = 1
    del r["settings"]["min_sample_s"]
    r["settings"].update(warmup_reps=1, slowdown_s={"numpy": 0.05})
    for res in r["results"]:
        res["slowdown_s"] = 0.0
        for metric in ("pp", "tg"):
            for key in ("evals_per_sample", "warmup_evals", "timed_evals"):
                res[metric].pop(key)
    return r


def test_schema_still_accepts_version_1_receipts_and_baselines(tmp_path: Path) -> None:
    old = version1_receipt()
    assert bench.validation_errors(old) == []
    path = tmp_path / "20260101-test-cpu-2cpu.json"
    path.write_text(json.dumps(old))
    assert bench_gate.load_baseline(path)["version"] == 1
    # ... but a version-1 baseline is not compared with a version-2 run (samples are taken differently)
    found, note = bench_gate.find_baseline(make_receipt(), tmp_path)
    assert found is None and "receipt v2" in note


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["settings"].update(slowdown_s={}),
        lambda r: r["settings"].update(warmup_reps=1),
        lambda r: r["results"][0].update(slowdown_s=0.0),
        lambda r: r["settings"].pop("min_sample_s"),
        lambda r: r["results"][0]["pp"].pop("warmup_evals"),
        lambda r: r["results"][1]["tg"].pop("evals_per_sample"),
    ],
)
def test_schema_version_2_has_no_test_hook_and_says_what_ran(mutate: Any) -> None:
    r = make_receipt()
    mutate(r)
    assert bench.validation_errors(r) != []


def test_schema_accepts_a_full_receipt_and_rejects_broken_ones(tmp_path: Path) -> None:
    r = make_receipt()
    assert bench.validation_errors(r) == []
    bad = copy.deepcopy(r)
    bad["results"][0]["impl"] = "gpu"
    del bad["machine"]["slug"]
    errors = bench.validation_errors(bad)
    assert any("impl" in e for e in errors) and any("slug" in e for e in errors)
    with pytest.raises(AssertionError, match="violates the schema"):
        bench.write_receipt(tmp_path / "bench.json", bad)
    assert not (tmp_path / "bench.json").exists()


def test_load_baseline_rejects_non_receipts(tmp_path: Path) -> None:
    p = tmp_path / "20260101-x.json"
    p.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(UsageError, match="not a valid bench baseline"):
        bench_gate.load_baseline(p)


def test_text_and_html_report() -> None:
    r = make_receipt()
    r["gate"]["rows"] = [row.to_dict() for row in bench_gate.compare(make_receipt(), make_receipt(numpy_pp=500.0))]
    r.update(status="fail", exit_code=1)
    text = bench_report.render_text(r)
    assert "numpy/llama" in text and "fails below" in text
    assert "bench: FAIL (exit 1): 2 figure(s) regressed or missing vs the baseline" in text
    page = bench_report.render_html(r)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2 and "default-f32 · numpy" in page


# ------------------------------------------------------------------------------------------------ help


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from parity import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "%%" not in text  # descriptions are not %-formatted, help strings are
    return " ".join(text.split())  # argparse re-wraps descriptions


def test_parity_help_shows_the_whole_exit_code_list(capsys: pytest.CaptureFixture[str]) -> None:
    from parity import cli

    assert cli.__doc__ is not None
    codes = " ".join(cli.__doc__.split("Exit codes:", 1)[1].split("(docs/ARCHITECTURE.md", 1)[0].split())
    assert "4 permission" in codes and "6 repair recursion" in codes  # the docstring wraps the list
    assert f"Exit codes: {codes}" in _help(["--help"], capsys)


def test_bench_help_shows_its_exit_codes_and_no_doubled_percent(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["bench", "--help"], capsys)
    assert "Exit codes: 0 pass (or no baseline yet / baseline written), 1 a throughput" in text
    assert "more than 10% beyond the measured noise" in text
    assert "2 usage error or backend unavailable; 5 build failure; 7 too noisy to judge" in text


def test_reports_render_version_1_and_2_receipts() -> None:
    old, new = version1_receipt(), make_receipt()
    assert "1 warm-up" in bench_report.render_html(old) and "each >= 50 ms" not in bench_report.render_text(old)
    assert "each >= 50 ms of evaluations" in bench_report.render_text(new)
    assert "warmup_evals" in bench_report.render_html(new) and "slowdown" not in bench_report.render_text(old)


# ----------------------------------------------------------------------------- external implementations


ECHO = Path(__file__).resolve().parents[2] / "examples" / "protocol_v2" / "echo_numpy.py"


def test_external_specs_are_bench_lanes(monkeypatch: pytest.MonkeyPatch) -> None:
    """cmd: and py: specs are lanes named `cmd` and `py` (no build); the program must exist (checked up front)."""
    cmd = f"cmd:{sys.executable} {ECHO}"
    specs = bench_inputs.parse_impls((cmd, "py:parity.bench.protocol_probe:zeros", "llama", cmd))
    assert [(s.kind, s.label) for s in specs] == [("cmd", "cmd"), ("py", "py"), ("llama", "llama")]
    assert specs[0].text == cmd
    bench.BenchOptions(impls=(cmd,)).validate()
    built: list[str] = []
    monkeypatch.setattr(bench_inputs, "_plan", lambda kind, optional, verbose: built.append(kind) or "plan")
    impls = bench_inputs.select_impls((cmd, "py:echo_numpy:create"))
    assert list(impls) == ["cmd", "py"] and impls["cmd"].plan is None and built == []
    assert bench.lane_params(specs[0], bench.BenchOptions()) is None
    result = bench._result(bench_inputs.ModelRef("m", Path("/m"), SHA, 1), specs[0])
    assert result["impl"] == "cmd" and result["spec"] == cmd


def test_two_different_commands_are_refused() -> None:
    with pytest.raises(UsageError, match="a second cmd: lane"):
        bench_inputs.parse_impls((f"cmd:{sys.executable} {ECHO}", f"cmd:{sys.executable} -c pass"))


def test_external_lane_times_greedy_through_the_implementation(tmp_path: Path) -> None:
    """ExternalLane times the implementation's greedy (the protocol inside it) and closes it, reading its VmHWM."""

    class Proc:
        pid = os.getpid()

        def poll(self) -> None:
            return None

    class Impl:
        kind, proc = "cmd", Proc()

        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []
            self.closed = False

        def greedy(self, tokens: list[int], n: int) -> list[int]:
            self.calls.append((len(tokens), n))
            return [0] * n

        def close(self) -> None:
            self.closed = True

    impl = Impl()
    lane = bench_lanes.ExternalLane("cmd", impl, 512, "llama", {"load_s": 0.1})  # type: ignore[arg-type]
    assert lane.impl == "cmd" and len(lane.evaluate([1, 2, 3], 1, 2)) == 2 and lane.evaluations == 2
    assert impl.calls == [(3, 1), (3, 1)]
    closed = lane.close()
    assert impl.closed and closed["peak_rss_bytes"] > 0 and "engine process" in closed["rss_method"]
    # a cmd lane's figures are gated and ratioed like any lane
    samples = {label: {"pp": [100.0, 110.0], "tg": [10.0, 11.0]} for label in ("llama", "cmd")}
    names = {q["name"] for q in bench.ratios(bench_inputs.ModelRef("m", Path("/m"), SHA, 1), samples)}
    assert names == {"cmd/llama"}
    r = make_receipt()
    r["results"].append({**copy.deepcopy(r["results"][1]), "impl": "cmd", "spec": "cmd:./e", "implementation": {}})
    assert bench.validation_errors(r) == [] and "cmd" in bench_report.render_text(r)


def _overhead(median: float) -> dict[str, Any]:
    return {
        "positions": 72,
        "vocab": 262144,
        "bytes": 4 * 72 * 262144,
        "command": ["python", "-m", "parity.engines.pyhost", protocol_probe.TARGET],
        "samples": [median, median * 0.9, median * 1.2],
        "median_s": median,
        "min_s": median * 0.9,
        "max_s": median * 1.2,
        "warmup": 1,
        "bar_s": 0.25,
        "verdict": "pass" if median <= 0.25 else "FAIL",
        "method": "m",
    }


def test_protocol_overhead_is_reported_and_gated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Below the bar: a line in the report, exit 0; above: exit 1 naming it. Receipts without it stay valid."""
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(tmp_path / "empty"))
    opts = bench.BenchOptions(out_dir=str(tmp_path))
    assert bench.finish({**make_receipt(), "protocol_overhead": _overhead(0.08)}, opts) == 0
    text = capsys.readouterr().out
    assert "protocol overhead: one logits reply of 72 x 262144 float32 (75.5 MB)" in text and "median 0.080 s" in text
    assert "bar 0.25 s: pass" in text and "bench: NO-BASELINE (exit 0)" in text
    assert "Protocol overhead" in (tmp_path / "report.html").read_text()
    assert bench.finish({**make_receipt(), "protocol_overhead": _overhead(0.4)}, opts) == 1
    text = capsys.readouterr().out
    assert "bench: FAIL (exit 1): protocol overhead 0.400 s above its bar of 0.25 s" in text
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["protocol_overhead"]["verdict"] == "FAIL" and saved["exit_code"] == 1
    assert bench.validation_errors(saved) == []
    assert bench.validation_errors(make_receipt()) == []  # optional: older receipts, --no-protocol-probe
    bad = {**make_receipt(), "protocol_overhead": {**_overhead(0.1), "verdict": "maybe"}}
    assert bench.validation_errors(bad)


def test_protocol_probe_flag_and_factory() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench_command.add_parser(parser.add_subparsers(dest="command"))
    assert bench_command.options_from_args(parser.parse_args(["bench"])).protocol_probe
    assert not bench_command.options_from_args(parser.parse_args(["bench", "--no-protocol-probe"])).protocol_probe
    engine = protocol_probe.zeros("/any/model.gguf")
    out = engine.logits([1, 2, 3])
    assert out.shape == (3, protocol_probe.VOCAB) and out.dtype == np.float32 and not out.any()
    assert engine.describe()["name"] == "protocol-probe"


def test_protocol_reader_reads_a_large_payload_through_a_pipe() -> None:
    """The Reader (header, then the payload read into one buffer) over a real pipe, fed by a thread in pieces."""
    import threading

    from parity.engines import protocol

    logits = np.arange(3 * 70000, dtype=np.float32).reshape(3, 70000)
    fields, payload = protocol.logits_payload(logits)
    message = protocol.encode({"ok": True, "id": 1, **fields}, payload) + protocol.encode({"ok": True, "id": 2})
    r, w = os.pipe()

    def feed() -> None:
        for i in range(0, len(message), 100003):  # a header split from its payload, payloads split anywhere
            os.write(w, message[i : i + 100003])
        os.close(w)

    t = threading.Thread(target=feed)
    t.start()
    try:
        reader = protocol.Reader(r)
        header, got = reader.read(time.monotonic() + 30)
        assert header["id"] == 1 and header["payload_bytes"] == len(payload) == 4 * logits.size
        out = protocol.decode_logits(header, got, 3)
        assert np.array_equal(out, logits) and out.dtype == np.float32
        out[0, 0] = 1.0  # a fresh buffer, writable as before
        assert reader.read(time.monotonic() + 30) == ({"ok": True, "id": 2}, b"")
        with pytest.raises(protocol.FrameError, match="closed"):
            reader.read(time.monotonic() + 30)
    finally:
        t.join()
        os.close(r)
    bad = np.ones((2, 3), dtype=np.float32)
    for value in (np.nan, np.inf, -np.inf):
        bad[1, 2] = value
        f, b = protocol.logits_payload(bad)
        with pytest.raises(protocol.FrameError, match="position 1, token 2"):
            protocol.decode_logits(f, bytes(b), 2)


def test_external_engines_start_with_the_bench_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset thread variables are set to --threads while an external engine starts, the user's are kept."""
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with bench_lanes.thread_env(1) as env:
        assert env == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert "OPENBLAS_NUM_THREADS" not in os.environ and os.environ["OMP_NUM_THREADS"] == "4"


def test_the_cross_check_times_the_lane_whose_tree_llama_bench_is_built_from() -> None:
    """The plain llama lane wins; with only a source= lane, that lane (and llama-bench built from its tree)."""
    from parity.bench.inputs import Impl
    from parity.engines import spec as engine_spec

    patched = Impl(engine_spec.parse("llama:source=/x/llama.cpp"), None)
    plain = Impl(engine_spec.parse("llama"), None)
    assert bench.llama_lane({"p": patched, "l": plain}) is plain
    assert bench.llama_lane({"p": patched}) is patched and bench.llama_lane({}) is None
