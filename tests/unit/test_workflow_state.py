"""Persisted state: schema, atomic saves with backup generations, recovery, the lock."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from parity.errors import UsageError
from parity.workflow import state

DIGEST = "0" * 64


def fresh(start: int = 0, end: int = 20, window: int = 6) -> dict[str, Any]:
    return state.new_state(
        {
            "name": "t",
            "config_path": "/x/t.toml",
            "config_sha256": DIGEST,
            "input_sha256": DIGEST,
            "llm": False,
            "start": start,
            "end": end,
            "window": window,
            "reference": "ref",
            "implementations": [{"name": "ref", "role": "reference", "kind": "command"}],
        }
    )


def test_new_state_validates_and_tiles_the_range() -> None:
    st = fresh()
    assert state.validation_errors(st) == []
    assert [(w["start"], w["end"]) for w in st["windows"]] == [(0, 6), (6, 12), (12, 18), (18, 20)]
    assert state.window_grid(5, 6, 6) == [(5, 6)]
    assert json.loads(state.dump_state(st)) == st


def test_schema_and_invariants_catch_damage() -> None:
    st = fresh()
    st["windows"][1]["status"] = "great"
    assert any("windows/1/status" in e for e in state.validation_errors(st))
    st = fresh()
    st["windows"].pop()
    assert any("do not tile" in e for e in state.validation_errors(st))
    st = fresh()
    st["verified_end"] = 6
    assert any("verified_end" in e for e in state.validation_errors(st))


def test_save_rotates_three_backup_generations(tmp_path: Path) -> None:
    store = state.StateStore(tmp_path)
    st = fresh()
    for _ in range(5):
        store.save(st)
    seqs = {n: json.loads((tmp_path / n).read_text())["seq"] for n in (state.STATE_NAME, *state.BACKUP_NAMES)}
    assert seqs == {"state.json": 5, "state.json.bak": 4, "state.json.bak.2": 3, "state.json.bak.3": 2}
    loaded, notes = store.load(repair=True)
    assert loaded == st and notes == []


def test_save_refuses_an_inconsistent_state(tmp_path: Path) -> None:
    st = fresh()
    st["in_progress"] = {"window": 0, "attempt": 1, "pass": 1, "pid": 1, "started": state.now()}
    with pytest.raises(AssertionError, match="internal error"):
        state.StateStore(tmp_path).save(st)
    assert not (tmp_path / "state.json").exists()


def test_half_written_state_is_recovered_from_the_last_good_copy(tmp_path: Path) -> None:
    store = state.StateStore(tmp_path)
    st = fresh()
    store.save(st)
    store.save(st)
    good = (tmp_path / "state.json").read_bytes()
    (tmp_path / "state.json").write_bytes(good[: len(good) // 2])
    peek, notes = store.load(repair=False)  # status/report: recover in memory, touch nothing
    assert peek is not None and peek["seq"] == 2 and "not valid JSON" in notes[0]  # backup #1 + journal record #2
    assert "1 later save(s) replayed from journal.jsonl (through save #2)" in notes[0]
    assert (tmp_path / "state.json").read_bytes() == good[: len(good) // 2]
    loaded, notes = store.load(repair=True)
    assert loaded is not None and loaded["seq"] == 3  # the recovery itself is a save
    assert "recovered from state.json.bak" in notes[0] and "damaged file is kept" in notes[0]
    assert loaded["events"][-1]["kind"] == "recovered"
    (kept,) = (tmp_path / "corrupt").iterdir()
    assert kept.read_bytes() == good[: len(good) // 2]  # nothing lost
    assert state.validation_errors(json.loads((tmp_path / "state.json").read_text())) == []


def test_schema_violation_and_missing_state_recover_too(tmp_path: Path) -> None:
    store = state.StateStore(tmp_path)
    st = fresh()
    store.save(st)
    store.save(st)
    bad = json.loads((tmp_path / "state.json").read_text())
    bad["windows"][0]["status"] = "bogus"
    (tmp_path / "state.json").write_text(json.dumps(bad))
    loaded, notes = store.load(repair=True)
    assert loaded is not None and "does not match the state schema" in notes[0]
    (tmp_path / "state.json").unlink()
    loaded, notes = store.load(repair=True)
    assert loaded is not None and "is missing" in notes[0]


def test_no_valid_copy_is_an_error_never_a_reset(tmp_path: Path) -> None:
    store = state.StateStore(tmp_path)
    store.save(fresh())
    store.save(fresh())
    for name in (state.STATE_NAME, *state.BACKUP_NAMES):
        if (tmp_path / name).exists():
            (tmp_path / name).write_text("{")
    with pytest.raises(UsageError, match="no valid backup exists.*nothing was reset"):
        store.load(repair=True)
    assert (tmp_path / "state.json").read_text() == "{"


def test_empty_directory_has_no_state(tmp_path: Path) -> None:
    assert state.StateStore(tmp_path).load(repair=True) == (None, [])


def test_temp_files_of_killed_writes_are_cleaned(tmp_path: Path) -> None:
    (tmp_path / ".state.json.abc.tmp").write_text("partial")
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / ".ref.jsonl.x.tmp").write_text("partial")
    (tmp_path / "keep.tmp").write_text("not ours")
    assert state.StateStore(tmp_path).clean_temp_files() == 2
    assert (tmp_path / "keep.tmp").exists()


def test_lock_excludes_a_second_holder_and_names_it(tmp_path: Path) -> None:
    with state.RunLock(tmp_path, "parity windows run") as lock:
        assert lock.notes == []
        with pytest.raises(UsageError, match=f"in use by PID {os.getpid()} \\(parity windows run"):
            state.RunLock(tmp_path, "parity windows resume").acquire()
    with state.RunLock(tmp_path, "again") as lock:  # released cleanly: no stale-lock note
        assert lock.notes == []


def test_stale_lock_of_a_dead_pid_is_reported_and_taken_over(tmp_path: Path) -> None:
    dead = 2**31 - 2  # above any pid_max: no such process
    (tmp_path / state.LOCK_NAME).write_text(
        json.dumps({"pid": dead, "command": "parity windows run", "started": "2025-01-01T00:00:00.000Z"})
    )
    with state.RunLock(tmp_path, "parity windows resume") as lock:
        (note,) = lock.notes
        assert f"stale lock on {tmp_path} from PID {dead}" in note and "no longer running" in note
        holder = json.loads((tmp_path / state.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "parity windows resume"
    assert (tmp_path / state.LOCK_NAME).read_text() == ""
