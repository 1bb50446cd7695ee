"""One window of a pass: run the implementations, compare them, persist the attempt (runner.py drives the pass).

Per window: the attempt is saved as in progress, the reference computes its steps, the alternates compute
theirs (teacher-forced on the reference's tokens in LLM runs), traces are written and fsynced, every
alternate is compared, a divergence gets a report (or an open one is fixed), and the result is journaled
(state.py). The report index is rebuilt when a divergence changed, the status page at most every
STATUS_INTERVAL seconds and at the end of the pass. Attempt numbers and trace directories are never reused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parity.core.proc import log
from parity.errors import UsageError
from parity.workflow import compare, reports, status
from parity.workflow.config import WindowsConfig
from parity.workflow.impls import Implementation, RunContext, WindowOutput, persistable
from parity.workflow.state import StateStore, add_event, now

DONE = ("verified", "diverged", "unverified")  # attempt statuses that carry a result
STATUS_INTERVAL = 3.0  # seconds between status page rewrites during a pass (and at least 20x a rewrite's time)
Observer = Callable[[dict[str, Any], dict[str, Any]], None]  # called with (window, attempt) after each window


def settle(window: dict[str, Any]) -> str:
    """A window's status from its attempts: the latest result, unless newer evidence made it stale."""
    if window["stale"] is not None:
        return "stale"
    done = [a for a in window["attempts"] if a["status"] in DONE]
    if done:
        return str(done[-1]["status"])
    return "interrupted" if window["attempts"] else "pending"


class WindowWork:
    """The windows of one pass: computes, compares and persists each (holds the state, store and implementations)."""

    def __init__(
        self,
        *,
        mode: str,
        cfg: WindowsConfig,
        ctx: RunContext,
        store: StateStore,
        state: dict[str, Any],
        impls: Sequence[Implementation],
        pass_n: int,
        quiet: bool = False,
        observer: Observer | None = None,
    ) -> None:
        self.mode = mode  # the pass's kind (run | resume | regression), recorded in each attempt
        self.cfg = cfg
        self.ctx = ctx
        self.store = store
        self.state = state
        self.run_dir = store.run_dir
        self.reference = next(i for i in impls if i.role == "reference")
        self.alternates = [i for i in impls if i.role == "alternate"]
        self.pass_n = pass_n
        self.quiet = quiet
        self.observer = observer
        self.processed = 0
        self.dirty: set[int] | None = None  # windows changed since the last save (None: any may have)
        self.status_due = 0.0  # time.monotonic() after which the status page is rewritten
        self.tokens_memo: tuple[int, list[int]] | None = None  # (window start, reference tokens before it)
        self.unsynced: list[Path] = []  # this window's traces, fsynced together before its result is saved
        self.sync_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync")

    def say(self, message: str) -> None:
        if not self.quiet:
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

    def close(self) -> None:
        """Stop the fsync threads (at the end of the pass)."""
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
            "mode": self.mode,
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
        w["status"] = settle(w)
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
        if self.observer is not None:
            self.observer(w, attempt)

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
