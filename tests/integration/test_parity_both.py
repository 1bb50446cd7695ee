"""parity-both with a real bitnet.cpp build (needs PARITY_BITNET_SRC: a local bitnet.cpp checkout)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build, lock
from parity.compare import receipts

from .conftest import run_cli

pytestmark = [pytest.mark.bitnet_cpp, pytest.mark.compile, pytest.mark.model]


@pytest.fixture(scope="module")
def bitnet_plan() -> build.BuildPlan:
    spec = lock.get_spec("bitnet")
    override = lock.source_override(spec)
    if override is None:
        pytest.fail(
            "this test needs a bitnet.cpp source: set PARITY_BITNET_SRC to a checkout of microsoft/BitNet at "
            "c82b5e6 with 3rdparty/llama.cpp at 406a5036 (CI deselects it with -m 'not bitnet_cpp')"
        )
    return build.ensure_built(spec, override)


def _both(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = run_cli(
        "parity-both",
        "--out-dir",
        str(tmp_path),
        "--format",
        "json",
        *args,
        env={"PARITY_BITNET_SRC": os.environ["PARITY_BITNET_SRC"]},
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.startswith("{") else {}, proc.stderr


def test_both_lanes_pass_on_the_default_model(
    bitnet_plan: build.BuildPlan, llama_plan: build.BuildPlan, tmp_path: Path
) -> None:
    code, summary, err = _both(tmp_path, "--metrics", "mse,kl,topk")
    assert code == 0, err
    rb = receipts.load(tmp_path / "receipt_bitnet.json")
    rl = receipts.load(tmp_path / "receipt_llama.json")
    assert rb["backend"] == "bitnet" and rl["backend"] == "llama"
    assert rb["tokenizer_authority"]["config_hash"] == rl["tokenizer_authority"]["config_hash"]
    assert rb["run_config"]["type_k"] == 0 and rb["run_config"]["type_v"] == 1 and rb["run_config"]["flash_attn"] == 0
    assert rb["backend_info"]["api_generation"] == 1 and rl["backend_info"]["api_generation"] == 2
    assert set(summary["lanes"]) == {"bitnet", "llama"} and summary["overall"]["exit_code"] == 0
    assert rb["summary"]["min_cosine"] > 0.99999


def test_impossible_tolerance_fails_both_and_writes_both(
    bitnet_plan: build.BuildPlan, llama_plan: build.BuildPlan, tmp_path: Path
) -> None:
    code, summary, _ = _both(tmp_path, "--cos-tol", "0.9999999999")
    assert code == 1
    for b in ("bitnet", "llama"):
        r = receipts.load(tmp_path / f"receipt_{b}.json")
        if r["status"] == "diverged":
            assert r["summary"]["first_divergence"] is not None
    assert summary["overall"]["status"] == "fail"


def test_parallel_receipts_equal_sequential(
    bitnet_plan: build.BuildPlan, llama_plan: build.BuildPlan, tmp_path: Path
) -> None:
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert _both(seq)[0] == 0
    assert _both(par, "--parallel")[0] == 0
    volatile = {"timestamp", "seconds", "options"}
    for b in ("bitnet", "llama"):
        a = {k: v for k, v in json.loads((seq / f"receipt_{b}.json").read_text()).items() if k not in volatile}
        c = {k: v for k, v in json.loads((par / f"receipt_{b}.json").read_text()).items() if k not in volatile}
        assert a == c
