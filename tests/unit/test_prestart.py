"""check/prestart.py decides nothing: specs the job will reject start nothing and raise nothing here, and the
unvalidated options it starts workers from are the same merge the job validates."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest

from parity import options
from parity.check import prestart
from parity.errors import UsageError


def test_specs_the_job_rejects_start_nothing() -> None:
    opts = options.resolve({}, validate=False)
    assert prestart.spawn(opts, ["cmd:./engine", "numpy", "no-such-engine", "llama:=", ""]) == {}


def test_workers_start_early_only_into_an_out_dir_a_run_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[str] = []
    monkeypatch.setattr(prestart, "built_plan", lambda kind, source=None: object())

    def spawn_worker(kind: str, plan: object, opts: object) -> Future[object]:
        spawned.append(kind)
        return Future()

    monkeypatch.setattr(prestart, "spawn_worker", spawn_worker)
    fresh = options.resolve({"out_dir": str(tmp_path / "fresh")}, validate=False)
    assert prestart.spawn(fresh, ["llama"]) == {} and spawned == []
    assert not (tmp_path / "fresh").exists()  # nothing created before the options are validated
    (tmp_path / "warm" / "logs").mkdir(parents=True)
    warm = options.resolve({"out_dir": str(tmp_path / "warm")}, validate=False)
    assert set(prestart.spawn(warm, ["llama", "llama:type_k=f16", "bitnet"])) == {"llama", "bitnet"}
    assert spawned == ["llama", "bitnet"]  # one per plan key


def test_unvalidated_options_are_the_same_merge() -> None:
    given = {"threads": 0, "out_dir": "somewhere", "timeout": 5.0}
    raw = options.resolve(given, validate=False)
    assert (raw.threads, raw.out_dir, raw.timeout) == (0, "somewhere", 5.0)
    with pytest.raises(UsageError, match="--threads must be >= 1"):
        options.resolve(given)
    # what is wrong with the merge itself is still raised, validated or not
    with pytest.raises(UsageError):
        options.resolve({"no_such_option": 1}, validate=False)


def test_discard_closes_what_the_job_did_not_take() -> None:
    class W:
        closed = 0

        def close(self) -> None:
            W.closed += 1

    ok: Future[W] = Future()
    ok.set_result(W())
    failed: Future[W] = Future()
    failed.set_exception(OSError("could not start"))
    started = {"llama": ok, "bitnet": failed}
    prestart.discard(started)  # type: ignore[arg-type]
    assert started == {} and W.closed == 1
