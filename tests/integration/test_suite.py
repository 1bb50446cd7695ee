"""`parity suite` for real (issue 16): local workers, Ray actors and merged shards print the same statistics;
20 SIGKILLs during a run, resumed each time, lose nothing and compute no finished item again.

The suite: numpy vs llama.cpp on the default model, token-id items and text items (parity's own tokenizer
path), one thread per side. Ray: one real local head for the module, started in this process on loopback
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: every Ray server listens on 127.0.0.1) and shut down after.
Cost (2-core machine shared with other jobs, load ~6-7): 140 s for this file, of which the 20 SIGKILLs 67 s,
local/Ray/shards 28 s + 18 s to start Ray and the baseline, the rest ~22 s (each CLI run loads both sides).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build
from parity.suite import store
from parity.suite.executors import DEPTH

from .conftest import ROOT, locked_gemma, run_cli

pytestmark = pytest.mark.model
THREADS = "1"
N_KILLS = 20
N_ITEMS = 100  # enough that 20 killed runs, each finishing a few items, leave work for the last ones


def _suite(path: Path, n_ids: int = 98) -> Path:
    lines = [
        {"id": f"ids-{i}", "tokens": [1, *((7 + 37 * i + 13 * k) % 500 + 3 for k in range(13))]} for i in range(n_ids)
    ]
    lines += [
        {"id": "fox", "text": "The quick brown fox jumps over the lazy dog."},
        {"id": "chat", "text": "What is 2+2?", "template": "chatml", "system": "Answer briefly."},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def _suite_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["suite", "--prompts", str(prompts), "--threads", THREADS, "--out-dir", str(out), "--format", "json", *extra]


def _run(prompts: Path, out: Path, *extra: str) -> dict[str, Any]:
    r = run_cli(*_suite_args(prompts, out, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    rec: dict[str, Any] = json.loads(r.stdout)
    assert rec == json.loads((out / "suite.json").read_text())
    return rec


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _suite(tmp_path_factory.mktemp("suite") / "items.jsonl")


BASELINE_DIR: list[Path] = []


@pytest.fixture(scope="module")
def baseline(llama_plan: build.BuildPlan, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted, unsharded local run."""
    BASELINE_DIR[:] = [tmp_path_factory.mktemp("local") / "out"]
    return _run(prompts, BASELINE_DIR[0])


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local Ray head bound to 127.0.0.1, for this module's tests."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError:
        pytest.fail("ray is not installed: pip install -e '.[test]' (the test extra has it)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        address = str(ray.get_runtime_context().gcs_address)
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()


def _same_numbers(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["statistics_text"] == b["statistics_text"]
    assert a["statistics"] == b["statistics"]
    keys = ("index", "id", "n_scored", "status", "mean_kld", "max_kld", "kld_p99", "same_top", "rms_dp")
    assert [{k: r[k] for k in keys} for r in a["items"]] == [{k: r[k] for k in keys} for r in b["items"]]
    assert a["histogram"] == b["histogram"] and a["worst"] == b["worst"]


def test_local_ray_and_merged_shards_print_identical_statistics(
    baseline: dict[str, Any], prompts: Path, ray_address: str, tmp_path: Path
) -> None:
    assert baseline["complete"] and baseline["status"] == "pass" and baseline["n_done"] == N_ITEMS
    assert baseline["scoring"]["n_positions"] > 100
    # a correct port is not vacuously exact: the two sides differ, by little
    assert 0 < baseline["statistics"]["kld"]["max"] < 1e-6

    on_ray = _run(prompts, tmp_path / "ray", "--executor", "ray", "--workers", "2", "--ray-address", ray_address)
    assert on_ray["executor"]["kind"] == "ray" and on_ray["executor"]["workers"] == 2
    _same_numbers(baseline, on_ray)
    r = run_cli(
        *_suite_args(prompts, tmp_path / "ray3", "--executor", "ray", "--workers", "3", "--ray-address", ray_address)
    )
    assert r.returncode == 2 and "has 2 CPU(s), one per actor" in r.stderr, r.stderr[-2000:]

    shard_dirs = []
    for k in (1, 2, 3):
        rec = _run(prompts, tmp_path / f"shard{k}", "--shard", f"{k}/3")
        assert rec["n_items"] == len([i for i in range(N_ITEMS) if i % 3 == k - 1]) and rec["complete"]
        shard_dirs.append(str(tmp_path / f"shard{k}"))
    r = run_cli("suite", "merge", *shard_dirs, "--out-dir", str(tmp_path / "merged"), "--format", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    merged = json.loads(r.stdout)
    assert merged["executor"]["kind"] == "merge" and merged["complete"]
    _same_numbers(baseline, merged)

    # merging a part of the shards: an incomplete suite, named, exit 2
    r = run_cli("suite", "merge", *shard_dirs[:2], "--out-dir", str(tmp_path / "partial"))
    assert r.returncode == 2 and f"missing: {len(range(2, N_ITEMS, 3))} item(s)" in r.stdout


def _segments(out: Path) -> list[list[dict[str, Any]]]:
    """progress.jsonl cut into runs (each starts with its `run` event)."""
    segs: list[list[dict[str, Any]]] = []
    for ev in store.read_progress(out):
        if ev["event"] == "run":
            segs.append([])
        segs[-1].append(ev)
    return segs


def _item_seconds(out: Path) -> float:
    """The median time between two items finishing in a finished run (its progress log)."""
    t = [ev["t"] for ev in store.read_progress(out) if ev["event"] == "done"]
    gaps = sorted(b - a for a, b in itertools.pairwise(t))
    return gaps[len(gaps) // 2]


def test_twenty_sigkills_resumed_each_time_lose_nothing_and_redo_nothing(
    baseline: dict[str, Any], prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    per_item = _item_seconds(BASELINE_DIR[0])
    rng = random.Random(16)
    kills = in_run = 0
    for cycle in range(N_KILLS):
        args = _suite_args(prompts, out, *(["--resume"] if cycle else []))
        runs_before = len(_segments(out)) if (out / store.PROGRESS).exists() else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "parity", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the kill takes its workers and C++ processes too
        )
        t0 = time.monotonic()
        if rng.random() < 0.25:  # during start-up, preparation, model loading: at the latest when it starts computing
            deadline = t0 + rng.uniform(0.0, 4.0)
            while time.monotonic() < deadline and proc.poll() is None:
                if (out / store.PROGRESS).exists() and len(_segments(out)) > runs_before:
                    break  # on a fast machine the whole suite takes less than the deadline: kill it now
                time.sleep(0.01)
        else:  # while items are computed: once this run finished one, within the next few items
            while proc.poll() is None and time.monotonic() - t0 < 120:
                segs = _segments(out) if (out / store.PROGRESS).exists() else []
                if len(segs) > runs_before and any(e["event"] == "done" for e in segs[-1]):
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 3 * per_item))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
            if (out / store.PROGRESS).exists() and len(_segments(out)) > runs_before:
                in_run += 1  # killed after it began computing (else during start-up: no trace in the log)
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), f"run {cycle} exited {proc.returncode}"
    final = _run(prompts, out, "--resume")
    assert kills >= N_KILLS - 1, f"only {kills} of {N_KILLS} runs were still running when killed"

    # the same statistics as one uninterrupted run
    _same_numbers(baseline, final)
    assert final["complete"] and final["n_done"] == N_ITEMS and final["executor"]["resumed"]

    # nothing finished is lost or started again; a kill costs at most the items in flight
    segs = _segments(out)
    assert len(segs) >= in_run + 1 and in_run >= N_KILLS // 2
    known: set[int] = set()
    starts = dict.fromkeys(range(N_ITEMS), 0)
    for seg in segs:
        head, events = seg[0], seg[1:]
        assert set(head["done"]) >= known, f"finished items lost: {sorted(known - set(head['done']))}"
        started = [e["item"] for e in events if e["event"] == "start"]
        again = set(head["done"]) & set(started)
        assert not again, f"finished items computed again: {sorted(again)}"
        done_here = [e["item"] for e in events if e["event"] == "done"]
        assert len(done_here) == len(set(done_here)) and set(done_here) <= set(started)
        assert len(set(started) - set(done_here)) <= DEPTH  # one worker: at most its queue is lost
        for i in started:
            starts[i] += 1
        known = set(head["done"]) | set(done_here)
    assert known == set(range(N_ITEMS))
    assert all(n >= 1 for n in starts.values())
    assert sum(starts.values()) <= N_ITEMS + DEPTH * kills
    print(
        f"{kills} kills ({in_run} while computing), {len(segs)} runs, {sum(starts.values())} computations of {N_ITEMS} items"
    )


def test_a_side_that_crashes_fails_its_items_not_the_run_and_resume_retries_them(
    llama_plan: build.BuildPlan, tmp_path: Path
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"tokens": [1, 20, 30, 40]}\n{"tokens": [1, 50, 60, 70]}\n', encoding="utf-8")
    out = tmp_path / "out"
    # llama.cpp's worker aborts in every item's evaluation (the scored rows: eval_rows), as a C++ abort would:
    # each item is an error, the run exit 1 (the calibrated verdict's floor, measured with eval, still runs)
    r = run_cli(*_suite_args(items, out), env={"PARITY_FAULT_INJECT": "abort:eval_rows"})
    assert r.returncode == 1, r.stderr[-2000:]
    rec = json.loads(r.stdout)
    assert rec["status"] == "error" and rec["verdict"]["n_error"] == 2 and rec["n_done"] == 0
    assert all(row["status"] == "error" and "SIGABRT" in row["reason"] for row in rec["items"]), rec["items"]
    assert "Traceback" not in r.stderr
    # the failed items were not persisted as done: a resume computes exactly them
    fixed = _run(items, out, "--resume")
    assert fixed["status"] == "pass" and fixed["n_done"] == 2
    assert [e["item"] for e in store.read_progress(out) if e["event"] == "start"] == [0, 1, 0, 1]


def test_two_files_of_one_model_through_one_engine(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """The quantisation question: llama.cpp on the Q8_0 file against llama.cpp on the F32 file."""
    from parity.models.modelgen import default_model

    items = tmp_path / "items.jsonl"
    items.write_text(
        '{"id": "a", "text": "The quick brown fox jumps over the lazy dog."}\n{"id": "b", "tokens": [1, 9, 8, 7, 6, 5]}\n',
        encoding="utf-8",
    )
    q8, f32 = default_model("q8_0")[0], default_model("f32")[0]
    sides = ("--impl", f"llama:model={q8}", "--reference", f"llama:model={f32}")
    loose = _run(items, tmp_path / "loose", *sides, "--max-mean-kld", "0.1")
    assert loose["implementation"]["model"]["path"] == str(q8) and loose["reference"]["model"]["path"] == str(f32)
    mean = loose["statistics"]["kld"]["mean"]
    assert 1e-6 < mean < 0.1, mean  # 8-bit weights move the distribution, by little
    r = run_cli(*_suite_args(items, tmp_path / "strict"), *sides, "--max-mean-kld", "1e-7")
    assert r.returncode == 1, r.stderr[-2000:]
    strict = json.loads(r.stdout)
    assert strict["status"] == "fail" and strict["statistics"] == loose["statistics"]
    assert set(strict["worst"]) == {0, 1} and all("mean KLD" in row["reason"] for row in strict["items"])
    # files whose vocabularies differ are refused before anything runs
    r = run_cli(
        *_suite_args(items, tmp_path / "other"),
        "--impl",
        f"llama:model={locked_gemma()}",
        "--reference",
        f"llama:model={f32}",
    )
    assert r.returncode == 2 and "different vocabularies" in r.stderr, r.stderr[-2000:]


def test_resume_keeps_the_threads_of_the_run_it_resumes(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """Without --threads, the slots share the configured threads (--workers 2: 1 each); a --resume with other
    --workers keeps the threads the resumed run decided (they are in its suite key) instead of refusing it."""
    items = _suite(tmp_path / "items.jsonl", n_ids=3)
    out = tmp_path / "out"
    base = ["suite", "--prompts", str(items), "--verdict", "fixed", "--out-dir", str(out), "--format", "json"]
    first = run_cli(*base, "--workers", "2", env={"PARITY_THREADS": "2"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / store.MANIFEST).read_text())["threads"] == 1
    for f in (out / "items").glob("000001.*"):  # as if killed before it finished item 1
        f.unlink()
    resumed = run_cli(*base, "--resume", env={"PARITY_THREADS": "2"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rec = json.loads(resumed.stdout)
    assert rec["complete"] and rec["n_done"] == rec["n_items"] == 5
