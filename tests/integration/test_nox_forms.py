"""Every documented `nox -s SESSION -- FLAGS` form, run through nox itself exactly as a user types it.

The tests elsewhere call `parity ...` directly; a session that mishandles its posargs (nox hands them to any
session listed in `requires=` as well) is only caught here. Each session reuses its virtualenv under .nox/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parity.backends import build, lock

from .conftest import ROOT

pytestmark = [pytest.mark.compile, pytest.mark.model]


def _nox(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`nox ARGS` in the project root, as a user runs it (stdout and stderr kept apart)."""
    exe = shutil.which("nox") or shutil.which("nox", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "nox"]
    full = {k: v for k, v in os.environ.items() if k not in ("PARITY_FAULT_INJECT", "VIRTUAL_ENV")}
    full.update(env or {})
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, env=full, timeout=1800)


def _readme_nox_forms() -> set[str]:
    """The session names the README shows in `nox -s NAME` commands."""
    return set(re.findall(r"nox -s ([a-z_]+)", (ROOT / "README.md").read_text(encoding="utf-8")))


def test_readme_names_only_sessions_that_exist() -> None:
    proc = _nox("-l")  # every session, selected by default (*) or not (-)
    assert proc.returncode == 0, proc.stderr
    sessions = set(re.findall(r"^[*-] ([a-z_]+) ->", proc.stdout, re.M))
    assert {"tests", "parity"} <= sessions, proc.stdout
    missing = _readme_nox_forms() - sessions
    assert not missing, f"README shows nox sessions that do not exist: {sorted(missing)}"


def test_parity_with_posargs_json_on_stdout(llama_plan: build.BuildPlan) -> None:
    proc = _nox("-s", "parity", "--", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is the JSON summary alone: the build step logs to stderr
    assert summary["overall"]["exit_code"] == 0 and summary["overall"]["tokenizer_consistent"] is True
    assert "Prerequisite session" not in proc.stderr and "unrecognized arguments" not in proc.stderr


def test_suite_with_posargs_keeps_the_example_items(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """`nox -s suite -- FLAGS`: flags that do not name the items keep the example suite (as README shows)."""
    out = tmp_path / "suite"
    proc = _nox("-s", "suite", "--", "--impl", "numpy:dtype=float64", "--out-dir", str(out), "--format", "json")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(proc.stdout)
    assert record["complete"] and record["n_done"] >= 1 and (out / "suite.json").is_file()


def test_parity_both_no_repair(llama_plan: build.BuildPlan) -> None:
    proc = _nox("-s", "parity_both", "--", "--no-repair")
    spec = lock.get_spec("bitnet")
    try:
        bitnet_built = build.is_built(build.plan(spec, lock.source_override(spec)))
    except Exception:  # no clang: bitnet.cpp cannot have been built here
        bitnet_built = False
    if bitnet_built:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    out = proc.stdout + proc.stderr  # nox prints a command's stderr to its stdout
    assert proc.returncode != 0
    assert "failed with exit code 2" in out, out[-3000:]
    assert "auto-repair is off (" in out  # "(--no-repair was given)", or "(CI is set)" in CI
    assert "nox -s setup_cpp -- --backend bitnet" in out and "PARITY_BITNET_SRC" in out
    assert "Traceback" not in out and "unrecognized arguments" not in out


def test_parity_windows_then_status(llama_plan: build.BuildPlan) -> None:
    run = _nox("-s", "parity_windows")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "verified through step 119" in run.stdout, run.stdout[-3000:]
    proc = _nox("-s", "parity_windows", "--", "status")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No divergences found, verified through step 119." in proc.stdout, proc.stdout[-3000:]


def test_bench_baseline(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    env = {"PARITY_BASELINE_DIR": str(tmp_path / "baselines")}
    proc = _nox("-s", "bench", "--", "--baseline", env=env)
    # pass, or on a busy machine exactly "too noisy to judge" (parity exits 7, parity.bench.noise; nox reports any
    # failed session as 1), never a failure
    assert proc.returncode in (0, 1), (proc.stdout[-3000:], proc.stderr[-3000:])
    if proc.returncode == 1:
        assert "bench: TOO NOISY TO JUDGE (exit 7): " in proc.stdout, (proc.stdout[-3000:], proc.stderr[-3000:])
    else:
        assert "bench: BASELINE-WRITTEN (exit 0)" in proc.stdout, proc.stdout[-3000:]
    written = list((tmp_path / "baselines").glob("*.json"))
    assert len(written) == 1, (written, proc.stdout[-2000:])
    assert "unrecognized arguments" not in proc.stdout + proc.stderr
