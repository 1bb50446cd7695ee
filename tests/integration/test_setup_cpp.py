from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from parity.backends import build

from .conftest import run_cli

pytestmark = pytest.mark.compile


def test_build_receipt_records_what_was_built(llama_plan: build.BuildPlan) -> None:
    r = json.loads(llama_plan.receipt_path.read_text())
    assert r["backend"] == "llama"
    assert r["source"]["commit"] == llama_plan.commit
    assert r["cmake"]["CMAKE_BUILD_TYPE"] == "Release"
    assert r["compiler"]["version"] and r["cpu"] == llama_plan.cpu
    assert set(r["durations_s"]) == {"libllama", "bridge"}
    assert llama_plan.bridge_path.stat().st_size > 100_000


def test_second_setup_rebuilds_nothing(llama_plan: build.BuildPlan) -> None:
    before = llama_plan.bridge_path.stat().st_mtime_ns
    t0 = time.perf_counter()
    proc = run_cli("setup-cpp")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr
    assert "$ cmake" not in proc.stderr and "scikit_build_core" not in proc.stderr
    assert proc.stdout.strip() == str(llama_plan.bridge_path)
    assert llama_plan.bridge_path.stat().st_mtime_ns == before
    print(f"second setup-cpp took {elapsed:.2f} s")


def test_bridge_build_shows_ninja_progress(
    llama_plan: build.BuildPlan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real `cmake --build` (the bridge's, through scikit-build-core; seconds, libllama is not rebuilt) shows
    ninja's [n/N] as progress lines when stderr is not a terminal, and still logs the full output."""
    p = dataclasses.replace(llama_plan, bridge_dir=tmp_path / "bridge")
    build._build_bridge(p, verbose=False)
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if re.match(r"  llama: building bridge \[\d+/\d+\] \d+% \d", line)]
    assert progress, err
    assert progress[-1].startswith("  llama: building bridge [2/2] 100% ")  # the end is always shown
    assert "Building CXX object" not in err  # the output itself went to the log, not the console
    assert re.search(r"^\[1/2\] Building CXX object", (p.bridge_dir / "bridge.log").read_text(), re.M)
    assert p.bridge_path.stat().st_size > 100_000


def test_unknown_backend_is_a_usage_error() -> None:
    proc = run_cli("setup-cpp", "--backend", "nope")
    assert proc.returncode == 2
    assert "unknown backend 'nope'" in proc.stderr and "Traceback" not in proc.stderr
