"""Tests for parity.gguf.ternary: I2_S, TQ1_0, TQ2_0 layouts, bit-for-bit, and the I2_S file reader.

TQ1_0 / TQ2_0 are checked against gguf-py's independent implementation and against loops transliterated
from mainline's ggml-quants.c; I2_S against a transliteration of bitnet.cpp's quantize_i2_s and the fork's
matmul. The check against the real bitnet.cpp quantizer output is in tests/integration/test_ternary_lanes.py.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import pytest
from gguf import GGMLQuantizationType as Q

from parity.errors import ModelFormatError
from parity.gguf import dequant, ternary
from parity.gguf.reader import TensorInfo, open_gguf

from .ternary_files import copy_as_i2_s

RNG = np.random.default_rng(20241017)


def ternary_rows(rows: int, cols: int, alpha: float = 0.078125) -> npt.NDArray[np.float32]:
    return (RNG.integers(-1, 2, size=(rows, cols)) * alpha).astype(np.float32)


# --------------------------------------------------------------------------------------------- TQ2_0 / TQ1_0


def _c_dequantize_tq2_0(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """dequantize_row_tq2_0, line by line."""
    blocks = raw.reshape(-1, 66)
    out = []
    for blk in blocks:
        d = np.float32(blk[64:66].view("<f2")[0])
        for j in range(0, 64, 32):
            for lane in range(4):
                for m in range(32):
                    q = (int(blk[j + m]) >> (lane * 2)) & 3
                    out.append(np.float32(q - 1) * d)
    return np.array(out, dtype=np.float32)


def _c_dequantize_tq1_0(raw: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """dequantize_row_tq1_0, line by line (uint8 wrap-around of q * pow3[n])."""
    pow3 = [1, 3, 9, 27, 81, 243]
    out = []
    for blk in raw.reshape(-1, 54):
        d = np.float32(blk[52:54].view("<f2")[0])
        for start, width in ((0, 32), (32, 16)):
            for n in range(5):
                for m in range(width):
                    q = (int(blk[start + m]) * pow3[n]) & 0xFF
                    out.append(np.float32(((q * 3) >> 8) - 1) * d)
        for n in range(4):
            for j in range(4):
                q = (int(blk[48 + j]) * pow3[n]) & 0xFF
                out.append(np.float32(((q * 3) >> 8) - 1) * d)
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize(
    ("qtype", "quant", "deq", "c_deq"),
    [
        (Q.TQ2_0, ternary.quantize_tq2_0, ternary.dequantize_tq2_0, _c_dequantize_tq2_0),
        (Q.TQ1_0, ternary.quantize_tq1_0, ternary.dequantize_tq1_0, _c_dequantize_tq1_0),
    ],
)
def test_tq_round_trip_matches_gguf_py_and_c(qtype: Q, quant: object, deq: object, c_deq: object) -> None:
    assert callable(quant) and callable(deq) and callable(c_deq)
    x = ternary_rows(3, 512)
    x[0, :256] = 0.0  # an all-zero block: d = 0
    noisy = RNG.standard_normal((2, 512)).astype(np.float32)
    for values in (x, noisy):
        ours = np.frombuffer(quant(values), dtype=np.uint8)
        theirs = gguf.quants.quantize(values, qtype).reshape(-1)
        assert np.array_equal(ours, theirs)
        decoded = deq(ours)
        assert np.array_equal(decoded, c_deq(ours))
        assert np.array_equal(decoded, gguf.quants.dequantize(theirs, qtype).reshape(-1))
    assert np.array_equal(deq(np.frombuffer(quant(x), dtype=np.uint8)).reshape(x.shape), x)  # ternary: exact


def test_tq_random_bytes_match_c() -> None:
    for block, c_deq, deq in (
        (66, _c_dequantize_tq2_0, ternary.dequantize_tq2_0),
        (54, _c_dequantize_tq1_0, ternary.dequantize_tq1_0),
    ):
        raw = RNG.integers(0, 256, size=(3, block), dtype=np.uint8)
        raw[:, -2:] = np.array([0.5, -2.0, 1e-3], dtype="<f2").view(np.uint8).reshape(3, 2)
        assert np.array_equal(deq(raw), c_deq(raw.reshape(-1)))


def test_dequantizers_are_registered() -> None:
    assert {"TQ1_0", "TQ2_0", "I2_S"} <= set(dequant.supported_types())
    x = ternary_rows(2, 256)
    raw = np.frombuffer(ternary.quantize_tq2_0(x), dtype=np.uint8)
    t = TensorInfo("blk.0.attn_q.weight", int(Q.TQ2_0), (2, 256), raw, 0, raw.size)
    assert np.array_equal(dequant.dequantize(t), x)


# --------------------------------------------------------------------------------------------------- I2_S


def _c_quantize_i2_s(x: npt.NDArray[np.float32]) -> bytes:
    """quantize_i2_s (ggml-bitnet-mad.cpp), line by line."""
    flat = x.reshape(-1)
    n = flat.size
    i2_scale = max(abs(float(v)) for v in flat)
    q8 = [1 if abs(float(v)) < 1e-6 else (2 if float(v) * i2_scale > 0 else 0) for v in flat]
    out = bytearray(n // 4 + 32)
    for i in range(n // 128):
        for j in range(128):
            out[i * 32 + j % 32] |= q8[i * 128 + j] << (6 - 2 * (j // 32))
    out[n // 4 : n // 4 + 4] = np.array([i2_scale], dtype="<f4").tobytes()
    return bytes(out)


def test_i2_s_quantizer_port_matches_c_transliteration() -> None:
    x = ternary_rows(4, 128)
    x[1, 3] = 5e-7  # below the 1e-6 zero threshold
    assert ternary.quantize_i2_s(x) == _c_quantize_i2_s(x)


def test_i2_s_layout_and_scale() -> None:
    x = np.zeros((1, 128), dtype=np.float32)
    x[0, 0] = 0.5  # block 0, group 0 -> byte 0, bits 7-6
    x[0, 33] = -0.5  # group 1, pos 1 -> byte 1, bits 5-4 hold 0 (= -1)
    raw = np.frombuffer(ternary.quantize_i2_s(x), dtype=np.uint8)
    assert raw.size == ternary.i2_s_nbytes(128) == 64
    assert raw[0] == (2 << 6) | (1 << 4) | (1 << 2) | 1
    assert raw[1] == (1 << 6) | (0 << 4) | (1 << 2) | 1
    assert raw[32:36].view("<f4")[0] == np.float32(0.5)
    t, scale = ternary.i2_s_codes(raw)
    assert t[0] == 1 and t[33] == -1 and int(np.abs(t).sum()) == 2 and scale == np.float32(0.5)
    assert np.array_equal(ternary.dequantize_i2_s(raw).reshape(1, 128), x)


def test_i2_s_rejects_a_bad_size() -> None:
    with pytest.raises(ValueError, match="not an I2_S tensor"):
        ternary.i2_s_codes(np.zeros(40, dtype=np.uint8))


def test_multi_threaded_i2_s_is_diagnosed() -> None:
    x = ternary_rows(256, 256)
    good = np.frombuffer(ternary.quantize_i2_s_threaded(x, 1), dtype=np.uint8)
    bad = np.frombuffer(ternary.quantize_i2_s_threaded(x, 2), dtype=np.uint8)
    assert np.array_equal(ternary.dequantize_i2_s(good).reshape(x.shape), x)
    decoded = ternary.dequantize_i2_s(bad).reshape(x.shape)
    assert not np.array_equal(decoded, x)
    why = ternary.diagnose_i2_s(bad, x)
    assert "rows 0-63" in why and "more than one thread" in why
    # a tensor that fits in one chunk is quantized single-threaded by the tool too, and survives
    small = ternary_rows(64, 256)
    assert ternary.quantize_i2_s_threaded(small, 2) == ternary.quantize_i2_s(small)


def test_ternary_codes_give_back_the_weights() -> None:
    x = ternary_rows(4, 512)
    for ggml_type, raw in (
        (int(ternary.ForkType.I2_S), ternary.quantize_i2_s(x)),
        (int(Q.TQ2_0), ternary.quantize_tq2_0(x)),
        (int(Q.TQ1_0), ternary.quantize_tq1_0(x)),
    ):
        t, scales = ternary.ternary_codes(ggml_type, np.frombuffer(raw, dtype=np.uint8), x.shape)
        per_value = np.repeat(scales, x.shape[1] // scales.shape[1], axis=1) if scales.shape[1] > 1 else scales
        assert np.array_equal(t.astype(np.float32) * per_value, x)
    with pytest.raises(ValueError, match="not a ternary format"):
        ternary.ternary_codes(int(Q.F16), np.zeros(4, dtype=np.uint8), (2,))


def test_loadable_types_per_backend() -> None:
    assert ternary.check_loadable("llama", {"a": 36, "b": 35, "c": 1}) == [("a", 36)]
    assert ternary.check_loadable("bitnet", {"a": 36, "b": 35, "c": 39}) == [("c", 39)]
    with pytest.raises(ModelFormatError) as exc:
        ternary.require_loadable("llama", "m.gguf", {"blk.0.attn_q.weight": 36})
    text = str(exc.value)
    assert "unsupported model format" in text and "I2_S" in text and "llama.cpp (mainline)" in text
    assert "\n" not in text
    assert ternary.type_name(36) == "I2_S" and ternary.type_name(35) == "TQ2_0" and ternary.type_name(38) == "type 38"


# ------------------------------------------------------------------------------------------ I2_S in a GGUF


def _tiny_bitnet_f16(path: Path) -> None:
    w = gguf.GGUFWriter(path, "bitnet")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 128), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", ternary_rows(256, 128).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(128, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reader_opens_i2_s_tensors(tmp_path: Path) -> None:
    src, dst = tmp_path / "f16.gguf", tmp_path / "i2s.gguf"
    _tiny_bitnet_f16(src)
    copy_as_i2_s(src, dst)
    f, s = open_gguf(dst), open_gguf(src)
    t = f.tensors["blk.0.attn_q.weight"]
    assert t.ggml_type == 36 and t.type_name == "I2_S" and t.shape == (256, 128)
    assert t.n_bytes == 256 * 128 // 4 + 32
    assert np.array_equal(dequant.dequantize(t), dequant.dequantize(s.tensors["blk.0.attn_q.weight"]))
    assert f.tensors["token_embd.weight"].ggml_type == int(Q.F16)  # the other tensors still read normally


def test_reader_rejects_a_truncated_i2_s_tensor(tmp_path: Path) -> None:
    src, dst = tmp_path / "f16.gguf", tmp_path / "i2s.gguf"
    _tiny_bitnet_f16(src)
    copy_as_i2_s(src, dst)
    data = dst.read_bytes()
    cut = tmp_path / "cut.gguf"
    t = open_gguf(dst).tensors["blk.0.attn_q.weight"]
    cut.write_bytes(data[: t.offset + 100])
    with pytest.raises(ModelFormatError, match="I2_S tensor 'blk.0.attn_q.weight'"):
        open_gguf(cut)
