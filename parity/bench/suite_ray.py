"""Ray actors against local workers on one suite (issue 16: "2 Ray actors on 2 cores are not slower than 1
local worker").

The same `parity suite` command line (one model pair, one text, one context, `--score perplexity`) is run whole,
as a user runs it, once per executor: `--executor local --workers 1` and `--executor ray --workers N` (a local
Ray cluster started by the run itself, so its start is part of what is timed). Each run's threads are the
suite's own default: the `threads` budget ([tool.parity] threads / PARITY_THREADS) shared by its slots
(parity.suite.executors.slot_threads: N actors on a 2-thread budget get 1 thread each, 1 local worker gets 2).

Two figures per run:
- wall: the whole command (interpreter start, tokenization, executor start, every model load, every item,
  the receipt), the user's figure;
- steady: items per second once every slot has returned its first item (from the run's progress.jsonl:
  the items done after the first N, over the time from the N-th completion to the last), i.e. without
  Ray's and the models' start-up.

`python -m parity.bench.suite_ray BASE OTHER [--chunks K] [--workers N]` prints the JSON record;
`parity bench --suite-ray BASE OTHER` puts it in the bench receipt as `suite_ray`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from parity.core import paths
from parity.core.proc import CommandError, run

TEXT = paths.project_root() / "parity" / "data" / "corpus.txt"  # the text `parity bench --suite-rate` reads
CHUNKS = 16  # 8 items per actor: enough for a steady state after each actor's first


def load_average() -> list[float]:
    """/proc/loadavg's 1, 5 and 15 minute figures (empty where there is no /proc)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text(encoding="ascii").split()[:3]]
    except OSError:
        return []


def suite_command(
    base_model: Path,
    other_model: Path,
    text: Path,
    out_dir: Path,
    *,
    ctx: int,
    chunks: int,
    executor: str,
    workers: int,
) -> list[str]:
    return [
        *(sys.executable, "-m", "parity", "suite", "--text", str(text), "--ctx", str(ctx), "--chunks", str(chunks)),
        *("--score", "perplexity", "--reference", f"llama:model={base_model}", "--impl", f"llama:model={other_model}"),
        *("--executor", executor, "--workers", str(workers), "--verdict", "fixed"),
        *("--out-dir", str(out_dir), "--format", "json"),
    ]


def steady_rate(progress: list[dict[str, Any]], workers: int) -> float | None:
    """Items per second after every slot's first item: (done - workers) / (last done - workers-th done)."""
    done = sorted(e["t"] for e in progress if e.get("event") == "done")
    if len(done) <= workers:
        return None
    span = done[-1] - done[workers - 1]
    return (len(done) - workers) / span if span > 0 else None


def read_progress(out_dir: Path) -> list[dict[str, Any]]:
    """The events of the run's progress.jsonl (parity.suite.store writes it; a torn last line is skipped)."""
    out = []
    path = out_dir / "progress.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def one_run(cmd: list[str], out_dir: Path, log: Path, workers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        run(cmd, log_file=log)
    except CommandError as exc:
        if exc.returncode != 1:  # 1: an item's verdict failed, which does not change what was timed
            raise
    wall = time.perf_counter() - t0
    rec = json.loads((out_dir / "suite.json").read_text(encoding="utf-8"))
    events = read_progress(out_dir)
    started = min((e["t"] for e in events if e.get("event") == "run"), default=None)
    first = min((e["t"] for e in events if e.get("event") == "done"), default=None)
    ex = rec.get("executor") or {}
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 3),
        "threads_per_slot": ex.get("threads"),
        "first_item_s": None if started is None or first is None else round(first - started, 3),
        "steady_items_per_s": steady_rate(events, workers),
    }


def measure(
    base_model: Path, other_model: Path, text: Path, workdir: Path, *, ctx: int, chunks: int, workers: int = 2
) -> dict[str, Any]:
    """Both executors on the same suite; the receipt's `suite_ray` record (ratios > 1: Ray is faster)."""
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, executor, n in (("local", "local", 1), ("ray", "ray", workers)):
        out = workdir / name
        shutil.rmtree(out, ignore_errors=True)  # the last bench's suite: a new run, not a resume of it
        cmd = suite_command(base_model, other_model, text, out, ctx=ctx, chunks=chunks, executor=executor, workers=n)
        runs[name] = one_run(cmd, out, workdir / f"{name}.log", n) | {"executor": executor, "workers": n}
    local, ray = runs["local"], runs["ray"]
    steady = (
        ray["steady_items_per_s"] / local["steady_items_per_s"]
        if ray["steady_items_per_s"] and local["steady_items_per_s"]
        else None
    )
    return {
        "ctx": ctx,
        "chunks": chunks,
        "runs": [local, ray],
        "wall_ratio": local["wall_s"] / ray["wall_s"],  # > 1: the Ray run took less time
        "steady_ratio": steady,
        "not_slower": local["wall_s"] / ray["wall_s"] >= 1.0,
        "load_average": load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.bench.suite_ray", description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=CHUNKS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("parity-out/suite-ray"))
    a = ap.parse_args(argv)
    rec = measure(a.base, a.other, a.text, a.workdir, ctx=a.ctx, chunks=a.chunks, workers=a.workers)
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
