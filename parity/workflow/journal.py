"""The append-only journal of a windows run, `journal.jsonl`: its records, appends, replay and pruning.

One line per save holding only what changed since the save before (the windows touched, the keys replaced,
the entries appended to the append-only lists), its sequence number, the run it belongs to and a SHA-256
of its data, so each record checks itself:

    {"seq": N, "run": "<name>@<created>", "sha256": "<hex digest of the data text>", "data": {...}}

A record is fsynced unless the save asks otherwise; a kill during an append leaves at most a torn last
line, which replay ignores. A damaged record, or one of another run, stops the replay; before the next
append the journal is cut after its last good record (what is cut is kept in `corrupt/`, a torn line
excepted). Records older than every compacted copy of the state are pruned. The state file, its backups
and when to compact them are state.py's business (StateStore).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_bytes

JOURNAL_NAME = "journal.jsonl"
APPEND_ONLY = ("timeline", "events")  # lists a save usually only appends to (journaled as their new tail)
_SEQ_HEAD = re.compile(rb'\{"seq": (\d+), ')
_RECORD_HEAD = re.compile(rb'\{"seq": (\d+), "run": ("(?:[^"\\]|\\.)*"), "sha256": "([0-9a-f]{64})", "data": ')


def run_id(state: dict[str, Any]) -> str:
    """Which run a journal record belongs to: the run's name and creation time."""
    return f"{state['run']['name']}@{state['run']['created']}"


def record_line(seq: int, run: str, data: dict[str, Any]) -> bytes:
    """One journal line: `{"seq": N, "run": ..., "sha256": <digest of the data text>, "data": {...}}`."""
    payload = json.dumps(data, ensure_ascii=False)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    return f'{{"seq": {seq}, "run": {json.dumps(run)}, "sha256": "{digest}", "data": {payload}}}\n'.encode()


def parse_record(line: bytes) -> tuple[int, str, dict[str, Any]] | None:
    """(seq, run, data) of a complete, undamaged journal line, else None (torn, edited or bit-flipped)."""
    if not line.endswith(b"\n"):
        return None
    m = _RECORD_HEAD.match(line)
    if m is None or not line.endswith(b"}\n"):
        return None
    payload = line[m.end() : -2]
    if hashlib.sha256(payload).hexdigest() != m.group(3).decode():
        return None
    try:
        data = json.loads(payload.decode("utf-8"))
        run = json.loads(m.group(2).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(run, str):
        return None
    return int(m.group(1)), run, data


def apply_record(state: dict[str, Any], data: dict[str, Any]) -> None:
    """Apply one journal record's changes to `state`."""
    for k, v in data.get("set", {}).items():
        state[k] = v
    for i, w in data.get("windows", {}).items():
        state["windows"][int(i)] = w
    for k, items in data.get("append", {}).items():
        state[k].extend(items)


def _lines(raw: bytes) -> list[bytes]:
    """`raw` cut after every newline (the last piece has none when the file ends in a torn line)."""
    parts = raw.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _ends(items: list[Any]) -> tuple[int, str | None, str | None]:
    """(length, first item's JSON, last item's JSON): enough to tell that a list was only appended to."""
    if not items:
        return 0, None, None
    return len(items), json.dumps(items[0], ensure_ascii=False), json.dumps(items[-1], ensure_ascii=False)


def quarantine(run_dir: Path, path: Path, data: bytes | None = None) -> Path | None:
    """Keep damaged bytes in `corrupt/`: `data` written there, else the file at `path` moved there.

    Returns where they went (None when there was no file to move).
    """
    dest = run_dir / "corrupt" / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        atomic_write_bytes(dest, data)
        return dest
    if not path.exists():
        return None
    os.replace(path, dest)
    return dest


class Changes:
    """What the journal already holds (JSON text per key and per window), to journal only what changed."""

    def __init__(self) -> None:
        self.snap: dict[str, Any] | None = None  # None: nothing journaled or loaded yet
        self.changed: set[str] = set()  # top-level keys (and "windows") the last diff found changed

    def take(self, state: dict[str, Any]) -> None:
        """Remember `state` as what is on disk."""
        snap: dict[str, Any] = {}
        for k, v in state.items():
            if k == "windows":
                snap[k] = [json.dumps(w, ensure_ascii=False) for w in v]
            elif k in APPEND_ONLY:
                snap[k] = _ends(v)
            else:
                snap[k] = json.dumps(v, ensure_ascii=False)
        self.snap = snap

    def diff(self, state: dict[str, Any], dirty: list[int] | None) -> dict[str, Any]:
        """The journal record's data: what changed since the last save (and the snapshot updated to match).

        `dirty`: the only windows that may have changed (None: compare every window).
        """
        if self.snap is None:  # nothing journaled yet (a new run): the first record holds everything
            self.snap = {"windows": [""] * len(state["windows"])}
        snap = self.snap
        sets: dict[str, Any] = {}
        appends: dict[str, Any] = {}
        wins: dict[str, Any] = {}
        self.changed = set()
        for k, v in state.items():
            if k == "windows":
                old = snap[k]
                if len(old) != len(v):
                    old[:] = [""] * len(v)
                    dirty = None
                for i in range(len(v)) if dirty is None else dirty:
                    text = json.dumps(v[i], ensure_ascii=False)
                    if text != old[i]:
                        old[i] = text
                        wins[str(i)] = v[i]
                if wins:
                    self.changed.add("windows")
            elif k in APPEND_ONLY:
                n, first, last = snap.get(k, (0, None, None))
                grown = len(v) >= n and (
                    n == 0
                    or (
                        json.dumps(v[0], ensure_ascii=False) == first
                        and json.dumps(v[n - 1], ensure_ascii=False) == last
                    )
                )
                if not grown:
                    sets[k] = v
                elif len(v) > n:
                    appends[k] = v[n:]
                if k in sets or k in appends:
                    self.changed.add(k)
                snap[k] = _ends(v)
            else:
                text = json.dumps(v, ensure_ascii=False)
                if snap.get(k) != text:
                    snap[k] = text
                    sets[k] = v
                    self.changed.add(k)
        data: dict[str, Any] = {"set": sets}
        if wins:
            data["windows"] = wins
        if appends:
            data["append"] = appends
        return data


class Journal:
    """The journal file of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / JOURNAL_NAME
        self.bytes = 0  # appended by this process since the last compaction (reset by the store)
        self._ready = False

    def replay(self, state: dict[str, Any], accept: Callable[[dict[str, Any]], bool]) -> tuple[int, str]:
        """Apply the records saved after `state` (contiguous, undamaged, of this run, `accept`ed).

        Returns (how many were applied, what stopped the replay early or "").
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, ""
        rid, seq, applied, problem = run_id(state), state["seq"], 0, ""
        for n, line in enumerate(_lines(raw), 1):
            head = _SEQ_HEAD.match(line)
            if head is not None and line.endswith(b"\n") and int(head.group(1)) <= seq:
                continue  # already part of the compacted copy
            rec = parse_record(line)
            if rec is None:
                torn = not line.endswith(b"\n")  # a kill during the last write: never acknowledged, ignored
                problem = "" if torn else f"record {n} is damaged; it and later records were not applied"
                break
            rec_seq, rec_run, data = rec
            if rec_run != rid:
                problem = f"record {n} belongs to another run ({rec_run}); not applied"
                break
            if rec_seq != seq + 1 or not accept(data):
                problem = (
                    f"record {n} (save #{rec_seq}) does not follow save #{seq}; it and later records were not applied"
                )
                break
            apply_record(state, data)
            seq, applied = rec_seq, applied + 1
        return applied, problem

    def append(self, state: dict[str, Any], data: dict[str, Any], *, durable: bool) -> None:
        """Append one record to the journal, fsynced when `durable` (a kill leaves at most a torn last line)."""
        if not self._ready:
            self._prepare(state)
        line = record_line(state["seq"], run_id(state), data)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.bytes += len(line)

    def _prepare(self, state: dict[str, Any]) -> None:
        """Before the first append: cut the journal after its last record of this run that precedes this save.

        What is cut was never applied (a torn last line, damage, another run's records): a torn line is
        dropped, anything else is kept in corrupt/ first.
        """
        self._ready = True
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        rid, limit, good, last = run_id(state), state["seq"] - 1, 0, 0
        for line in _lines(raw):
            rec = parse_record(line)
            if rec is None or rec[1] != rid or rec[0] > limit or rec[0] <= last:
                break
            last = rec[0]
            good += len(line)
        rest = raw[good:]
        if not rest:
            return
        if b"\n" in rest:
            quarantine(self.run_dir, self.path, rest)
        with open(self.path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())

    def prune(self, keep_after: int) -> None:
        """Drop the records up to save #`keep_after` (every compacted copy already holds them)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        cut = 0
        for line in _lines(raw):
            head = _SEQ_HEAD.match(line)
            if head is None or int(head.group(1)) > keep_after:
                break
            cut += len(line)
        if cut:
            atomic_write_bytes(self.path, raw[cut:])
