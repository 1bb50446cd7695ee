"""`parity bench` end to end on the embedded default model: a baseline, a passing run, a slowed-down failing run.

The llama-bench build (LLAMA_BUILD_TOOLS, once per cache) happens in a session fixture, so the timed part of
these tests is a few short benches (3 repetitions on a tiny model). They run single-threaded: on a shared
2-core machine two llama.cpp threads spin-wait for each other whenever one is descheduled, which makes
the timings erratic, and thread scaling is not what these tests are about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from parity import backends, bench, build, build_tools

from .conftest import ROOT

pytestmark = [pytest.mark.compile, pytest.mark.model]


@pytest.fixture(scope="session")
def llama_bench_tools(llama_plan: build.BuildPlan) -> build_tools.ToolsPlan:
    """llama-bench built from the same pinned source as the library (cached under cache/llama-<key>-tools)."""
    spec = backends.get_spec("llama")
    return build_tools.ensure_llama_bench(spec, backends.source_override(spec))


def _bench(out: Path, baselines: Path, *args: str, slowdown: str | None = None) -> tuple[int, str, str]:
    env = dict(os.environ, PARITY_BASELINE_DIR=str(baselines), PARITY_BENCH_MACHINE="itest-machine")
    env.pop("PARITY_BENCH_SLOWDOWN", None)
    if slowdown:
        env["PARITY_BENCH_SLOWDOWN"] = slowdown
    proc = subprocess.run(
        [sys.executable, "-m", "parity.bench", "bench", "--reps", "3", "--threads", "1", "--out-dir", str(out), *args],
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


def test_baseline_then_pass_then_slowdown_fails(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    baselines = tmp_path / "baselines"
    code, out, err = _bench(tmp_path / "none", baselines, "--no-llama-bench", "--impl", "numpy")
    assert code == 0, err
    assert "no baseline for machine itest-machine" in out and "parity bench --baseline" in out

    # numpy and llama.cpp only: bitnet.cpp joins by default wherever a build of it exists
    code, out, err = _bench(
        tmp_path / "base", baselines, "--baseline", "--no-llama-bench", "--impl", "numpy", "--impl", "llama"
    )
    assert code == 0, out + err
    written = list(baselines.glob("*-itest-machine.json"))
    assert len(written) == 1 and f"baseline written: {written[0]}" in out
    r = _receipt(tmp_path / "base")
    by_impl = {x["impl"]: x for x in r["results"]}
    assert by_impl["numpy"]["status"] == "ok" and by_impl["llama"]["status"] == "ok"
    llama = by_impl["llama"]
    assert llama["backend"]["commit"] == backends.get_spec("llama").commit and llama["config"]["type_k"] == 0
    assert llama["peak_rss_bytes"] > 10 * 2**20 and llama["load_s"] > 0 and llama["rpc_overhead_ms"] < 50
    assert len(llama["pp"]["samples"]) == 3 and r["models"][0]["architecture"] == "llama"
    assert {q["name"] for q in r["ratios"]} == {"numpy/llama"}
    assert "<svg" in (tmp_path / "base" / "report.html").read_text()

    # A shared CI machine moves single figures by 20% between runs; the gate rule itself is unit-tested with exact
    # numbers. Here a wide --max-drop keeps "unchanged code passes" robust, and the slowdown below is far beyond it.
    code, out, err = _bench(
        tmp_path / "plain", baselines, "--no-llama-bench", "--impl", "numpy", "--impl", "llama", "--max-drop", "0.6"
    )
    assert code == 0, out + err
    assert "bench: PASS (exit 0)" in out and str(written[0]) in out

    code, out, err = _bench(
        tmp_path / "slow",
        baselines,
        "--no-llama-bench",
        "--impl",
        "numpy",
        "--impl",
        "llama",
        "--max-drop",
        "0.6",
        slowdown="numpy:0.05",
    )
    assert code == 1, out + err
    assert "TEST-ONLY slowdown" in out
    failed = [line.split() for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    subjects = {(cells[0], cells[2], cells[3]) for cells in failed}
    assert ("throughput", "numpy", "pp") in subjects and ("ratio", "numpy/llama", "pp") in subjects, out
    assert "bench: FAIL (exit 1)" in out
    assert _receipt(tmp_path / "slow")["status"] == "fail"


def test_llama_bench_cross_check(llama_bench_tools: build_tools.ToolsPlan, tmp_path: Path) -> None:
    """llama-bench runs with our lane's settings and with its defaults; its JSON is parsed and compared.

    Whether the figures agree depends on the machine's load (a 64-token prompt of the default model takes
    ~1.5 ms, so another job's time slice is a large error), so this asserts the bookkeeping and that the
    exit code follows the verdict; the verdict itself is the cross-check's job in real runs.
    """
    code, out, err = _bench(tmp_path, tmp_path / "baselines", "--impl", "llama")
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
    assert matched["invocations"] == 3 and len(matched["pp"]["samples"]) == 3 and matched["tg"]["median"] > 0
    rows = {c["metric"]: c for c in r["cross_check"]}
    pp = rows["pp"]
    assert rows["tg"]["status"] == "info" and pp["status"] in ("pass", "FAIL")
    assert pp["change"] == pytest.approx(pp["ours"]["q75"] / pp["theirs"]["q75"] - 1)
    assert pp["allowed"] == pytest.approx(0.10 + pp["ours"]["mad"] + pp["theirs"]["mad"])
    assert pp["ours_config"]["type_k"] == 1 and pp["ours_config"]["flash_attn"] == 0
    assert (code == 1) == (pp["status"] == "FAIL"), out + err
    assert "llama-bench cross-check" in out and "llama-bench defaults" in out
