"""Weights of the "scale x small integer" quantizations (Q8_0, Q5_0, Q4_0) kept quantized (issue 15: peak RSS).

Gemma 3 270M Q4_K_M's tied head is 262,144 x 640 in Q8_0 (671 MB as float32) and most of its layer matrices
are Q5_0. In these types every weight is d * k, an f16 block scale d times an integer k (Q8_0: -128..127,
Q5_0: -16..15, Q4_0: -8..7): exact in float32. `QRows` holds k as int8 (1 byte a weight) and d as float32 (1/8
byte a weight), and dequantizes a chunk of rows at a time into a buffer that stays in cache:

- `rows[ids]` (the embedding lookup), `project(x)` (x @ W.T, the plain path) and `np.asarray(rows)` use
  exactly the weights parity.gguf.dequant gives, so products are those of the float matrix up to the order in
  which the matrix product adds;
- `project_fast(x)` (the KV-cached greedy step, a few rows) never forms the weights: per 32-wide block b it
  takes the integers' dot products with x, then adds the blocks' scaled sums, y_i = sum_b d_ib (k_ib . x_b).
  A different order of float roundings of the same sum (tests/unit/test_engine_qrows.py bounds it by
  float32 rounding), measured here at the speed of streaming the float32 matrix (the cast of the int8 chunk and
  the in-cache products cost what reading 4 bytes a weight from memory costs), from under a third of the bytes.

Layout: the rows are cut into chunks of R = min(CHUNK_ROWS, rows) rows, and a chunk is stored transposed: its
integers (cols, R) and scales (nb, R), nb = cols/32. Scaling a chunk then runs along contiguous rows of R values
(one scale per (row, block) broadcast over 32 integers costs a numpy inner loop per 32 values, 2-3x slower), the
chunk (cols, R) is W.T for the matrix product, and block b's integers are its rows b*32..b*32+31, so the fast
product is one batched matrix product over the nb blocks.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType as Q

from parity.engines.numpy.blas import one_thread
from parity.engines.numpy.loader import empty
from parity.gguf.reader import GGUFFile, TensorInfo

Array = npt.NDArray[Any]
FloatType = type[np.floating[Any]]

QK = 32  # values per Q8_0 block
BLOCK_BYTES = 2 + QK  # f16 scale, 32 int8 quants
CHUNK_ROWS = 1024  # rows dequantized at a time: 640 columns x 1024 rows x 4 bytes = 2.6 MB of buffer
LOAD_THREADS = max(1, min(2, os.cpu_count() or 1))
Q8_0, Q5_0 = int(Q.Q8_0), int(Q.Q5_0)
BLOCK_BYTES_OF = {Q8_0: 34, Q5_0: 22, int(Q.Q4_0): 18}  # each block: f16 d first, then its 32 integers
TILE_ROWS = 64
# every f16 bit pattern as float32 (exact): a lookup is ~20x faster than numpy's f16 -> f32 cast here
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view("<f2").astype(np.float32)
FAST_ROWS = 4  # project_fast's products stay in cache up to this many rows of x; more go through `project`


class QRows:
    """A (rows, cols) Q8_0/Q5_0/Q4_0 matrix as int8 integers and float32 scales; see the module docstring."""

    ndim = 2

    def __init__(self, qs: Array, d: Array, rows: int, dtype: FloatType) -> None:
        self.qs = qs  # (C, cols, R) int8: chunk c holds rows c*R .. c*R+R-1, transposed
        self.d = d  # (C, nb, R) float32: the block scales, transposed alike
        self.chunk = int(qs.shape[2])  # R
        self.shape = (rows, qs.shape[1])
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        self.nbytes = qs.nbytes + d.nbytes

    @classmethod
    def load(cls, f: GGUFFile, t: TensorInfo, dtype: FloatType) -> QRows:
        """Read tensor `t` of `f` (`holds(t)`) with pread, chunk by chunk, on LOAD_THREADS threads."""
        rows, cols = t.shape
        nb, block_bytes = cols // QK, BLOCK_BYTES_OF[t.ggml_type]
        row_bytes = nb * block_bytes
        chunk = min(CHUNK_ROWS, rows)
        n_chunks = -(-rows // chunk)
        qs = empty((n_chunks, cols, chunk), np.int8, 1)  # (C, cols, R), mapped: see loader.empty
        d = empty((n_chunks, nb, chunk), np.float32, 1)  # (C, nb, R)
        pad = n_chunks * chunk - rows
        if pad:  # the last chunk's padding rows: zero weights, never returned
            qs[-1, :, chunk - pad :] = 0
            d[-1, :, chunk - pad :] = 0
        fd = os.open(f.path, os.O_RDONLY)
        try:

            def work(c: int) -> None:
                r0 = c * chunk
                n = min(rows, r0 + chunk) - r0
                raw = os.pread(fd, n * row_bytes, t.offset + r0 * row_bytes)
                if len(raw) != n * row_bytes:  # the reader checked the file's size; a file truncated since
                    raise OSError(f"{f.path}: short read of tensor '{t.name}' at row {r0}")
                blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n, nb, block_bytes)
                scales = F16_TO_F32[np.ascontiguousarray(blocks[:, :, :2]).view("<u2")[:, :, 0]]  # (n, nb)
                ints = integers(t.ggml_type, blocks)  # (n, nb, 32) int8
                dst = qs[c].reshape(nb, QK, chunk)  # (nb, 32, R)
                for i in range(0, n, TILE_ROWS):  # a transposing copy is 2x faster in tiles that stay in cache
                    np.copyto(dst[:, :, i : min(n, i + TILE_ROWS)], ints[i : i + TILE_ROWS].transpose(1, 2, 0))
                np.copyto(d[c, :, :n], scales.T)

            with ThreadPoolExecutor(LOAD_THREADS) as pool:
                list(pool.map(work, range(n_chunks)))
        finally:
            os.close(fd)
        return cls(qs, d, rows, dtype)

    def __getitem__(self, ids: Array) -> Array:
        """Rows `ids` (n,), dequantized: (n, cols) in the engine dtype, exactly as parity.gguf.dequant gives them."""
        idx = np.asarray(ids)
        c, j = np.divmod(idx, self.chunk)  # (n,) each
        q = self.qs[c, :, j]  # (n, cols) int8
        scale = self.d[c, :, j]  # (n, nb)
        w = np.multiply(q.reshape(idx.shape[0], -1, QK), scale[:, :, None], dtype=np.float32)  # (n, nb, 32): d * k
        return w.reshape(idx.shape[0], -1).astype(self.dtype, copy=False)  # (n, cols)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Array:
        """The whole dequantized matrix (rows, cols), for code that needs it as an array."""
        out = self[np.arange(self.shape[0])]
        return out if dtype is None else out.astype(dtype, copy=False)

    def _rows(self, c: int) -> int:
        return min(self.shape[0] - c * self.chunk, self.chunk)

    def project(self, x: Array) -> Array:
        """x @ W.T for x (n, cols): (n, rows), multiplying by the dequantized weights of each chunk."""
        with one_thread():  # hundreds of small BLAS calls: see engines/numpy/blas.py
            return self._project(x)

    def _project(self, x: Array) -> Array:
        rows, cols = self.shape
        out = np.empty((x.shape[0], rows), dtype=self.dtype)  # (n, rows)
        wt = scratch("w", (cols, self.chunk), self.dtype)  # (cols, R): one chunk's weights, W.T
        scaled = wt.reshape(cols // QK, QK, self.chunk)  # (nb, 32, R)
        for c in range(self.qs.shape[0]):
            np.copyto(wt, self.qs[c], casting="unsafe")  # the integers, exact in float
            np.multiply(scaled, self.d[c][:, None, :], out=scaled)  # d * k, exact
            r0, r = c * self.chunk, self._rows(c)
            out[:, r0 : r0 + r] = x @ wt[:, :r]  # (n, r)
        return out

    def project_fast(self, x: Array) -> Array:
        """x @ W.T for x (n, cols) as sum_b d_b (k_b . x_b), block by block; `project` when n > FAST_ROWS."""
        if x.shape[0] > FAST_ROWS:
            return self.project(x)
        with one_thread():
            return self._project_fast(x)

    def _project_fast(self, x: Array) -> Array:
        n, cols = x.shape
        nb, r = cols // QK, self.chunk
        xb = np.ascontiguousarray(x.reshape(n, nb, QK).transpose(1, 0, 2))  # (nb, n, 32)
        out = np.empty((n, self.shape[0]), dtype=self.dtype)  # (n, rows)
        ints = scratch("w", (nb, QK, r), self.dtype)  # (nb, 32, R): one chunk's integers
        sums = scratch("s", (nb, n, r), self.dtype)  # (nb, n, R): per-block dot products
        for c in range(self.qs.shape[0]):
            np.copyto(ints.reshape(-1, r), self.qs[c], casting="unsafe")
            np.matmul(xb, ints, out=sums)  # (nb, n, R): k_b . x_b for every row of the chunk
            np.multiply(sums, self.d[c][:, None, :], out=sums)  # times d_b
            r0, rc = c * r, self._rows(c)
            out[:, r0 : r0 + rc] = np.add.reduce(sums, axis=0)[:, :rc]  # (n, rc): the blocks in order
        return out


_SCRATCH = threading.local()


def scratch(role: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
    """A buffer for `role` of this shape, reused by every later call on this thread (no allocation per step)."""
    cache: dict[tuple[str, int, str], Array] = _SCRATCH.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape))
    buf = cache.get((role, size, dtype.str))
    if buf is None:
        buf = cache[(role, size, dtype.str)] = np.empty(size, dtype=dtype)
    return buf.reshape(shape)


def integers(ggml_type: int, blocks: Array) -> Array:
    """The integers k of blocks (n, nb, block bytes) as int8 (n, nb, 32), as ggml's dequantize_row_* reads them.

    Q8_0: qs[32] as int8. Q4_0: qs[16] holds element j in its low nibble and j + 16 in its high one, k = q - 8.
    Q5_0: the same nibbles, plus a fifth bit for element j at bit j of qh[4] (a little-endian uint32), k = q - 16.
    tests/unit/test_engine_qrows.py checks d * k against parity.gguf.dequant for each type.
    """
    if ggml_type == Q8_0:
        return blocks[:, :, 2:].view(np.int8)
    qs = blocks[:, :, -16:]  # (n, nb, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (n, nb, 32) uint8
    if ggml_type == Q5_0:
        q |= np.unpackbits(blocks[:, :, 2:6], axis=-1, bitorder="little") << 4  # bit j of qh: element j's fifth bit
        return (q.view(np.int8) - np.int8(16)).astype(np.int8, copy=False)
    return (q.view(np.int8) - np.int8(8)).astype(np.int8, copy=False)


def holds(t: TensorInfo) -> bool:
    """Whether `t` is a 2-D Q8_0/Q5_0/Q4_0 tensor `QRows` can hold (every ggml row is whole blocks)."""
    return t.ggml_type in BLOCK_BYTES_OF and len(t.shape) == 2 and t.shape[1] % QK == 0 and t.shape[0] > 0
