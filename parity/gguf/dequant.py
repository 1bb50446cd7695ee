"""Pure numpy dequantisers, one per ggml type, each mirroring its C function in ggml.

The arithmetic is float32 in the same order as the C code (e.g. Q4_K is `(d * sc) * q - (dmin * m)`),
so results are bit-for-bit equal to the reference C loops compiled without FMA contraction. Block
layouts are those of `ggml-common.h`; all multi-byte fields are little-endian.

Checked, not just claimed: tests/integration/test_bridge.py enumerates DEQUANTIZERS and compares every mainline
type bit for bit with ggml's own `to_float` of the pinned llama.cpp (through the bridge, random blocks with
finite f16 scales). Two types have no C dequantizer to compare with: F32 (ggml reads it as it is; checked to be
the raw values) and bitnet.cpp's I2_S (the pinned fork registers no `to_float`; checked against the fork's own
quantizer output, which must decode to exactly its ternary source, in tests/integration/test_ternary_lanes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType

from parity.errors import ModelFormatError
from parity.gguf import ternary
from parity.gguf.reader import TensorInfo
from parity.gguf.types import TYPES

F32Array = npt.NDArray[np.float32]
U8Array = npt.NDArray[np.uint8]


def _as_bytes(data: npt.NDArray[Any]) -> U8Array:
    """Flat uint8 view of any contiguous array (typed memmap views included)."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _blocks(data: npt.NDArray[Any], qtype: GGMLQuantizationType) -> U8Array:
    """Raw bytes reshaped to (n_blocks, type_size)."""
    raw = _as_bytes(data)
    type_size = TYPES[qtype].type_size
    if raw.size % type_size != 0:
        raise ValueError(f"{raw.size} bytes is not a whole number of {qtype.name} blocks of {type_size} bytes")
    return raw.reshape(-1, type_size)


def _f16(b: U8Array) -> F32Array:
    """Little-endian f16 fields (n, 2 bytes) -> float32 (n, 1); exact, as GGML_FP16_TO_FP32."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def dequantize_f32(data: npt.NDArray[Any]) -> F32Array:
    """F32: a copy of the raw values; ggml has no C function to mirror (ggml.c's type_traits[GGML_TYPE_F32] has no
    `to_float`: ggml reads F32 data as it is)."""
    return _as_bytes(data).view("<f4").astype(np.float32)


def dequantize_f16(data: npt.NDArray[Any]) -> F32Array:
    """F16: mirrors `ggml_fp16_to_fp32_row` (ggml.c); every f16 value is exact in float32."""
    return _as_bytes(data).view("<f2").astype(np.float32)


def dequantize_bf16(data: npt.NDArray[Any]) -> F32Array:
    """BF16: mirrors `ggml_bf16_to_fp32_row` (ggml.c) / `ggml_compute_bf16_to_fp32` (ggml-impl.h).

    The 16 stored bits become the high half of a float32.
    """
    bits = _as_bytes(data).view("<u2").astype(np.uint32) << np.uint32(16)  # (n,)
    return bits.view(np.float32)


def dequantize_q8_0(data: npt.NDArray[Any]) -> F32Array:
    """Q8_0: mirrors `dequantize_row_q8_0` (ggml-quants.c): y = qs[j] * d.

    Block (34 bytes): f16 d, int8 qs[32].
    """
    blocks = _blocks(data, GGMLQuantizationType.Q8_0)  # (nb, 34)
    d = _f16(blocks[:, 0:2])  # (nb, 1)
    qs = blocks[:, 2:].view(np.int8).astype(np.float32)  # (nb, 32)
    return (qs * d).reshape(-1)  # (nb*32,)


def dequantize_q4_0(data: npt.NDArray[Any]) -> F32Array:
    """Q4_0: mirrors `dequantize_row_q4_0` (ggml-quants.c): y[j] = (lo - 8) * d, y[j + 16] = (hi - 8) * d.

    Block (18 bytes): f16 d, uint8 qs[16] holding element j in the low nibble and j + 16 in the high one.
    """
    blocks = _blocks(data, GGMLQuantizationType.Q4_0)  # (nb, 18)
    d = _f16(blocks[:, 0:2])  # (nb, 1)
    qs = blocks[:, 2:]  # (nb, 16)
    x0 = (qs & 0x0F).astype(np.int32) - 8  # (nb, 16)
    x1 = (qs >> 4).astype(np.int32) - 8  # (nb, 16)
    y = np.concatenate([x0.astype(np.float32) * d, x1.astype(np.float32) * d], axis=1)  # (nb, 32)
    return y.reshape(-1)


def dequantize_q4_1(data: npt.NDArray[Any]) -> F32Array:
    """Q4_1: mirrors `dequantize_row_q4_1` (ggml-quants.c): y[j] = lo * d + m, y[j + 16] = hi * d + m.

    Block (20 bytes): f16 d, f16 m, uint8 qs[16] (element j in the low nibble, j + 16 in the high one).
    """
    blocks = _blocks(data, GGMLQuantizationType.Q4_1)  # (nb, 20)
    d = _f16(blocks[:, 0:2])  # (nb, 1)
    m = _f16(blocks[:, 2:4])  # (nb, 1)
    qs = blocks[:, 4:]  # (nb, 16)
    x0 = (qs & 0x0F).astype(np.float32)  # (nb, 16)
    x1 = (qs >> 4).astype(np.float32)  # (nb, 16)
    return np.concatenate([x0 * d + m, x1 * d + m], axis=1).reshape(-1)  # (nb*32,)


def _q5_high_bits(qh: U8Array) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """The fifth bits of a Q5 block as 0/16, for elements j and j + 16 (j = 0..15).

    Mirrors `xh_0 = ((qh >> (j + 0)) << 4) & 0x10` and `xh_1 = ((qh >> (j + 12))) & 0x10` with qh the
    block's four bytes read as a little-endian uint32: element j takes bit j, element j + 16 bit j + 16.
    """
    bits = np.ascontiguousarray(qh).view("<u4").astype(np.int64)  # (nb, 1)
    j = np.arange(16)  # (16,)
    xh_0 = ((bits >> j) << 4) & 0x10  # (nb, 16)
    xh_1 = (bits >> (j + 12)) & 0x10  # (nb, 16)
    return xh_0.astype(np.int32), xh_1.astype(np.int32)


def dequantize_q5_0(data: npt.NDArray[Any]) -> F32Array:
    """Q5_0: mirrors `dequantize_row_q5_0` (ggml-quants.c): y = (q - 16) * d with 5-bit q.

    Block (22 bytes): f16 d, uint8 qh[4] (the fifth bit of each of the 32 elements), uint8 qs[16]
    (low nibble: element j, high nibble: element j + 16).
    """
    blocks = _blocks(data, GGMLQuantizationType.Q5_0)  # (nb, 22)
    d = _f16(blocks[:, 0:2])  # (nb, 1)
    xh_0, xh_1 = _q5_high_bits(blocks[:, 2:6])  # (nb, 16) each
    qs = blocks[:, 6:].astype(np.int32)  # (nb, 16)
    x0 = ((qs & 0x0F) | xh_0) - 16  # (nb, 16)
    x1 = ((qs >> 4) | xh_1) - 16  # (nb, 16)
    return np.concatenate([x0.astype(np.float32) * d, x1.astype(np.float32) * d], axis=1).reshape(-1)


def dequantize_q5_1(data: npt.NDArray[Any]) -> F32Array:
    """Q5_1: mirrors `dequantize_row_q5_1` (ggml-quants.c): y = q * d + m with 5-bit q.

    Block (24 bytes): f16 d, f16 m, uint8 qh[4], uint8 qs[16], laid out as in Q5_0.
    """
    blocks = _blocks(data, GGMLQuantizationType.Q5_1)  # (nb, 24)
    d = _f16(blocks[:, 0:2])  # (nb, 1)
    m = _f16(blocks[:, 2:4])  # (nb, 1)
    xh_0, xh_1 = _q5_high_bits(blocks[:, 4:8])  # (nb, 16) each
    qs = blocks[:, 8:].astype(np.int32)  # (nb, 16)
    x0 = ((qs & 0x0F) | xh_0).astype(np.float32)  # (nb, 16)
    x1 = ((qs >> 4) | xh_1).astype(np.float32)  # (nb, 16)
    return np.concatenate([x0 * d + m, x1 * d + m], axis=1).reshape(-1)  # (nb*32,)


def _scale_min_k4(scales: U8Array) -> tuple[F32Array, F32Array]:
    """Mirrors `get_scale_min_k4` for j = 0..7: six-bit scales and mins packed into 12 bytes.

    Returns float32 (nb, 8) arrays of the integer scales and mins.
    """
    q = scales.astype(np.uint8)  # (nb, 12)
    sc = np.empty((q.shape[0], 8), dtype=np.uint8)  # (nb, 8)
    m = np.empty((q.shape[0], 8), dtype=np.uint8)  # (nb, 8)
    sc[:, 0:4] = q[:, 0:4] & 63
    m[:, 0:4] = q[:, 4:8] & 63
    sc[:, 4:8] = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), m.astype(np.float32)


def dequantize_q4_k(data: npt.NDArray[Any]) -> F32Array:
    """Q4_K: mirrors `dequantize_row_q4_K` (ggml-quants.c).

    Block (144 bytes): f16 d, f16 dmin, scales[12] (8 six-bit scale/min pairs), qs[128]. Each 64-element
    chunk j uses one 32-byte slice of qs: low nibbles with pair 2j, high nibbles with pair 2j+1;
    y = d1 * q - m1 where d1 = d * sc and m1 = dmin * m, all float32.
    """
    blocks = _blocks(data, GGMLQuantizationType.Q4_K)  # (nb, 144)
    nb = blocks.shape[0]
    d = _f16(blocks[:, 0:2])  # (nb, 1)
    dmin = _f16(blocks[:, 2:4])  # (nb, 1)
    sc, m = _scale_min_k4(blocks[:, 4:16])  # (nb, 8), (nb, 8)
    d_sub = d * sc  # (nb, 8) float32, as `const float d1 = d * sc`
    m_sub = dmin * m  # (nb, 8) float32, as `const float m1 = min * m`
    qs = blocks[:, 16:].reshape(nb, 4, 32)  # (nb, 4 chunks, 32)
    # sub-block 2j is the low nibbles of chunk j, sub-block 2j+1 the high nibbles
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)  # (nb, 8, 32)
    y = d_sub[:, :, None] * q - m_sub[:, :, None]  # (nb, 8, 32)
    return y.reshape(-1)


def dequantize_q6_k(data: npt.NDArray[Any]) -> F32Array:
    """Q6_K: mirrors `dequantize_row_q6_K` (ggml-quants.c): y = d * sc * q with q in [-32, 31].

    Block (210 bytes): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d. Each
    128-element half n uses ql[64n:64n+64], qh[32n:32n+32], scales[8n:8n+8]; for l in 0..31 the four
    outputs l, l+32, l+64, l+96 take qh bits 0-1, 2-3, 4-5, 6-7 and scales is+0, is+2, is+4, is+6 (is = l/16).
    """
    blocks = _blocks(data, GGMLQuantizationType.Q6_K)  # (nb, 210)
    nb = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(nb, 2, 64)  # (nb, half, 64)
    qh = blocks[:, 128:192].reshape(nb, 2, 32)  # (nb, half, 32)
    scales = blocks[:, 192:208].view(np.int8).reshape(nb, 2, 8).astype(np.float32)  # (nb, half, 8)
    d = _f16(blocks[:, 208:210]).reshape(nb, 1, 1)  # (nb, 1, 1)
    lo, hi = ql[:, :, 0:32], ql[:, :, 32:64]  # (nb, half, 32) each
    quarters = [  # (nb, half, 32) each, for outputs l, l+32, l+64, l+96
        (lo & 0x0F) | (((qh >> 0) & 3) << 4),
        (hi & 0x0F) | (((qh >> 2) & 3) << 4),
        (lo >> 4) | (((qh >> 4) & 3) << 4),
        (hi >> 4) | (((qh >> 6) & 3) << 4),
    ]
    q = np.stack(quarters, axis=2).astype(np.int32) - 32  # (nb, half, 4, 32)
    # scale index for output (quarter k, lane l) is is + 2k with is = l // 16
    scale_idx = 2 * np.arange(4)[:, None] + np.arange(32)[None, :] // 16  # (4, 32)
    sc = scales[:, :, scale_idx]  # (nb, half, 4, 32)
    y = (d[:, :, :, None] * sc) * q.astype(np.float32)  # (nb, half, 4, 32): (d * sc) * q as in C
    return y.reshape(-1)


# Keyed by IntEnum members (gguf-py's types, plus parity.gguf.ternary.ForkType for bitnet.cpp's I2_S), which hash
# like their integer ids.
DEQUANTIZERS: dict[IntEnum, Callable[[npt.NDArray[Any]], F32Array]] = {
    GGMLQuantizationType.F32: dequantize_f32,
    GGMLQuantizationType.F16: dequantize_f16,
    GGMLQuantizationType.BF16: dequantize_bf16,
    GGMLQuantizationType.Q8_0: dequantize_q8_0,
    GGMLQuantizationType.Q4_0: dequantize_q4_0,
    GGMLQuantizationType.Q4_1: dequantize_q4_1,
    GGMLQuantizationType.Q5_0: dequantize_q5_0,
    GGMLQuantizationType.Q5_1: dequantize_q5_1,
    GGMLQuantizationType.Q4_K: dequantize_q4_k,
    GGMLQuantizationType.Q6_K: dequantize_q6_k,
    GGMLQuantizationType.TQ1_0: ternary.dequantize_tq1_0,
    GGMLQuantizationType.TQ2_0: ternary.dequantize_tq2_0,
    ternary.ForkType.I2_S: ternary.dequantize_i2_s,
}


def supported_types() -> list[str]:
    """Names of the ggml types `dequantize` handles."""
    return [t.name for t in DEQUANTIZERS]


def dequantize(t: TensorInfo) -> F32Array:
    """Dequantize a tensor to a new float32 array of shape `t.shape` (numpy order)."""
    # IntEnum keys hash and compare like their ids, so the plain id finds gguf-py's and the fork's types alike
    fn: Callable[[npt.NDArray[Any]], F32Array] | None = DEQUANTIZERS.get(t.ggml_type)  # type: ignore[call-overload]
    if fn is None:
        raise ModelFormatError(
            f"tensor '{t.name}' has type {t.type_name}, which parity cannot dequantize "
            f"(supported: {', '.join(supported_types())})",
            fix="requantize the model to one of the supported types with llama-quantize",
        )
    values = fn(t.data)  # (n_elements,)
    if values.size != t.n_elements:
        raise ModelFormatError(
            f"tensor '{t.name}' ({t.type_name}, shape {t.shape}) holds {values.size} values, expected {t.n_elements}",
            fix="re-download or regenerate the model",
        )
    return values.reshape(t.shape)
