"""An alternate that deliberately diverges at step 37 in one field: the report, the stop, the fix, the resume."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path
from typing import Any

from .test_windows_html import EXAMPLES, vm_config, windows_cli


def reference_records(steps: int) -> list[dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("stackvm", EXAMPLES / "stackvm.py")
    assert spec is not None and spec.loader is not None
    vm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vm)
    program = [
        "push 0", "store a", "push 1", "store b", "push 0", "store i",
        "load a", "load b", "add", "load b", "store a", "store b",
        "load b", "load i", "mstore",
        "load i", "push 1", "add", "store i",
        "push 1", "jnz 6",
    ]  # fmt: skip
    m = vm.RefMachine(program)
    out = []
    for n in range(steps):
        pc, op = m.step()
        out.append(m.record(n, pc, op))
    return out


def test_divergence_at_step_37_is_reported_stops_the_run_and_is_fixed_on_resume(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path, steps=60, port_params='{ bug_step = 37, bug_field = "registers.b" }')
    run_dir = tmp_path / "run"
    proc = windows_cli("run", "--config", str(cfg), "--run-dir", str(run_dir))
    assert proc.returncode == 1, proc.stderr
    b37 = reference_records(38)[37]["registers"]["b"]
    assert f"vm-port: step 37 registers.b: reference {b37} vs alternate {b37 + 1}" in proc.stderr
    assert "stopped at window [36, 42) (diverged)" in proc.stdout

    st = json.loads((run_dir / "state.json").read_text())
    assert [w["status"] for w in st["windows"]] == ["verified"] * 6 + ["diverged"] + ["pending"] * 3
    (div,) = st["divergences"]
    assert (div["id"], div["window"], div["window_end"], div["step"], div["fields"]) == (
        "w000036-a1",
        36,
        42,
        37,
        ["registers.b"],
    )
    md = (run_dir / div["report_md"]).read_text()
    assert "# Divergence w000036-a1: window [36, 42), step 37" in md
    assert f"| 37 | `registers.b` | `{b37}` | `{b37 + 1}` | exact; not equal |" in md
    assert "### step 35" in md and "### step 39" in md  # context around the step
    jsonl = [json.loads(line) for line in (run_dir / "divergences.jsonl").read_text().splitlines()]
    assert jsonl[0]["alternates"]["vm-port"]["differences"][0]["alternate"] == b37 + 1

    report = windows_cli("report", "--run-dir", str(run_dir))
    assert report.returncode == 0 and "step 37" in report.stdout and "registers.b" in report.stdout

    cfg.write_text(cfg.read_text().replace(', params = { bug_step = 37, bug_field = "registers.b" }', ""))
    proc = windows_cli("resume", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "FIXED: divergence w000036-a1 (step 37: vm-port in registers.b) no longer reproduces" in proc.stderr
    assert "No open divergences (1 found, all fixed), verified through step 59." in proc.stdout
    st = json.loads((run_dir / "state.json").read_text())
    assert [len(w["attempts"]) for w in st["windows"]] == [1] * 6 + [2] + [1] * 3  # nothing verified recomputed
    assert st["divergences"][0]["status"] == "fixed" and st["windows"][6]["attempts"][1]["fixed"] == ["w000036-a1"]
    assert any(e["kind"] == "config-changed" for e in st["events"])

    arch = windows_cli("report", "--run-dir", str(run_dir), "--archive")
    assert arch.returncode == 0, arch.stderr
    st = json.loads((run_dir / "state.json").read_text())
    (record,) = st["archives"]
    with tarfile.open(run_dir / record["path"]) as tar:
        names = tar.getnames()
    assert "reports/w000036-a1.md" in names and "traces/w000036/a1/vm-port.jsonl" in names
    assert "archived on" in (run_dir / "reports" / "w000036-a1.md").read_text()
    assert (run_dir / "traces" / "w000036" / "a1" / "ARCHIVED.txt").is_file()
