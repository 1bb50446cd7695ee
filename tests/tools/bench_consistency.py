"""Issue 15.4's check of the bench rule: one baseline, N runs of unchanged code, then M runs with the numpy lane
really 20% slower; every run's gate and llama-bench cross-check verdicts tallied.

    python -m tests.tools.bench_consistency [--runs 10] [--slowed 3] [--out DIR] [-- BENCH FLAGS...]

Unchanged runs are `python -m parity bench` subprocesses, as a user runs them. The slowed runs go through the
Python API (parity.bench.main.run_bench) with the numpy engine wrapped here: after each evaluation it sleeps a
quarter of that evaluation's own time, inside the lane's timed region, so its throughput is 1/1.25 = 0.8 of the
unchanged code's (parity has no slow-down hook). The machine should be idle: on a busy one the expected
verdict is "too noisy to judge" (exit 7), which the tally shows as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from parity.bench import command, lanes
from parity.bench import main as bench

MACHINE = "consistency-check"


class TwentyPercentSlower:
    """The numpy engine with every evaluation 25% longer (throughput x 0.8)."""

    def __init__(self, inner: lanes.Engine) -> None:
        self.inner, self.n_vocab, self.architecture = inner, inner.n_vocab, inner.architecture

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        t0 = time.perf_counter()
        out = self.inner.greedy(tokens, n_new)
        time.sleep(0.25 * (time.perf_counter() - t0))
        return out


def _slowed_opener(spec: lanes.LaneSpec) -> lanes.Lane:
    lane = lanes.open_lane(spec)
    if isinstance(lane, lanes.InProcessLane) and lane.engine is not None:
        lane.engine = TwentyPercentSlower(lane.engine)
    return lane


def _verdicts(receipt: dict[str, Any], code: int) -> dict[str, Any]:
    rows = receipt.get("gate", {}).get("rows", [])
    xcheck = receipt.get("cross_check", [])
    return {
        "exit": code,
        "gate": receipt.get("status"),
        "gate_rows": Counter(r["status"] for r in rows),
        "failed": sorted(
            f"{r['kind']}:{r['subject']}:{r['metric']} {r['change']:+.1%}" for r in rows if r["status"] == "FAIL"
        ),
        "cross_check": Counter(str(r.get("status")) for r in xcheck),
        "load": os.getloadavg()[0],
    }


def _options(flags: list[str]) -> bench.BenchOptions:
    """The BenchOptions `parity bench FLAGS` runs with (its own parser)."""
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="cmd"))
    return command.options_from_args(parser.parse_args(["bench", *flags]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--slowed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("bench_flags", nargs="*")
    a = ap.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="bench-consistency-"))
    env = dict(os.environ, PARITY_BASELINE_DIR=str(out / "baselines"), PARITY_BENCH_MACHINE=MACHINE)
    os.environ.update(PARITY_BASELINE_DIR=env["PARITY_BASELINE_DIR"], PARITY_BENCH_MACHINE=MACHINE)
    base = [sys.executable, "-m", "parity", "bench", "--no-harness-overhead", *a.bench_flags]

    def cli(name: str, *extra: str) -> dict[str, Any]:
        proc = subprocess.run([*base, "--out-dir", str(out / name), *extra], capture_output=True, text=True, env=env)
        path = out / name / "bench.json"
        receipt = json.loads(path.read_text()) if path.is_file() else {}
        if not receipt:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        return _verdicts(receipt, proc.returncode)

    results: list[tuple[str, dict[str, Any]]] = [("baseline", cli("baseline", "--baseline"))]
    for i in range(a.runs):
        results.append((f"unchanged-{i + 1}", cli(f"unchanged-{i + 1}")))
        print(results[-1][0], results[-1][1], flush=True)
    for i in range(a.slowed):
        opts = _options([*a.bench_flags, "--no-harness-overhead", "--out-dir", str(out / f"slowed-{i + 1}")])
        receipt = bench.run_bench(opts, open_lane=_slowed_opener)
        code = bench.finish(receipt, opts)
        results.append((f"slowed-{i + 1}", _verdicts(receipt, code)))
        print(results[-1][0], results[-1][1], flush=True)
    print(f"\n{'run':14s} {'exit':>4s}  {'gate':10s} {'gate rows':28s} {'cross-check':24s} load  FAILed figures")
    for name, v in results:
        rows = ", ".join(f"{k} {n}" for k, n in sorted(v["gate_rows"].items()))
        xc = ", ".join(f"{k} {n}" for k, n in sorted(v["cross_check"].items()))
        failed = "; ".join(v["failed"])
        print(f"{name:14s} {v['exit']:>4d}  {v['gate']!s:10s} {rows:28s} {xc:24s} {v['load']:4.1f}  {failed}")
    print(f"(receipts in {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
