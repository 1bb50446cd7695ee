"""`parity bench` end to end on the embedded default model: a baseline, a passing run, a slowed-down failing run,
the warm-up a receipt records against what ran, and the llama-bench cross-check.

The llama-bench build (LLAMA_BUILD_TOOLS, once per cache) happens in a session fixture, so the timed part of
these tests is a few short benches (3 samples per figure on a tiny model). They run single-threaded: on a shared
2-core machine two llama.cpp threads spin-wait for each other whenever one is descheduled, which makes
the timings erratic, and thread scaling is not what these tests are about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build, lock, tools
from parity.bench import lanes
from parity.bench import main as bench

from .conftest import ROOT

pytestmark = [pytest.mark.compile, pytest.mark.model]
MACHINE = "itest-machine"


@pytest.fixture(scope="session")
def llama_bench_tools(llama_plan: build.BuildPlan) -> tools.ToolsPlan:
    """llama-bench built from the same pinned source as the library (cached under cache/llama-<key>-tools)."""
    spec = lock.get_spec("llama")
    return tools.ensure_llama_bench(spec, lock.source_override(spec))


def _bench(
    out: Path,
    baselines: Path,
    *args: str,
    probe: bool = False,
    overhead: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """`parity bench` in a subprocess; without the protocol overhead probe unless `probe` (its bar is absolute,
    and these tests are about the lanes: test_external_lanes_and_protocol_overhead measures it), and without the
    harness overhead figure unless `overhead` (test_harness_overhead_is_recorded)."""
    env = dict(os.environ, **(env or {}), PARITY_BASELINE_DIR=str(baselines), PARITY_BENCH_MACHINE=MACHINE)
    flags = ("--reps", "3", "--threads", "1", "--out-dir", str(out), *(() if probe else ("--no-protocol-probe",)))
    flags += () if overhead else ("--no-harness-overhead",)
    proc = subprocess.run(
        [sys.executable, "-m", "parity", "bench", *flags, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _receipt(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "bench.json").read_text())
    assert bench.validation_errors(data) == []
    return data


class SlowEngine:
    """The numpy engine, `delay` seconds slower per evaluation: the sleep is inside the lane's timed region."""

    def __init__(self, inner: lanes.Engine, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.n_vocab, self.architecture = inner.n_vocab, inner.architecture

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        time.sleep(self.delay)
        return self.inner.greedy(tokens, n_new)


class CountingEngine:
    """Wraps the real numpy engine and counts its evaluations per (prompt length, n_new): what really ran."""

    def __init__(self, inner: lanes.Engine) -> None:
        self.inner, self.n_vocab, self.architecture = inner, inner.n_vocab, inner.architecture
        self.calls: dict[tuple[int, int], int] = {}

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        key = (len(tokens), n_new)
        self.calls[key] = self.calls.get(key, 0) + 1
        return self.inner.greedy(tokens, n_new)


def _wrap_numpy(wrap: Any) -> lanes.LaneOpener:
    """A lane opener that opens lanes as `parity bench` does, then wraps the numpy lane's engine."""

    def opener(spec: lanes.LaneSpec) -> lanes.Lane:
        lane = lanes.open_lane(spec)
        if isinstance(lane, lanes.InProcessLane) and lane.engine is not None:
            lane.engine = wrap(lane.engine)
        return lane

    return opener


def test_baseline_then_pass_then_slowdown_fails(
    llama_plan: build.BuildPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    baselines = tmp_path / "baselines"
    code, out, err = _bench(tmp_path / "none", baselines, "--no-llama-bench", "--impl", "numpy")
    assert code == 0, err
    assert f"no baseline for machine {MACHINE}" in out and "parity bench --baseline" in out

    # numpy and llama.cpp only: bitnet.cpp joins by default wherever a build of it exists
    code, out, err = _bench(
        tmp_path / "base", baselines, "--baseline", "--no-llama-bench", "--impl", "numpy", "--impl", "llama"
    )
    assert code == 0, out + err
    written = list(baselines.glob(f"*-{MACHINE}.json"))
    assert len(written) == 1 and f"baseline written: {written[0]}" in out
    r = _receipt(tmp_path / "base")
    assert r["version"] == 2 and "slowdown_s" not in r["settings"] and "warmup_reps" not in r["settings"]
    by_impl = {x["impl"]: x for x in r["results"]}
    assert by_impl["numpy"]["status"] == "ok" and by_impl["llama"]["status"] == "ok"
    llama = by_impl["llama"]
    assert llama["backend"]["commit"] == lock.get_spec("llama").commit and llama["config"]["type_k"] == 0
    assert llama["peak_rss_bytes"] > 10 * 2**20 and llama["load_s"] > 0 and llama["rpc_overhead_ms"] < 50
    assert len(llama["pp"]["samples"]) == 3 and r["models"][0]["architecture"] == "llama"
    # the worker lane's evaluations (durations it returned) are exactly the warm-up and timed ones recorded
    assert llama["evaluations"] == sum(llama[m]["warmup_evals"] + llama[m]["timed_evals"] for m in ("pp", "tg"))
    # a tiny-model evaluation takes ~1-2 ms: a sample is many of them (>= 50 ms), not one scheduler slice
    assert llama["pp"]["evals_per_sample"] > 5
    assert {q["name"] for q in r["ratios"]} == {"numpy/llama"}
    assert "<svg" in (tmp_path / "base" / "report.html").read_text()

    # The gate rule itself is unit-tested with exact numbers; here a wide --max-drop keeps "unchanged code passes"
    # robust on a shared machine, and the slowdown below is far beyond it.
    code, out, err = _bench(
        tmp_path / "plain", baselines, "--no-llama-bench", "--impl", "numpy", "--impl", "llama", "--max-drop", "0.6"
    )
    assert str(written[0]) in out, out + err
    if code == 7:  # the machine was too busy to judge: every row said why, none failed
        rows = _receipt(tmp_path / "plain")["gate"]["rows"]
        assert "bench: TOO NOISY TO JUDGE (exit 7)" in out and not any(g["status"] == "FAIL" for g in rows), out
    elif code != 0:
        # Seen once in 7 runs on a 2-core machine shared with other jobs: between two runs seconds apart every
        # absolute throughput dropped ~65% (load average 4.3) while the same-run ratios moved 2-6%. Absolute rows
        # cannot tell a slower machine from slower code; the ratios can. Accept exactly that case, nothing else.
        rows = _receipt(tmp_path / "plain")["gate"]["rows"]
        assert all(g["status"] == "pass" for g in rows if g["kind"] == "ratio"), out
        assert all(g["change"] < -0.3 for g in rows if g["kind"] == "throughput"), out
    else:
        assert "bench: PASS (exit 0)" in out

    # The same bench through its Python API, with the numpy engine 50 ms slower per evaluation (wrapped here,
    # in the test: parity has no slow-down hook).
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(baselines))
    monkeypatch.setenv("PARITY_BENCH_MACHINE", MACHINE)
    opts = bench.BenchOptions(
        impls=("numpy", "llama"),
        reps=3,
        threads=1,
        out_dir=str(tmp_path / "slow"),
        llama_bench=False,
        max_drop=0.6,
        harness_overhead=False,
    )
    receipt = bench.run_bench(opts, open_lane=_wrap_numpy(lambda engine: SlowEngine(engine, 0.05)))
    capsys.readouterr()
    code = bench.finish(receipt, opts)
    out = capsys.readouterr().out
    slow = _receipt(tmp_path / "slow")
    row = next(
        g for g in slow["gate"]["rows"] if (g["kind"], g["subject"], g["metric"]) == ("throughput", "numpy", "pp")
    )
    assert row["change"] < -0.6 and "slowdown" not in json.dumps(slow), out
    if code == 7:
        # an oversubscribed machine (CPU pressure or waiting recorded for the slowed figure) cannot judge, and says
        # so; it never passes the slowdown
        numpy = next(r for r in slow["results"] if r["impl"] == "numpy")["pp"]
        busy = max(numpy.get("cpu_wait", 0.0), numpy.get("cpu_pressure", 0.0))
        assert row["status"] == "noisy" and busy > 0.1, (busy, out)
        assert "bench: TOO NOISY TO JUDGE (exit 7)" in out and slow["status"] == "too-noisy"
    else:
        assert code == 1, out
        failed = [line.split() for line in out.splitlines() if line.rstrip().endswith("FAIL")]
        subjects = {(cells[0], cells[2], cells[3]) for cells in failed}
        # The slowed figure FAILs, or (seen once under load ~10, the throughput row's band widened by CPU pressure
        # to "noisy") the same-run ratio that holds it.
        assert subjects & {("throughput", "numpy", "pp"), ("ratio", "numpy/llama", "pp")}, out
        assert "bench: FAIL (exit 1)" in out and "regressed or missing vs the baseline" in out
        assert slow["status"] == "fail"
    # The numpy/llama ratio shows the slowdown too (-90% or worse). Whether its row FAILs depends on the load:
    # a ratio cannot drop more than 100%, and 60% + both runs' MADs exceeded that once on this shared machine.
    ratio = next(
        g for g in slow["gate"]["rows"] if (g["kind"], g["subject"], g["metric"]) == ("ratio", "numpy/llama", "pp")
    )
    assert ratio["change"] < -0.9, out


def test_receipt_records_the_warm_up_that_really_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receipt's per-figure counts equal the evaluations the (wrapped, real) numpy engine performed."""
    monkeypatch.setenv("PARITY_BASELINE_DIR", str(tmp_path / "baselines"))
    engines: list[CountingEngine] = []

    def counting(engine: lanes.Engine) -> CountingEngine:
        engines.append(CountingEngine(engine))
        return engines[-1]

    opts = bench.BenchOptions(
        impls=("numpy",),
        prompt_tokens=8,
        gen_tokens=2,
        reps=3,
        llama_bench=False,
        out_dir=str(tmp_path),
        protocol_probe=False,
    )
    assert bench.finish(bench.run_bench(opts, open_lane=_wrap_numpy(counting)), opts) == 0
    saved = _receipt(tmp_path)
    assert "warmup_reps" not in saved["settings"] and saved["settings"]["min_sample_s"] == 0.05
    numpy = saved["results"][0]
    ran = engines[0].calls
    for metric, key in (("pp", (8, 1)), ("tg", (1, 2))):
        fig = numpy[metric]
        assert fig["timed_evals"] == 3 * fig["evals_per_sample"] and len(fig["samples"]) == 3
        assert fig["warmup_evals"] + fig["timed_evals"] == ran[key], (metric, fig, ran)
        assert fig["warmup_evals"] >= 2 + 3  # calibration (a warm-up and >= 1 probe), then one per sample
    assert numpy["evaluations"] == sum(ran.values()) and set(ran) == {(8, 1), (1, 2)}


def test_impl_spec_lane_benches_its_configuration(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """`--impl llama:type_k=f16` is a lane of its own, named by the spec's label, with an F16 K cache."""
    args = ("--no-llama-bench", "--impl", "llama", "--impl", "llama:type_k=f16", "--reps", "2")
    code, out, err = _bench(tmp_path, tmp_path / "baselines", *args)
    assert code == 0, out + err
    r = _receipt(tmp_path)
    by_impl = {x["impl"]: x for x in r["results"]}
    assert list(by_impl) == ["llama", "llama-type_k-f16"] and "llama-type_k-f16" in out
    f16, precise = by_impl["llama-type_k-f16"], by_impl["llama"]
    assert f16["status"] == "ok" and f16["spec"] == "llama:type_k=f16" and len(f16["pp"]["samples"]) == 2
    assert (f16["config"]["type_k"], f16["config"]["type_v"]) == (1, 0) and precise["config"]["type_k"] == 0
    assert {k: v for k, v in f16["config"].items() if k != "type_k"} == {
        k: v for k, v in precise["config"].items() if k != "type_k"
    }
    assert {q["name"] for q in r["ratios"]} == {"llama-type_k-f16/llama"}
    assert (tmp_path / "logs" / "worker_llama-type_k-f16.log").is_file()


def test_external_lanes_and_protocol_overhead(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """`--impl 'cmd:ARGV'` and `--impl py:module:factory` are lanes timed through protocol v2 beside llama.cpp, and
    the receipt carries the protocol overhead of a Gemma-sized logits reply (issue 13's bar: <= 0.25 s)."""
    echo = ROOT / "examples" / "protocol_v2" / "echo_numpy.py"
    cmd = f"cmd:{sys.executable} {echo}"
    args = ("--no-llama-bench", "--impl", cmd, "--impl", "py:echo_numpy:create", "--impl", "llama", "--reps", "2")
    env = {"PYTHONPATH": os.pathsep.join([str(echo.parent), os.environ.get("PYTHONPATH", "")])}
    code, out, err = _bench(tmp_path, tmp_path / "baselines", *args, probe=True, env=env)
    r = _receipt(tmp_path)
    by_impl = {x["impl"]: x for x in r["results"]}
    assert list(by_impl) == ["cmd", "py", "llama"], out + err
    for label, spec in (("cmd", cmd), ("py", "py:echo_numpy:create")):
        lane = by_impl[label]
        assert lane["status"] == "ok" and lane["spec"] == spec, out + err
        assert len(lane["pp"]["samples"]) == 2 and len(lane["tg"]["samples"]) == 2
        assert lane["pp"]["median"] > 0 and lane["tg"]["median"] > 0 and lane["load_s"] > 0
        assert lane["implementation"]["name"] == "echo_numpy" and lane["implementation"]["kind"] == label
        assert lane["config"]["thread_env"]["OPENBLAS_NUM_THREADS"] == os.environ.get("OPENBLAS_NUM_THREADS", "1")
        assert lane["peak_rss_bytes"] > 10 * 2**20 and "engine process" in lane["rss_method"]
        assert lane["evaluations"] == sum(lane[m]["warmup_evals"] + lane[m]["timed_evals"] for m in ("pp", "tg"))
    assert str(echo.resolve()) in by_impl["cmd"]["implementation"]["files"]
    assert {q["name"] for q in r["ratios"]} == {"cmd/llama", "py/llama"}
    assert (tmp_path / "logs" / "bench-cmd.log").is_file()
    probe = r["protocol_overhead"]
    assert (probe["positions"], probe["vocab"], probe["bytes"]) == (72, 262144, 72 * 262144 * 4)
    assert len(probe["samples"]) == 7 and probe["min_s"] <= probe["median_s"] <= probe["max_s"]
    assert probe["bar_s"] == 0.25 and "parity.bench.protocol_probe:zeros" in probe["command"]
    assert f"median {probe['median_s']:.3f} s" in out and "protocol overhead:" in out
    # the bar: quiet, the median is ~0.09 s here; other jobs on the 2 shared cores pushed it to 0.23 s once, so the
    # test holds the fastest request to the bar and the run's verdict and exit code to the median
    assert probe["min_s"] <= 0.25, f"protocol overhead: every request above 0.25 s: {probe['samples']}"
    if probe["median_s"] <= 0.25:
        assert probe["verdict"] == "pass" and code == 0, out + err
    else:  # FAIL (exit 1) unless waiting for a CPU explains it: then too noisy to judge (exit 7)
        busy = max(probe["cpu_wait"] or 0.0, probe["cpu_pressure"] or 0.0)
        waited = probe["median_s"] * (1 - busy) <= 0.25
        assert (probe["verdict"], code) == (("noisy", 7) if waited else ("FAIL", 1)), out + err


def test_logits_files_are_not_benched(tmp_path: Path) -> None:
    code, out, err = _bench(tmp_path, tmp_path / "baselines", "--impl", "logits:/nonexistent.npz")
    assert code == 2 and "nothing to time" in err, out + err


def test_llama_bench_cross_check_agrees(llama_bench_tools: tools.ToolsPlan, tmp_path: Path) -> None:
    """Our matched llama.cpp lane and llama-bench measure the same work, so their pp figures must agree.

    Same model, threads (1), batch sizes, F16 KV cache, flash attention off, thread-pool polling, a fresh KV
    cache per evaluation, one warm-up evaluation then K timed ones per round on both sides (K = our lane's
    evaluations per sample = llama-bench's -r); each side's K evaluations make one sample of >= 50 ms.
    The rule (parity.bench.noise): |median ours / median llama-bench - 1| <= 10%, judged when the noise band (both
    sides' dispersion and CPU waiting) is narrower than 10%; else "too noisy to judge" (exit 7), never a pass.
    """
    code, out, err = _bench(tmp_path, tmp_path / "baselines", "--impl", "llama", "--reps", "5")
    r = _receipt(tmp_path)
    assert [b["config"] for b in r["llama_bench"]] == ["matched", "default"], err
    matched, default = r["llama_bench"]
    assert matched["settings"] == {
        "n_threads": 1,
        "n_batch": 80,
        "n_ubatch": 80,
        "type_k": "f16",
        "type_v": "f16",
        "flash_attn": 0,
    }
    assert default["settings"]["type_k"] == "f16" and default["settings"]["n_batch"] == 2048
    assert matched["command"][0] == str(llama_bench_tools.binary) and "-ctk" in matched["command"]
    assert matched["command"][matched["command"].index("--poll") + 1] == "0"
    rows = {c["metric"]: c for c in r["cross_check"]}
    pp = rows["pp"]
    ours, theirs = pp["ours"], pp["theirs"]
    k = ours["evals_per_sample"]
    assert k > 5 and matched["command"][matched["command"].index("-r") + 1] == str(k)
    # the same work on both sides: K timed evaluations after one warm-up per sample (ours also calibrated once)
    assert theirs["evals_per_sample"] == k and theirs["warmup_evals"] == matched["invocations"] == 5
    assert len(ours["samples"]) == len(theirs["samples"]) == 5 and ours["warmup_evals"] >= 5 + 2
    assert pp["ours_config"]["type_k"] == 1 and pp["ours_config"]["flash_attn"] == 0
    assert pp["ours_config"]["n_threads"] == 1 and pp["ours_config"]["n_batch"] == 80
    assert pp["change"] == pytest.approx(ours["median"] / theirs["median"] - 1)
    assert pp["allowed"] == 0.10 and "cpu_wait" in ours and "cpu_wait" in theirs
    if pp["status"] == "noisy":  # a busy machine: said so, with the band that was too wide
        assert pp["band"] is None or pp["band"] > 0.10, pp
        assert code == 7 and "bench: TOO NOISY TO JUDGE (exit 7)" in out, out + err
    else:
        assert abs(pp["change"]) <= pp["allowed"] and pp["status"] == "pass" and pp["band"] <= 0.10, out
        assert code == 0, out + err
    assert rows["tg"]["status"] == "info" and "llama-bench cross-check" in out and "llama-bench defaults" in out


def test_harness_overhead_is_recorded(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """The receipt's harness_overhead: `parity run` (3 processes) against numpy's and llama.cpp's own load and
    compute for the same job, timed on bench lanes; what is left is the harness (parity.bench.overhead)."""
    args = ("--no-llama-bench", "--impl", "numpy", "--impl", "llama", "--gen-tokens", "4")
    code, out, err = _bench(tmp_path, tmp_path / "baselines", *args, overhead=True)
    assert code == 0, out + err
    (h,) = _receipt(tmp_path)["harness_overhead"]
    assert "error" not in h, h
    assert h["command"][2:4] == ["parity", "run"] and h["runs"] == 3 and len(h["wall_s"]) == 3
    assert h["gen_tokens"] == 4 and h["prompt_tokens"] > 0
    assert set(h["engines"]) == {"numpy", "llama"}
    for e in h["engines"].values():
        assert e["load_s"] > 0 and e["compute_s"] > 0 and e["total_s"] == pytest.approx(e["load_s"] + e["compute_s"])
    assert h["engines_s"] == pytest.approx(sum(e["total_s"] for e in h["engines"].values()))
    assert h["overhead_s"] == pytest.approx(h["median_wall_s"] - h["engines_s"])
    # a fresh interpreter, imports, a worker process and receipts cost something: never a vacuous zero
    assert h["overhead_s"] > 0 and 0 < h["overhead_fraction"] < 1
    assert {"load", "tokenize", "lane"} <= set(h["run_seconds"])
    assert "harness overhead" in out
    # issue 15's target for the default model, judged on the same runs (recorded, not gated)
    assert h["target"]["max_wall_s"] == 1.0 and h["target"]["wall_s"] == h["median_wall_s"], h["target"]
    assert h["target"]["met"] == (h["median_wall_s"] <= 1.0)
    assert len(h["cpu_s"]) == 3 and all(c > 0 for c in h["cpu_s"]) and h["threads"] == 1
    assert "`parity run` target:" in out
