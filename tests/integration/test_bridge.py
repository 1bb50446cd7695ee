"""The C bridge against the real llama.cpp: tokenizer test vectors, dequantizers, crashes, bad input."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from parity import build
from parity.bridge import BackendParams
from parity.errors import WorkerError
from parity.worker import RemoteModel, Worker

pytestmark = pytest.mark.compile


def _models_dir(plan: build.BuildPlan) -> Path:
    src = Path(build.read_receipt(plan)["source"]["path"])
    d = src / "models"
    assert d.is_dir(), f"{d} missing: the pinned llama.cpp source ships models/ggml-vocab-*.gguf"
    return d


@pytest.mark.parametrize("vocab", ["gpt-2", "llama-spm", "qwen2"])
def test_tokenizer_vectors_of_the_pinned_source(llama_plan: build.BuildPlan, vocab: str) -> None:
    """llama.cpp's own .inp/.out test vectors, through our bridge (tests tokenize in the worker)."""
    d = _models_dir(llama_plan)
    # Parsed as llama.cpp's tests/test-tokenizer-0.cpp does: inputs split on the separator, one output line each.
    raw = (d / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inp = raw.split(sep)
    if raw.endswith(sep):
        inp.pop()
    out = (d / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(inp) == len(out) and len(inp) > 10
    with Worker("llama", llama_plan.bridge_path) as w:
        m = RemoteModel(w, str(d / f"ggml-vocab-{vocab}.gguf"), BackendParams(vocab_only=1))
        for text, expected in zip(inp, out, strict=True):
            want = [int(t) for t in expected.strip().split()]
            assert m.tokenize(text, False, False) == want, repr(text)


def test_bridge_reports_bad_input_without_dying(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    d = _models_dir(llama_plan)
    with Worker("llama", llama_plan.bridge_path) as w:
        with pytest.raises(WorkerError, match="cannot open model file"):
            RemoteModel(w, str(tmp_path / "missing.gguf"), BackendParams())
        junk = tmp_path / "junk.gguf"
        junk.write_bytes(b"not a gguf at all" * 10)
        with pytest.raises(WorkerError, match="could not load"):
            RemoteModel(w, str(junk), BackendParams())
        with pytest.raises(WorkerError, match="n_ubatch"):
            RemoteModel(w, str(d / "ggml-vocab-gpt-2.gguf"), BackendParams(n_batch=8, n_ubatch=16))
        m = RemoteModel(w, str(d / "ggml-vocab-gpt-2.gguf"), BackendParams(vocab_only=1))
        with pytest.raises(WorkerError, match="vocab-only"):
            m.eval([1, 2])
        with pytest.raises(WorkerError, match="outside"):
            m.piece(10**7)
        assert w.proc.poll() is None  # every error above was reported, none killed the worker
        assert m.detokenize(m.tokenize("Hello world", False, False)) == "Hello world"


def test_killed_worker_becomes_an_error(llama_plan: build.BuildPlan) -> None:
    with Worker("llama", llama_plan.bridge_path) as w:
        os.kill(w.pid, signal.SIGKILL)
        with pytest.raises(WorkerError, match="killed by signal SIGKILL"):
            w.call("dequantize", 8, b"\0" * 34, 32)


def test_aborting_worker_becomes_an_error(llama_plan: build.BuildPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_FAULT_INJECT", "abort:dequantize")
    with Worker("llama", llama_plan.bridge_path) as w, pytest.raises(WorkerError, match="SIGABRT"):
        w.call("dequantize", 8, b"\0" * 34, 32)


def _random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> tuple[int, bytes, int]:
    import gguf

    qt = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=n_blocks * type_size, dtype=np.uint8)
    # Keep every f16 scale finite: set the exponent bits of scale fields to a sane range.
    if type_name in ("Q8_0", "Q4_0"):
        for b in range(n_blocks):
            raw[b * type_size : b * type_size + 2] = np.frombuffer(np.float16(rng.uniform(-1, 1)).tobytes(), np.uint8)
    elif type_name == "Q4_K":
        for b in range(n_blocks):
            o = b * type_size
            raw[o : o + 4] = np.frombuffer(np.array(rng.uniform(0, 1, 2), np.float16).tobytes(), np.uint8)
    elif type_name == "Q6_K":
        for b in range(n_blocks):
            o = b * type_size + type_size - 2
            raw[o : o + 2] = np.frombuffer(np.float16(rng.uniform(0, 1)).tobytes(), np.uint8)
    elif type_name in ("F16", "BF16"):
        vals = rng.normal(size=n_blocks * block).astype(np.float32)
        raw = (
            np.frombuffer(vals.astype(np.float16).tobytes(), np.uint8)
            if type_name == "F16"
            else (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        )
    return int(qt), raw.tobytes(), n_blocks * block


@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_dequantizers_bit_exact_with_ggml(llama_plan: build.BuildPlan, type_name: str) -> None:
    from parity import dequant
    from parity.gguf_file import TensorInfo

    rng = np.random.default_rng(7)
    qt, raw, n = _random_blocks(type_name, 8, rng)
    with Worker("llama", llama_plan.bridge_path) as w:
        theirs = w.call("dequantize", qt, raw, n)
    t = TensorInfo(
        name="t", ggml_type=qt, shape=(1, n), data=np.frombuffer(raw, dtype=np.uint8), offset=0, n_bytes=len(raw)
    )
    ours = dequant.dequantize(t).reshape(-1)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), np.asarray(theirs, np.float32).view(np.uint32)), type_name
