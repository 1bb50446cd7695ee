"""The suite's throughput against llama-perplexity's KL-divergence mode, llama.cpp on both sides (issue 16).

One model pair (BASE as the reference, OTHER as the implementation), one text, one context and thread count:

- llama-perplexity, as users run it: `-m BASE --kl-divergence-base FILE` (evaluates BASE, stores its
  log-probs) then `-m OTHER --kl-divergence-base FILE --kl-divergence` (evaluates OTHER, prints the
  statistics). Both runs are timed whole (process start, model load, warm-up, evaluation, statistics): the
  two of them are what a KL-divergence comparison costs, and they evaluate the same two models parity does.
- `parity suite --text TEXT --ctx N --chunks K --score perplexity --reference llama:model=BASE --impl
  llama:model=OTHER --verdict fixed`, timed whole the same way (interpreter start, tokenization, both models
  loaded in one worker, every chunk evaluated on both sides, statistics, verdicts, receipt, report). `--verdict
  fixed`: llama-perplexity judges nothing, and the default calibrated verdict adds a job it has no counterpart
  for (parity.suite.calibrate measures the reference's own variation on sampled items, a stepwise pass among
  others, cached per user after the first run).

The figure is tokens per second (chunks x ctx over wall seconds) of each, and their ratio; the issue's target
is ratio >= TARGET_RATIO. On a shared machine wall time carries the other processes' load, so each side's CPU
seconds (user + system of the process tree, getrusage) are recorded too, and `cpu_ratio` (llama-perplexity's
CPU seconds over parity's: the same work costs parity 1/cpu_ratio times the CPU). Both printouts are parsed, so the figure also says whether the two agree on mean
KLD, same top p and RMS dp. parity.bench calls `measure()`; the commands it ran are in the result.
"""

from __future__ import annotations

import json
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from parity.backends import lock, perplexity, tools
from parity.bench.suite_ray import load_average
from parity.core import paths
from parity.core.proc import CommandError, run


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process of this one and their waited-for children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


TARGET_RATIO = 0.8
TEXT = paths.project_root() / "parity" / "data" / "corpus.txt"  # what `parity bench --suite-rate` reads


def suite_command(
    base_model: Path, other_model: Path, text: Path, out_dir: Path, *, ctx: int, chunks: int, threads: int
) -> list[str]:
    """The `parity suite` run that answers the same question as the two llama-perplexity runs."""
    return [
        *(sys.executable, "-m", "parity", "suite", "--text", str(text), "--ctx", str(ctx), "--chunks", str(chunks)),
        *("--score", "perplexity", "--reference", f"llama:model={base_model}", "--impl", f"llama:model={other_model}"),
        *("--threads", str(threads), "--verdict", "fixed", "--out-dir", str(out_dir), "--format", "json"),
    ]


def _chunks_of(base_file: Path) -> int:
    return perplexity.read_base_file(base_file).n_chunk


def measure(
    base_model: Path,
    other_model: Path,
    text: Path,
    workdir: Path,
    *,
    ctx: int,
    threads: int,
    chunks: int | None = None,
) -> dict[str, Any]:
    """Time both tools on the same pair, text, context and threads; the receipt's `suite_rate` record.

    `chunks`: the first K chunks of the text (None: every chunk, as llama-perplexity's default)."""
    spec = lock.get_spec("llama")
    ppl = tools.ensure_llama_perplexity(spec, lock.source_override(spec))
    workdir.mkdir(parents=True, exist_ok=True)
    base_file = workdir / "base.kld"
    base_cmd = perplexity.base_command(
        ppl.binary, base_model, text, base_file, n_ctx=ctx, n_chunks=-1 if chunks is None else chunks, threads=threads
    )
    kld_cmd = perplexity.kld_command(ppl.binary, other_model, base_file, n_ctx=ctx, threads=threads)
    cpu0 = _children_cpu()
    base_run = perplexity.run_tool(base_cmd, workdir / "llama-perplexity-base.log")
    chunks = _chunks_of(base_file)
    kld_run = perplexity.run_tool(kld_cmd, workdir / "llama-perplexity-kld.log")
    ppl_cpu = _children_cpu() - cpu0
    base_file.unlink(missing_ok=True)  # n_vocab x 2 bytes per scored position: large, and not needed again
    theirs = perplexity.parse_output(kld_run.output)

    out_dir = workdir / "suite"
    shutil.rmtree(out_dir, ignore_errors=True)  # the last bench's suite: a new run, not a resume of it
    cmd = suite_command(base_model, other_model, text, out_dir, ctx=ctx, chunks=chunks, threads=threads)
    cpu0, t0 = _children_cpu(), time.perf_counter()
    try:
        run(cmd, log_file=workdir / "parity-suite.log")
    except CommandError as exc:
        if exc.returncode != 1:  # 1: an item's verdict failed, which does not change what was timed
            raise
    suite_seconds = time.perf_counter() - t0
    suite_cpu = _children_cpu() - cpu0
    ours = json.loads((out_dir / "suite.json").read_text(encoding="utf-8"))
    tokens = ctx * chunks
    ppl_seconds = base_run.seconds + kld_run.seconds
    ratio = (tokens / suite_seconds) / (tokens / ppl_seconds)
    return {
        "tokens": tokens,
        "ctx": ctx,
        "chunks": chunks,
        "threads": threads,
        "llama_perplexity": {
            "seconds_base": round(base_run.seconds, 3),
            "seconds_kld": round(kld_run.seconds, 3),
            "tokens_per_s": tokens / ppl_seconds,
            "cpu_seconds": round(ppl_cpu, 3),
            "commands": [shlex.join(base_cmd), shlex.join(kld_cmd)],
        },
        "parity_suite": {
            "seconds": round(suite_seconds, 3),
            "tokens_per_s": tokens / suite_seconds,
            "cpu_seconds": round(suite_cpu, 3),
            "command": shlex.join(cmd),
        },
        "ratio": ratio,
        "cpu_ratio": ppl_cpu / suite_cpu if suite_cpu > 0 else None,
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "agreement": _agreement(theirs, ours),
        "load_average": load_average(),
    }


def _agreement(theirs: dict[str, tuple[float, float | None]], suite: dict[str, Any]) -> dict[str, Any]:
    """llama-perplexity's printed figure next to parity's (same units: KLD as is, the rest in percent)."""
    s = suite.get("statistics") or suite.get("summary") or {}
    if not s.get("kld"):
        return {}
    mine = {"Mean KLD": s["kld"]["mean"], "RMS Δp": 100 * s["dp"]["rms"], "Same top p": 100 * s["same_top"]["p"]}
    return {k: {"llama_perplexity": theirs[k][0], "parity": v} for k, v in mine.items() if k in theirs}
