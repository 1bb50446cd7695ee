"""`parity suite` (and `nox -s suite`): an implementation against a reference over a corpus (README, "Suites").

    parity suite --prompts items.jsonl [--impl SPEC] [--reference SPEC] [--out-dir DIR]
    parity suite --text wiki.txt --ctx 256 [--chunks 64] [--score perplexity] ...
    parity suite ... --executor ray [--ray-address ADDR] --workers 2
    parity suite ... --shard 2/3 --out-dir out/shard2    then    parity suite merge out/shard* --out-dir out/all
    parity suite ... --resume                             computes only the items not yet done
    parity suite ... --verdict fixed --max-mean-kld 0.05  thresholds instead of the reference's own variation

Each item's verdict is calibrated by default: within k x the reference's own variation on it (parity.suite.
verdicts; the floor is measured beside the items by parity.suite.calibrate).

Exit codes: 0 every item passes, 1 an item fails or could not be evaluated (a side crashed), 2 bad input or
an incomplete merge, 3 a Ray cluster that cannot be reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from parity.core.proc import log
from parity.errors import UsageError
from parity.suite import receipt, stats, verdicts
from parity.suite.store import Store, in_shard, locked

DEFAULT_OUT = ".parity/suite"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "suite",
        help="an implementation vs a reference over many prompts or a whole text: dataset statistics "
        "(llama-perplexity's KL-divergence definitions), per-item verdicts, shards, Ray (nox -s suite)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help='one item per line: {"text": ...} or {"tokens": [...]}, optional "template", "system", "id"',
    )
    src.add_argument("--text", metavar="FILE", help="a text tokenized once and cut into chunks of --ctx tokens")
    p.add_argument("--ctx", type=int, metavar="N", help="tokens per chunk with --text (llama-perplexity's -c)")
    p.add_argument("--chunks", type=int, metavar="K", help="only the first K chunks of --text")
    p.add_argument(
        "--impl",
        metavar="SPEC",
        help="the implementation under test (default numpy); KIND:model=FILE "
        "loads another file, e.g. llama:model=q4_0.gguf",
    )
    p.add_argument(
        "--reference",
        metavar="SPEC",
        help="the reference (default llama), any implementation spec, e.g. llama:model=f16.gguf",
    )
    p.add_argument(
        "--model-gguf", metavar="PATH", help="the model of a side without model= (default: the default model)"
    )
    p.add_argument(
        "--score",
        choices=stats.MODES,
        default="all",
        help="all: every position (default); perplexity: "
        "llama-perplexity's positions and numerics (second half of each chunk)",
    )
    p.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="local worker processes (default) or Ray actors"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes / actors, each holding both sides (default 1)",
    )
    p.add_argument(
        "--ray-address", metavar="ADDR", help="a Ray cluster to join (default RAY_ADDRESS, else a local one)"
    )
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="run slice K of N (items with index %% N == K-1); combine with `parity suite merge`",
    )
    p.add_argument("--resume", action="store_true", help="continue --out-dir: compute only the items not yet done")
    p.add_argument("--out-dir", metavar="DIR", help=f"items, progress and suite.json (default {DEFAULT_OUT})")
    _verdict_flags(p, "")
    p.add_argument(
        "--max-mean-kld",
        type=float,
        metavar="X",
        help=f"--verdict fixed: an item passes when its mean KLD <= X (default {verdicts.DEFAULT_MAX_MEAN_KLD:g}); "
        "given without --verdict, it selects fixed",
    )
    p.add_argument("--max-kld-p99", type=float, metavar="X", help="and its 99th KLD percentile <= X")
    p.add_argument("--min-same-top", type=float, metavar="P", help="and its same-top fraction >= P (0..1)")
    p.add_argument(
        "--threads",
        type=int,
        help="threads of each side in each worker (default: [tool.parity] threads shared by the --workers)",
    )
    p.add_argument("--timeout", type=float, help="seconds one side may take on one item before its worker is killed")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary on stdout")
    p.add_argument(
        "--no-repair",
        dest="repair",
        action="store_const",
        const=False,
        help="fail (exit 2) instead of building a missing backend",
    )
    p.add_argument("--verbose", action="store_const", const=True, help="show llama.cpp's log")
    msub = p.add_subparsers(dest="suite_command", metavar="merge", required=False)
    pm = msub.add_parser("merge", help="combine the out directories of shards into one receipt")
    pm.add_argument("dirs", nargs="+", metavar="DIR")
    pm.add_argument(
        "--out-dir", dest="merge_out", required=True, metavar="DIR", help="where the merged suite.json goes"
    )
    _verdict_flags(pm, "merge_")
    pm.add_argument("--max-mean-kld", dest="merge_max_mean_kld", type=float, metavar="X")
    pm.add_argument("--max-kld-p99", dest="merge_max_kld_p99", type=float, metavar="X")
    pm.add_argument("--min-same-top", dest="merge_min_same_top", type=float, metavar="P")
    pm.add_argument("--format", dest="merge_format", choices=("text", "json"), default="text")


def _verdict_flags(p: Any, prefix: str) -> None:
    p.add_argument(
        "--verdict",
        dest=f"{prefix}verdict",
        choices=("calibrated", "fixed"),
        help="calibrated (default): an item passes within k x the reference's own variation on it (a C++ "
        "reference; README, Suites); fixed: --max-mean-kld (and --max-kld-p99, --min-same-top)",
    )
    p.add_argument(
        "--tie-margin",
        dest=f"{prefix}tie_margin",
        type=float,
        help="calibrated: a top-1 flip is also a tie where the reference's top-2 probabilities differ by less "
        "than this (default 0.01)",
    )


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(
            f"--shard {text}: not K/N with 1 <= K <= N", fix="e.g. --shard 2/3 (the second of three slices)"
        )
    return int(m.group(1)), int(m.group(2))


def _mode(flag: str | None, tie_margin: float | None, thresholds: dict[str, float | None]) -> tuple[str, float]:
    """(verdict mode, tie margin) as parity run resolves them (flag > PARITY_VERDICT > [tool.parity]); suite
    thresholds given without --verdict select fixed, and with --verdict calibrated are exit 2."""
    from parity import options

    given = [f"--{k.replace('_', '-')}" for k, v in thresholds.items() if v is not None]
    if given and flag == "calibrated":
        raise UsageError(
            f"{' and '.join(given)} only apply with --verdict fixed", fix="drop them, or pass --verdict fixed"
        )
    opts = options.resolve({"verdict": flag, "tie_margin": tie_margin})
    return ("fixed" if given and flag is None else opts.verdict), opts.tie_margin


def _thresholds(mean: float | None, p99: float | None, top: float | None) -> verdicts.Thresholds:
    for name, v in (("--max-mean-kld", mean), ("--max-kld-p99", p99)):
        if v is not None and not v >= 0:
            raise UsageError(f"{name} {v}: must be >= 0", fix=f"e.g. {name} 0.001")
    if top is not None and not 0 <= top <= 1:
        raise UsageError(f"--min-same-top {top}: a fraction", fix="e.g. --min-same-top 0.95")
    return verdicts.Thresholds(verdicts.DEFAULT_MAX_MEAN_KLD if mean is None else mean, p99, top)


def _finish(out: Path, rec: dict[str, Any], fmt: str) -> int:
    path = receipt.write(out, rec)
    import importlib
    import importlib.util

    if importlib.util.find_spec("parity.suite.report") is not None:  # the HTML page, drawn from the receipt alone
        report = importlib.import_module("parity.suite.report")
        rec["report_html"] = str(report.write(out, rec))
        path = receipt.write(out, rec)
    print(json.dumps(rec, indent=2) if fmt == "json" else receipt.render(rec, path))
    code: int = rec["exit_code"]
    return code


def run(args: argparse.Namespace) -> int:
    if args.suite_command == "merge":
        return merge(args)
    if args.prompts is None and args.text is None:
        raise UsageError("parity suite needs its items", fix="pass --prompts FILE.jsonl, or --text FILE --ctx N")
    if args.text is not None and args.ctx is None:
        raise UsageError("--text needs --ctx N, the tokens per chunk", fix="e.g. --text wiki.txt --ctx 256")
    if args.prompts is not None and (args.ctx is not None or args.chunks is not None):
        raise UsageError("--ctx and --chunks apply to --text", fix="drop them with --prompts")
    for flag, v in (("--ctx", args.ctx), ("--chunks", args.chunks), ("--workers", args.workers)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} {v}: must be a positive integer", fix=f"e.g. {flag} 2")
    if args.executor == "local" and args.ray_address:
        raise UsageError("--ray-address applies to --executor ray", fix="add --executor ray")
    shard = _shard(args.shard)
    th = _thresholds(args.max_mean_kld, args.max_kld_p99, args.min_same_top)
    limits = {"max_mean_kld": args.max_mean_kld, "max_kld_p99": args.max_kld_p99, "min_same_top": args.min_same_top}
    mode, tie_margin = _mode(args.verdict, args.tie_margin, limits)
    from parity import options
    from parity.suite import calibrate
    from parity.suite.prepare import prepare

    if mode == "calibrated":
        calibrate.check_reference(args.reference or "llama")

    given = {
        k: getattr(args, k)
        for k in ("threads", "timeout", "verbose", "repair", "model_gguf")
        if getattr(args, k) is not None
    }
    out = Path(args.out_dir or DEFAULT_OUT)
    opts = options.resolve({**given, "out_dir": str(out)})
    from parity.suite.executors import slot_threads

    threads = slot_threads(opts.threads, args.workers, explicit="threads" in given)
    if args.resume and "threads" not in given:  # the run resumed decided its threads (part of its key): keep them,
        old = Store.read_manifest(out)  # whatever --workers is now
        threads = old["threads"] if old is not None and isinstance(old.get("threads"), int) else threads
    opts = dataclasses.replace(opts, threads=threads)
    prepared = prepare(
        args.impl or "numpy",
        args.reference or "llama",
        opts,
        prompts=Path(args.prompts) if args.prompts else None,
        text=Path(args.text) if args.text else None,
        ctx=args.ctx,
        chunks=args.chunks,
        mode=args.score,
        shard=shard,
    )
    rule: verdicts.Rule = th
    if mode == "calibrated":
        prepared.ref = dataclasses.replace(prepared.ref, evidence=True)  # the workers keep verdicts.evidence()
    with locked(out):
        store = Store.open_write(out, prepared.manifest, args.resume)
        floor = None  # the reference's own variation, measured beside the items (parity.suite.calibrate)
        if mode == "calibrated":
            sha = prepared.manifest["sides"]["reference"]["model"]["sha256"]
            floor = calibrate.Background(prepared.ref, prepared.items, sha, out)
        executor_info, errors = _compute(store, prepared, shard, args)
        if floor is not None:
            rule = verdicts.Calibrated(floor.result(), tie_margin)
        rec = receipt.build([store], rule, executor_info, errors)
    return _finish(out, rec, args.format)


def _compute(
    store: Store, prepared: Any, shard: tuple[int, int] | None, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[int, str]]:
    """Evaluate the items of this run (its shard, minus those done) and persist each as it finishes."""
    from parity.suite import executors

    done = store.done()
    todo = [it for it in prepared.items if in_shard(it.index, shard) and it.index not in done]
    store.progress("run", pid=os.getpid(), done=sorted(done), todo=[it.index for it in todo], resume=bool(args.resume))
    errors: dict[int, str] = {}
    workers = max(1, min(args.workers, len(todo)))
    info: dict[str, Any] = {"kind": args.executor, "workers": args.workers, "threads": prepared.threads}
    info.update(resumed=bool(done), seconds=0.0)
    if args.executor == "ray":
        info["ray_address"] = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if not todo:
        info["tokens_per_second"] = None
        return info, errors
    t0 = time.perf_counter()
    n_tokens = 0

    def on_start(item: Any) -> None:
        store.progress("start", item=item.index)

    def on_done(item: Any, outcome: Any) -> None:
        nonlocal n_tokens
        if outcome.values is None:
            errors[item.index] = outcome.error or "no result"
            store.progress("error", item=item.index, error=errors[item.index])
            log(f"suite: item #{item.index} ({item.id}) failed: {errors[item.index]}")
            return
        if outcome.describe:
            store.save_sides(outcome.describe)
        store.save(item.index, item.id, len(item.tokens), outcome.values, outcome.seconds, outcome.evidence)
        store.progress("done", item=item.index)
        n_tokens += len(item.tokens)

    ex: executors.Executor
    if args.executor == "ray":
        ex = executors.RayExecutor(
            prepared.impl, prepared.ref, args.score, workers, prepared.threads, args.ray_address, bool(args.verbose)
        )
    else:
        ex = executors.LocalExecutor(prepared.impl, prepared.ref, args.score, workers, prepared.threads)
    with ex:
        executors.drive(ex, todo, on_start, on_done)
    seconds = time.perf_counter() - t0
    info.update(seconds=seconds, tokens_per_second=n_tokens / seconds if n_tokens else None)
    return info, errors


def merge(args: argparse.Namespace) -> int:
    """`parity suite merge DIR... --out-dir OUT`: the shards' items as one suite (they must share the suite key)."""
    rule: verdicts.Rule = _thresholds(args.merge_max_mean_kld, args.merge_max_kld_p99, args.merge_min_same_top)
    limits = {"max_mean_kld": args.merge_max_mean_kld, "max_kld_p99": args.merge_max_kld_p99}
    mode, tie_margin = _mode(
        args.merge_verdict, args.merge_tie_margin, {**limits, "min_same_top": args.merge_min_same_top}
    )
    stores = [Store.open_read(Path(d)) for d in args.dirs]
    keys = {st.key for st in stores}
    if len(keys) > 1:
        raise UsageError(
            f"the directories hold different suites ({len(keys)} suite keys: other items, sides, models or scoring)",
            fix="merge the shards of one `parity suite` command line",
        )
    out = Path(args.merge_out)
    if any(out.resolve() == Path(d).resolve() for d in args.dirs):
        raise UsageError(f"--out-dir {out} is one of the merged directories", fix="write the merge to a new directory")
    if mode == "calibrated":
        from parity.suite import calibrate

        floor = calibrate.read([Path(d) for d in args.dirs])
        if floor is None:
            raise UsageError(
                f"none of the directories holds the reference's floor ({calibrate.FLOOR_FILE}): the shards ran with "
                "--verdict fixed",
                fix="merge with --verdict fixed, or run the shards again without it",
            )
        rule = verdicts.Calibrated(floor, tie_margin)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "kind": "merge",
        "workers": 0,
        "merged_from": [str(d) for d in args.dirs],
        "seconds": 0.0,
        "tokens_per_second": None,
    }
    rec = receipt.build(stores, rule, info, merged=True)
    if not rec["complete"]:
        log(
            f"suite merge: {len(rec['missing'])} item(s) are in none of the directories (a shard missing or unfinished)"
        )
    return _finish(out, rec, args.merge_format)
