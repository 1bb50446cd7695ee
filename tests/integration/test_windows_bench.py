"""Per-window cost of the windows harness stays flat as a run grows (CI-sized `parity windows bench`).

The 10,000-window figure is the benchmark's (`parity windows bench --windows 10000 --command-ms 5`); this
runs the same code on 1,000 windows with an in-process 1 ms implementation, so it takes seconds. A ratio is
asserted, not a time: last-100 over first-100 mean overhead is machine-independent, and a harness whose
per-window work grows with the run (rewriting the whole state or status page each window) fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .test_windows_html import windows_cli


def test_overhead_per_window_is_flat_and_resume_starts_fast(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = windows_cli(
        "bench", "--windows", "1000", "--command-ms", "1", "--command", "inprocess", "--json", str(out), "--check"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert json.loads(proc.stdout) == figures
    assert figures["windows"] == 1000
    assert figures["ratio_last_first_mean"] <= 2, figures
    assert figures["overhead_per_window"]["mean_ms"] <= 20, figures
    resume = figures["resume"]
    assert resume["load_s"] < 0.5 and resume["cli_s"] < 2.0, resume  # before the journal: 3.3 s at 1,600 windows
    assert figures["files"]["journal_bytes"] > 0
