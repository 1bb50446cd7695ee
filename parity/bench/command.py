"""`parity bench` on the command line: its parser and the run it dispatches to (parity.bench.main).

parity.cli registers it and is the one error funnel: `run` returns an exit code or raises ParityError.
"""

from __future__ import annotations

import argparse

from parity.bench import gate as bench_gate
from parity.bench import lanes as bench_lanes
from parity.bench import protocol_probe
from parity.bench.main import BenchOptions, finish, run_bench

CROSS_CHECK_THREADS_HELP = (
    "threads of the llama-bench cross-check, on both sides: one, because with as many threads as cores any other "
    "load makes ggml's spin barriers swing the two harnesses apart by up to 45 percent either way"
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `parity bench`; dispatch the parsed arguments to `run`."""
    p = subparsers.add_parser(
        "bench",
        help="throughput of numpy / llama.cpp / bitnet.cpp, cross-checked with llama-bench, gated on a baseline",
        description=(
            "Measure prompt processing and token generation (tokens/s) of each implementation on each model, "
            "cross-check llama.cpp with its own llama-bench, and compare with the newest matching baseline. "
            "Exit codes: 0 pass (or no baseline yet / baseline written), 1 a throughput or same-run ratio dropped "
            "more than 10% beyond the measured noise, the llama-bench cross-check disagreed, an implementation "
            "failed, or moving Gemma-sized logits through protocol v2 took more than "
            f"{protocol_probe.BAR_S:g} s; 2 usage error or backend unavailable; 5 build failure; 7 too noisy to judge "
            "(nothing failed, but a figure's noise band, from its samples' dispersion and the CPU time the lanes "
            "waited for, is wider than the 10% it must resolve)."
        ),
    )
    p.add_argument("--baseline", action="store_true", help="write this run as the baseline for this machine")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME_OR_PATH",
        help="default-f32 (default), default-f16, default-q8_0, a lock name such as gemma3-270m-q4_k_m, "
        "or a GGUF path; repeatable",
    )
    p.add_argument(
        "--impl",
        action="append",
        dest="impls",
        metavar="SPEC",
        help="implementation spec, repeatable: numpy, numpy:dtype=float64, llama, llama:type_k=f16,flash_attn=on, "
        "bitnet, ... (KIND[:key=value,...], as `parity run --impl`; default: numpy, llama, and bitnet where built), "
        "or an engine of your own: 'cmd:ARGV' or py:module:factory (docs/PROTOCOL.md; timed through the protocol); "
        "a lane is named by the spec's label, e.g. llama-type_k-f16, cmd",
    )
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for prompt processing (default 64)")
    p.add_argument("--gen-tokens", type=int, default=16, help="greedy steps for token generation (default 16)")
    p.add_argument(
        "--reps",
        type=int,
        default=5,
        help=f"samples per figure, each after one warm-up evaluation and at least "
        f"{bench_lanes.MIN_SAMPLE_S * 1e3:.0f} ms of evaluations (default 5)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of the C++ engines, numpy's BLAS and llama-bench's default configuration (default 1: on a "
        "2-core machine shared with anything else, 2 threads make llama.cpp's samples swing by 100x)",
    )
    p.add_argument("--out-dir", default=".parity/bench", metavar="DIR", help="receipt, report.html, logs")
    p.add_argument("--no-llama-bench", action="store_true", help="skip the llama-bench cross-check (and its build)")
    p.add_argument(
        "--cross-check-threads", type=int, default=1, metavar="N", help=CROSS_CHECK_THREADS_HELP + " (default 1)"
    )
    p.add_argument(
        "--protocol-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"time {protocol_probe.SAMPLES} logits replies of Gemma 3's size ({protocol_probe.POSITIONS} x "
        f"{protocol_probe.VOCAB} float32) through protocol v2 to a child process; exit 1 when the median exceeds "
        f"{protocol_probe.BAR_S:g} s (default: on)",
    )
    p.add_argument(
        "--harness-overhead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time `parity run` on each model (3 runs, --gen-tokens generated) against numpy's and llama.cpp's own "
        "load and compute for the same job; the difference is the receipt's harness_overhead (default: on)",
    )
    p.add_argument(
        "--suite-rate",
        nargs=2,
        metavar=("BASE", "OTHER"),
        help="also time `parity suite --score perplexity` against llama-perplexity's two KL-divergence runs on the "
        "pair (names or paths as --model) over parity/data/corpus.txt; the receipt's suite_rate (target ratio 0.8)",
    )
    p.add_argument("--suite-rate-ctx", type=int, default=256, metavar="N", help="chunk size of --suite-rate (256)")
    p.add_argument(
        "--suite-ray",
        nargs=2,
        metavar=("BASE", "OTHER"),
        help="also time that suite on 2 Ray actors against 1 local worker (wall and steady state); the receipt's "
        "suite_ray (parity/bench/suite_ray.py; needs the ray package)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary on stdout (default text)")
    p.add_argument("--verbose", action="store_true", help="stream build output")
    p.add_argument(
        "--max-drop",
        type=float,
        default=bench_gate.THRESHOLD,
        help="gate: fail when a figure drops more than this fraction beyond the measured noise (default 0.10)",
    )
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from parsed `parity bench` arguments."""
    return BenchOptions(
        models=tuple(args.models or ("default-f32",)),
        impls=tuple(args.impls or ()),
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        reps=args.reps,
        threads=args.threads,
        out_dir=args.out_dir,
        baseline=args.baseline,
        llama_bench=not args.no_llama_bench,
        format=args.format,
        verbose=args.verbose,
        max_drop=args.max_drop,
        cross_check_threads=args.cross_check_threads,
        protocol_probe=args.protocol_probe,
        harness_overhead=args.harness_overhead,
        suite_rate=tuple(args.suite_rate) if args.suite_rate else None,
        suite_rate_ctx=args.suite_rate_ctx,
        suite_ray=tuple(args.suite_ray) if args.suite_ray else None,
    )


def run(args: argparse.Namespace) -> int:
    """Run `parity bench`; returns the exit code."""
    opts = options_from_args(args)
    return finish(run_bench(opts), opts)
