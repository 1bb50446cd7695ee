"""`parity windows ...` through its argparse front end, in process (numpy engines, no subprocess)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

import parity.cli
from parity.errors import UsageError
from parity.workflow import cli, impls

NUMPY_CONFIG = """
[run]
steps = 8
window = 4

[input]
prompt = "What is 2+2?"
variant = "f32"
top_k = 4

[fields]
top_ids = {{ ties_within = "top_logits" }}
top_logits = {{ abs = 1e-3 }}
logits = {{ abs = 1e-3, optional = true }}
logits_digest = "ignore"

[[implementation]]
name = "np32"
role = "reference"
kind = "numpy"

[[implementation]]
name = "np64"
role = "alternate"
kind = "numpy"
options = {{ dtype = "{alt_dtype}" }}
"""


def parse(*argv: str) -> argparse.Namespace:
    return parity.cli.build_parser().parse_args(["windows", *argv])


def main(*argv: str) -> int:
    """`parity windows ...` through parity.cli.main, the one error funnel (errors become exit codes there)."""
    return parity.cli.main(["windows", *argv])


@pytest.fixture
def numpy_config(tmp_path: Path) -> Path:
    path = tmp_path / "np.toml"
    path.write_text(NUMPY_CONFIG.format(alt_dtype="float64"), encoding="utf-8")
    return path


def test_add_parser_wires_the_windows_command() -> None:
    parser = argparse.ArgumentParser(prog="parity")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["windows", "run", "--config", "x.toml", "--regression", "--from", "6", "--to", "12"])
    assert (args.command, args.windows_action, args.regression, args.from_step, args.to_step) == (
        "windows",
        "run",
        True,
        6,
        12,
    )
    assert parser.parse_args(["windows", "report", "--run-dir", "d", "--archive"]).archive


def test_bench_command_option_does_not_clobber_the_dispatch() -> None:
    args = parse("bench", "--command", "inprocess")  # parity.cli.main dispatches on args.command
    assert (args.command, args.windows_action, args.bench_command) == ("windows", "bench", "inprocess")


def test_numpy_float32_vs_float64_run_status_report(
    numpy_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main("run", "--config", str(numpy_config), "--run-dir", str(run_dir), "--quiet") == 0
    out = capsys.readouterr().out
    assert "No divergences found, verified through step 7." in out and "status.html" in out
    st = json.loads((run_dir / "state.json").read_text())
    (w0, w1) = st["windows"]
    assert st["run"]["llm"] and len(w0["attempts"][0]["reference_tokens"]) == 4
    trace = [
        json.loads(line) for line in (run_dir / w1["attempts"][0]["trace_dir"] / "np64.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in trace] == [4, 5, 6, 7]
    assert set(trace[0]) == {"step", "position", "token", "top_ids", "top_logits", "logits_digest"}  # no full rows
    worst = w1["attempts"][0]["participants"]["np64"]["metrics"]["max_abs_logits"]
    assert 0 < worst < 1e-3  # float32 vs float64 engine: full rows compared in memory
    assert main("status", "--run-dir", str(run_dir), "--format", "json", "--check") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verified_through"] == 7 and summary["counts"]["verified"] == 2
    assert main("report", "--run-dir", str(run_dir)) == 0
    assert "No open divergences" in capsys.readouterr().out
    assert main("resume", "--run-dir", str(run_dir), "--quiet") == 0
    assert "0 window(s) computed" in capsys.readouterr().out


def test_a_perturbed_alternate_diverges_then_resume_reports_it_fixed(
    numpy_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = impls.NumpyImpl._window

    def buggy(
        self: impls.NumpyImpl, start: int, count: int, tokens: list[int], trace_dir: Path
    ) -> list[dict[str, Any]]:
        records = real(self, start, count, tokens, trace_dir)
        for rec in records:
            if self.role == "alternate" and rec["step"] == 5:
                rec["top_logits"] = [rec["top_logits"][0] + 0.01, *rec["top_logits"][1:]]
        return records

    monkeypatch.setattr(impls.NumpyImpl, "_window", buggy)
    run_dir = tmp_path / "run"
    assert main("run", "--config", str(numpy_config), "--run-dir", str(run_dir), "--quiet") == 1
    out = capsys.readouterr().out
    assert "1 open divergence(s)" in out and "window [4, 8) step 5" in out and "top_logits" in out
    assert main("report", "--run-dir", str(run_dir), "--format", "jsonl") == 0
    (line,) = capsys.readouterr().out.splitlines()
    d = json.loads(line)["alternates"]["np64"]["differences"][0]
    assert d["step"] == 5 and d["field"] == "top_logits" and d["index"] == 0
    assert d["alternate"][0] - d["reference"][0] == pytest.approx(0.01, abs=1e-5)  # short lists are shown whole
    monkeypatch.setattr(impls.NumpyImpl, "_window", real)
    assert main("resume", "--run-dir", str(run_dir), "--quiet") == 0
    out = capsys.readouterr().out
    assert "1 window(s) computed" in out and "No open divergences (1 found, all fixed), verified through step 7." in out


def test_usage_errors_exit_2(numpy_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="--from/--to"):
        cli.run(parse("run", "--config", str(numpy_config), "--from", "3"))
    with pytest.raises(UsageError, match="exclude each other"):
        cli.run(parse("run", "--config", str(numpy_config), "--resume", "--regression"))
    assert main("status", "--run-dir", str(tmp_path / "nothing")) == 2
    assert main("status") == 2
    assert main("run", "--config", str(tmp_path / "missing.toml")) == 2
    assert main("report", "--run-dir", str(tmp_path / "nothing")) == 2
