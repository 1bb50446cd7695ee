"""`parity windows bench`: the harness's own cost per window, at the start of a long run and at its end.

A run of N windows over two external commands (reference and alternate) that each sleep a few
milliseconds and print their records. Per window the harness overhead is the wall time from one window's
save to the next one's minus the time the two commands took (as the harness measured them, process start
included): what parity itself spends on traces, comparison, the journal, compactions and the status page.
The figures that matter are the mean overhead of the first and last 100 windows and their ratio: a
per-window cost that grows with the run shows up as a ratio above 1, whatever the machine's speed.
Window 0 also pays for the pass's start and is left out.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from parity.core import paths
from parity.core.fs import atomic_write_text
from parity.workflow.config import ImplSpec
from parity.workflow.impls import Implementation, RunContext

EDGE = 100  # windows compared at each end

COMMAND_SH = """#!/bin/sh
# protocol-1 command for the benchmark: read the request, sleep, print one record per step
while [ $# -gt 0 ]; do
  case "$1" in --start) s=$2; shift ;; --count) n=$2; shift ;; esac
  shift
done
cat > /dev/null
[ "$PARITY_BENCH_SLEEP" = "0" ] || sleep "$PARITY_BENCH_SLEEP"
i=0
while [ "$i" -lt "$n" ]; do
  printf '{"step": %d, "pc": %d}\\n' $((s + i)) $(((s + i) % 21))
  i=$((i + 1))
done
"""

COMMAND_PY = """import json, os, sys, time
req = json.load(sys.stdin)
time.sleep(float(os.environ["PARITY_BENCH_SLEEP"]))
for step in range(req["start"], req["end"]):
    print(json.dumps({"step": step, "pc": step % 21}))
"""


class Sleeper(Implementation):
    """`--command inprocess`: sleeps in the harness's own process (no process start: the CI-sized test)."""

    def __init__(self, spec: ImplSpec, ctx: RunContext, seconds: float) -> None:
        super().__init__(spec, ctx)
        self.seconds = seconds

    def _window(self, start: int, count: int, tokens: list[int], trace_dir: Path) -> list[dict[str, Any]]:
        if self.seconds > 0:
            time.sleep(self.seconds)
        return [{"step": s, "pc": s % 21} for s in range(start, start + count)]


def _config(directory: Path, windows: int, window: int, command: str, command_ms: float) -> Path:
    if command == "inprocess":
        argv = ["never-run"]
    elif command == "sh":
        script = directory / "cmd.sh"
        atomic_write_text(script, COMMAND_SH)
        argv = ["/bin/sh", str(script)]
    else:
        script = directory / "cmd.py"
        atomic_write_text(script, COMMAND_PY)
        argv = ["{python}", str(script)]
    sleep = "0" if command_ms <= 0 else f"{command_ms / 1000:.6f}"
    # TOML inline tables (JSON strings and arrays of strings are valid TOML)
    opts = f"{{ command = {json.dumps(argv)}, timeout = 60, env = {{ PARITY_BENCH_SLEEP = {json.dumps(sleep)} }} }}"
    text = f"""# parity windows bench: {windows} windows of {window} steps, {command} command sleeping {command_ms} ms
[run]
steps = {windows * window}
window = {window}

[input]
program = ["bench"]

[[implementation]]
name = "ref"
role = "reference"
kind = "command"
options = {opts}

[[implementation]]
name = "alt"
role = "alternate"
kind = "command"
options = {opts}
"""
    path = directory / "bench.toml"
    atomic_write_text(path, text)
    return path


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "mean_ms": round(statistics.fmean(ms), 3),
        "median_ms": round(statistics.median(ms), 3),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 3),
        "max_ms": round(ms[-1], 3),
    }


def run_bench(
    *,
    windows: int = 10_000,
    command_ms: float = 5.0,
    window: int = 6,
    command: str = "sh",
    run_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures (see the module docstring). `run_dir` is kept, a temporary one not."""
    from parity.workflow import runner
    from parity.workflow.journal import JOURNAL_NAME
    from parity.workflow.registry import create
    from parity.workflow.state import STATE_NAME, StateStore

    if windows < 2 * EDGE + 1:
        raise ValueError(f"--windows must be at least {2 * EDGE + 1} (first and last {EDGE} are compared)")
    temp = run_dir is None
    base = Path(tempfile.mkdtemp(prefix="parity-windows-bench-")) if run_dir is None else run_dir.resolve()
    try:
        base.mkdir(parents=True, exist_ok=True)
        cfg = _config(base, windows, window, command, command_ms)
        rdir = base / "run"
        walls: list[float] = []
        commands: list[float] = []
        last = [0.0]

        def observe(w: dict[str, Any], attempt: dict[str, Any]) -> None:
            t = time.perf_counter()
            if last[0]:
                walls.append(t - last[0])
                commands.append(sum(float(p["seconds"]) for p in attempt["participants"].values()))
            last[0] = t
            done = len(walls) + 1
            if progress and done % max(windows // 10, 1) == 0:
                recent = [a - b for a, b in zip(walls[-EDGE:], commands[-EDGE:], strict=True)]
                print(
                    f"  {done}/{windows} windows; overhead of the last {len(recent)}: "
                    f"{statistics.fmean(recent) * 1000:.2f} ms/window",
                    file=sys.stderr,
                    flush=True,
                )

        factory = create
        if command == "inprocess":
            factory = lambda spec, ctx: Sleeper(spec, ctx, command_ms / 1000)  # noqa: E731
        t0 = time.perf_counter()
        out = runner.execute(runner.Request("run", cfg, rdir, quiet=True, observer=observe), factory=factory)
        total = time.perf_counter() - t0
        if out.code != 0:
            raise RuntimeError(f"the benchmark run did not verify every window: {out.headline}")
        overhead = [a - b for a, b in zip(walls, commands, strict=True)]
        first, final = overhead[:EDGE], overhead[-EDGE:]

        t0 = time.perf_counter()
        StateStore(rdir).load(repair=False)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.execute(runner.Request("resume", None, rdir, quiet=True), factory=factory)
        resume_pass_s = time.perf_counter() - t0
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(paths.PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]),
        )
        t0 = time.perf_counter()
        proc = subprocess.run(  # nothing left to compute: the command never runs, so `inprocess` works here too
            [sys.executable, "-m", "parity", "windows", "resume", "--run-dir", str(rdir), "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        resume_cli_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"resume of the benchmark run failed: {proc.stderr.strip()[-400:]}")
        mean_first, mean_last = statistics.fmean(first), statistics.fmean(final)
        med_first, med_last = statistics.median(first), statistics.median(final)
        return {
            "benchmark": "parity windows bench",
            "windows": windows,
            "window_steps": window,
            "command": command,
            "command_ms": command_ms,
            "python": sys.version.split()[0],
            "wall_s": round(total, 3),
            "measured_windows": f"1..{windows - 1} (window 0 includes the pass's start)",
            "wall_per_window": _summary(walls),
            "command_per_window": _summary(commands),
            "overhead_per_window": _summary(overhead),
            f"first_{EDGE}": _summary(first),
            f"last_{EDGE}": _summary(final),
            "ratio_last_first_mean": round(mean_last / mean_first, 3),
            "ratio_last_first_median": round(med_last / med_first, 3),
            "resume": {
                "load_s": round(load_s, 3),
                "pass_in_process_s": round(resume_pass_s, 3),
                "cli_s": round(resume_cli_s, 3),
            },
            "files": {
                "state_json_bytes": (rdir / STATE_NAME).stat().st_size,
                "journal_bytes": (rdir / JOURNAL_NAME).stat().st_size,
                "status_html_bytes": (rdir / "status.html").stat().st_size,
            },
            "run_dir": None if temp else str(rdir),
        }
    finally:
        if temp:
            shutil.rmtree(base, ignore_errors=True)
