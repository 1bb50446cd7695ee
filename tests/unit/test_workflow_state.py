"""Persisted state: schema, atomic saves with backup generations, recovery, the lock."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from parity.errors import UsageError
from parity.workflow import journal, lock, state

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
    with lock.RunLock(tmp_path, "parity windows run") as held:
        assert held.notes == []
        with pytest.raises(UsageError, match=f"in use by PID {os.getpid()} \\(parity windows run"):
            lock.RunLock(tmp_path, "parity windows resume").acquire()
    with lock.RunLock(tmp_path, "again") as held:  # released cleanly: no stale-lock note
        assert held.notes == []


def test_stale_lock_of_a_dead_pid_is_reported_and_taken_over(tmp_path: Path) -> None:
    dead = 2**31 - 2  # above any pid_max: no such process
    (tmp_path / lock.LOCK_NAME).write_text(
        json.dumps({"pid": dead, "command": "parity windows run", "started": "2025-01-01T00:00:00.000Z"})
    )
    with lock.RunLock(tmp_path, "parity windows resume") as held:
        (note,) = held.notes
        assert f"stale lock on {tmp_path} from PID {dead}" in note and "no longer running" in note
        holder = json.loads((tmp_path / lock.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "parity windows resume"
    assert (tmp_path / lock.LOCK_NAME).read_text() == ""


def _journal_run(tmp_path: Path, saves: int = 4) -> tuple[state.StateStore, dict[str, Any]]:
    """A state saved once in full, then `saves` times into the journal only (one window changed each time)."""
    store = state.StateStore(tmp_path)
    st = fresh()
    store.save(st)
    for i in range(saves):
        st["windows"][i % 4]["status"] = "stale" if i % 2 else "pending"
        st["events"].append({"time": state.now(), "kind": "note", "message": f"save {i}"})
        store.save(st, [i % 4], compact=False)
    return store, st


def test_journal_brings_state_json_up_to_date(tmp_path: Path) -> None:
    _store, st = _journal_run(tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["seq"] == 1  # compacted once, the rest journaled
    lines = (tmp_path / journal.JOURNAL_NAME).read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["seq"] for line in lines] == [2, 3, 4, 5]  # #1 is in state.json, no backup needs it
    assert "windows" not in json.loads(lines[-1])["data"]["set"]  # a record holds what changed, not the state
    loaded, notes = state.StateStore(tmp_path).load(repair=False)
    assert loaded == st and notes == []


def test_torn_last_record_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    _store, st = _journal_run(tmp_path)
    jpath = tmp_path / journal.JOURNAL_NAME
    good = jpath.read_bytes()
    last = good.splitlines(keepends=True)[-1]
    jpath.write_bytes(good[: len(good) - len(last) // 2])  # a kill in the middle of the last write
    s2 = state.StateStore(tmp_path)
    loaded, notes = s2.load(repair=True)
    assert loaded is not None and loaded["seq"] == st["seq"] - 1 and notes == []
    s2.save(loaded, [0], compact=False)
    records = [json.loads(line) for line in jpath.read_bytes().splitlines()]  # every line is whole again
    assert [r["seq"] for r in records] == [2, 3, 4, 5]
    assert not (tmp_path / "corrupt").exists()  # a torn line was never a record: nothing to keep


def test_damaged_record_stops_the_replay_and_is_kept(tmp_path: Path) -> None:
    _store, _st = _journal_run(tmp_path)
    jpath = tmp_path / journal.JOURNAL_NAME
    lines = jpath.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"save 1"', b'"save X"')  # bit rot in save #3: the checksum no longer matches
    jpath.write_bytes(b"".join(lines))
    s2 = state.StateStore(tmp_path)
    loaded, notes = s2.load(repair=True)
    assert loaded is not None and loaded["seq"] == 2 and "record 2 is damaged" in notes[0]
    s2.save(loaded, [0], compact=False)
    (kept,) = (tmp_path / "corrupt").iterdir()
    assert kept.read_bytes() == b"".join(lines[1:])  # the records not applied are kept, not deleted


def test_journal_of_another_run_is_not_applied(tmp_path: Path) -> None:
    _journal_run(tmp_path)
    other = tmp_path / "other"
    _journal_run(other)
    st2 = json.loads((other / "state.json").read_text())
    st2["run"]["created"] = "2020-01-01T00:00:00.000Z"
    state.StateStore(other).save(st2)  # the same files, but a run created at another time
    (other / journal.JOURNAL_NAME).write_bytes((tmp_path / journal.JOURNAL_NAME).read_bytes())
    loaded, notes = state.StateStore(other).load(repair=False)
    assert loaded is not None and loaded["run"]["created"] == "2020-01-01T00:00:00.000Z"
    assert not notes or "another run" in notes[0]


def test_state_recovered_from_a_backup_is_replayed_to_the_latest_save(tmp_path: Path) -> None:
    store, st = _journal_run(tmp_path)
    store.save(st)  # compaction: state.json #6, backup #1
    (tmp_path / "state.json").write_text("{")
    loaded, notes = state.StateStore(tmp_path).load(repair=False)
    assert loaded is not None and "recovered from state.json.bak" in notes[0]
    assert {k: v for k, v in loaded.items()} == st  # backup #1 + records 2..6 = the latest state


def test_compaction_is_due_when_the_journal_outgrows_the_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "COMPACT_MIN_BYTES", 0)
    store = state.StateStore(tmp_path)
    st = fresh(end=600)
    store.save(st)
    size = (tmp_path / "state.json").stat().st_size
    seqs = []
    for i in range(60):
        st["events"].append({"time": state.now(), "kind": "note", "message": "x" * 200})
        store.save(st, [i], compact=False)
        seqs.append(json.loads((tmp_path / "state.json").read_text())["seq"])
    compactions = sorted(set(seqs))
    assert 1 < len(compactions) < 30, compactions  # compacted now and then, never on every save
    journal_size = (tmp_path / journal.JOURNAL_NAME).stat().st_size
    assert journal_size < 8 * max(size, (tmp_path / "state.json").stat().st_size)  # pruned to what the backups need
    names = [n for n in (state.STATE_NAME, *state.BACKUP_NAMES) if (tmp_path / n).exists()]
    oldest = min(json.loads((tmp_path / n).read_text())["seq"] for n in names)
    first = json.loads((tmp_path / journal.JOURNAL_NAME).read_bytes().splitlines()[0])["seq"]
    assert first == oldest + 1  # every backup can still be brought up to date


def test_compiled_schema_check_agrees_with_jsonschema() -> None:
    from jsonschema import Draft202012Validator

    from parity.workflow.fastschema import compile_schema

    check = compile_schema(state.schema())
    v = Draft202012Validator(state.schema())
    st = fresh()
    st["windows"][0]["attempts"].append(
        {
            "n": 1,
            "pass": 1,
            "mode": "run",
            "started": state.now(),
            "finished": None,
            "status": "interrupted",
            "participants": {
                "ref": {
                    "role": "reference",
                    "status": "ok",
                    "result": "reference",
                    "steps": 6,
                    "seconds": 0.1,
                    "reason": None,
                    "metrics": {"max_abs_logits": 1e-6},
                }
            },
            "reference_tokens": [1, 2],
            "divergence": None,
            "fixed": [],
            "reason": None,
            "trace_dir": "traces/w000000/a1",
        }
    )
    mutations: list[tuple[str, Any]] = [
        ("version", 2),
        ("version", True),
        ("seq", -1),
        ("seq", 1.5),
        ("seq", 2.0),
        ("updated", "yesterday"),
        ("in_progress", {"window": 0}),
        ("prefix_tokens", [1, "2"]),
        ("prefix_tokens", [True]),
        ("timeline", [{}]),
        ("extra", 1),
        ("windows", "none"),
    ]
    cases = [st] + [{**st, k: val} for k, val in mutations]
    att = st["windows"][0]["attempts"][0]
    for key, val in [
        ("status", "done"),
        ("n", 0),
        ("reference_tokens", None),
        ("fixed", [1]),
        ("participants", {"ref": {**att["participants"]["ref"], "metrics": {"x": "1"}}}),
        ("participants", {"ref": {**att["participants"]["ref"], "seconds": -1}}),
        ("participants", {"ref": {**att["participants"]["ref"], "extra": 1}}),
    ]:
        w = {**st["windows"][0], "attempts": [{**att, key: val}]}
        cases.append({**st, "windows": [w, *st["windows"][1:]]})
    for case in cases:
        assert check(case) == v.is_valid(case), case
    assert check(st) and sum(not check(c) for c in cases) == len(cases) - 3  # seq 2.0, None tokens, the original
