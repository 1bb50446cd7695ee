"""Ternary weight formats: bitnet.cpp's I2_S (GGML type 36) and mainline llama.cpp's TQ1_0 / TQ2_0.

gguf-py cannot read I2_S at all (36 is not in its type table; mainline llama.cpp lists it as a removed
type), so its layout is written down here from bitnet.cpp's own sources:

- `quantize_i2_s` (BitNet src/ggml-bitnet-mad.cpp) packs the WHOLE tensor it is given as one flat run of
  n = rows * cols values: q = 0, 1, 2 for -1, 0, +1 (|x| < 1e-6 counts as 0), in blocks of 128 values; value j
  of block b goes to byte 32*b + j % 32 at bit shift 6 - 2*(j // 32). After the n/4 code bytes comes ONE
  float32 scale, the largest |x| of the tensor (the "i2_scale"), then padding: the fork's `ggml_nbytes`
  (ggml.c) gives n/4 + 32 bytes.
- The fork's matmul (`ggml_compute_forward_mul_mat`, ggml.c) reads the scale at byte n/4 and computes
  (sum_j q_j * x8_j - sum_j x8_j) / act_scale * scale, i.e. (q - 1) * scale is the weight.

The trap: `llama_tensor_quantize_internal` (the fork's src/llama.cpp) splits a tensor into row chunks when
more than one thread quantizes it, and `ggml_quantize_chunk` places chunk k at byte first_row * n_per_row
(the I2_S row size is n_per_row bytes because its block size is 1), four times too far, while each chunk
writes its own scale right after its own codes. Only the first chunk's rows survive; the tensor scale is
whatever bytes land at n/4. The model still loads. `check_ternary_source` tells that apart from other
damage so the message can say why.

TQ1_0 / TQ2_0 (ggml-common.h, ggml-quants.c of mainline) keep an f16 absmax `d` per 256-value block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType

from parity.gguf.types import I2_S_TRAILER, LOADABLE_TYPES, QK_I2_S, TYPES

# Re-exported: the numpy engine and the ternary model family name these through this module.
from parity.gguf.types import QK_K as QK_K
from parity.gguf.types import ForkType as ForkType
from parity.gguf.types import type_name as type_name

F32Array = npt.NDArray[np.float32]
U8Array = npt.NDArray[np.uint8]
I8Array = npt.NDArray[np.int8]

TQ1_0, TQ2_0 = GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0
TQ2_0_BLOCK = TYPES[TQ2_0].type_size  # uint8 qs[64] + f16 d
TQ1_0_BLOCK = TYPES[TQ1_0].type_size  # uint8 qs[48] + uint8 qh[4] + f16 d
# ggml_quantize_requires / llama_tensor_quantize_internal: rows are cut into chunks of at least this many values
MIN_CHUNK_SIZE = 32 * 512


def _as_bytes(data: npt.NDArray[Any]) -> U8Array:
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


# ---------------------------------------------------------------------------------------------------
# I2_S


def i2_s_nbytes(n_elements: int) -> int:
    """Stored size of an I2_S tensor of `n_elements` values: the fork's `ggml_nbytes` (n/4 + 32)."""
    return n_elements // 4 + I2_S_TRAILER


def i2_s_codes(data: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int8], np.float32]:
    """The ternary values (-1, 0, +1) in flat tensor order and the per-tensor float32 scale of an I2_S tensor.

    `data` is the tensor's n/4 + 32 stored bytes. Code 3 never occurs in a valid file; it decodes to +2 and
    so fails any ternary check instead of being hidden.
    """
    raw = _as_bytes(data)
    n = (raw.size - I2_S_TRAILER) * 4
    if raw.size < I2_S_TRAILER or n % QK_I2_S != 0:
        raise ValueError(f"{raw.size} bytes is not an I2_S tensor (n/4 + 32 bytes with n a multiple of {QK_I2_S})")
    codes = raw[: n // 4].reshape(-1, 1, 32)  # (blocks, 1, 32): byte j % 32 of each block
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)  # group j // 32 -> shift 6 - 2 * group
    q = (codes >> shifts) & 3  # (blocks, 4 groups, 32)
    scale = raw[n // 4 : n // 4 + 4].view("<f4")[0]
    return (q.reshape(-1).astype(np.int8) - 1), np.float32(scale)


def dequantize_i2_s(data: npt.NDArray[Any]) -> F32Array:
    """I2_S: mirrors the weight bitnet.cpp's `ggml_compute_forward_mul_mat` (the fork's ggml.c) computes with.

    The fork registers no `to_float` for I2_S (ggml.c type_traits); its matmul computes
    `(sum - act_sum) / act_scale * scale`, i.e. the weight `(q - 1) * i2_scale` with the tensor's single scale.
    """
    t, scale = i2_s_codes(data)
    return t.astype(np.float32) * scale


def quantize_i2_s(x: npt.NDArray[np.float32]) -> bytes:
    """Port of bitnet.cpp's `quantize_i2_s` (src/ggml-bitnet-mad.cpp) for ONE call over all of `x`.

    Used by unit tests to build I2_S bytes without running the tool; the result includes the 32-byte
    trailer (scale + zero padding), i.e. exactly what a single-threaded quantizer stores.
    """
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    if n % QK_I2_S != 0:
        raise ValueError(f"I2_S needs a multiple of {QK_I2_S} values, got {n}")
    scale = np.float64(np.max(np.abs(flat.astype(np.float64)))) if n else np.float64(0.0)
    q = np.where(flat.astype(np.float64) * scale > 0, 2, 0).astype(np.uint8)
    q[np.abs(flat.astype(np.float64)) < 1e-6] = 1
    q = q.reshape(-1, 4, 32)  # (blocks, group, pos)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]  # (blocks, 32)
    out = np.zeros(n // 4 + I2_S_TRAILER, dtype=np.uint8)
    out[: n // 4] = packed.reshape(-1)
    out[n // 4 : n // 4 + 4] = np.array([scale], dtype="<f4").view(np.uint8)
    return out.tobytes()


def quantize_i2_s_threaded(x: npt.NDArray[np.float32], nthread: int) -> bytes:
    """What the fork's `llama_tensor_quantize_internal` stores for an I2_S tensor quantized by `nthread` threads.

    With nthread >= 2 the rows are cut into chunks of max(1, MIN_CHUNK_SIZE // cols) rows, chunk k is
    quantized on its own and written at byte first_row * cols (ggml_quantize_chunk with the I2_S row size
    n_per_row), and the file keeps the first n/4 + 32 bytes of that buffer. The thread schedule does not
    matter: every chunk lands at a fixed offset. For tests of the weight check.
    """
    rows, cols = x.shape
    if nthread < 2:
        return quantize_i2_s(x)
    chunk_rows = max(1, MIN_CHUNK_SIZE // cols) if cols < MIN_CHUNK_SIZE else 1
    buf = np.zeros(rows * cols + I2_S_TRAILER, dtype=np.uint8)  # the tool allocates a generous buffer
    for first in range(0, rows, chunk_rows):
        part = np.frombuffer(quantize_i2_s(x[first : first + chunk_rows]), dtype=np.uint8)
        body = part[: part.size - I2_S_TRAILER + 4]  # codes + this chunk's scale; the rest is untouched
        start = first * cols
        buf[start : start + body.size] = body
    return buf[: i2_s_nbytes(rows * cols)].tobytes()


# ---------------------------------------------------------------------------------------------------
# TQ2_0 / TQ1_0 (mainline ggml-quants.c)


def _tq_blocks(data: npt.NDArray[Any], block_bytes: int, name: str) -> U8Array:
    raw = _as_bytes(data)
    if raw.size % block_bytes != 0:
        raise ValueError(f"{raw.size} bytes is not a whole number of {name} blocks of {block_bytes} bytes")
    return raw.reshape(-1, block_bytes)


def tq2_0_codes(data: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int8], F32Array]:
    """Ternary values (nb, 256) and block scales d (nb, 1) of TQ2_0 data, in `dequantize_row_tq2_0` order.

    Block (66 bytes): uint8 qs[64], f16 d. Bytes j..j+31 (j = 0, 32) hold four values each: value
    4*j + 32*l + m is (qs[j + m] >> 2l) & 3, minus 1.
    """
    blocks = _tq_blocks(data, TQ2_0_BLOCK, "TQ2_0")  # (nb, 66)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)  # (nb, half j, 1, m)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)  # l -> shift 2l
    q = ((qs >> shifts) & 3).astype(np.int8) - 1  # (nb, 2, 4, 32)
    d = np.ascontiguousarray(blocks[:, 64:66]).view("<f2").astype(np.float32)  # (nb, 1)
    return q.reshape(-1, QK_K), d


def dequantize_tq2_0(data: npt.NDArray[Any]) -> F32Array:
    """TQ2_0: mirrors `dequantize_row_tq2_0` (ggml-quants.c): y = (float)(q - 1) * d."""
    t, d = tq2_0_codes(data)
    return (t.astype(np.float32) * d).reshape(-1)


_POW3 = np.array([1, 3, 9, 27, 81, 243], dtype=np.uint8)


def _trits(q: U8Array, n: int) -> npt.NDArray[np.int8]:
    """Trit n of packed bytes: `xi = ((uint16_t)(uint8_t)(q * pow3[n]) * 3) >> 8` (dequantize_row_tq1_0)."""
    shifted = (q.astype(np.uint16) * np.uint16(_POW3[n])) & 0xFF  # uint8 wrap-around, as in C
    return ((shifted * 3) >> 8).astype(np.int8) - 1


def tq1_0_codes(data: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int8], F32Array]:
    """Ternary values (nb, 256) and block scales d (nb, 1) of TQ1_0 data, in `dequantize_row_tq1_0` order.

    Block (54 bytes): uint8 qs[48] (5 trits per byte: 32 bytes then 16 bytes), uint8 qh[4] (4 trits per
    byte), f16 d. Output order: qs[0:32] trit 0..4 (32 each), qs[32:48] trit 0..4 (16 each), qh trit 0..3.
    """
    blocks = _tq_blocks(data, TQ1_0_BLOCK, "TQ1_0")  # (nb, 54)
    qs32, qs16, qh = blocks[:, 0:32], blocks[:, 32:48], blocks[:, 48:52]
    parts = [_trits(qs32, n) for n in range(5)]  # 5 x (nb, 32)
    parts += [_trits(qs16, n) for n in range(5)]  # 5 x (nb, 16)
    parts += [_trits(qh, n) for n in range(4)]  # 4 x (nb, 4)
    t = np.concatenate(parts, axis=1)  # (nb, 256)
    d = np.ascontiguousarray(blocks[:, 52:54]).view("<f2").astype(np.float32)  # (nb, 1)
    return t, d


def dequantize_tq1_0(data: npt.NDArray[Any]) -> F32Array:
    """TQ1_0: mirrors `dequantize_row_tq1_0` (ggml-quants.c): y = (float)(xi - 1) * d."""
    t, d = tq1_0_codes(data)
    return (t.astype(np.float32) * d).reshape(-1)


def _f16_bytes(d: F32Array) -> U8Array:
    return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize_tq2_0(x: npt.NDArray[np.float32]) -> bytes:
    """Port of `quantize_row_tq2_0_ref` (mainline ggml-quants.c), for unit tests. lroundf rounds half away."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, QK_K)  # (nb, 256)
    amax = np.max(np.abs(xb), axis=1, keepdims=True)  # (nb, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(1.0) / amax, np.float32(0.0)).astype(np.float32)
    v = xb * inv  # (nb, 256) float32
    xi = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int16) + 1  # lroundf + 1
    xi = xi.reshape(-1, 2, 4, 32)  # (nb, j, n, m): value m + 32n of chunk j
    q = np.zeros((xb.shape[0], 2, 32), dtype=np.uint8)
    for n in range(4):
        q |= ((xi[:, :, n, :] & 3) << (2 * n)).astype(np.uint8)
    return np.concatenate([q.reshape(-1, 64), _f16_bytes(amax)], axis=1).tobytes()


def quantize_tq1_0(x: npt.NDArray[np.float32]) -> bytes:
    """Port of `quantize_row_tq1_0_ref` (mainline ggml-quants.c), for unit tests."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, QK_K)  # (nb, 256)
    amax = np.max(np.abs(xb), axis=1, keepdims=True)  # (nb, 1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(1.0) / amax, np.float32(0.0)).astype(np.float32)
    v = xb * inv
    xi = ((np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int32) + 1).astype(np.int32)  # (nb, 256)

    def pack(values: npt.NDArray[np.int32], extra_shift: bool) -> U8Array:
        q = np.zeros(values.shape[1:], dtype=np.int32)
        for n in range(values.shape[0]):
            q = (q * 3 + values[n]) & 0xFF  # uint8 arithmetic, as in C
        if extra_shift:
            q = (q * 3) & 0xFF
        return ((q * 256 + 242) // 243).astype(np.uint8)  # ceiling division by 243

    nb = xb.shape[0]
    first = pack(xi[:, :160].reshape(nb, 5, 32).transpose(1, 0, 2), False)  # (nb, 32)
    second = pack(xi[:, 160:240].reshape(nb, 5, 16).transpose(1, 0, 2), False)  # (nb, 16)
    high = pack(xi[:, 240:256].reshape(nb, 4, 4).transpose(1, 0, 2), True)  # (nb, 4)
    return np.concatenate([first, second, high, _f16_bytes(amax)], axis=1).tobytes()


# ---------------------------------------------------------------------------------------------------
# Ternary codes of any supported tensor, for the mirroring numerics and the weight check


def ternary_codes(
    ggml_type: int, data: npt.NDArray[Any], shape: tuple[int, ...]
) -> tuple[npt.NDArray[np.int8], F32Array]:
    """(t, scale) with the weights equal to t * scale: t (rows, cols) in {-1, 0, 1}; scale broadcastable to
    (rows, cols // block) -- one scale per tensor for I2_S, per 256-value block for TQ1_0 / TQ2_0.

    Raises ValueError for other types.
    """
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    cols = int(shape[-1])
    if ggml_type == ForkType.I2_S:
        t, s = i2_s_codes(data)
        return t.reshape(rows, cols), np.full((1, 1), s, dtype=np.float32)
    if ggml_type in (TQ1_0, TQ2_0):
        t, d = tq1_0_codes(data) if ggml_type == TQ1_0 else tq2_0_codes(data)
        return t.reshape(rows, cols), d.reshape(rows, cols // QK_K)
    raise ValueError(f"ggml type {ggml_type} is not a ternary format")


def diagnose_i2_s(data: npt.NDArray[Any], source: F32Array) -> str:
    """Why an I2_S tensor does not decode to `source`: names the multi-threaded quantizer when that fits."""
    rows, cols = source.shape
    t, scale = i2_s_codes(data)
    want = np.sign(source).astype(np.int8)
    row_ok = np.all(t.reshape(rows, cols) == want, axis=1)
    chunk_rows = max(1, MIN_CHUNK_SIZE // cols)
    amax = float(np.max(np.abs(source)))
    if rows > chunk_rows and bool(np.all(row_ok[:chunk_rows])) and not bool(np.all(row_ok[chunk_rows:])):
        return (
            f"rows 0-{chunk_rows - 1} (the first quantizer chunk) are right but {int(np.sum(~row_ok))} later rows "
            f"are not and the stored scale is {float(scale):.6g} instead of {amax:.6g}: the signature of "
            "bitnet.cpp's llama-quantize run with more than one thread (each row chunk is written 4x too far "
            "into the buffer)"
        )
    if float(scale) != amax:
        return f"the stored scale is {float(scale):.6g}, the source's largest |w| is {amax:.6g}"
    return f"{int(np.sum(~row_ok))} of {rows} rows hold different ternary codes than the source"


def check_loadable(backend: str, types: dict[str, int]) -> list[tuple[str, int]]:
    """The (tensor, ggml type) pairs `backend` cannot load; `types` maps tensor name -> ggml type id."""
    allowed = LOADABLE_TYPES.get(backend)
    if allowed is None:
        return []
    return [(name, t) for name, t in types.items() if t not in allowed]


def require_loadable(backend: str, path: object, types: dict[str, int]) -> None:
    """ModelFormatError (exit 2) naming the first tensor whose stored type `backend` cannot load.

    Checked before any lane starts, so a format the engine lacks (mainline and I2_S: id 36 is a removed
    type there) is "unsupported model format", never a crash inside the engine.
    """
    from parity.errors import ModelFormatError

    bad = check_loadable(backend, types)
    if bad:
        name, t = bad[0]
        engine = {"llama": "llama.cpp (mainline)", "bitnet": "bitnet.cpp's llama.cpp fork"}.get(backend, backend)
        raise ModelFormatError(
            f"unsupported model format for the {backend} lane: {engine} cannot load tensor '{name}' of type "
            f"{type_name(t)} in {path} ({len(bad)} such tensor(s))",
            fix="give each lane a format its backend runs natively (--variant ternary) or drop this backend",
        )
