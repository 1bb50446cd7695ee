"""Tests for parity.gguf.dequant: bit-for-bit against gguf-py and against loops transliterated from C.

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

from parity.errors import ModelFormatError
from parity.gguf import dequant
from parity.gguf.reader import TensorInfo, open_gguf

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
        (Q.Q4_1, dequant.dequantize_q4_1),
        (Q.Q5_0, dequant.dequantize_q5_0),
        (Q.Q5_1, dequant.dequantize_q5_1),
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


def c_dequantize_row_q4_1(block: npt.NDArray[np.uint8]) -> list[np.float32]:
    """A line-by-line transliteration of dequantize_row_q4_1 for one block, with float32 scalars."""
    f32 = np.float32
    d, m, qs = f32(block[0:2].view("<f2")[0]), f32(block[2:4].view("<f2")[0]), block[4:20]
    y = [f32(0.0)] * 32
    for j in range(16):
        y[j] = f32(int(qs[j]) & 0x0F) * d + m
        y[j + 16] = f32(int(qs[j]) >> 4) * d + m
    return y


def c_dequantize_row_q5(block: npt.NDArray[np.uint8], with_min: bool) -> list[np.float32]:
    """dequantize_row_q5_0 (with_min False) / dequantize_row_q5_1 (True) for one block, line by line."""
    f32 = np.float32
    d = f32(block[0:2].view("<f2")[0])
    m = f32(block[2:4].view("<f2")[0]) if with_min else f32(0.0)
    off = 4 if with_min else 2
    qh = int(block[off : off + 4].view("<u4")[0])  # memcpy(&qh, x[i].qh, sizeof(qh)) on little-endian
    qs = block[off + 4 : off + 20]
    y = [f32(0.0)] * 32
    for j in range(16):
        xh_0 = ((qh >> (j + 0)) << 4) & 0x10
        xh_1 = (qh >> (j + 12)) & 0x10
        x0 = (int(qs[j]) & 0x0F) | xh_0
        x1 = (int(qs[j]) >> 4) | xh_1
        if with_min:
            y[j], y[j + 16] = f32(x0) * d + m, f32(x1) * d + m
        else:
            y[j], y[j + 16] = f32(x0 - 16) * d, f32(x1 - 16) * d
    return y


def test_legacy_quants_match_c_transliteration_on_random_blocks() -> None:
    q41 = random_blocks(16, 20, (0, 2))
    expected = np.array([v for b in q41 for v in c_dequantize_row_q4_1(b)], dtype=np.float32)
    assert same_bits(dequant.dequantize_q4_1(q41), expected)
    q50 = random_blocks(16, 22, (0,))
    expected = np.array([v for b in q50 for v in c_dequantize_row_q5(b, with_min=False)], dtype=np.float32)
    assert same_bits(dequant.dequantize_q5_0(q50), expected)
    q51 = random_blocks(16, 24, (0, 2))
    expected = np.array([v for b in q51 for v in c_dequantize_row_q5(b, with_min=True)], dtype=np.float32)
    assert same_bits(dequant.dequantize_q5_1(q51), expected)
    # every fifth bit is used: all-ones qh lifts each value by exactly 16 steps of d
    q50[:, 2:6] = 0xFF
    lifted = dequant.dequantize_q5_0(q50).reshape(16, 32)
    q50[:, 2:6] = 0x00
    base = dequant.dequantize_q5_0(q50).reshape(16, 32)
    d = q50[:, 0:2].copy().view("<f2").astype(np.float32)  # (16, 1)
    assert np.array_equal(lifted, base + np.float32(16.0) * d)


def test_dequantize_tensor_from_file(tmp_path: Path) -> None:
    x = random_rows(4, 64)
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("f32.weight", x)
    w.add_tensor("f16.weight", x.astype(np.float16))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16):
        w.add_tensor(f"{qtype.name}.weight", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = open_gguf(path)
    assert same_bits(dequant.dequantize(f.tensors["f32.weight"]), x)
    assert same_bits(dequant.dequantize(f.tensors["f16.weight"]), x.astype(np.float16).astype(np.float32))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16):
        t = f.tensors[f"{qtype.name}.weight"]
        out = dequant.dequantize(t)
        assert out.shape == (4, 64)
        assert same_bits(out, gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype))
        assert out.flags.writeable  # a fresh array, not a view of the read-only map


def test_unsupported_types_are_named() -> None:
    raw = np.zeros(84, dtype=np.uint8)  # one Q2_K super-block
    with pytest.raises(ModelFormatError) as exc:
        dequant.dequantize(TensorInfo("blk.0.attn_q.weight", int(Q.Q2_K), (256,), raw, 0, 84))
    text = str(exc.value)
    assert "tensor 'blk.0.attn_q.weight' has type Q2_K" in text
    assert "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K" in text and "\n" not in text
    with pytest.raises(ModelFormatError, match="has type type 99"):  # an id no ggml generation uses
        dequant.dequantize(TensorInfo("w", 99, (32,), raw, 0, 22))
    # the mainline types in table order; other modules (ternary formats) may register more after them
    mainline = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]
    assert dequant.supported_types()[: len(mainline)] == mainline


def test_size_mismatch_is_reported() -> None:
    raw = np.zeros(34, dtype=np.uint8)  # one Q8_0 block = 32 values, but the shape claims 64
    with pytest.raises(ModelFormatError, match="holds 32 values, expected 64"):
        dequant.dequantize(TensorInfo("w", int(Q.Q8_0), (64,), raw, 0, 34))


# The ggml C function each dequantizer mirrors (ggml.c's type_traits[...].to_float, or what the fork computes
# with); None: ggml has no C function for the type (it reads F32 as it is).
C_FUNCTIONS = {
    "F32": None,
    "F16": "ggml_fp16_to_fp32_row",
    "BF16": "ggml_bf16_to_fp32_row",
    "Q8_0": "dequantize_row_q8_0",
    "Q4_0": "dequantize_row_q4_0",
    "Q4_1": "dequantize_row_q4_1",
    "Q5_0": "dequantize_row_q5_0",
    "Q5_1": "dequantize_row_q5_1",
    "Q4_K": "dequantize_row_q4_K",
    "Q6_K": "dequantize_row_q6_K",
    "TQ1_0": "dequantize_row_tq1_0",
    "TQ2_0": "dequantize_row_tq2_0",
    "I2_S": "ggml_compute_forward_mul_mat",
}


@pytest.mark.parametrize("name", dequant.supported_types())
def test_each_dequantizer_names_the_c_function_it_mirrors(name: str) -> None:
    fn = next(f for t, f in dequant.DEQUANTIZERS.items() if t.name == name)
    doc = fn.__doc__ or ""
    assert name in C_FUNCTIONS, f"{name}: add the C function its dequantizer mirrors to C_FUNCTIONS"
    c_function = C_FUNCTIONS[name]
    if c_function is None:
        assert "no C function" in doc, fn.__name__
    else:
        assert f"`{c_function}`" in doc, f"{fn.__name__} does not name `{c_function}`"
    assert sum(f is fn for f in dequant.DEQUANTIZERS.values()) == 1, f"{fn.__name__} serves more than one type"
