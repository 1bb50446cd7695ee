"""`parity suite`'s calibrated per-item verdict for real (issue 16): on the default model, the numpy engine passes
within k x llama.cpp's own variation on every item, and a planted bug (tests/planted/bugs.py, served as a
`py:` implementation) fails every item by orders of magnitude although the fixed threshold lets it through.

Cost: three CLI runs of 8 short items, ~3-5 s each (one reference floor measured beside the items; cached
per user after the first run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build
from parity.compare.calibrate import K

from .conftest import run_cli

pytestmark = pytest.mark.model


def _items(tmp_path: Path) -> Path:
    lines = [
        {"id": f"ids-{i}", "tokens": [1, *((11 + 41 * i + 17 * k) % 500 + 3 for k in range(15))]} for i in range(7)
    ]
    lines.append({"id": "fox", "text": "The quick brown fox jumps over the lazy dog."})
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def _suite(items: Path, out: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    r = run_cli("suite", "--prompts", str(items), "--threads", "1", "--out-dir", str(out), "--format", "json", *extra)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rec: dict[str, Any] = json.loads(r.stdout)
    assert rec == json.loads((out / "suite.json").read_text())
    return r.returncode, rec, r.stderr


def test_faithful_port_passes_calibrated_and_a_planted_bug_fails(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    items = _items(tmp_path)

    code, ok, _ = _suite(items, tmp_path / "clean")
    assert code == 0 and ok["status"] == "pass" and ok["verdict"]["mode"] == "calibrated"
    floor = ok["floor"]
    assert floor["status"] == "measured" and len(floor["samples"]) == 3 and floor["rounding"]["format"] == "F32"
    assert (tmp_path / "clean" / "floor.json").is_file()
    ratios = [row["ratio"] for row in ok["items"]]
    # a correct port is not vacuously exact (the two sides differ), and stays within k floors on every item
    assert all(0 < r <= K for r in ratios), ratios
    assert ok["verdict"]["max_ratio"] == max(ratios)
    assert all(row["floor"] > 0 and row["calibrated"]["decisive"] == [] for row in ok["items"])

    bug = "py:tests.planted.bugs:factory_rope_base"  # RoPE base off by 1%
    code, bad, _ = _suite(items, tmp_path / "bug", "--impl", bug)
    assert code == 1 and bad["status"] == "fail" and bad["verdict"]["n_fail"] == len(ratios)
    assert min(row["ratio"] for row in bad["items"]) > 1e3 * K  # far outside llama.cpp's own variation
    assert all("the reference's own variation" in row["reason"] for row in bad["items"])
    # the same bug under the fixed threshold (mean KLD <= 1e-3 nats) passes: what calibration is for
    code, fixed, _ = _suite(items, tmp_path / "bug-fixed", "--impl", bug, "--verdict", "fixed")
    assert code == 0 and fixed["verdict"]["mode"] == "fixed" and fixed["floor"] is None
    assert fixed["statistics"] == bad["statistics"]
