"""Tests for parity.dequant: bit-for-bit against gguf-py and against loops transliterated from C.

The transliterations follow ggml-quants.c's dequantize_row_* line by line with float32 scalars.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest
from gguf import GGMLQuantizationType as Q

from parity import dequant
from parity.errors import ModelFormatError
from parity.gguf_file import TensorInfo, open_gguf

RNG = np.random.default_rng(20240611)


def random_rows(rows: int = 6, cols: int = 512) -> npt.NDArray[np.float32]:
    x = RNG.standard_normal((rows, cols)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, 5] = 40.0  # an outlier dominating its block
    return x


def random_blocks(n_blocks: int, type_size: int, f16_offsets: tuple[int, ...]) -> npt.NDArray[np.uint8]:
    """Random block bytes whose f16 scale fields hold finite values (no NaN/inf d)."""
    blocks = RNG.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in f16_offsets:
        scales = (RNG.standard_normal(n_blocks) * RNG.choice([1e-4, 1e-2, 1.0, 50.0], n_blocks)).astype("<f2")
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def same_bits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize(
    ("qtype", "fn"),
    [
        (Q.Q8_0, dequant.dequantize_q8_0),
        (Q.Q4_0, dequant.dequantize_q4_0),
        (Q.BF16, dequant.dequantize_bf16),
    ],
)
def test_quantizable_types_match_gguf_py(qtype: Q, fn: Callable[[npt.NDArray[Any]], Any]) -> None:
    x = random_rows()
    q = gguf.quants.quantize(x, qtype)
    assert same_bits(fn(q).reshape(x.shape), gguf.quants.dequantize(q, qtype))


def test_f16_and_f32_match_gguf_py() -> None:
    x = random_rows()
    h = gguf.quants.quantize(x, Q.F16)
    assert same_bits(dequant.dequantize_f16(h).reshape(x.shape), gguf.quants.dequantize(h, Q.F16))
    assert same_bits(dequant.dequantize_f32(x).reshape(x.shape), x)


@pytest.mark.parametrize(
    ("qtype", "fn", "f16_offsets"),
    [(Q.Q4_K, dequant.dequantize_q4_k, (0, 2)), (Q.Q6_K, dequant.dequantize_q6_k, (208,))],
)
def test_k_quants_match_gguf_py_on_random_blocks(
    qtype: Q, fn: Callable[[npt.NDArray[Any]], Any], f16_offsets: tuple[int, ...]
) -> None:
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = random_blocks(64, type_size, f16_offsets)
    rows = blocks.reshape(8, 8 * type_size)  # 8 rows of 8 super-blocks
    assert same_bits(fn(rows).reshape(8, 8 * 256), gguf.quants.dequantize(rows, qtype))


def _c_get_scale_min_k4(j: int, q: npt.NDArray[np.uint8]) -> tuple[int, int]:
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    d = (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4)
    m = (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)
    return d, m


def c_dequantize_row_q4_k(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """A line-by-line transliteration of dequantize_row_q4_K for one block, with float32 scalars."""
    f32 = np.float32
    d = f32(block[0:2].view("<f2")[0])
    mn = f32(block[2:4].view("<f2")[0])
    scales, q = block[4:16], block[16:144]
    y: list[np.float32] = []
    is_, qo = 0, 0
    for _j in range(0, 256, 64):
        sc, m = _c_get_scale_min_k4(is_ + 0, scales)
        d1, m1 = d * f32(sc), mn * f32(m)
        sc, m = _c_get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * f32(sc), mn * f32(m)
        y += [d1 * f32(int(q[qo + i]) & 0xF) - m1 for i in range(32)]
        y += [d2 * f32(int(q[qo + i]) >> 4) - m2 for i in range(32)]
        qo += 32
        is_ += 2
    return np.array(y, dtype=np.float32)


def c_dequantize_row_q6_k(block: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """A line-by-line transliteration of dequantize_row_q6_K for one block, with float32 scalars."""
    f32 = np.float32
    d = f32(block[208:210].view("<f2")[0])
    ql, qh, sc = block[0:128], block[128:192], block[192:208].view(np.int8)
    y = np.zeros(256, dtype=np.float32)
    for n in range(2):
        lo, hi, s, out = 64 * n, 32 * n, 8 * n, 128 * n
        for ll in range(32):
            is_ = ll // 16
            q1 = ((int(ql[lo + ll]) & 0xF) | (((int(qh[hi + ll]) >> 0) & 3) << 4)) - 32
            q2 = ((int(ql[lo + ll + 32]) & 0xF) | (((int(qh[hi + ll]) >> 2) & 3) << 4)) - 32
            q3 = ((int(ql[lo + ll]) >> 4) | (((int(qh[hi + ll]) >> 4) & 3) << 4)) - 32
            q4 = ((int(ql[lo + ll + 32]) >> 4) | (((int(qh[hi + ll]) >> 6) & 3) << 4)) - 32
            y[out + ll + 0] = d * f32(sc[s + is_ + 0]) * f32(q1)
            y[out + ll + 32] = d * f32(sc[s + is_ + 2]) * f32(q2)
            y[out + ll + 64] = d * f32(sc[s + is_ + 4]) * f32(q3)
            y[out + ll + 96] = d * f32(sc[s + is_ + 6]) * f32(q4)
    return y


def test_k_quants_match_c_transliteration() -> None:
    q4 = random_blocks(3, 144, (0, 2))
    expected = np.concatenate([c_dequantize_row_q4_k(b) for b in q4])
    assert same_bits(dequant.dequantize_q4_k(q4), expected)
    q6 = random_blocks(3, 210, (208,))
    expected = np.concatenate([c_dequantize_row_q6_k(b) for b in q6])
    assert same_bits(dequant.dequantize_q6_k(q6), expected)


def test_q4_0_and_q8_0_match_c_transliteration() -> None:
    x = random_rows(2, 64)
    q8 = gguf.quants.quantize(x, Q.Q8_0).reshape(-1, 34)
    q4 = gguf.quants.quantize(x, Q.Q4_0).reshape(-1, 18)
    f32 = np.float32
    exp8 = [f32(v) * f32(b[0:2].view("<f2")[0]) for b in q8 for v in b[2:].view(np.int8)]
    exp4: list[np.float32] = []
    for b in q4:
        d = f32(b[0:2].view("<f2")[0])
        exp4 += [f32((int(v) & 0x0F) - 8) * d for v in b[2:]] + [f32((int(v) >> 4) - 8) * d for v in b[2:]]
    assert same_bits(dequant.dequantize_q8_0(q8), np.array(exp8, dtype=np.float32))
    assert same_bits(dequant.dequantize_q4_0(q4), np.array(exp4, dtype=np.float32))


def test_dequantize_tensor_from_file(tmp_path: Path) -> None:
    x = random_rows(4, 64)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("f32.weight", x)
    w.add_tensor("f16.weight", x.astype(np.float16))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.BF16):
        w.add_tensor(f"{qtype.name}.weight", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = open_gguf(path)
    assert same_bits(dequant.dequantize(f.tensors["f32.weight"]), x)
    assert same_bits(dequant.dequantize(f.tensors["f16.weight"]), x.astype(np.float16).astype(np.float32))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.BF16):
        t = f.tensors[f"{qtype.name}.weight"]
        out = dequant.dequantize(t)
        assert out.shape == (4, 64)
        assert same_bits(out, gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))
        assert out.flags.writeable  # a fresh array, not a view of the read-only map


def test_unsupported_types_are_named() -> None:
    raw = np.zeros(22, dtype=np.uint8)
    with pytest.raises(ModelFormatError) as exc:
        dequant.dequantize(TensorInfo("blk.0.attn_q.weight", int(Q.Q5_0), (32,), raw, 0, 22))
    text = str(exc.value)
    assert "tensor 'blk.0.attn_q.weight' has type Q5_0" in text
    assert "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K" in text and "\n" not in text
    with pytest.raises(ModelFormatError, match="has type type 36"):
        dequant.dequantize(TensorInfo("w", 36, (32,), raw, 0, 22))
    assert dequant.supported_types() == ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K"]


def test_size_mismatch_is_reported() -> None:
    raw = np.zeros(34, dtype=np.uint8)  # one Q8_0 block = 32 values, but the shape claims 64
    with pytest.raises(ModelFormatError, match="holds 32 values, expected 64"):
        dequant.dequantize(TensorInfo("w", int(Q.Q8_0), (64,), raw, 0, 34))
