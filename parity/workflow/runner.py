"""Run windows: compare every alternate with the reference, window by window, and persist each result.

A pass is one invocation: `run` (a new run), `resume` (the first unverified window onwards, skipping every
verified window) or `regression` (re-verify every window of a range, appending attempts to the history).
Each window is computed, compared and journaled by window.py. A killed pass leaves the attempt "in progress"; the next pass records it as interrupted and
computes the window again as a new attempt (attempt numbers and trace directories are never reused).
Nothing verified is ever recomputed by `resume`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_text
from parity.core.proc import log
from parity.errors import UsageError
from parity.workflow import config as wconfig
from parity.workflow import reports, status
from parity.workflow.config import ImplSpec, WindowsConfig
from parity.workflow.impls import Implementation, RunContext, resolve_context
from parity.workflow.lock import RunLock
from parity.workflow.registry import create
from parity.workflow.state import StateStore, add_event, new_state, now
from parity.workflow.window import Observer, WindowWork, settle

Factory = Callable[[ImplSpec, RunContext], Implementation]


@dataclass
class Request:
    """What the CLI asks for. None means "not given" (the config file or the state decides)."""

    action: str  # run | resume | regression
    config_path: Path | None = None
    run_dir: Path | None = None
    start: int | None = None
    steps: int | None = None
    window: int | None = None
    continue_on_divergence: bool | None = None
    from_step: int | None = None
    to_step: int | None = None
    fresh: bool = False
    quiet: bool = False
    observer: Observer | None = None  # after each window is saved (bench)


@dataclass
class Outcome:
    """The result of a pass: exit code (0 all in scope verified, 1 otherwise), the state, a one-line summary."""

    code: int
    state: dict[str, Any]
    run_dir: Path
    headline: str
    processed: int = 0
    stopped: str | None = None
    notes: list[str] = field(default_factory=list)


def default_run_dir(cfg: WindowsConfig) -> Path:
    """[run] dir of the config, else .parity/windows/<config stem> (relative to the current directory)."""
    return Path(cfg.run.dir) if cfg.run.dir else Path(".parity") / "windows" / cfg.path.stem


def resolve_run_dir(config_path: Path | None, run_dir: Path | None) -> tuple[WindowsConfig | None, Path]:
    """The parsed config (when given) and the run directory (--run-dir, else from the config)."""
    cfg = wconfig.load(config_path) if config_path else None
    if run_dir is None:
        if cfg is None:
            raise UsageError("no run directory given", fix="pass --run-dir DIR or --config FILE")
        run_dir = default_run_dir(cfg)
    return cfg, run_dir.resolve()


def recover_interrupted(state: dict[str, Any]) -> list[str]:
    """Record the attempt and pass a killed process left open; returns notes for the user."""
    notes = []
    ptr = state["in_progress"]
    if ptr is not None:
        for w in state["windows"]:
            for a in w["attempts"]:
                if a["status"] == "in_progress":
                    a["status"] = "interrupted"
                    a["finished"] = now()
                    a["reason"] = f"pass {ptr['pass']} (PID {ptr['pid']}) ended before finishing this window"
                    w["status"] = settle(w)
                    notes.append(
                        f"window [{w['start']}, {w['end']}) attempt {a['n']} was interrupted (PID {ptr['pid']} ended "
                        "before finishing it); computing it again"
                    )
        state["in_progress"] = None
    for p in state["passes"]:
        if p["outcome"] == "running":
            p["outcome"] = "interrupted"
            p["message"] = f"PID {p['pid']} ended without finishing the pass"
            notes.append(f"pass {p['n']} ({p['kind']}, PID {p['pid']}) was interrupted")
    for n in notes:
        add_event(state, "interrupted", n)
    return notes


def _geometry(req: Request, cfg: WindowsConfig, state: dict[str, Any] | None) -> tuple[int, int, int]:
    if state is not None:
        run = state["run"]
        given = {"--start": (req.start, run["start"]), "--window": (req.window, run["window"])}
        if req.steps is not None:
            given["--steps"] = (req.steps, run["end"] - run["start"])
        for flag, (want, have) in given.items():
            if want is not None and want != have:
                raise UsageError(
                    f"{flag} {want} differs from the existing run's {have} in {state['run']['config_path']}",
                    fix="drop the flag to keep the run's geometry, or start over with `run --fresh`",
                )
        return run["start"], run["end"], run["window"]
    start = req.start if req.start is not None else cfg.run.start
    window = req.window if req.window is not None else cfg.run.window
    if req.steps is not None:
        end = start + req.steps
    elif cfg.run.end is not None:
        end = cfg.run.end if req.start is None else start + (cfg.run.end - cfg.run.start)
    else:
        raise UsageError(f"{cfg.path} sets no number of steps", fix="add steps = N to [run] or pass --steps N")
    if start < 0 or window < 1 or end <= start:
        raise UsageError(
            f"invalid run geometry: steps [{start}, {end}) in windows of {window}", fix="check --start/--steps/--window"
        )
    return start, end, window


def _check_compatible(state: dict[str, Any], cfg: WindowsConfig, ctx: RunContext) -> list[str]:
    run = state["run"]
    if cfg.reference.name != run["reference"]:
        raise UsageError(
            f"{cfg.path} names reference '{cfg.reference.name}' but the run in {ctx.run_dir} was made against "
            f"'{run['reference']}'",
            fix="restore the reference, or start over with `run --fresh`",
        )
    if ctx.digest != run["input_sha256"] or ctx.llm != run["llm"]:
        raise UsageError(
            f"the run's input changed ([input] of {cfg.path}, or the model file): verified windows would no longer "
            "mean anything",
            fix="restore the input, or start over with `run --fresh` (the old run is archived)",
        )
    notes = []
    if cfg.sha256 != run["config_sha256"]:
        notes.append(f"{cfg.path} changed since the run started (implementations or tolerances); recorded")
        add_event(state, "config-changed", f"{cfg.path} now has sha256 {cfg.sha256}")
        run["implementations"] = [{"name": i.name, "role": i.role, "kind": i.kind} for i in cfg.implementations]
        run["config_sha256"] = cfg.sha256
    return notes


class Pass:
    """One pass over a run's windows (the lock is held by the caller; WindowWork does each window)."""

    def __init__(
        self,
        req: Request,
        cfg: WindowsConfig,
        ctx: RunContext,
        store: StateStore,
        state: dict[str, Any],
        impls: Sequence[Implementation],
        continue_on_divergence: bool,
    ) -> None:
        self.req = req
        self.cfg = cfg
        self.state = state
        self.run_dir = store.run_dir
        self.continue_on = continue_on_divergence
        self.pass_n = len(state["passes"]) + 1
        self.work = WindowWork(
            mode=req.action,
            cfg=cfg,
            ctx=ctx,
            store=store,
            state=state,
            impls=impls,
            pass_n=self.pass_n,
            quiet=req.quiet,
            observer=req.observer,
        )

    def begin(self, lo: int, hi: int) -> None:
        self.state["passes"].append(
            {
                "n": self.pass_n,
                "kind": self.req.action,
                "pid": os.getpid(),
                "started": now(),
                "finished": None,
                "outcome": "running",
                "from": lo,
                "to": hi,
                "config_sha256": self.cfg.sha256,
                "windows": 0,
                "message": "",
            }
        )
        self.work.save(final=True)

    def finish(self, outcome: str, message: str) -> None:
        p = self.state["passes"][-1]
        p.update(finished=now(), outcome=outcome, message=message, windows=self.work.processed)
        self.work.save(compact=True, final=True)
        self.work.close()

    def abort(self, message: str) -> None:
        """An exception escaped a window: record the open attempt as interrupted before it propagates."""
        recover_interrupted(self.state)
        self.work.dirty = None
        p = self.state["passes"][-1]
        p.update(finished=now(), outcome="failed", message=message, windows=self.work.processed)
        self.work.save(compact=True, final=True)
        self.work.close()

    # -- the pass ------------------------------------------------------------------------------------

    def targets(self) -> tuple[int, int, list[dict[str, Any]]]:
        run = self.state["run"]
        if self.req.action != "regression":
            if self.req.from_step is not None or self.req.to_step is not None:
                raise UsageError("--from/--to select the range of a regression pass", fix="add --regression")
            return run["start"], run["end"], self.state["windows"]
        lo = run["start"] if self.req.from_step is None else self.req.from_step
        hi = run["end"] if self.req.to_step is None else self.req.to_step
        if not run["start"] <= lo < hi <= run["end"]:
            raise UsageError(
                f"--from {lo} --to {hi} is not inside the run's steps [{run['start']}, {run['end']})",
                fix=f"choose {run['start']} <= FROM < TO <= {run['end']}",
            )
        return lo, hi, [w for w in self.state["windows"] if w["end"] > lo and w["start"] < hi]

    def run(self) -> Outcome:
        lo, hi, targets = self.targets()
        self.begin(lo, hi)
        stopped: str | None = None
        try:
            problem = self.work.ensure_prefix()
            if problem:
                stopped = problem
            for w in [] if stopped else targets:
                if self.req.action != "regression" and w["status"] == "verified":
                    continue  # verified windows are never recomputed outside a regression pass
                result = self.work.process(w)
                if result == "reference-unavailable":
                    stopped = f"stopped at window [{w['start']}, {w['end']}): the reference is unavailable"
                    break
                if result != "verified" and not self.continue_on:
                    stopped = (
                        f"stopped at window [{w['start']}, {w['end']}) ({result}); "
                        "`parity windows resume` continues from it, --continue-on-divergence goes past it"
                    )
                    break
        except BaseException as exc:
            self.abort(f"{type(exc).__name__}: {exc}")
            raise
        if self.req.action == "regression":
            done = [w for w in targets if w["attempts"] and w["attempts"][-1]["pass"] == self.pass_n]
            ok = len(done) == len(targets) and all(w["status"] == "verified" for w in targets)
        else:
            ok = all(w["status"] == "verified" for w in self.state["windows"])
        line = status.headline(self.state)
        self.finish("stopped" if stopped else "complete", stopped or line)
        return Outcome(0 if ok else 1, self.state, self.run_dir, line, self.work.processed, stopped)


def execute(req: Request, factory: Factory = create) -> Outcome:
    """Run one pass (`run`, `resume` or `regression`) under the run directory's lock."""
    if req.action not in ("run", "resume", "regression"):
        raise UsageError(f"unknown windows action {req.action!r}")
    cfg, run_dir = resolve_run_dir(req.config_path, req.run_dir)
    store = StateStore(run_dir)
    with RunLock(run_dir, f"parity windows {req.action}") as lock:
        notes = list(lock.notes)
        store.clean_temp_files()
        state, recovered = store.load(repair=True)
        notes += recovered
        if req.fresh:
            if req.action != "run":
                raise UsageError(
                    "--fresh starts a new run", fix="use it with `parity windows run`, not resume/regression"
                )
            if state is not None:
                archive, sha, n_files = reports.archive_run(run_dir)
                notes.append(f"previous run archived to {archive} ({n_files} files, sha256 {sha[:16]})")
                state = None
        if state is None:
            if req.action == "regression":
                raise UsageError(
                    f"{run_dir} holds no run to re-verify", fix="start one with `parity windows run --config FILE`"
                )
            if cfg is None:
                raise UsageError(f"{run_dir} holds no run", fix="pass --config FILE to start one")
            if req.action == "resume":
                notes.append(f"{run_dir} holds no run yet; starting one")
        else:
            if req.action == "run":
                raise UsageError(
                    f"{run_dir} already holds a run ({status.headline(state)})",
                    fix="`parity windows resume` continues it, `run --regression` re-verifies it, `run --fresh` archives it "
                    "and starts over",
                )
            if cfg is None:
                path = Path(state["run"]["config_path"])
                if not path.is_file():
                    copy = run_dir / "configs" / f"{state['run']['config_sha256'][:16]}.toml"
                    raise UsageError(
                        f"the run's implementations file {path} is gone",
                        fix=f"pass --config FILE (a copy is in {copy})",
                    )
                cfg = wconfig.load(path)
        start, end, window = _geometry(req, cfg, state)
        ctx = resolve_context(cfg, run_dir, end)
        if state is None:
            state = new_state(
                {
                    "name": cfg.path.stem,
                    "config_path": str(cfg.path),
                    "config_sha256": cfg.sha256,
                    "input_sha256": ctx.digest,
                    "llm": ctx.llm,
                    "start": start,
                    "end": end,
                    "window": window,
                    "reference": cfg.reference.name,
                    "implementations": [{"name": i.name, "role": i.role, "kind": i.kind} for i in cfg.implementations],
                }
            )
            add_event(state, "created", f"run created from {cfg.path}: steps [{start}, {end}) in windows of {window}")
        else:
            notes += _check_compatible(state, cfg, ctx)
        notes += recover_interrupted(state)
        for n in lock.notes:
            add_event(state, "stale-lock", n)
        copy = run_dir / "configs" / f"{cfg.sha256[:16]}.toml"
        if not copy.exists():
            atomic_write_text(copy, cfg.text)
        for n in notes:
            log(n)
        continue_on = (
            cfg.run.continue_on_divergence if req.continue_on_divergence is None else req.continue_on_divergence
        )
        impls = [factory(spec, ctx) for spec in cfg.implementations]
        try:
            outcome = Pass(req, cfg, ctx, store, state, impls, continue_on).run()
        finally:
            for impl in impls:
                impl.close()
        outcome.notes = notes
        return outcome


def load_state(run_dir: Path) -> dict[str, Any]:
    """The state of `run_dir` for reading (status, report): recovered in memory if damaged, never written."""
    state, notes = StateStore(run_dir).load(repair=False)
    for n in notes:
        log(n)
    if state is None:
        raise UsageError(f"{run_dir} holds no windows run", fix="start one with `parity windows run --config FILE`")
    return state
