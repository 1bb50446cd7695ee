"""The `parity` command. Exit codes: 0 pass, 1 divergence, 2 usage/tokenizer/backend/bad model, 3 network,
4 permission, 5 build, 6 repair recursion, 7 too noisy to judge (parity bench), 70 internal error
(docs/ARCHITECTURE.md, "Contracts").

Exit 70 (EX_SOFTWARE) is any exception that is not one of parity's errors: a bug in parity, never a verdict
on the model. It prints one line, "internal error, please report", with the path of a log file holding the
traceback; it never exits 1, which means "a lane diverged"."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parity import __version__
from parity.errors import ParityError

# The commands defined by a module of their own: name -> (module, the help line `parity --help` shows). Each
# module has add_parser(subparsers) and run(args). main() imports only the module of the command that runs
# (startup time, issue 15: importing them all cost ~0.4 s per command); the others are listed from this table.
# tests/unit/test_cli_lazy.py checks the table against each module's own parser.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-models": (
        "parity.models.fetch",
        "fetch the models pinned in lock/models.lock.json into the cache, or verify the cache",
    ),
    "windows": (
        "parity.workflow.cli",
        "stepwise parity of N implementations in windows, resumable (run|resume|status|report|bench)",
    ),
    "tokenizer": ("parity.tokenize.export", "tokenizer tools"),
    "bench": (
        "parity.bench.command",
        "throughput of numpy / llama.cpp / bitnet.cpp, cross-checked with llama-bench, gated on a baseline",
    ),
    "suite": (
        "parity.suite.command",
        "an implementation vs a reference over many prompts or a whole text: dataset statistics "
        "(llama-perplexity's KL-divergence definitions), per-item verdicts, shards, Ray (nox -s suite)",
    ),
}


def _add_common_flags(p: argparse.ArgumentParser, default_metrics: str) -> None:
    # default=None everywhere: "not given" lets [tool.parity] and PARITY_* env supply the value.
    p.add_argument("--model-gguf", metavar="PATH", help="GGUF model to check (default: the embedded default model)")
    p.add_argument(
        "--impl",
        metavar="SPEC",
        help="the implementation under test (default numpy): numpy[:dtype=float32|float64], cmd:ARGV (protocol v2, "
        "docs/PROTOCOL.md), py:module:factory, logits:FILE.npz, or a C++ engine in another configuration, e.g. llama:type_k=f16,flash_attn=on (keys: type_k, type_v, flash_attn, threads, "
        "n_batch, n_ubatch, eval_shape)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.json for HF tokenizers (default: the default model's; else the GGUF's own vocabulary)",
    )
    p.add_argument("--prompt", help='user prompt (default "What is 2+2?")')
    p.add_argument("--max-tokens", type=int, help="tokens generated greedily after the prompt (default 4)")
    p.add_argument("--cos-tol", type=float, help="a position passes when cosine >= this (default 0.999)")
    p.add_argument(
        "--tie-margin",
        type=float,
        help="the greedy decode must match exactly, except a flip where the reference's top-2 probabilities "
        "differ by less than this (a tie flip, reported; default 0.01)",
    )
    p.add_argument(
        "--verdict",
        choices=("calibrated", "fixed"),
        help="calibrated (default): a lane passes within k x the reference's own variation, measured per lane "
        "(README, Verdicts); fixed: every position meets --cos-tol and --mse-tol",
    )
    loc = p.add_mutually_exclusive_group()
    loc.add_argument(
        "--locate",
        dest="locate",
        action="store_const",
        const="on",
        help="localise every lane: compare each named graph tensor with the reference's (teacher-forced replay) "
        "and fail the lane when an op's error exceeds k x the reference's own variation for that op type, even "
        "if the final logits pass (README, Localisation). Default: only a diverged lane is localised",
    )
    loc.add_argument("--no-locate", dest="locate", action="store_const", const="off", help="never localise a lane")
    p.add_argument("--format", choices=("text", "json"), help="summary format on stdout (default text)")
    p.add_argument(
        "--prompt-template",
        choices=("auto", "raw", "instruct", "llama3-chat", "gemma", "chatml"),
        help="prompt template (default auto: the model's own GGUF chat template rendered in a Jinja2 sandbox, "
        "else the format whose turn markers the vocabulary has (gemma, llama3-chat, chatml), else path hints, "
        "else instruct)",
    )
    p.add_argument("--system-prompt", help="system prompt for templates that have one")
    p.add_argument("--out-dir", metavar="DIR", help="where receipts and worker logs go (default .parity)")
    p.add_argument(
        "--no-repair",
        dest="repair",
        action="store_const",
        const=False,
        help="fail (exit 2) instead of building a missing backend (the default when CI is set)",
    )
    p.add_argument("--verbose", action="store_const", const=True, help="show llama.cpp's log and build output")
    p.add_argument("--dump-ids", action="store_const", const=True, help="print the token ids of the tokenizer.json")
    p.add_argument("--dump-cpp-ids", action="store_const", const=True, help="print the token ids of each C++ backend")
    p.add_argument(
        "--metrics",
        metavar="LIST",
        help=f"comma list of mse,kl,topk (cosine, L2, max-abs always; default {default_metrics})",
    )
    p.add_argument(
        "--parallel",
        action="store_const",
        const=True,
        help="run the lanes at once (receipts identical to a sequential run except timings)",
    )


def _add_run_only_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant",
        choices=(
            "f32",
            "f16",
            "q8_0",
            "ternary",
            "ternary-f32",
            "ternary-f16",
            "ternary-i2_s",
            "ternary-tq2_0",
            "ternary-tq1_0",
        ),
        help="default-model variant (default f32); ternary: the ternary bitnet model, each lane in its backend's native "
        "format (bitnet I2_S, llama TQ2_0); ternary-<format>: every lane on that one file",
    )
    p.add_argument(
        "--eval-shape",
        choices=("batch", "stepwise"),
        help="how lanes evaluate the sequence: one decode (batch, default) or one token per decode (stepwise)",
    )
    p.add_argument(
        "--numerics",
        choices=("exact", "mirror"),
        help="numpy on the dequantized weights (exact, default) or at the lane engine's rounding points (mirror; bitnet)",
    )
    p.add_argument("--mse-tol", type=float, help="a position passes when MSE <= this too (default 0.01)")
    p.add_argument("--threads", type=int, help="threads for the C++ backends (default 2)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="numpy engine precision (default float32)")
    p.add_argument("--timeout", type=float, help="seconds a backend call may take before the worker is killed")
    p.add_argument(
        "--reference",
        "--backend",
        action="append",
        dest="backends",
        metavar="SPEC",
        help="a reference lane (repeatable; default llama, in its most precise configuration): llama, bitnet, "
        "or with options, e.g. llama:type_k=f16",
    )


_COMMON_KEYS = (
    "model_gguf",
    "impl",
    "tokenizer",
    "prompt",
    "max_tokens",
    "cos_tol",
    "tie_margin",
    "verdict",
    "locate",
    "format",
    "prompt_template",
    "system_prompt",
    "out_dir",
    "repair",
    "verbose",
    "dump_ids",
    "dump_cpp_ids",
    "metrics",
    "parallel",
)
_RUN_KEYS = (*_COMMON_KEYS, "variant", "mse_tol", "threads", "dtype", "timeout", "eval_shape", "numerics")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (also the source of `parity --help`).

    `only`: the command about to run. Of the LAZY_COMMANDS only its module is imported and adds its real
    parser; the others are listed with their help line. None: every module's real parser (tests, docs)."""
    # the docstring's first paragraph (it wraps the exit-code list over two lines), not just its first line
    description = " ".join(__doc__.split("\n\n")[0].split()) if __doc__ else None
    parser = argparse.ArgumentParser(prog="parity", description=description)
    parser.add_argument("--version", action="version", version=f"parity {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="numpy engine vs llama.cpp on one prompt (the main job; nox -s parity)")
    _add_common_flags(p_run, "mse,kl,topk")
    _add_run_only_flags(p_run)

    p_both = sub.add_parser(
        "parity-both", help="numpy engine vs bitnet.cpp AND llama.cpp, two lanes (nox -s parity_both)"
    )
    _add_common_flags(p_both, "mse")

    p_setup = sub.add_parser("setup-cpp", help="fetch and build a pinned backend and its bridge (nox -s setup_cpp)")
    p_setup.add_argument("--backend", default="llama", help="backend from lock/lock.toml (default llama)")
    p_setup.add_argument("--source", metavar="PATH", help="local source tree instead of the pinned download")
    p_setup.add_argument("--jobs", type=int, help="parallel build jobs (default: CPU count)")
    p_setup.add_argument("--verbose", action="store_true", help="stream build output")

    p_gen = sub.add_parser("generate-model", help="write the embedded default model (GGUF + tokenizer.json)")
    p_gen.add_argument("--variant", choices=("f32", "f16", "q8_0"), default="f32")
    p_gen.add_argument("-o", "--out-dir", required=True, metavar="DIR")

    for name, (module, help_line) in LAZY_COMMANDS.items():
        if only is None or only == name:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_line)

    p_rec = sub.add_parser("receipts", help="receipt tools")
    rsub = p_rec.add_subparsers(dest="receipts_command", required=True, metavar="ACTION")
    p_verify = rsub.add_parser("verify", help="validate receipts against the shipped JSON Schema (v1 and v2)")
    p_verify.add_argument("files", nargs="+", metavar="FILE")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """`parity run`: a thin layer over parity.api.check."""
    from parity import api

    given = {k: getattr(args, k) for k in _RUN_KEYS if getattr(args, k) is not None}
    result = api.check(reference=args.backends or ["llama"], **given)
    print(result.render())
    return result.exit_code


def cmd_parity_both(args: argparse.Namespace) -> int:
    """`parity parity-both`: parity.api.check against bitnet.cpp and llama.cpp."""
    from parity import api

    given = {k: getattr(args, k) for k in _COMMON_KEYS if getattr(args, k) is not None}
    given.setdefault("metrics", "mse")
    result = api.check(reference=["bitnet", "llama"], **given)
    print(result.render())
    return result.exit_code


def cmd_setup(args: argparse.Namespace) -> int:
    from parity.backends import build, lock

    spec = lock.get_spec(args.backend)
    override = lock.source_override(spec, args.source)
    p = build.ensure_built(spec, override, verbose=args.verbose, jobs=args.jobs)
    print(p.bridge_path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from parity.models import modelgen

    m = modelgen.generate(args.variant, Path(args.out_dir))
    print(f"{m.gguf_path}  sha256 {m.gguf_sha256}")
    print(f"{m.tokenizer_path}  sha256 {m.tokenizer_sha256}")
    return 0


def cmd_receipts_verify(args: argparse.Namespace) -> int:
    from parity.compare import receipts

    bad = 0
    for f in args.files:
        try:
            r = receipts.load(Path(f))
            print(f"ok    {f}  (version {r['version']}, backend {r['backend']})")
        except ParityError as exc:
            bad += 1
            print(f"FAIL  {exc}")
    return 2 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one line per error, traceback only with --debug; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the command is the first word that is not an option (the top-level options take no value)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    handlers: dict[str, Any] = {
        "run": cmd_run,
        "parity-both": cmd_parity_both,
        "setup-cpp": cmd_setup,
        "generate-model": cmd_generate,
        "receipts": cmd_receipts_verify,
    }
    if args.command in LAZY_COMMANDS:
        handlers[args.command] = importlib.import_module(LAZY_COMMANDS[args.command][0]).run
    debug = args.debug or bool(os.environ.get("PARITY_DEBUG"))
    try:
        code: int = handlers[args.command](args)
        return code
    except ParityError as exc:
        if debug:
            traceback.print_exc()
        print(f"parity: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not a ParityError: a bug, reported as such and never as exit 1 (a divergence)
        if debug:
            traceback.print_exc()
        return _internal_error(exc)


EXIT_INTERNAL = 70  # EX_SOFTWARE


def _internal_error(exc: BaseException) -> int:
    """One line naming the exception and a log file with its traceback; returns EXIT_INTERNAL."""
    import tempfile

    text = "".join(traceback.format_exception(exc))
    try:
        fd, name = tempfile.mkstemp(prefix="parity-internal-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"parity {__version__}\nargv: {sys.argv!r}\n\n{text}")
        where = f"traceback in {name}"
    except OSError as write_exc:
        where = f"the traceback could not be written ({write_exc.strerror}); rerun with --debug"
    first = (str(exc).splitlines() or [""])[0]
    print(f"parity: internal error, please report: {type(exc).__name__}: {first} ({where})", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
