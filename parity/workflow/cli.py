"""`parity windows run|resume|status|report`: the command-line face of the windows workflow.

`add_parser(subparsers)` adds the `windows` command to parity's parser; `run(args)` executes it and
returns the exit code (0 everything in scope verified, 1 a divergence or an unverified window). Errors are
raised as ParityErrors and reported by parity.cli.main, the one error funnel (docs/ARCHITECTURE.md,
"Layers" and "Contracts"); `python -m parity windows ...` is the same command as `parity windows ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from parity.errors import UsageError


def _add_location(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="implementations file (TOML; see README.md, section Stepwise parity)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="the run's directory (default: [run] dir of the config, else .parity/windows/<config name>)",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `windows` with its actions to an argparse subparsers object; returns the `windows` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "windows",
        help="stepwise parity of N implementations in windows, resumable (run|resume|status|report|bench)",
        description="Compare implementations step by step against a reference, in windows of W steps, with a "
        "persisted, resumable state, divergence reports and a status page (README.md, section Stepwise parity).",
    )
    sub = p.add_subparsers(dest="windows_action", required=True, metavar="ACTION")

    p_run = sub.add_parser("run", help="start a run (or --resume it, or re-verify it with --regression)")
    _add_location(p_run)
    p_run.add_argument("--start", type=int, metavar="N", help="first step (default: [run] start, else 0)")
    p_run.add_argument("--steps", type=int, metavar="N", help="number of steps (default: [run] steps)")
    p_run.add_argument("--window", type=int, metavar="W", help="steps per window (default: [run] window, else 6)")
    p_run.add_argument(
        "--continue-on-divergence",
        action="store_const",
        const=True,
        help="keep going past a diverging or unverified window (default: stop there)",
    )
    p_run.add_argument("--resume", action="store_true", help="same as `parity windows resume`")
    p_run.add_argument(
        "--regression",
        action="store_true",
        help="re-verify verified windows (all, or --from/--to), appending to the history",
    )
    p_run.add_argument("--from", dest="from_step", type=int, metavar="STEP", help="regression: first step to re-verify")
    p_run.add_argument("--to", dest="to_step", type=int, metavar="STEP", help="regression: end step (exclusive)")
    p_run.add_argument(
        "--fresh",
        action="store_true",
        help="archive an existing run in --run-dir (archive/run-*.tar.gz) and start over",
    )
    p_run.add_argument("--quiet", action="store_true", help="no per-window progress lines on stderr")

    p_resume = sub.add_parser(
        "resume", help="continue a run at its first unverified window (nothing verified is recomputed)"
    )
    _add_location(p_resume)
    p_resume.add_argument(
        "--continue-on-divergence", action="store_const", const=True, help="keep going past a diverging window"
    )
    p_resume.add_argument("--quiet", action="store_true", help="no per-window progress lines on stderr")

    p_status = sub.add_parser("status", help="print the run's status (and regenerate status.md / status.html)")
    _add_location(p_status)
    p_status.add_argument("--format", choices=("markdown", "json"), default="markdown", help="output format")
    p_status.add_argument(
        "--check", action="store_true", help="exit 1 unless every window is verified and no divergence is open"
    )

    p_report = sub.add_parser("report", help="print divergence reports; --archive packs old traces and reports away")
    _add_location(p_report)
    p_report.add_argument("--id", dest="report_id", metavar="ID", help="one divergence (e.g. w000036-a1)")
    p_report.add_argument("--all", action="store_true", help="include fixed and superseded divergences")
    p_report.add_argument("--format", choices=("markdown", "jsonl"), default="markdown", help="output format")
    p_report.add_argument(
        "--archive",
        action="store_true",
        help="archive traces of superseded attempts and reports of fixed divergences (archive markers stay)",
    )

    p_bench = sub.add_parser(
        "bench",
        help="benchmark the harness's own cost per window on a long run (first vs last windows)",
        description="Run N windows of two external commands that sleep --command-ms each and measure parity's "
        "overhead per window (wall time minus the commands' time): first 100 vs last 100 windows, their ratio, "
        "and how long a resume of the finished run takes. Prints JSON.",
    )
    p_bench.add_argument("--windows", type=int, default=10_000, metavar="N", help="windows to run (default 10000)")
    p_bench.add_argument(
        "--command-ms", type=float, default=5.0, metavar="MS", help="each command sleeps MS ms (default 5)"
    )
    p_bench.add_argument("--window", type=int, default=6, metavar="W", help="steps per window (default 6)")
    p_bench.add_argument(
        "--command",
        dest="bench_command",  # not `command`: parity.cli dispatches on args.command
        choices=("sh", "python", "inprocess"),
        default="sh",
        help="the command: a /bin/sh script (default), a Python script (~20-30 ms to start), or inprocess (a sleep "
        "in parity's own process: no process start, for a quick check)",
    )
    p_bench.add_argument("--run-dir", type=Path, metavar="DIR", help="keep the run in DIR (default: a temp dir)")
    p_bench.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    p_bench.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless the last/first overhead ratio is <= 2 and the mean overhead <= 20 ms per window",
    )
    return p


def _bench(args: argparse.Namespace) -> int:
    from parity.core.fs import atomic_write_json
    from parity.workflow.windows_bench import EDGE, run_bench

    if args.windows < 2 * EDGE + 1:
        raise UsageError(f"--windows {args.windows} is too few", fix=f"use at least {2 * EDGE + 1}")
    figures = run_bench(
        windows=args.windows,
        command_ms=args.command_ms,
        window=args.window,
        command=args.bench_command,
        run_dir=args.run_dir,
    )
    if args.json:
        atomic_write_json(args.json, figures)
    print(json.dumps(figures, indent=2))
    ok = figures["ratio_last_first_mean"] <= 2 and figures["overhead_per_window"]["mean_ms"] <= 20
    return 0 if ok or not args.check else 1


def _pass(args: argparse.Namespace) -> int:
    from parity.workflow import runner

    action = args.windows_action
    if action == "run":
        if args.resume and args.regression:
            raise UsageError("--resume and --regression exclude each other", fix="pick one")
        if args.fresh and (args.resume or args.regression):
            raise UsageError("--fresh starts a new run", fix="drop --resume/--regression")
        if (args.from_step is not None or args.to_step is not None) and not args.regression:
            raise UsageError("--from/--to select the range of a regression pass", fix="add --regression")
        kind = "regression" if args.regression else "resume" if args.resume else "run"
        req = runner.Request(
            kind,
            args.config,
            args.run_dir,
            args.start,
            args.steps,
            args.window,
            args.continue_on_divergence,
            args.from_step,
            args.to_step,
            args.fresh,
            args.quiet,
        )
    else:
        req = runner.Request(
            "resume", args.config, args.run_dir, continue_on_divergence=args.continue_on_divergence, quiet=args.quiet
        )
    out = runner.execute(req)
    st = out.state
    p = st["passes"][-1]
    print(f"parity windows: {st['run']['name']} - pass {p['n']} ({p['kind']}): {out.processed} window(s) computed")
    print(f"  {out.headline}")
    if out.stopped:
        print(f"  {out.stopped}")
    for d in st["divergences"]:
        if d["status"] == "open":
            print(f"  open divergence {d['id']}: {out.run_dir / d['report_md']}")
    print(f"  status: {out.run_dir / 'status.md'}  {out.run_dir / 'status.html'}")
    return out.code


def _status(args: argparse.Namespace) -> int:
    from parity.workflow import runner, status

    _, run_dir = runner.resolve_run_dir(args.config, args.run_dir)
    st = runner.load_state(run_dir)
    md, page = status.write(run_dir, st)
    c = status.counts(st)
    complete = c["verified"] == len(st["windows"]) and not any(d["status"] == "open" for d in st["divergences"])
    if args.format == "json":
        end = st["verified_end"]
        summary = {
            "run": st["run"]["name"],
            "run_dir": str(run_dir),
            "headline": status.headline(st),
            "verified_end": end,
            "verified_through": end - 1 if end > st["run"]["start"] else None,
            "verified_steps": st["verified_steps"],
            "counts": {s: c[s] for s in status.STATUS_ORDER},
            "windows": [
                {"start": w["start"], "end": w["end"], "status": w["status"], "attempts": len(w["attempts"])}
                for w in st["windows"]
            ],
            "open_divergences": [d for d in st["divergences"] if d["status"] == "open"],
            "status_md": str(md),
            "status_html": str(page),
        }
        print(json.dumps(summary, indent=2))
    else:
        sys.stdout.write(md.read_text(encoding="utf-8"))
    return 1 if args.check and not complete else 0


def _report(args: argparse.Namespace) -> int:
    from parity.workflow import reports, runner, status
    from parity.workflow.lock import RunLock
    from parity.workflow.state import StateStore

    _, run_dir = runner.resolve_run_dir(args.config, args.run_dir)
    if args.archive:
        store = StateStore(run_dir)
        with RunLock(run_dir, "parity windows report --archive"):
            st, notes = store.load(repair=True)
            for note in notes:
                print(note, file=sys.stderr)
            if st is None:
                raise UsageError(
                    f"{run_dir} holds no windows run", fix="start one with `parity windows run --config FILE`"
                )
            record = reports.archive_history(run_dir, st)
            if record is None:
                print("nothing to archive: every trace belongs to a window's latest attempt and no divergence is fixed")
                return 0
            store.save(st)
            reports.rebuild_index(run_dir, st)
            status.write(run_dir, st)
        print(f"archived {record['members']} file(s) ({record['what']}) to {run_dir / record['path']}")
        print(
            f"  sha256 {record['sha256']}; archive markers ({reports.ARCHIVE_MARKER} / stub reports) name the archive"
        )
        return 0
    st = runner.load_state(run_dir)
    divs = st["divergences"]
    if args.report_id:
        divs = [d for d in divs if d["id"] == args.report_id]
        if not divs:
            known = ", ".join(d["id"] for d in st["divergences"]) or "none"
            raise UsageError(f"no divergence {args.report_id} in {run_dir}", fix=f"known ids: {known}")
    elif not args.all:
        divs = [d for d in divs if d["status"] == "open"]
    if args.format == "jsonl":
        index = reports.rebuild_index(run_dir, st)
        wanted = {d["id"] for d in divs}
        for line in index.read_text(encoding="utf-8").splitlines():
            if json.loads(line).get("id") in wanted:
                print(line)
        return 0
    if not divs:
        fixed = sum(d["status"] == "fixed" for d in st["divergences"])
        print(f"No open divergences in {run_dir} ({fixed} fixed; --all lists them). {status.headline(st)}")
        return 0
    for i, d in enumerate(divs):
        path = run_dir / d["report_md"]
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            text = f"# Divergence {d['id']}\n\n(report file {path} is missing)\n"
        if i:
            print("\n---\n")
        print(f"<!-- status: {d['status']}{' (' + d['fixed'] + ')' if d['fixed'] else ''}; file: {path} -->")
        sys.stdout.write(text)
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute `parity windows ACTION`; returns the exit code."""
    action = args.windows_action
    if action in ("run", "resume"):
        return _pass(args)
    if action == "status":
        return _status(args)
    if action == "report":
        return _report(args)
    if action == "bench":
        return _bench(args)
    raise UsageError(f"unknown windows action {action!r}", fix="use run, resume, status, report or bench")
