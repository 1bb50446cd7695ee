"""SIGKILL at random points, 20 times, resuming each time: nothing verified is lost or recomputed, the state
file always validates, and the final result equals an uninterrupted run. Plus the lock: a live holder is
named, a dead holder's lock is reported stale and taken over."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from parity.workflow import state

from .test_windows_html import EXAMPLES, ROOT, windows_cli

KILLS = 20
LOGGED = """
import os, runpy, sys
script, rest = sys.argv[1], sys.argv[2:]
start, count = rest[rest.index("--start") + 1], rest[rest.index("--count") + 1]
with open(os.environ["INVOCATION_LOG"], "a") as f:
    f.write(f"{os.environ['PARITY_IMPL']} {start} {count}\\n")
sys.argv = [script, *rest]
runpy.run_path(script, run_name="__main__")
"""


def logged_config(tmp_path: Path, log: Path) -> Path:
    """examples/windows/vm.toml (48 steps, windows of 3) with every command invocation logged."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "logged.py").write_text(LOGGED, encoding="utf-8")
    text = (EXAMPLES / "vm.toml").read_text(encoding="utf-8").replace("steps = 240", "steps = 48")
    text = text.replace("window = 6", "window = 3")
    text = text.replace('"stackvm.py"', f'"{tmp_path / "logged.py"}", "{EXAMPLES / "stackvm.py"}"')
    text = text.replace("timeout = 30 }", f'timeout = 30, env = {{ INVOCATION_LOG = "{log}" }} }}')
    cfg = tmp_path / "vm.toml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


def spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "parity", "windows", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The run's state as a kill left it: state.json validated WITHOUT recovery (it must never be torn), brought
    up to date by the journal's records (a torn last record is the only damage a kill may leave)."""
    path = run_dir / "state.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert state.validation_errors(data) == [], state.validation_errors(data)[:3]
    merged, notes = state.StateStore(run_dir).load(repair=False)
    assert merged is not None and notes == [], notes
    assert merged["seq"] >= data["seq"] and state.validation_errors(merged) == []
    return merged


def verified(st: dict[str, Any] | None) -> dict[int, tuple[int, str]]:
    """window start -> (attempt number, finished time) of its verified attempt."""
    out: dict[int, tuple[int, str]] = {}
    for w in (st or {}).get("windows", []):
        if w["status"] == "verified":
            a = next(a for a in w["attempts"] if a["status"] == "verified")
            out[w["start"]] = (a["n"], a["finished"])
    return out


def traces(run_dir: Path, st: dict[str, Any]) -> dict[tuple[int, str], str]:
    out = {}
    for w in st["windows"]:
        a = w["attempts"][-1]
        for impl in ("vm-ref", "vm-port"):
            out[(w["start"], impl)] = (run_dir / a["trace_dir"] / f"{impl}.jsonl").read_text()
    return out


def test_twenty_sigkills_lose_and_recompute_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("PARITY_KILL_SEED", "20240601"))
    rng = random.Random(seed)
    # The uninterrupted run: the result to reproduce, and the timings the kill points are drawn from.
    base_log = tmp_path / "base.log"
    base_dir = tmp_path / "base"
    t0 = time.monotonic()
    proc = windows_cli("run", "--config", str(logged_config(tmp_path / "b", base_log)), "--run-dir", str(base_dir))
    full = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    t0 = time.monotonic()
    assert windows_cli("resume", "--run-dir", str(base_dir)).returncode == 0
    startup = time.monotonic() - t0  # a pass with nothing to compute: interpreter, imports, lock, load
    base = read_state(base_dir)
    assert base is not None
    per_window = max((full - startup) / len(base["windows"]), 0.01)

    log = tmp_path / "kill.log"
    cfg = logged_config(tmp_path / "k", log)
    run_dir = tmp_path / "run"
    kills = 0
    stale_notes = 0
    before: dict[int, tuple[int, str]] = {}
    for _ in range(KILLS * 3):
        if kills == KILLS:
            break
        log_mark = log.stat().st_size if log.exists() else 0
        p = spawn("resume", "--config", str(cfg), "--run-dir", str(run_dir), "--quiet")
        # From mid-startup to a window or two in: lands in imports, lock, load, saves and command runs alike.
        time.sleep(rng.uniform(0.3 * startup, startup + 2 * per_window))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        _, err = p.communicate(timeout=120)
        stale_notes += err.count("stale lock")
        st = read_state(run_dir)  # validates on disk, as left by the kill
        now_verified = verified(st)
        for start, attempt in before.items():
            assert now_verified.get(start) == attempt, f"verified window {start} lost or changed (seed {seed})"
        if log.exists():
            with open(log, encoding="utf-8") as f:
                f.seek(log_mark)
                invoked = {int(line.split()[1]) for line in f.read().splitlines()}
            assert not invoked & set(before), (
                f"verified windows {sorted(invoked & set(before))} recomputed (seed {seed})"
            )
        before = now_verified
    assert kills == KILLS, f"only {kills} kills landed before the run finished (seed {seed})"
    assert stale_notes > 0  # at least one kill landed while the lock was held, and the next pass took it over

    proc = windows_cli("resume", "--config", str(cfg), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    st = read_state(run_dir)
    assert st is not None
    assert "No divergences found, verified through step 47." in proc.stdout
    assert [w["status"] for w in st["windows"]] == ["verified"] * len(base["windows"])
    for w in st["windows"]:
        statuses = [a["status"] for a in w["attempts"]]
        assert statuses.count("verified") == 1 and statuses[-1] == "verified", (w["start"], statuses)
        assert set(statuses[:-1]) <= {"interrupted"}
    assert traces(run_dir, st) == traces(base_dir, base)  # byte-identical evidence
    assert [w["attempts"][-1]["participants"].keys() for w in st["windows"]] == [
        w["attempts"][-1]["participants"].keys() for w in base["windows"]
    ]
    assert any(e["kind"] == "stale-lock" for e in st["events"])
    for name in state.BACKUP_NAMES:  # compactions happen at the end of a pass, so a killed pass may leave fewer
        if (run_dir / name).exists():
            assert state.validation_errors(json.loads((run_dir / name).read_text())) == []
    assert not list(run_dir.rglob(".*.tmp"))  # leftovers of killed writes were cleaned under the lock


def test_live_lock_holder_is_named_and_a_dead_one_is_taken_over(tmp_path: Path) -> None:
    from .test_windows_html import vm_config

    cfg = vm_config(tmp_path, steps=6)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from parity.workflow.lock import RunLock; "
            "lock = RunLock(Path(sys.argv[1]), 'holder for the test'); lock.acquire(); print('locked', flush=True); time.sleep(120)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        proc = windows_cli("run", "--config", str(cfg), "--run-dir", str(run_dir))
        assert proc.returncode == 2
        assert f"is in use by PID {holder.pid} (holder for the test" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    proc = windows_cli("run", "--config", str(cfg), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert f"stale lock on {run_dir} from PID {holder.pid} (holder for the test" in proc.stderr
    assert "no longer running) taken over" in proc.stderr
