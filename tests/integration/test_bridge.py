"""The C bridge against the real llama.cpp: tokenizer test vectors, dequantizers, crashes, bad input."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.backends.worker import RemoteModel, Worker
from parity.errors import WorkerError

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


def test_eval_rows_are_eval_rows_and_refuse_bad_rows(llama_plan: build.BuildPlan) -> None:
    """parity_eval_rows (the output head for some positions only) gives those positions' rows of parity_eval,
    bit for bit, through the worker's out-of-band framing; rows out of range or out of order are exit-2 input."""
    from parity.engines import spec as impl_specs
    from parity.engines.bridged import BridgedImplementation
    from parity.models.modelgen import default_model

    gguf = default_model("f32")[0]
    tokens = [1, 5, 9, 2, 7, 3, 11, 4]
    rows = [1, 4, 5, 7]
    spec = impl_specs.parse("llama")
    with BridgedImplementation(spec, llama_plan, gguf, BackendParams(n_ctx=16, n_batch=16, n_ubatch=16)) as impl:
        full = impl.logits(tokens)
        at = impl.logits_at(tokens, rows)
        assert at.shape == (len(rows), full.shape[1]) and at.dtype == np.float32
        assert np.array_equal(at, full[rows])
        assert impl.logits_at(tokens, []).shape == (0, full.shape[1])
        for bad in ([3, 3], [5, 2], [-1], [len(tokens)]):
            with pytest.raises(WorkerError, match="rows must increase strictly"):
                impl.logits_at(tokens, bad)
        assert np.array_equal(impl.logits(tokens), full)  # the worker is still good


def test_killed_worker_becomes_an_error(llama_plan: build.BuildPlan) -> None:
    with Worker("llama", llama_plan.bridge_path) as w:
        os.kill(w.pid, signal.SIGKILL)
        with pytest.raises(WorkerError, match="killed by signal SIGKILL"):
            w.call("dequantize", 8, b"\0" * 34, 32)


def test_aborting_worker_becomes_an_error(llama_plan: build.BuildPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_FAULT_INJECT", "abort:dequantize")
    with Worker("llama", llama_plan.bridge_path) as w, pytest.raises(WorkerError, match="SIGABRT"):
        w.call("dequantize", 8, b"\0" * 34, 32)


# Byte offsets of the f16 scale fields in one block of each quantized type (ggml-common.h). Every other byte of
# a block is valid with any bit pattern, so it is random; a scale is a random FINITE f16 (subnormals included).
F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,),  # d, qs[32]
    "Q4_0": (0,),  # d, qs[16]
    "Q4_1": (0, 2),  # d, m, qs[16]
    "Q5_0": (0,),  # d, qh[4], qs[16]
    "Q5_1": (0, 2),  # d, m, qh[4], qs[16]
    "Q4_K": (0, 2),  # d, dmin, scales[12], qs[128]
    "Q6_K": (208,),  # ql[128], qh[64], scales[16], d
    "TQ1_0": (52,),  # qs[48], qh[4], d
    "TQ2_0": (64,),  # qs[64], d
}
# ggml registers no to_float for F32 (its kernels read F32 data as it is): parity's F32 must be the raw values.
NO_GGML_TO_FLOAT = {"F32"}


def _engine_types(*, fork: bool) -> list[str]:
    """Every type parity's numpy engine reads (parity.gguf.dequant.DEQUANTIZERS): a new type is tested automatically."""
    from parity.gguf import dequant, ternary

    return [t.name for t in dequant.DEQUANTIZERS if isinstance(t, ternary.ForkType) == fork]


def _finite_f16_bits(rng: np.random.Generator, n: int) -> npt.NDArray[np.uint16]:
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exp = (bits >> 10) & 0x1F
    return np.where(exp == 0x1F, bits & ~np.uint16(0x4000), bits).astype(np.uint16)  # 0x7C00 -> 0x3C00 range


def _random_blocks(type_name: str, rng: np.random.Generator) -> tuple[int, bytes, int]:
    """(ggml type id, raw bytes, element count): random but valid data, at least 2048 values."""
    import gguf

    qt = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n_blocks = max(8, 2048 // block)
    if type_name == "F32":
        bits = rng.integers(0, 1 << 32, size=n_blocks, dtype=np.uint32)
        bits = np.where((bits >> 23) & 0xFF == 0xFF, bits & ~np.uint32(1 << 30), bits).astype(np.uint32)
        return int(qt), bits.tobytes(), n_blocks
    if type_name == "F16":
        return int(qt), _finite_f16_bits(rng, n_blocks).tobytes(), n_blocks
    if type_name == "BF16":
        bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
        bits = np.where((bits >> 7) & 0xFF == 0xFF, bits & ~np.uint16(1 << 14), bits).astype(np.uint16)
        return int(qt), bits.tobytes(), n_blocks
    if type_name not in F16_FIELDS:
        pytest.fail(
            f"{type_name} is read by parity's engine but this test does not know its block layout: add the byte "
            "offsets of its f16 fields to F16_FIELDS (ggml-common.h) so it is compared with ggml"
        )
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        raw[:, off : off + 2] = _finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return int(qt), raw.tobytes(), n_blocks * block


def _ours(qt: int, raw: bytes, n: int) -> npt.NDArray[np.float32]:
    from parity.gguf import dequant
    from parity.gguf.reader import TensorInfo

    t = TensorInfo(
        name="t", ggml_type=qt, shape=(1, n), data=np.frombuffer(raw, dtype=np.uint8), offset=0, n_bytes=len(raw)
    )
    ours = dequant.dequantize(t).reshape(-1)
    assert ours.dtype == np.float32
    return ours


def _same_bits(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> bool:
    return bool(np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32)))


@pytest.mark.parametrize("type_name", _engine_types(fork=False))
def test_dequantizers_bit_exact_with_ggml(llama_plan: build.BuildPlan, type_name: str) -> None:
    """Every mainline type the numpy engine reads, against ggml's own to_float through the bridge."""
    rng = np.random.default_rng(7)
    qt, raw, n = _random_blocks(type_name, rng)
    ours = _ours(qt, raw, n)
    assert np.isfinite(ours).all(), type_name  # valid data: finite scales give finite values
    with Worker("llama", llama_plan.bridge_path) as w:
        if type_name in NO_GGML_TO_FLOAT:
            with pytest.raises(WorkerError, match="no dequantizer"):
                w.call("dequantize", qt, raw, n)
            assert _same_bits(ours, np.frombuffer(raw, "<f4")), type_name
            return
        theirs = w.call("dequantize", qt, raw, n)
    assert _same_bits(ours, theirs), type_name


def test_dequantize_refuses_a_buffer_of_the_wrong_length(llama_plan: build.BuildPlan) -> None:
    """parity_dequantize gets the byte length: a short buffer is a clear error, not a read past its end."""
    rng = np.random.default_rng(3)
    qt, raw, n = _random_blocks("Q4_1", rng)  # 2048 values: 64 blocks of 20 bytes
    assert len(raw) == 1280
    with Worker("llama", llama_plan.bridge_path) as w:
        with pytest.raises(WorkerError, match=r"2048 elements of type q4_1 take 1280 bytes .* buffer holds 1279"):
            w.call("dequantize", qt, raw[:-1], n)
        with pytest.raises(WorkerError, match=r"take 1280 bytes .* buffer holds 1300"):
            w.call("dequantize", qt, raw + b"\0" * 20, n)
        with pytest.raises(WorkerError, match=r"take 1300 bytes .* buffer holds 1280"):
            w.call("dequantize", qt, raw, n + 32)  # the element count claims more than the buffer holds
        with pytest.raises(WorkerError, match="not a multiple of the q4_1 block size 32"):
            w.call("dequantize", qt, raw, n - 1)
        with pytest.raises(WorkerError, match="holds 0"):
            w.call("dequantize", qt, b"", n)
        with pytest.raises(WorkerError, match="n_elements must be positive"):
            w.call("dequantize", qt, raw, 0)
        # A removed type id keeps a table entry with block size 0: refused, not a division by zero.
        with pytest.raises(WorkerError, match="no dequantizer"):
            w.call("dequantize", 36, raw, n)
        assert w.proc.poll() is None  # every refusal was reported, none killed the worker
        assert _same_bits(w.call("dequantize", qt, raw, n), _ours(qt, raw, n))


@pytest.mark.bitnet_cpp
@pytest.mark.parametrize("type_name", _engine_types(fork=True))
def test_fork_only_types_have_no_ggml_dequantizer(type_name: str) -> None:
    """I2_S exists only in bitnet.cpp's fork, which registers no to_float for it (ggml.c type_traits).

    So there is no C dequantizer to be bit-exact with: parity's I2_S reading is checked instead against what the
    fork's own llama-quantize writes (test_ternary_lanes.py::test_bitnet_quantizer_output_reads_exactly) and the
    fork's logits. If the fork ever gains a to_float for it, this test fails: then compare the two here.
    """
    from parity.backends import lock
    from parity.gguf import ternary

    spec = lock.get_spec("bitnet")
    override = lock.source_override(spec)
    if override is None:
        pytest.fail(
            "this test needs a bitnet.cpp source: set PARITY_BITNET_SRC to a checkout of microsoft/BitNet at "
            "c82b5e6 with 3rdparty/llama.cpp at 406a5036 (CI deselects it with -m 'not bitnet_cpp')"
        )
    plan = build.ensure_built(spec, override)
    qt = int(ternary.ForkType[type_name])
    raw = bytes(ternary.i2_s_nbytes(256))
    with Worker("bitnet", plan.bridge_path) as w, pytest.raises(WorkerError, match="no dequantizer"):
        w.call("dequantize", qt, raw, 256)
