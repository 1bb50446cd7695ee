"""Protocol v2 `tensors` (docs/PROTOCOL.md) end to end: a cmd: engine (the example's protocol loop) and a py: engine
(pyhost) record and teacher-force a toy graph; no capability is Unsupported (exit 2) before anything is sent; a
crash inside `tensors` is a lane error (WorkerError). About 3 s (five engine processes, no model).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from parity.engines import spec as impl_spec
from parity.engines import tensor_names
from parity.engines.external import CommandImplementation
from parity.errors import Unsupported, UsageError, WorkerError
from parity.models import modelgen

ENGINES = Path(__file__).parent / "engines"
TOY = ENGINES / "toy_tensors.py"
TOKENS = [3, 1, 4, 1, 5, 9, 2]


def _open(text: str, tmp_path: Path, model: Path | None = None) -> CommandImplementation:
    model = model or tmp_path / "unused.gguf"  # the toy engine reads no model
    return CommandImplementation(impl_spec.parse(text), model, timeout=60, log_dir=tmp_path)


@pytest.fixture(params=["cmd", "py"])
def toy(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CommandImplementation]:
    monkeypatch.setenv("PYTHONPATH", str(ENGINES))
    text = f"cmd:{sys.executable} {TOY}" if request.param == "cmd" else "py:toy_tensors:create"
    with _open(text, tmp_path) as impl:
        yield impl


def test_tensors_record_and_replay(toy: CommandImplementation) -> None:
    assert "tensors" in toy.capabilities and tensor_names.can_capture(toy)
    free = toy.tensors(TOKENS)  # None: the default names it has
    assert list(free) == ["inp_embd", "attn_norm-0", "ffn_out-0", "l_out-0", "attn_norm-1", "ffn_out-1", "l_out-1",
                          "result_output"]  # fmt: skip
    assert all(v.shape[0] == len(TOKENS) and v.dtype == np.float32 for v in free.values())
    assert np.array_equal(free["result_output"], toy.logits(TOKENS))
    assert list(toy.tensors(TOKENS, ["l_out-*"])) == ["l_out-0", "l_out-1"]
    assert list(toy.tensors(TOKENS, ["ffn_out-1", "inp_embd"])) == ["ffn_out-1", "inp_embd"]
    # teacher forcing: own values change nothing; a perturbed layer-0 output moves only what is downstream
    same = toy.tensors(TOKENS, replace={k: v for k, v in free.items() if k != "result_output"})
    assert all(np.array_equal(same[k], v) for k, v in free.items())
    bumped = toy.tensors(TOKENS, replace={"ffn_out-0": free["ffn_out-0"] * np.float32(1.1)})
    assert np.array_equal(bumped["ffn_out-0"], free["ffn_out-0"])  # recorded: its own value
    assert np.array_equal(bumped["attn_norm-0"], free["attn_norm-0"])
    assert not np.array_equal(bumped["l_out-0"], free["l_out-0"])
    assert not np.array_equal(bumped["result_output"], free["result_output"])


def test_unknown_names_and_bad_replacements(toy: CommandImplementation) -> None:
    with pytest.raises(UsageError, match="'kqv_out-0'"):
        toy.tensors(TOKENS, ["l_out-0", "kqv_out-0"])
    with pytest.raises(UsageError, match="'zz\\*'"):
        toy.tensors(TOKENS, ["zz*"])
    with pytest.raises(UsageError, match=r"must be \(7, width\)"):
        toy.tensors(TOKENS, replace={"l_out-0": np.zeros((3, 8), np.float32)})
    with pytest.raises(WorkerError, match="cannot replace"):  # the engine's own error reply: a lane error
        toy.tensors(TOKENS, replace={"nope-0": np.zeros((7, 8), np.float32)})
    assert toy.tensors(TOKENS, ["l_out-1"])["l_out-1"].shape == (7, 8)  # and it keeps serving


def test_no_capability_is_unsupported_before_anything_is_sent(tmp_path: Path) -> None:
    gguf, _ = modelgen.default_model("f32")
    with _open(f"cmd:{sys.executable} {ENGINES / 'faulty.py'} none", tmp_path, gguf) as impl:
        sent = impl._id
        assert not tensor_names.can_capture(impl)
        with pytest.raises(Unsupported, match="does not announce 'tensors'") as info:
            impl.tensors(TOKENS)
        assert info.value.exit_code == 2 and impl._id == sent


def test_a_crash_inside_tensors_is_a_lane_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ENGINES))
    monkeypatch.setenv("TOY_FAULT", "crash_tensors")
    for text in (f"cmd:{sys.executable} {TOY}", "py:toy_tensors:create"):
        with _open(text, tmp_path) as impl:
            with pytest.raises(WorkerError, match="failed in 'tensors'.*exited with status 3") as info:
                impl.tensors(TOKENS)
            assert info.value.exit_code == 1 and "crashing inside tensors" in str(info.value)
