"""The persisted state of a windows run: the state document, and the store that loads and saves it.

The state (schema: parity/schema/windows_state.schema.json) is kept as a compacted `state.json` plus an
append-only journal, `journal.jsonl` (journal.py): one line per save holding only what changed, each record
checking itself. A window costs two small appends, whatever the run's length. Every
save checks the run's invariants first (an inconsistent state is a bug and is never written). The journal
is compacted into state.json - backups rotated (`state.json.bak`, `.bak.2`, `.bak.3`), temp file, fsync,
rename - at the end of a pass and whenever the journal since the last compaction outgrows the state, so the
cost of compacting stays constant per window; records older than every compacted copy are then dropped.

Loading takes the newest valid compacted copy (schema and invariants checked) and replays the journal
records after it: a torn last line (a kill during an append) is ignored, a damaged record stops the replay
(reported; it and later records are moved to `corrupt/` before the next append). A corrupt state.json is
reported, moved to `corrupt/`, and the newest valid backup brought up to date from the journal, so a run
recovered from a backup loses nothing the journal holds. If no valid copy exists the load fails, naming the
files: a run is never silently reset. The caller holds the run directory's lock (lock.py) to write.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from parity.core import paths
from parity.core.fs import atomic_write_bytes, atomic_write_text
from parity.errors import UsageError
from parity.workflow.fastschema import compile_schema
from parity.workflow.journal import APPEND_ONLY, JOURNAL_NAME, Changes, Journal, quarantine

STATE_VERSION = 1
STATE_KIND = "parity-windows-state"
STATE_NAME = "state.json"
BACKUP_NAMES = ("state.json.bak", "state.json.bak.2", "state.json.bak.3")
SCHEMA_PATH = paths.schema_path("windows_state.schema.json")
WINDOW_STATUSES = ("pending", "in_progress", "verified", "diverged", "unverified", "interrupted", "stale")
MAX_EVENTS = 2000  # older events are summarised into one, so a long-lived run's state stays small
COMPACT_MIN_BYTES = 1 << 20  # compact when the journal since the last compaction exceeds this and the state's size
_SEQ_LINE = re.compile(rb'\n  "seq": (\d+),')


def now() -> str:
    """UTC timestamp with milliseconds: windows of a fast run finish within the same second."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


@cache
def schema() -> dict[str, Any]:
    """The state JSON Schema."""
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


def window_grid(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """[start, end) cut into windows of `size` steps (the last one may be shorter)."""
    return [(s, min(s + size, end)) for s in range(start, end, size)]


def new_state(run: dict[str, Any]) -> dict[str, Any]:
    """A fresh state for `run` (its geometry: start, end, window; plus config and input digests)."""
    t = now()
    windows: list[dict[str, Any]] = [
        {"start": s, "end": e, "status": "pending", "attempts": [], "stale": None}
        for s, e in window_grid(run["start"], run["end"], run["window"])
    ]
    return {
        "version": STATE_VERSION,
        "kind": STATE_KIND,
        "run": {**run, "created": t},
        "seq": 0,
        "updated": t,
        "verified_end": run["start"],
        "verified_steps": 0,
        "in_progress": None,
        "prefix_tokens": None,
        "windows": windows,
        "divergences": [],
        "passes": [],
        "timeline": [],
        "events": [],
        "archives": [],
    }


def dump_state(state: dict[str, Any]) -> str:
    """JSON text of a state: one line per top-level key and per window, divergence, pass or event.

    Readable in a pager and diffable line by line, and fast: each line goes through the C encoder (an
    indented dump of a long run's state takes the pure-Python path and costs more than the window).
    """
    lines = []
    for key, value in state.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join("    " + json.dumps(v, ensure_ascii=False) for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def verified_progress(state: dict[str, Any]) -> tuple[int, int]:
    """(verified_end, verified_steps): every step in [start, verified_end) is verified; steps verified in all."""
    end = state["run"]["start"]
    contiguous = True
    total = 0
    for w in state["windows"]:
        if w["status"] == "verified":
            total += w["end"] - w["start"]
            if contiguous:
                end = w["end"]
        else:
            contiguous = False
    return end, total


def semantic_errors(state: dict[str, Any]) -> list[str]:
    """Invariants the schema cannot express: the window grid, attempt numbering, the in-progress pointer."""
    errors: list[str] = []
    run = state["run"]
    grid = window_grid(run["start"], run["end"], run["window"])
    got = [(w["start"], w["end"]) for w in state["windows"]]
    if got != grid:
        errors.append(f"windows {got[:3]}... do not tile [{run['start']}, {run['end']}) in steps of {run['window']}")
    in_progress = []
    for w in state["windows"]:
        numbers = [a["n"] for a in w["attempts"]]
        if numbers != sorted(set(numbers)) or (numbers and numbers[0] < 1):
            # Increasing, not necessarily 1..n: a number whose traces exist on disk is never used again, even
            # when the state recovered from a backup does not know that attempt (README.md, section
            # "Nothing is lost": traces are never overwritten).
            errors.append(f"window {w['start']}: attempts are numbered {numbers}, expected increasing from 1")
        in_progress += [(w["start"], a["n"]) for a in w["attempts"] if a["status"] == "in_progress"]
    ptr = state["in_progress"]
    want = [] if ptr is None else [(ptr["window"], ptr["attempt"])]
    if in_progress != want:
        errors.append(f"in_progress points at {want} but the attempts in progress are {in_progress}")
    if (state["verified_end"], state["verified_steps"]) != verified_progress(state):
        errors.append("verified_end/verified_steps disagree with the window statuses")
    ids = [d["id"] for d in state["divergences"]]
    if len(ids) != len(set(ids)):
        errors.append("divergence ids are not unique")
    return errors


@cache
def _compiled() -> Callable[[Any], bool]:
    return compile_schema(schema())


def _valid(data: Any) -> bool:
    """The schema's verdict, compiled (jsonschema takes seconds on a 10,000-window state; it is asked only for
    the messages of an invalid one)."""
    return _compiled()(data)


def validation_errors(data: Any) -> list[str]:
    """Schema violations, then invariant violations (empty when the state is valid)."""
    if _valid(data):
        return semantic_errors(data)
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(schema())
    errors = [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(v.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    ]
    return errors or semantic_errors(data)


def _read_valid(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(state, "") when `path` holds a valid state, else (None, why not)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON ({exc}; {len(raw)} bytes: half-written or damaged)"
    errors = validation_errors(data)
    if errors:
        return None, "does not match the state schema: " + "; ".join(errors[:3])
    result: dict[str, Any] = data
    return result, ""


def _open_attempts(state: dict[str, Any]) -> dict[int, list[int]]:
    """window index -> numbers of its attempts in progress."""
    out = {}
    for i, w in enumerate(state["windows"]):
        numbers = [a["n"] for a in w["attempts"] if a["status"] == "in_progress"]
        if numbers:
            out[i] = numbers
    return out


def _peek_seq(path: Path) -> int | None:
    """The `seq` of a state file from its first lines (dump_state writes it near the top), without parsing it."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    m = _SEQ_LINE.search(head)
    return int(m.group(1)) if m else None


@cache
def _part_checks() -> tuple[dict[str, Callable[[Any], bool]], Callable[[Any], bool]]:
    """Compiled checks of each top-level key's schema and of one window (journal records are checked piecewise)."""
    s = schema()
    keys = {k: compile_schema(v, s) for k, v in s["properties"].items()}
    return keys, compile_schema({"$ref": "#/$defs/window"}, s)


def _record_valid(state: dict[str, Any], data: dict[str, Any]) -> bool:
    keys, window = _part_checks()
    if set(data) - {"set", "windows", "append"}:
        return False
    sets, wins, appends = data.get("set", {}), data.get("windows", {}), data.get("append", {})
    if not (isinstance(sets, dict) and isinstance(wins, dict) and isinstance(appends, dict)):
        return False
    n = len(state["windows"])
    return (
        all(k in keys and k != "windows" and keys[k](v) for k, v in sets.items())
        and all(k.isdigit() and int(k) < n and window(v) for k, v in wins.items())
        and all(k in APPEND_ONLY and keys[k](v) for k, v in appends.items())
    )


class _Progress:
    """verified_end / verified_steps kept up to date per changed window (O(log n)), not by a scan of all windows."""

    def __init__(self, state: dict[str, Any]) -> None:
        windows = state["windows"]
        self.start = state["run"]["start"]
        self.end = state["run"]["end"]
        self.verified = [w["status"] == "verified" for w in windows]
        self.steps = sum(w["end"] - w["start"] for w, v in zip(windows, self.verified, strict=True) if v)
        self.todo = [i for i, v in enumerate(self.verified) if not v]  # a heap of (possibly) unverified windows
        heapq.heapify(self.todo)

    def update(self, state: dict[str, Any], indices: Iterable[int]) -> tuple[int, int]:
        windows = state["windows"]
        for i in indices:
            now_verified = windows[i]["status"] == "verified"
            if now_verified != self.verified[i]:
                size = windows[i]["end"] - windows[i]["start"]
                self.steps += size if now_verified else -size
                self.verified[i] = now_verified
                if not now_verified:
                    heapq.heappush(self.todo, i)
        while self.todo and self.verified[self.todo[0]]:
            heapq.heappop(self.todo)
        end = windows[self.todo[0]]["start"] if self.todo else self.end
        return end, self.steps


class StateStore:
    """Loads, recovers and saves the state of one run directory (state.json, its backups and the journal)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_NAME
        self.journal = Journal(run_dir)
        self._changes = Changes()  # what the journal holds, so a save journals only what changed
        self._progress: _Progress | None = None
        self._open: dict[int, list[int]] = {}  # window index -> numbers of its attempts in progress
        self._state_bytes = 0  # size of the last compacted state.json

    def exists(self) -> bool:
        """Is there a state or any backup generation (a run that must be resumed, not restarted)?"""
        return any((self.run_dir / n).exists() for n in (STATE_NAME, *BACKUP_NAMES))

    # -- loading -------------------------------------------------------------------------------------

    def load(self, *, repair: bool) -> tuple[dict[str, Any] | None, list[str]]:
        """The state (None when the directory has no run) and notes on what was recovered.

        The newest valid compacted copy (state.json, else the newest valid backup) plus every journal record
        saved after it. With `repair`, a corrupt state.json is moved to corrupt/ and the recovered state
        saved in its place (the caller must hold the lock); without it nothing is written.
        """
        state, why = _read_valid(self.path)
        source = STATE_NAME
        if state is None:
            if why == "missing" and not self.exists():
                return None, []
            for name in BACKUP_NAMES:
                state, _ = _read_valid(self.run_dir / name)
                if state is not None:
                    source = name
                    break
            else:
                raise UsageError(
                    f"{self.path} is {why} and no valid backup exists ({', '.join(BACKUP_NAMES)}); nothing was reset",
                    fix=f"inspect or restore {self.run_dir} by hand, or start over with `parity windows run --fresh`",
                )
        base_seq, base_time = state["seq"], state["updated"]
        applied, notes = self._replay(state, source)
        if source == STATE_NAME:
            if repair:
                self._loaded(state)
            return state, notes
        note = f"{self.path} is {why}; recovered from {source} (saved {base_time}, save #{base_seq})"
        if applied:
            note += f" and {applied} later save(s) replayed from {JOURNAL_NAME} (through save #{state['seq']})"
        else:
            note += "; windows finished after that save are not verified and will be recomputed"
        if repair:
            moved = quarantine(self.run_dir, self.path)
            if moved:
                note += f"; the damaged file is kept as {moved}"
            self._loaded(state)
            add_event(state, "recovered", note)
            self.save(state)
        return state, [note, *notes]

    def _replay(self, state: dict[str, Any], source: str) -> tuple[int, list[str]]:
        """Apply the journal records saved after `state` (contiguous, undamaged, of this run); returns how many."""
        applied, problem = self.journal.replay(state, lambda data: _record_valid(state, data))
        notes = [f"{self.journal.path}: {problem}"] if problem else []
        if applied and semantic_errors(state):
            state.clear()
            state.update(_read_valid(self.run_dir / source)[0] or {})
            return 0, [f"{self.journal.path} does not apply to {source} consistently; ignored (kept in place)"]
        return applied, notes

    def _loaded(self, state: dict[str, Any]) -> None:
        """Remember what is on disk, so the next save journals only what changed."""
        self._changes.take(state)
        self._open = _open_attempts(state)
        self._progress = _Progress(state)
        self._state_bytes = self.path.stat().st_size if self.path.exists() else 0

    # -- saving --------------------------------------------------------------------------------------

    def progress(self, state: dict[str, Any], windows: Iterable[int] | None) -> tuple[int, int]:
        """(verified_end, verified_steps) after changes to `windows` (None: any window may have changed)."""
        if windows is None or self._progress is None:
            self._progress = _Progress(state)
            windows = ()
        return self._progress.update(state, windows)

    @property
    def changed(self) -> set[str]:
        """Top-level keys (and "windows") the last save changed."""
        return self._changes.changed

    def save(
        self, state: dict[str, Any], windows: Iterable[int] | None = None, *, compact: bool = True, durable: bool = True
    ) -> None:
        """Check the run's invariants, journal what changed and (with `compact`, or when due) write state.json.

        `windows`: indices of the only windows changed since the last save (None: any may have changed,
        which costs a comparison of every window). A compaction rotates the backups and writes atomically;
        it is due when the journal has grown past the compacted state (at least COMPACT_MIN_BYTES), so its
        cost per window stays constant however long the run. The full JSON Schema is checked on every load,
        not here; the tests validate every state they see against it. `durable=False` skips the record's
        fsync: it still survives any kill of this process (the kernel has it), not a power failure.
        """
        state["seq"] = int(state.get("seq", 0)) + 1
        state["updated"] = now()
        if len(state["events"]) > MAX_EVENTS:
            dropped = state["events"][: len(state["events"]) - MAX_EVENTS + 1]
            state["events"] = [
                {"time": now(), "kind": "events-summarised", "message": f"{len(dropped)} older events summarised"},
                *state["events"][len(dropped) :],
            ]
        dirty = None if windows is None or self._changes.snap is None else sorted(set(windows))
        state["verified_end"], state["verified_steps"] = self.progress(state, dirty)
        if dirty is None:
            errors = semantic_errors(state)
            self._open = _open_attempts(state)
        else:
            errors = self._quick_errors(state, dirty)
        if errors:
            raise AssertionError(f"internal error: windows state for {self.run_dir} is invalid: {errors[:3]}")
        data = self._changes.diff(state, dirty)
        first = not self.path.exists()
        self.journal.append(state, data, durable=durable)
        if compact or first or self.journal.bytes > max(COMPACT_MIN_BYTES, self._state_bytes):
            self.compact(state)

    def compact(self, state: dict[str, Any]) -> None:
        """Write the whole state to state.json (backups rotated) and drop journal records no copy needs."""
        text = dump_state(state).encode("utf-8")
        self._write(text, rotate=True)
        self._state_bytes = len(text)
        self.journal.bytes = 0
        # keep the records any compacted copy (state.json or a backup) may need to be brought up to date
        seqs = [s for s in (_peek_seq(self.run_dir / n) for n in (STATE_NAME, *BACKUP_NAMES)) if s is not None]
        if seqs:
            self.journal.prune(min(seqs))

    def _quick_errors(self, state: dict[str, Any], dirty: list[int]) -> list[str]:
        """semantic_errors for a save that changed only the windows `dirty` (the rest was checked before)."""
        errors = []
        for i in dirty:
            w = state["windows"][i]
            numbers = [a["n"] for a in w["attempts"]]
            if numbers != sorted(set(numbers)) or (numbers and numbers[0] < 1):
                errors.append(f"window {w['start']}: attempts are numbered {numbers}, expected increasing from 1")
            open_ = [a["n"] for a in w["attempts"] if a["status"] == "in_progress"]
            if open_:
                self._open[i] = open_
            else:
                self._open.pop(i, None)
        windows = state["windows"]
        have = [(windows[i]["start"], n) for i in sorted(self._open) for n in self._open[i]]
        ptr = state["in_progress"]
        want = [] if ptr is None else [(ptr["window"], ptr["attempt"])]
        if have != want:
            errors.append(f"in_progress points at {want} but the attempts in progress are {have}")
        ids = [d["id"] for d in state["divergences"]]
        if len(ids) != len(set(ids)):
            errors.append("divergence ids are not unique")
        return errors

    def _write(self, text: bytes, *, rotate: bool) -> None:
        if rotate and self.path.exists():
            # Oldest first, so every step leaves a complete set of valid files behind. The newest backup is a
            # hard link to the current state.json: the atomic write below replaces state.json's directory
            # entry, and the backup keeps the previous file without copying or re-syncing it.
            names = [self.run_dir / n for n in BACKUP_NAMES]
            for older, newer in zip(reversed(names[1:]), reversed(names[:-1]), strict=True):
                if newer.exists():
                    os.replace(newer, older)
            tmp = names[0].with_name(f".{names[0].name}.{os.getpid()}.link.tmp")
            try:
                tmp.unlink(missing_ok=True)
                os.link(self.path, tmp)
                os.replace(tmp, names[0])
            except OSError:  # file systems without hard links: copy instead
                tmp.unlink(missing_ok=True)
                atomic_write_bytes(names[0], self.path.read_bytes())
        atomic_write_bytes(self.path, text)

    def clean_temp_files(self) -> int:
        """Remove temp files of atomic writes cut short by a kill (`.<name>.<random>.tmp`; never a finished
        file). The caller holds the lock, so no write of this run is in flight."""
        n = 0
        for p in self.run_dir.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        return n


def replace_text(path: Path, text: str) -> None:
    """Atomic (rename) but not fsynced: for files rebuilt from the state after every window (status, index),
    where a crash may cost the newest version but must never leave a torn one. Mode: 0o666 minus the umask."""
    atomic_write_text(path, text, fsync=False)


def add_event(state: dict[str, Any], kind: str, message: str) -> None:
    """Record something that happened to the run (recoveries, takeovers, interruptions, archives)."""
    state["events"].append({"time": now(), "kind": kind, "message": message})
