"""The persisted state of a windows run: one JSON file per run directory, and the lock that guards it.

`state.json` is the source of truth (schema: parity/schema/windows_state.schema.json). Every save checks
the run's invariants (an inconsistent state is a bug and is never written), rotates the previous files into backup
generations (`state.json.bak`, `.bak.2`, `.bak.3`) and writes atomically (temp file, fsync, rename), so a
reader sees the old or the new state, never a half-written one. Loading validates against the schema and
the run's own invariants; a corrupt file is reported, moved to `corrupt/`, and the newest valid backup is
restored. If no valid copy exists the load fails, naming the files: a run is never silently reset.

The lock is an flock on `state.lock` (released by the kernel when the holder dies, however it dies); the
file also records the holder's PID, so a lock left behind by a killed run is reported as stale and taken
over, and a live holder is named in the error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from functools import cache
from pathlib import Path
from typing import IO, Any

from parity.errors import UsageError
from parity.fsutil import atomic_write_bytes, atomic_write_text

STATE_VERSION = 1
STATE_KIND = "parity-windows-state"
STATE_NAME = "state.json"
BACKUP_NAMES = ("state.json.bak", "state.json.bak.2", "state.json.bak.3")
LOCK_NAME = "state.lock"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "windows_state.schema.json"
WINDOW_STATUSES = ("pending", "in_progress", "verified", "diverged", "unverified", "interrupted", "stale")
MAX_EVENTS = 2000  # older events are summarised into one, so a long-lived run's state stays small


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
        if numbers != list(range(1, len(numbers) + 1)):
            errors.append(f"window {w['start']}: attempts are numbered {numbers}, expected 1..{len(numbers)}")
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


def validation_errors(data: Any) -> list[str]:
    """Schema violations, then invariant violations (empty when the state is valid)."""
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


class StateStore:
    """Loads, recovers and saves the state of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_NAME

    def exists(self) -> bool:
        """Is there a state or any backup generation (a run that must be resumed, not restarted)?"""
        return any((self.run_dir / n).exists() for n in (STATE_NAME, *BACKUP_NAMES))

    def load(self, *, repair: bool) -> tuple[dict[str, Any] | None, list[str]]:
        """The state (None when the directory has no run) and notes on what was recovered.

        With `repair`, a corrupt state.json is moved to corrupt/ and the newest valid backup restored in
        its place (the caller must hold the lock); without it the backup is only read.
        """
        state, why = _read_valid(self.path)
        if state is not None:
            return state, []
        if why == "missing" and not self.exists():
            return None, []
        for name in BACKUP_NAMES:
            backup, _ = _read_valid(self.run_dir / name)
            if backup is None:
                continue
            note = (
                f"{self.path} is {why}; recovered from {name} (saved {backup['updated']}, save #{backup['seq']}); "
                "windows finished after that save are not verified and will be recomputed"
            )
            if repair:
                moved = self._quarantine()
                if moved:
                    note += f"; the damaged file is kept as {moved}"
                backup.setdefault("events", []).append({"time": now(), "kind": "recovered", "message": note})
                self._write(backup, rotate=False)
            return backup, [note]
        raise UsageError(
            f"{self.path} is {why} and no valid backup exists ({', '.join(BACKUP_NAMES)}); nothing was reset",
            fix=f"inspect or restore {self.run_dir} by hand, or start over with `parity windows run --fresh`",
        )

    def _quarantine(self) -> Path | None:
        if not self.path.exists():
            return None
        dest = self.run_dir / "corrupt" / f"state.json.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.{os.getpid()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest)
        return dest

    def save(self, state: dict[str, Any]) -> None:
        """Check the run's invariants, rotate the backups, write atomically.

        The full JSON Schema is checked on every load, not here: schema validation costs O(state) and a
        save happens twice per window, so a long run would spend its time validating. The tests validate
        every state they see against the schema.
        """
        state["seq"] = int(state.get("seq", 0)) + 1
        state["updated"] = now()
        state["verified_end"], state["verified_steps"] = verified_progress(state)
        if len(state["events"]) > MAX_EVENTS:
            dropped = state["events"][: len(state["events"]) - MAX_EVENTS + 1]
            state["events"] = [
                {"time": now(), "kind": "events-summarised", "message": f"{len(dropped)} older events summarised"},
                *state["events"][len(dropped) :],
            ]
        errors = semantic_errors(state)
        if errors:
            raise AssertionError(f"internal error: windows state for {self.run_dir} is invalid: {errors[:3]}")
        self._write(state, rotate=True)

    def _write(self, state: dict[str, Any], *, rotate: bool) -> None:
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
        atomic_write_bytes(self.path, dump_state(state).encode("utf-8"))

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory; use as a context manager. `notes` says if a stale lock was taken over."""

    def __init__(self, run_dir: Path, command: str) -> None:
        self.path = run_dir / LOCK_NAME
        self.command = command
        self.notes: list[str] = []
        self._f: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise UsageError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(f)
            f.close()
            who = (
                f"PID {holder.get('pid')} ({holder.get('command', '?')}, since {holder.get('started', '?')})"
                if holder
                else "another process"
            )
            raise UsageError(
                f"run directory {self.path.parent} is in use by {who}",
                fix="wait for it to finish, or stop that process; a lock of a dead process is taken over automatically",
            ) from None
        holder = self._holder(f)
        if holder.get("pid"):
            pid = int(holder["pid"])
            state = "still running but no longer holding the lock" if _pid_alive(pid) else "no longer running"
            self.notes.append(
                f"stale lock on {self.path.parent} from PID {pid} ({holder.get('command', '?')}, started "
                f"{holder.get('started', '?')}; {state}) taken over"
            )
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": now()}, f)
        f.flush()
        os.fsync(f.fileno())
        self._f = f

    @staticmethod
    def _holder(f: IO[str]) -> dict[str, Any]:
        f.seek(0)
        try:
            data = json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        """Clear the holder record and unlock (the file stays: unlinking a locked path races with takers)."""
        if self._f is None:
            return
        with contextlib.suppress(OSError):
            self._f.seek(0)
            self._f.truncate()
            self._f.flush()
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()
        self._f = None
