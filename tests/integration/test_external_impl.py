"""Bring your own implementation: cmd: (protocol v2), py: (a Python factory in its own process), logits: files.

A misbehaving engine (crash, abort, hang, garbage, wrong shape, short payload, NaN, an error reply, closing
early) is an error in every lane - exit 1, a clear message, every lane's receipt written, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.backends import build
from parity.compare import receipts

from .conftest import ROOT, run_cli

pytestmark = [pytest.mark.compile, pytest.mark.model]

ECHO = ROOT / "examples" / "protocol_v2" / "echo_numpy.py"
FAULTY = Path(__file__).parent / "engines" / "faulty.py"
TWO_LANES = ["--reference", "llama", "--reference", "llama:type_k=f16"]


def _run(out: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    proc = run_cli("run", "--out-dir", str(out), "--format", "json", *args, env=env)
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, summary, proc.stderr


def test_cmd_engine_passes_and_is_described(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "--impl", f"cmd:{sys.executable} {ECHO}")
    assert code == 0, err
    r = receipts.load(tmp_path / "receipt_llama.json")
    impl = r["implementation"]
    assert impl["kind"] == "cmd" and impl["name"] == "echo_numpy" and impl["version"] == "1"
    assert str(ECHO) in impl["files"] and len(impl["files"][str(ECHO)]) == 64
    assert r["summary"]["max_abs"] <= 1e-4 and r["greedy"]["verdict"] == "identical"


def test_py_factory_runs_in_its_own_process(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "--impl", "py:echo_numpy:create", env={"PYTHONPATH": str(ECHO.parent)})
    assert code == 0, err
    impl = receipts.load(tmp_path / "receipt_llama.json")["implementation"]
    assert impl["kind"] == "py" and impl["name"] == "echo_numpy" and str(ECHO) in impl["files"]


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ("crash", "exited with status 3"),
        ("abort", "killed by SIGABRT"),
        ("hang", "no reply within 3 s"),
        ("garbage", "malformed reply: header is not JSON"),
        ("wrong_shape", "(39, 511): the two engines read this model differently"),
        ("short_payload", "exited with status 0"),
        ("nan", "not finite"),
        ("error_reply", "out of GPU memory (planted)"),
        ("close_after_hello_request", "failed in 'hello'"),
    ],
)
def test_a_misbehaving_engine_is_an_error_in_every_lane(
    llama_plan: build.BuildPlan, tmp_path: Path, fault: str, says: str
) -> None:
    code, summary, err = _run(
        tmp_path, "--impl", f"cmd:{sys.executable} {FAULTY} {fault}", "--timeout", "3", *TWO_LANES
    )
    assert code == 1, err
    lanes = summary["lanes"]
    assert set(lanes) == {"llama", "llama-type_k-f16"}
    for name, lane in lanes.items():
        assert lane["status"] == "error" and says in lane["error"], (name, lane["error"])
        r = receipts.load(tmp_path / f"receipt_{name}.json")
        assert r["status"] == "error" and not r["summary"]["all_passed"]


def test_own_tokenizer_mismatch_exits_2_before_any_lane(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "--impl", f"cmd:{sys.executable} {FAULTY} own_tokenizer_differs")
    assert code == 2 and "token mismatch" in err and "position" in err, err
    assert not list(tmp_path.glob("receipt_*.json"))


def test_logits_file(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """A 10-line script writes the logits; the run checks them; the wrong ids are refused (exit 2)."""
    from parity.engines.numpy.engine import NumpyEngine
    from parity.models.modelgen import default_model

    first = tmp_path / "first"
    code, _, err = _run(first)  # the run's sequence, from a numpy run
    assert code == 0, err
    ids = receipts.load(first / "receipt_llama.json")["token_ids"]
    model, _ = default_model("f32")
    good = tmp_path / "good.npz"
    np.savez(good, tokens=np.asarray(ids), logits=NumpyEngine(model).logits(ids))
    code, _, err = _run(tmp_path / "ok", "--impl", f"logits:{good}")
    assert code == 0, err
    impl = receipts.load(tmp_path / "ok" / "receipt_llama.json")["implementation"]
    assert impl["kind"] == "logits" and impl["positions"] == len(ids)

    bad = tmp_path / "bad.npz"
    wrong = [*ids[:5], (ids[5] + 1) % 512, *ids[6:]]
    np.savez(bad, tokens=np.asarray(wrong), logits=np.zeros((len(wrong), 512), dtype=np.float32))
    code, _, err = _run(tmp_path / "refused", "--impl", f"logits:{bad}")
    assert code == 2 and "differ from the run's prompt at position 5" in err, err
    assert not list((tmp_path / "refused").glob("receipt_*.json"))


def test_numerics_mirror_needs_the_numpy_engine(tmp_path: Path) -> None:
    """A mirror is computed by the numpy engine: with another implementation under test it would silently
    compare numpy instead of that implementation, so it is refused (exit 2) before anything runs."""
    for impl in (f"cmd:{sys.executable} {ECHO}", "llama:type_k=f16"):
        code, _, err = _run(tmp_path, "--impl", impl, "--numerics", "mirror")
        assert code == 2 and "mirrors C++ rounding in the numpy engine" in err, err
        assert not list(tmp_path.glob("receipt_*.json"))
