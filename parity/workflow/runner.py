"""Run windows: compare every alternate with the reference, window by window, and persist each result.

A pass is one invocation: `run` (a new run), `resume` (the first unverified window onwards, skipping every
verified window) or `regression` (re-verify every window of a range, appending attempts to the history).
Per window: the attempt is saved as in progress, the reference computes its steps, the alternates compute
theirs (teacher-forced on the reference's tokens in LLM runs), traces are written and fsynced, every
alternate is compared, a divergence gets a report, and the result is journaled (state.py); the report index
is rebuilt when a divergence changed, the status page at most every STATUS_INTERVAL seconds and at the end
of the pass. A killed pass leaves the attempt "in progress"; the next pass records it as interrupted and
computes the window again as a new attempt (attempt numbers and trace directories are never reused).
Nothing verified is ever recomputed by `resume`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_text
from parity.core.proc import log
from parity.errors import UsageError
from parity.workflow import compare, reports, status
from parity.workflow import config as wconfig
from parity.workflow.config import ImplSpec, WindowsConfig
from parity.workflow.impls import Implementation, RunContext, WindowOutput, create, persistable, resolve_context
from parity.workflow.lock import RunLock
from parity.workflow.state import StateStore, add_event, new_state, now

Factory = Callable[[ImplSpec, RunContext], Implementation]
DONE = ("verified", "diverged", "unverified")  # attempt statuses that carry a result
STATUS_INTERVAL = 3.0  # seconds between status page rewrites during a pass (and at least 20x a rewrite's time)


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
    observer: Callable[[dict[str, Any], dict[str, Any]], None] | None = None  # after each window is saved (bench)


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


def _settle(window: dict[str, Any]) -> str:
    """A window's status from its attempts: the latest result, unless newer evidence made it stale."""
    if window["stale"] is not None:
        return "stale"
    done = [a for a in window["attempts"] if a["status"] in DONE]
    if done:
        return str(done[-1]["status"])
    return "interrupted" if window["attempts"] else "pending"


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
                    w["status"] = _settle(w)
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
    """One pass over a run's windows (holds the lock, the state and the implementations)."""

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
        self.ctx = ctx
        self.store = store
        self.state = state
        self.run_dir = store.run_dir
        self.reference = next(i for i in impls if i.role == "reference")
        self.alternates = [i for i in impls if i.role == "alternate"]
        self.continue_on = continue_on_divergence
        self.pass_n = len(state["passes"]) + 1
        self.processed = 0
        self.dirty: set[int] | None = None  # windows changed since the last save (None: any may have)
        self.status_due = 0.0  # time.monotonic() after which the status page is rewritten
        self.tokens_memo: tuple[int, list[int]] | None = None  # (window start, reference tokens before it)
        self.unsynced: list[Path] = []  # this window's traces, fsynced together before its result is saved
        self.sync_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")

    def say(self, message: str) -> None:
        if not self.req.quiet:
            log(message)

    # -- bookkeeping ---------------------------------------------------------------------------------

    def index(self, w: dict[str, Any]) -> int:
        run = self.state["run"]
        return int((w["start"] - run["start"]) // run["window"])

    def touch(self, w: dict[str, Any]) -> None:
        if self.dirty is not None:
            self.dirty.add(self.index(w))

    def trace(self, path: Path, records: Sequence[dict[str, Any]]) -> None:
        reports.write_trace(path, [persistable(r) for r in records], fsync=False)
        self.unsynced.append(path)

    def save(self, *, compact: bool = False, final: bool = False, durable: bool = True) -> None:
        """Journal what changed; rewrite the divergence index when divergences changed, the status page at the
        start and end of a pass and at most every STATUS_INTERVAL seconds in between (its cost grows with the
        run; the journal's does not)."""
        if durable and self.unsynced:  # evidence first: a durable result never points at traces a crash lost
            reports.sync_files(self.unsynced, self.sync_pool)
            self.unsynced = []
        dirty, self.dirty = self.dirty, set()
        self.store.save(self.state, dirty, compact=compact, durable=durable)
        if final or "divergences" in self.store.changed:
            reports.rebuild_index(self.run_dir, self.state)
        if final or time.monotonic() >= self.status_due:
            t0 = time.monotonic()
            status.write(self.run_dir, self.state)
            took = time.monotonic() - t0
            self.status_due = time.monotonic() + max(STATUS_INTERVAL, 20 * took)

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
        self.save(final=True)

    def finish(self, outcome: str, message: str) -> None:
        p = self.state["passes"][-1]
        p.update(finished=now(), outcome=outcome, message=message, windows=self.processed)
        self.save(compact=True, final=True)
        self.sync_pool.shutdown()

    def abort(self, message: str) -> None:
        """An exception escaped a window: record the open attempt as interrupted before it propagates."""
        recover_interrupted(self.state)
        self.dirty = None
        p = self.state["passes"][-1]
        p.update(finished=now(), outcome="failed", message=message, windows=self.processed)
        self.save(compact=True, final=True)
        self.sync_pool.shutdown()

    # -- windows -------------------------------------------------------------------------------------

    def tokens_before(self, start: int) -> list[int]:
        """The reference's tokens for steps before `start` (LLM runs): the prefix, then each window's latest."""
        if not self.ctx.llm:
            return []
        if self.tokens_memo is not None and self.tokens_memo[0] == start:
            return list(self.tokens_memo[1])  # the window before was just computed: no scan of every window
        tokens = list(self.state["prefix_tokens"] or [])
        for w in self.state["windows"]:
            if w["start"] >= start:
                break
            done = [a for a in w["attempts"] if a["status"] in DONE and a["reference_tokens"] is not None]
            if not done:
                raise UsageError(
                    f"window [{w['start']}, {w['end']}) has no reference tokens, needed to teacher-force window {start}",
                    fix="resume the run from its first unverified window (`parity windows resume`)",
                )
            tokens += done[-1]["reference_tokens"]
        return tokens

    def ensure_prefix(self) -> str | None:
        """LLM runs starting after step 0 need the reference's tokens for [0, start) once (computed, not verified)."""
        start = self.state["run"]["start"]
        if not self.ctx.llm or start == 0 or self.state["prefix_tokens"] is not None:
            return None
        trace_dir = self.run_dir / "traces" / "prefix"
        n = 1
        while trace_dir.exists():  # a prefix computed again (state recovered from an older copy): new directory
            n += 1
            trace_dir = self.run_dir / "traces" / f"prefix-{n}"
        trace_dir.mkdir(parents=True)
        out = self.reference.run_window(0, start, [], trace_dir)
        if not out.ok:
            return f"reference {self.reference.name} could not compute the prefix [0, {start}): {out.error}"
        self.state["prefix_tokens"] = [int(r["token"]) for r in out.records]
        reports.write_trace(trace_dir / f"{self.reference.name}.jsonl", [persistable(r) for r in out.records])
        self.save()
        return None

    def new_attempt(self, w: dict[str, Any]) -> tuple[int, str]:
        """The next attempt number of window `w` and its trace directory, created empty.

        Never a number used before: neither one in the state nor one with a trace directory on disk (a state
        recovered from an older copy may not know an attempt whose traces exist). The directory is created
        with exist_ok=False, so an attempt never writes into another's traces.
        """
        start = w["start"]
        parent = self.run_dir / "traces" / f"w{start:06d}"
        known = max((a["n"] for a in w["attempts"]), default=0)
        try:
            on_disk = max(
                (int(p.name[1:]) for p in parent.iterdir() if p.name[:1] == "a" and p.name[1:].isdigit()), default=0
            )
        except FileNotFoundError:
            on_disk = 0
        n = max(known, on_disk) + 1
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (parent / f"a{n}").mkdir(exist_ok=False)
                break
            except FileExistsError:
                n += 1
        if on_disk > known:
            message = (
                f"window [{w['start']}, {w['end']}): traces of attempt(s) {known + 1}..{on_disk} exist in {parent} "
                f"but not in the state (recovered from an older copy); kept, this attempt is {n}"
            )
            add_event(self.state, "attempts-on-disk", message)
            self.say(f"  {message}")
        return n, f"traces/w{start:06d}/a{n}"

    def _alternate_outputs(self, start: int, count: int, forced: list[int], trace_dir: Path) -> dict[str, WindowOutput]:
        if len(self.alternates) == 1:
            a = self.alternates[0]
            return {a.name: a.run_window(start, count, forced, trace_dir)}
        # Alternates are independent: external commands and bridge workers run in their own processes, and
        # numpy releases the GIL in its matrix products, so threads overlap their waits.
        with ThreadPoolExecutor(max_workers=len(self.alternates)) as pool:
            futures = {a.name: pool.submit(a.run_window, start, count, forced, trace_dir) for a in self.alternates}
            return {name: f.result() for name, f in futures.items()}

    def process(self, w: dict[str, Any]) -> str:
        """Compute, compare and persist one window; returns the attempt status (or 'reference-unavailable')."""
        start, end = w["start"], w["end"]
        count = end - start
        t0 = time.perf_counter()
        tokens = self.tokens_before(start)
        n, trace_rel = self.new_attempt(w)
        trace_dir = self.run_dir / trace_rel
        attempt: dict[str, Any] = {
            "n": n,
            "pass": self.pass_n,
            "mode": self.req.action,
            "started": now(),
            "finished": None,
            "status": "in_progress",
            "participants": {},
            "reference_tokens": None,
            "divergence": None,
            "fixed": [],
            "reason": None,
            "trace_dir": trace_rel,
        }
        w["attempts"].append(attempt)
        w["status"] = "in_progress"
        self.touch(w)
        self.state["in_progress"] = {
            "window": start,
            "attempt": n,
            "pass": self.pass_n,
            "pid": os.getpid(),
            "started": attempt["started"],
        }
        # From here on, a kill leaves an attempt the next pass reports as interrupted. Not fsynced: a kill cannot
        # lose it, and if a power failure does, the attempt's trace directory still keeps its number taken.
        self.save(durable=False)

        ref = self.reference
        ref_out = ref.run_window(start, count, tokens, trace_dir)
        parts = attempt["participants"]
        parts[ref.name] = self._participant(ref, ref_out, "reference" if ref_out.ok else "unavailable")
        if ref_out.ok:
            self.trace(trace_dir / f"{ref.name}.jsonl", ref_out.records)
        if not ref_out.ok:
            for a in self.alternates:
                parts[a.name] = {
                    "role": "alternate",
                    "status": "unavailable",
                    "result": "not_run",
                    "steps": 0,
                    "seconds": 0.0,
                    "reason": "not run: the reference did not produce this window",
                    "metrics": None,
                }
            attempt["reason"] = f"reference unavailable: {ref_out.error}"
            self._complete(w, attempt, "unverified")
            self.say(f"{self._label(w)}  UNVERIFIED  reference {ref.name} unavailable: {ref_out.error}")
            return "reference-unavailable"

        new_tokens = [int(r["token"]) for r in ref_out.records] if self.ctx.llm else None
        attempt["reference_tokens"] = new_tokens
        forced = tokens + new_tokens if new_tokens is not None else []
        outputs = self._alternate_outputs(start, count, forced, trace_dir)
        diffs_by_alt: dict[str, list[compare.FieldDiff]] = {}
        matching: list[str] = []
        unavailable: dict[str, str] = {}
        for a in self.alternates:
            out = outputs[a.name]
            if not out.ok:
                unavailable[a.name] = str(out.error)
                parts[a.name] = self._participant(a, out, "unavailable")
                continue
            self.trace(trace_dir / f"{a.name}.jsonl", out.records)
            diffs = compare.compare_window(start, ref_out.records, out.records, self.cfg.rule)
            parts[a.name] = self._participant(a, out, "diverged" if diffs else "match")
            worst = compare.logits_max_abs(ref_out.records, out.records)
            if worst is not None:
                parts[a.name]["metrics"] = {"max_abs_logits": worst}
            if diffs:
                diffs_by_alt[a.name] = diffs
            else:
                matching.append(a.name)

        if diffs_by_alt:
            result = "diverged"
        elif matching:
            result = "verified"
        else:
            result = "unverified"
            attempt["reason"] = "no alternate took part: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        message = ""
        if result == "diverged":
            message = self._record_divergence(w, attempt, ref_out, outputs, diffs_by_alt, matching, unavailable)
        elif result == "verified":
            message = self._record_fixed(w, attempt)
        self._mark_stale_if_tokens_changed(w, attempt)
        self._complete(w, attempt, result)
        if new_tokens is not None:
            self.tokens_memo = (w["end"], forced)
        took = " · ".join(f"{k} {v['result'] if v['result'] != 'reference' else 'ref'}" for k, v in parts.items())
        seconds = time.perf_counter() - t0
        self.say(f"{self._label(w)}  {result.upper():<10}  {took}  {seconds:6.2f} s")
        if message:
            self.say(message)
        return result

    @staticmethod
    def _label(w: dict[str, Any]) -> str:
        return f"window [{w['start']:>5}, {w['end']:>5})"

    @staticmethod
    def _participant(impl: Implementation, out: WindowOutput, result: str) -> dict[str, Any]:
        return {
            "role": impl.role,
            "status": "ok" if out.ok else "unavailable",
            "result": result,
            "steps": len(out.records),
            "seconds": round(out.seconds, 4),
            "reason": out.error,
            "metrics": None,
        }

    def _complete(self, w: dict[str, Any], attempt: dict[str, Any], result: str) -> None:
        attempt["status"] = result
        attempt["finished"] = now()
        w["stale"] = None
        w["status"] = _settle(w)
        self.state["in_progress"] = None
        self.processed += 1
        self.touch(w)
        end, steps = self.store.progress(self.state, None if self.dirty is None else [self.index(w)])
        self.state["timeline"].append(
            {
                "time": attempt["finished"],
                "pass": self.pass_n,
                "window": w["start"],
                "status": result,
                "verified_end": end,
                "verified_steps": steps,
            }
        )
        self.save()
        if self.req.observer is not None:
            self.req.observer(w, attempt)

    def _record_divergence(
        self,
        w: dict[str, Any],
        attempt: dict[str, Any],
        ref_out: WindowOutput,
        outputs: dict[str, WindowOutput],
        diffs_by_alt: dict[str, list[compare.FieldDiff]],
        matching: list[str],
        unavailable: dict[str, str],
    ) -> str:
        sig = reports.signature(diffs_by_alt)
        open_here = [d for d in self.state["divergences"] if d["window"] == w["start"] and d["status"] == "open"]
        same = next((d for d in open_here if d["signature"] == sig), None)
        if same is not None:
            same["reproduced"].append({"pass": self.pass_n, "attempt": attempt["n"], "time": now()})
            attempt["divergence"] = same["id"]
            return f"  divergence {same['id']} reproduced (step {same['step']}: {', '.join(same['fields'])}); report: {self.run_dir / same['report_md']}"
        tolerances = {}
        for diffs in diffs_by_alt.values():
            for d in diffs:
                tolerances[d.field] = self.cfg.rule(d.field).describe()
        report = reports.build_report(
            run_dir=self.run_dir,
            state=self.state,
            window=w,
            attempt=attempt["n"],
            pass_n=self.pass_n,
            reference=self.reference.name,
            ref_records=[persistable(r) for r in ref_out.records],
            diffs_by_alt=diffs_by_alt,
            matching=matching,
            unavailable=unavailable,
            alt_records={k: [persistable(r) for r in v.records] for k, v in outputs.items()},
            tolerances=tolerances,
        )
        rel_md, rel_json = reports.write_report(self.run_dir, report)
        for old in open_here:
            old["status"] = "superseded"
            old["superseded_by"] = report["id"]
        self.state["divergences"].append(
            {
                "id": report["id"],
                "window": w["start"],
                "window_end": w["end"],
                "step": report["step"],
                "pass": self.pass_n,
                "attempt": attempt["n"],
                "found": report["found"],
                "status": "open",
                "diverging": report["diverging"],
                "matching": report["matching"],
                "fields": report["fields"],
                "signature": sig,
                "reproduced": [],
                "fixed": None,
                "fixed_pass": None,
                "fixed_attempt": None,
                "superseded_by": None,
                "report_md": rel_md,
                "report_json": rel_json,
            }
        )
        attempt["divergence"] = report["id"]
        lines = [f"  DIVERGENCE {report['id']} at step {report['step']}:"]
        for alt, info in report["alternates"].items():
            d = info["differences"][0]
            name = d["field"] + (f"[{d['index']}]" if d["index"] is not None else "")
            lines.append(
                f"    {alt}: step {d['step']} {name}: reference {json.dumps(d['reference'])} vs alternate "
                f"{json.dumps(d['alternate'])} ({d['detail']})"
            )
        lines.append(f"    report: {self.run_dir / rel_md}")
        return "\n".join(lines)

    def _record_fixed(self, w: dict[str, Any], attempt: dict[str, Any]) -> str:
        fixed = [d for d in self.state["divergences"] if d["window"] == w["start"] and d["status"] == "open"]
        for d in fixed:
            d.update(status="fixed", fixed=now(), fixed_pass=self.pass_n, fixed_attempt=attempt["n"])
            attempt["fixed"].append(d["id"])
            add_event(
                self.state,
                "fixed",
                f"divergence {d['id']} (window [{d['window']}, {d['window_end']}) step {d['step']}) no longer reproduces",
            )
        if not fixed:
            return ""
        return "\n".join(
            f"  FIXED: divergence {d['id']} (step {d['step']}: {', '.join(d['diverging'])} in {', '.join(d['fields'])}) no longer reproduces"
            for d in fixed
        )

    def _mark_stale_if_tokens_changed(self, w: dict[str, Any], attempt: dict[str, Any]) -> None:
        """A re-run reference that chose different tokens invalidates later windows forced on the old ones."""
        if attempt["reference_tokens"] is None:
            return
        before = [a for a in w["attempts"][:-1] if a["status"] in DONE and a["reference_tokens"] is not None]
        if not before or before[-1]["reference_tokens"] == attempt["reference_tokens"]:
            return
        reason = (
            f"the reference's tokens for window [{w['start']}, {w['end']}) changed in pass {self.pass_n} "
            f"(attempt {attempt['n']}); this window was teacher-forced on the old ones"
        )
        stale = []
        for later in self.state["windows"]:
            if later["start"] > w["start"] and later["status"] == "verified":
                later["stale"] = {"time": now(), "reason": reason}
                later["status"] = "stale"
                stale.append(later["start"])
                self.dirty = None
        if stale:
            add_event(self.state, "stale", f"{len(stale)} later window(s) marked stale: {reason}")
            self.say(
                f"  reference tokens changed: {len(stale)} later verified window(s) are stale and will be recomputed"
            )

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
            problem = self.ensure_prefix()
            if problem:
                stopped = problem
            for w in [] if stopped else targets:
                if self.req.action != "regression" and w["status"] == "verified":
                    continue  # verified windows are never recomputed outside a regression pass
                result = self.process(w)
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
        return Outcome(0 if ok else 1, self.state, self.run_dir, line, self.processed, stopped)


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
