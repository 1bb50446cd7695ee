"""Every file parity writes honours the umask (issue 11 item 7): 0o644 under umask 022, 0o600 under 077.

One test per writer: the atomic writer itself, workflow state (and its backups), status pages, divergence
reports and traces, the divergence index, config copies, fetch metadata and fetched files (and their `.partial`), run
receipts, bench.json, and the default-model generator's writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from parity.compare import receipts
from parity.core import download, fs
from parity.models import fetch
from parity.models import lock as models_lock
from parity.workflow import reports, state, status

from .test_receipts import v1
from .test_workflow_runner import Script, run_pass, write_config
from .test_workflow_state import fresh

UMASKS = [0o022, 0o077, 0o027]


@pytest.fixture(params=UMASKS, ids=[f"umask{m:03o}" for m in UMASKS])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def expected(mask: int) -> int:
    return 0o666 & ~mask


def test_examples_from_the_issue() -> None:
    old = os.umask(0o022)
    try:
        assert fs.current_umask() == 0o022 and fs.new_file_mode() == 0o644
        os.umask(0o077)
        assert fs.current_umask() == 0o077 and fs.new_file_mode() == 0o600
    finally:
        os.umask(old)


def test_reading_the_umask_does_not_change_it_even_under_threads(umask: int) -> None:
    seen: list[int] = []

    def reader() -> None:
        seen.extend(fs.current_umask() for _ in range(200))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {umask} and os.umask(umask) == umask


def test_atomic_writers(tmp_path: Path, umask: int) -> None:
    fs.atomic_write_bytes(tmp_path / "b", b"x")
    fs.atomic_write_text(tmp_path / "t", "x", fsync=False)
    fs.atomic_write_json(tmp_path / "j.json", {"a": 1})
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(["b", "t", "j.json"], expected(umask))


def test_replacing_a_file_left_0600_gives_the_umask_mode(tmp_path: Path, umask: int) -> None:
    # Documented choice: outputs follow the umask of the run that writes them, not the mode of the old file.
    target = tmp_path / "state.json"
    target.write_text("old")
    target.chmod(0o600)
    fs.atomic_write_text(target, "new")
    assert mode(target) == expected(umask) and target.read_text() == "new"


def test_workflow_state_and_its_backups(tmp_path: Path, umask: int) -> None:
    store = state.StateStore(tmp_path)
    st = fresh()
    for _ in range(3):
        store.save(st)
    names = [state.STATE_NAME, *state.BACKUP_NAMES[:2]]
    assert {n: mode(tmp_path / n) for n in names} == dict.fromkeys(names, expected(umask))


def test_status_pages(tmp_path: Path, umask: int) -> None:
    md, page = status.write(tmp_path, fresh())
    assert (mode(md), mode(page)) == (expected(umask), expected(umask))


def test_replace_text(tmp_path: Path, umask: int) -> None:
    state.replace_text(tmp_path / "index.jsonl", "{}\n")
    assert mode(tmp_path / "index.jsonl") == expected(umask)


def test_reports_traces_and_every_file_of_a_windows_run(tmp_path: Path, umask: int) -> None:
    script = Script()
    script.bugs["alt1"] = {8: ("pc", 0)}
    run_dir = tmp_path / "run"
    run_pass(write_config(tmp_path, steps=18), run_dir, script, continue_on_divergence=True)
    files = {p.relative_to(run_dir).as_posix(): mode(p) for p in run_dir.rglob("*") if p.is_file()}
    assert any(n.startswith("reports/") and n.endswith(".json") for n in files), files
    assert any(n.endswith(".jsonl") for n in files) and "status.html" in files and "state.json" in files
    assert any(n.startswith("configs/") for n in files) and "divergences.jsonl" in files
    assert files == dict.fromkeys(files, expected(umask))
    trace = tmp_path / "t" / "ref.jsonl"
    reports.write_trace(trace, [{"step": 0}])
    assert mode(trace) == expected(umask)


def test_run_receipt(tmp_path: Path, umask: int) -> None:
    receipts.write(tmp_path / "receipt.json", v1())
    assert mode(tmp_path / "receipt.json") == expected(umask)


def test_bench_json(tmp_path: Path, umask: int) -> None:
    from parity.bench import main as bench

    from .test_bench import make_receipt

    bench.write_receipt(tmp_path / "bench.json", make_receipt())
    assert mode(tmp_path / "bench.json") == expected(umask)


def test_default_model_writer(tmp_path: Path, umask: int) -> None:
    fs.atomic_write_file(tmp_path / "m.bin", lambda tmp: tmp.write_bytes(b"abc"))  # model.gguf's writer
    assert mode(tmp_path / "m.bin") == expected(umask)


def test_fetched_file_its_metadata_and_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    data = b"model bytes " * 1000
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "m.bin").write_bytes(data)
    entry = {
        "name": "m",
        "tier": "ci",
        "url": (tmp_path / "up" / "m.bin").as_uri(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "description": "test entry",
    }
    (tmp_path / "lock.json").write_text(json.dumps({"schema_version": 1, "models": [entry]}))
    monkeypatch.setenv("PARITY_MODELS_LOCK", str(tmp_path / "lock.json"))
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    (result,) = fetch.fetch_models("ci", cache_dir=tmp_path / "cache")
    assert result.status == "fetched"
    meta = result.path.with_name(result.path.name + ".meta.json")
    assert (mode(result.path), mode(meta)) == (expected(umask), expected(umask))

    # A partial left 0o600 (an older version, another umask) is renamed into place with the current umask's mode.
    partial = tmp_path / "p.partial"
    download.copy_verified(tmp_path / "up" / "m.bin", models_lock.load_lock()[0].file, partial)
    assert mode(partial) == expected(umask)
    result.path.unlink()
    partial.replace(result.path.with_name(result.path.name + ".partial"))
    result.path.with_name(result.path.name + ".partial").chmod(0o600)
    monkeypatch.setattr(fetch, "_sources", lambda item, ctx: [fetch._Source("file", str(tmp_path / "up" / "m.bin"))])
    (again,) = fetch.fetch_models("ci", cache_dir=tmp_path / "cache")
    assert again.status == "fetched" and mode(again.path) == expected(umask)


def test_history_archive(tmp_path: Path, umask: int) -> None:
    (tmp_path / "t.jsonl").write_text("{}\n")
    archive, _ = reports._pack(tmp_path, [tmp_path / "t.jsonl"], "a.tar.gz")
    assert mode(archive) == expected(umask)
