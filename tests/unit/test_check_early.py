"""check/early.py: work started in the background is handed on once, its errors surface where the work used
to run, and whatever nobody collected is closed. (The real worker path: tests/integration/test_parity_run.py.)"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from parity.backends.bridge import BackendParams
from parity.check import early, inputs
from parity.engines.spec import parse
from parity.errors import ModelFormatError
from parity.options import RunOptions


class _Closable:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _done(value: Any) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def _failed(exc: BaseException) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_exception(exc)
    return f


def test_a_lane_loaded_under_the_same_parameters_is_used_as_is() -> None:
    ref = _Closable()
    params = BackendParams(n_ctx=64)
    opened = early.OpenedLane("llama", params, _done(ref), 0.0, seconds=0.25)

    def no_worker() -> None:
        raise AssertionError("a matching background lane must not start another worker")

    got, seconds = early.lane_reference(
        opened,
        parse("llama"),
        None,  # type: ignore[arg-type]
        Path("m.gguf"),
        BackendParams(n_ctx=64),
        "batch",
        RunOptions(),
        Path("."),
        no_worker,
    )
    assert got is ref and seconds == 0.25 and ref.closed == 0  # type: ignore[comparison-overlap]


def test_background_work_nobody_collected_is_closed_once() -> None:
    worker, vocab, ref = _Closable(), _Closable(), _Closable()
    bg = early.Background()
    bg.started["llama"] = _done((worker, vocab))
    bg.started["bitnet"] = _failed(ModelFormatError("refused"))  # it closed its own worker
    bg.opened["llama"] = early.OpenedLane("llama", BackendParams(), _done(ref), 0.0)
    bg.opened["bitnet"] = early.OpenedLane("bitnet", BackendParams(), _failed(RuntimeError("crash")), 0.0)
    bg.discard()
    assert (worker.closed, vocab.closed, ref.closed) == (1, 1, 1)
    assert not bg.started and not bg.opened
    bg.discard()
    assert (worker.closed, vocab.closed, ref.closed) == (1, 1, 1)


def test_a_refusal_in_the_background_is_raised_where_tokenization_runs() -> None:
    started = {"llama": _failed(ModelFormatError("the llama backend cannot load m.gguf: bad"))}
    spare: dict[str, Any] = {}
    with pytest.raises(ModelFormatError, match="cannot load m.gguf"):
        inputs.tokenize_in_backends(
            RunOptions(),
            {"llama": None},  # type: ignore[dict-item]
            {"llama": parse("llama")},
            spare,
            {},
            Path("m.gguf"),
            {},
            None,
            {},
            started,
        )
    assert not started and not spare  # taken, and nothing left to close
