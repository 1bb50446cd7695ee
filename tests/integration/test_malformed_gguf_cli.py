"""Malformed GGUF files through the real `parity run` (issue 11): exit 2 with one line, never a traceback or exit 1.

The unit fuzz test (tests/unit/test_gguf_fuzz.py) covers thousands of mutants in-process; this file checks the
issue's exact reproduction and a small campaign through the CLI and a real llama.cpp lane, where a mutant the
pre-flight accepts (say, one weight changed) is a valid model that may pass (0) or diverge (1).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import options
from parity.backends import build
from parity.check import inputs
from parity.errors import ParityError
from parity.models import modelgen
from tests.integration.conftest import run_cli
from tests.unit.test_gguf_fuzz import Layout, _layout, mutations

pytestmark = pytest.mark.model


def _parity_run(model: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("run", "--model-gguf", str(model), "--no-repair", "--out-dir", str(out_dir), env={"CI": "true"})


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("parity: ")]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _layout(modelgen.generate("f32", tmp_path_factory.mktemp("base")).gguf_path)


def test_head_count_zero_exits_2_naming_the_key(llama_plan: build.BuildPlan, base: Layout, tmp_path: Path) -> None:
    """The issue's reproduction: `llama.attention.head_count` = 0 was a ZeroDivisionError traceback, exit 1."""
    key = b"llama.attention.head_count"
    data = bytearray(base.data)
    at = data.find(key + b"\x04\x00\x00\x00") + len(key) + 4  # the uint32 value after the type tag
    data[at : at + 4] = b"\x00\x00\x00\x00"
    model = tmp_path / "head_count_0.gguf"
    model.write_bytes(bytes(data))
    r = _parity_run(model, tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("parity: error: ")
    assert "'llama.attention.head_count'" in lines[0] and "expected a positive integer" in lines[0]
    assert not list((tmp_path / "out").glob("receipt_*.json")), "bad input must write no receipt"


@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutants_through_parity_run(
    llama_plan: build.BuildPlan, base: Layout, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    what, mutate = data.draw(mutations(base), label="mutation")
    work = tmp_path_factory.mktemp("mutant")
    model = work / "model.gguf"
    model.write_bytes(bytes(mutate(bytearray(base.data))))
    try:
        inputs.check_input(options.resolve({}), ["llama"], model, None)
        accepted = True
    except ParityError:
        accepted = False
    r = _parity_run(model, work / "out")
    assert "Traceback" not in r.stderr, f"{what}: {r.stderr}"
    if r.returncode == 2:
        lines = _error_lines(r.stderr)
        assert len(lines) == 1 and lines[0].startswith("parity: error: "), f"{what}: {r.stderr}"
    else:
        # only a file the pre-flight accepts is a model: it may pass (0) or diverge/fail its lane (1)
        assert accepted and r.returncode in (0, 1), f"{what}: exit {r.returncode}: {r.stderr}"
