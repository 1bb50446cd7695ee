"""llama.cpp's own `llama-bench`, run and parsed: the cross-check of `parity bench`.

Our timing of the llama.cpp lane must agree with llama.cpp's own benchmark tool on the same model, threads
and context settings. The binary is built by parity.backends.tools (`ensure_llama_bench`).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from parity.backends.tools import ToolsPlan
from parity.bench import gate
from parity.bench.host import cpu_pressure_us
from parity.core.fs import atomic_write_text
from parity.core.proc import run
from parity.errors import UsageError

# ------------------------------------------------------------------------------------- running llama-bench

# The JSON fields of the pinned llama-bench version that parity reads, with their JSON types
# (tools/llama-bench/llama-bench.cpp: test::get_fields() and json_printer).
LLAMA_BENCH_FIELDS: dict[str, tuple[type, ...]] = {
    "build_commit": (str,),
    "build_number": (int,),
    "cpu_info": (str,),
    "model_filename": (str,),
    "n_batch": (int,),
    "n_ubatch": (int,),
    "n_threads": (int,),
    "type_k": (str,),
    "type_v": (str,),
    "flash_attn": (int,),
    "n_prompt": (int,),
    "n_gen": (int,),
    "n_depth": (int,),
    "avg_ns": (int,),
    "stddev_ns": (int,),
    "avg_ts": (int, float),
    "stddev_ts": (int, float),
    "samples_ns": (list,),
    "samples_ts": (list,),
}
# ggml type ids (BackendParams.type_k/type_v) as llama-bench's -ctk/-ctv spell them. F32 is not among the
# names this version accepts, so the cross-check lane runs with an F16 KV cache on both sides.
GGML_TYPE_NAMES = {1: "f16", 8: "q8_0"}


class LlamaBenchFormatError(UsageError):
    """llama-bench's output is not the JSON of the pinned version (exit 2)."""


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """The tests of `llama-bench -o json` output, each checked against LLAMA_BENCH_FIELDS.

    Log lines around the JSON array (llama-bench writes progress to stderr, which the runner merges)
    are ignored; anything else that differs from the pinned format raises LlamaBenchFormatError.
    """
    fix = "rebuild llama-bench from the pinned source (delete cache/llama-*-tools) or update LLAMA_BENCH_FIELDS"
    start, end = text.find("[\n"), text.rfind("]")
    if start < 0 or end < start:
        raise LlamaBenchFormatError("llama-bench printed no JSON array (was -o json passed?)", fix=fix)
    try:
        tests = json.loads(text[start : end + 1])
    except ValueError as exc:
        raise LlamaBenchFormatError(f"llama-bench output is not valid JSON: {exc}", fix=fix) from exc
    if not isinstance(tests, list) or not tests:
        raise LlamaBenchFormatError("llama-bench printed an empty result list", fix=fix)
    for i, t in enumerate(tests):
        if not isinstance(t, dict):
            raise LlamaBenchFormatError(f"llama-bench test {i} is not an object", fix=fix)
        for key, types in LLAMA_BENCH_FIELDS.items():
            if key not in t:
                raise LlamaBenchFormatError(f"llama-bench test {i} lacks field {key!r}", fix=fix)
            if not isinstance(t[key], types) or isinstance(t[key], bool):
                raise LlamaBenchFormatError(
                    f"llama-bench test {i} field {key!r} is {type(t[key]).__name__}, expected "
                    + " or ".join(ty.__name__ for ty in types),
                    fix=fix,
                )
        if (t["n_prompt"] > 0) == (t["n_gen"] > 0):
            raise LlamaBenchFormatError(f"llama-bench test {i} is neither a pp nor a tg test", fix=fix)
    return list(tests)


def llama_bench_command(
    binary: Path, model: Path, prompt_tokens: int, gen_tokens: int, reps: int, threads: int, extra: list[str]
) -> list[str]:
    """The llama-bench command line: JSON output, our prompt/generation lengths, repetitions and threads."""
    return [
        str(binary),
        "-m",
        str(model),
        "-p",
        str(prompt_tokens),
        "-n",
        str(gen_tokens),
        "-r",
        str(reps),
        "-t",
        str(threads),
        "-o",
        "json",
        *extra,
    ]


def matched_flags(params: dict[str, int]) -> list[str]:
    """llama-bench flags mirroring our cross-check lane: KV cache types, flash attention, batch sizes, and the
    thread pool's polling (`--poll 0`: parity's bridge creates its pool with poll = 0, llama-bench's default
    is 50, i.e. idle threads spin for new work instead of sleeping)."""
    kv = [GGML_TYPE_NAMES.get(params[k]) for k in ("type_k", "type_v")]
    if None in kv:
        raise UsageError(f"llama-bench cannot express KV cache types {params['type_k']}/{params['type_v']}")
    fa = {0: "0", 1: "1", -1: "auto"}[params["flash_attn"]]
    return [
        "-ctk",
        str(kv[0]),
        "-ctv",
        str(kv[1]),
        "-fa",
        fa,
        "-b",
        str(params["n_batch"]),
        "-ub",
        str(params["n_ubatch"]),
        "--poll",
        "0",
    ]


class LlamaBenchRunner:
    """llama-bench on one model in two configurations, one sample per call, to interleave with ours.

    `matched` mirrors our cross-check lane (KV cache types, flash attention, batch sizes, thread polling);
    `default` is llama-bench's own defaults. Each call of `run_once` runs `llama-bench -r K` once per
    configuration: one warm-up evaluation, then K timed ones (fresh KV cache each), exactly what our
    matched lane does in a round (K = its evaluations per sample, bench_lanes.calibrate). The K
    repetitions of one invocation make one sample (tokens x K / their summed time), so llama-bench's
    samples are as long as ours and taken between our rounds, under the same machine load.
    """

    def __init__(
        self,
        tp: ToolsPlan,
        model: Path,
        prompt_tokens: int,
        gen_tokens: int,
        threads: int,
        params: dict[str, int],
        reps_per_invocation: int = 1,
    ) -> None:
        self.reps = reps_per_invocation
        self.commands = {  # matched: the cross-check lane's threads; default: --threads, like our precise lane
            "matched": llama_bench_command(
                tp.binary, model, prompt_tokens, gen_tokens, self.reps, params["n_threads"], matched_flags(params)
            ),
            "default": llama_bench_command(tp.binary, model, prompt_tokens, gen_tokens, self.reps, threads, []),
        }
        self.threads = {"matched": params["n_threads"], "default": threads}
        self.outputs: dict[str, list[str]] = {config: [] for config in self.commands}
        self.tests: dict[str, list[list[dict[str, Any]]]] = {config: [] for config in self.commands}
        self.cpu: dict[str, list[float]] = {config: [0.0, 0.0] for config in self.commands}  # CPU s, wall s x threads
        self.psi: dict[str, list[float] | None] = {config: [0.0, 0.0] for config in self.commands}  # stalled, wall µs

    def run_once(self) -> None:
        """One llama-bench invocation (pp and tg, K repetitions each) of each configuration; its CPU time against
        its wall time x threads says how long it waited for a CPU (cpu_wait, parity.bench.noise)."""
        for config, cmd in self.commands.items():
            before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            psi = cpu_pressure_us()
            output = run(cmd)
            wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
            psi_after, acc = cpu_pressure_us(), self.psi[config]
            if psi is None or psi_after is None or acc is None:
                self.psi[config] = None
            else:
                acc[0], acc[1] = acc[0] + psi_after - psi, acc[1] + wall * 1e6
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            self.cpu[config][0] += cpu
            self.cpu[config][1] += wall * self.threads[config]
            self.tests[config].append(parse_llama_bench(output))
            self.outputs[config].append(output)

    def cpu_wait(self, config: str) -> float | None:
        """1 - CPU time / (wall time x threads) of a configuration's invocations (None before any ran)."""
        cpu, capacity = self.cpu[config]
        return min(1.0, max(0.0, 1.0 - cpu / capacity)) if capacity > 0 else None

    def results(self, out_dir: Path, model_name: str) -> list[dict[str, Any]]:
        """One record per configuration: settings and pp/tg statistics over all invocations; raw output saved."""
        records = []
        for config, cmd in self.commands.items():
            runs = self.tests[config]
            if not runs:
                continue
            raw_path = out_dir / f"llama-bench_{gate.slugify(model_name)}_{config}.txt"
            atomic_write_text(raw_path, "".join(self.outputs[config]))
            first = runs[0][0]
            record: dict[str, Any] = {
                "config": config,
                "command": cmd,
                "invocations": len(runs),
                "output": str(raw_path),
                "build_commit": first["build_commit"],
                "build_number": first["build_number"],
                "settings": {
                    k: first[k] for k in ("n_threads", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn")
                },
                "pp": None,
                "tg": None,
            }
            for metric in gate.METRICS:
                tests = [t for tests in runs for t in tests if (t["n_prompt"] > 0) == (metric == "pp")]
                if tests:
                    record[metric] = summarize_tests(tests)
                    wait, psi = self.cpu_wait(config), self.psi[config]
                    if wait is not None:
                        record[metric]["cpu_wait"] = wait
                    if psi is not None and psi[1] > 0:
                        record[metric]["cpu_pressure"] = min(1.0, psi[0] / psi[1])
            records.append(record)
        return records


def summarize_tests(tests: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over llama-bench invocations of one test: each invocation's repetitions are one sample
    (tokens x repetitions / their summed time, from samples_ns), plus what ran (one warm-up evaluation per
    invocation), the mean of its own avg_ts and the standard deviation of those averages."""
    samples = []
    for t in tests:
        n_tokens = t["n_prompt"] if t["n_prompt"] > 0 else t["n_gen"]
        ns = [int(x) for x in t["samples_ns"]]
        samples.append(n_tokens * len(ns) / (sum(ns) / 1e9))
    avgs = [float(t["avg_ts"]) for t in tests]
    reps = len(tests[0]["samples_ns"])
    return {
        **gate.summarize(samples),
        "evals_per_sample": reps,
        "warmup_evals": len(tests),
        "timed_evals": sum(len(t["samples_ns"]) for t in tests),
        "avg_ts": statistics.fmean(avgs),
        "stddev_ts": statistics.stdev(avgs) if len(avgs) > 1 else float(tests[0]["stddev_ts"]),
    }


def cross_check(model_sha256: str, ours: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our cross-check lane vs llama-bench `matched`: pp judged (10 % either way, parity.bench.noise: pass, FAIL or
    too noisy), tg reported. The medians of both sides' samples are compared (each sample at least
    bench_lanes.MIN_SAMPLE_S of evaluations on both sides), against a noise band from both sides' dispersion and
    CPU waiting."""
    rows = []
    matched = next((r for r in runs if r["config"] == "matched"), None)
    for metric in gate.METRICS:
        if matched is None or matched.get(metric) is None or ours.get(metric) is None:
            continue
        theirs, mine = matched[metric], ours[metric]
        v = gate.judge_agreement(theirs, mine)
        rows.append(
            {
                "model_sha256": model_sha256,
                "metric": metric,
                "ours": mine,
                "theirs": theirs,
                "ours_config": ours["config"],
                "change": v.change,
                "allowed": v.allowed,
                "band": gate.finite(v.band),
                "reason": v.reason,
                "status": v.status if metric == "pp" else "info",
            }
        )
    return rows
