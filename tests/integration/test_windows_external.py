"""Protocol v2 engines in a windows run (issue 13): `kind = "cmd"` opens what `--impl cmd:...` opens.

24 steps in windows of 6 with llama.cpp as the reference: examples/protocol_v2/echo_numpy.py verifies every
window from one long-lived process; tests/integration/engines/faulty.py `crash` is unavailable in every
window (restarted each time), so no window is verified and nothing prints a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build

from .test_windows_html import EXAMPLES, windows_cli

pytestmark = [pytest.mark.compile, pytest.mark.model]
FAULTY = Path(__file__).parent / "engines" / "faulty.py"
ECHO_ARGV = 'argv = "{python} {config_dir}/../protocol_v2/echo_numpy.py"'


def participants(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Each window's last attempt's participants, and each window's status."""
    st = json.loads((run_dir / "state.json").read_text())
    return [w["attempts"][-1]["participants"] for w in st["windows"]], [w["status"] for w in st["windows"]]


def test_cmd_engine_verifies_every_window_from_one_process(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = windows_cli("run", "--config", str(EXAMPLES / "cmd_engine.toml"), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts, statuses = participants(run_dir)
    assert statuses == ["verified"] * 4
    for p in parts:
        assert (p["llama"]["status"], p["echo"]["status"], p["echo"]["result"]) == ("ok", "ok", "match")
        assert p["echo"]["metrics"]["max_abs_logits"] < 1e-4
    # one engine process served all four windows: one start, one log directory
    assert [d.name.split("-")[0] for d in (run_dir / "logs").iterdir()].count("echo") == 1


def test_a_crashing_cmd_engine_never_verifies_a_window(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    text = (EXAMPLES / "cmd_engine.toml").read_text(encoding="utf-8")
    assert ECHO_ARGV in text
    cfg = tmp_path / "crash.toml"
    cfg.write_text(text.replace(ECHO_ARGV, f'argv = "{{python}} {FAULTY} crash"'), encoding="utf-8")
    run_dir = tmp_path / "run"
    proc = windows_cli("run", "--config", str(cfg), "--run-dir", str(run_dir), "--continue-on-divergence")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    parts, statuses = participants(run_dir)
    assert statuses == ["unverified"] * 4
    for p in parts:
        assert p["llama"]["status"] == "ok" and p["echo"]["status"] == "unavailable"
        reason = p["echo"]["reason"]
        assert "exited with status 3" in reason and "faulty: about to crash" in reason, reason
    # restarted after every crash, each start logging to a directory of its own
    logs = sorted(d for d in (run_dir / "logs").iterdir() if d.name.startswith("echo-"))
    assert len(logs) == 4 and all((d / "cmd.log").read_text().strip() == "faulty: about to crash" for d in logs)
