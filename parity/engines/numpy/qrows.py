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

Layout: the rows are cut into chunks of R = min(CHUNK_ROWS, rows) rows; a chunk stores its quants block-major, (nb, R, 32)
with nb = cols/32, and its scales (nb, R), so that one block's quants of the chunk's rows are one contiguous
(R, 32) matrix (the fast product is a batched matrix-vector product over the nb blocks) and the scales multiply
contiguous rows.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType as Q

from parity.errors import ModelFormatError
from parity.gguf.dequant import DEQUANTIZERS
from parity.gguf.reader import GGUFFile, TensorInfo

Array = npt.NDArray[Any]
FloatType = type[np.floating[Any]]

QK = 32  # values per Q8_0 block
BLOCK_BYTES = 2 + QK  # f16 scale, 32 int8 quants
CHUNK_ROWS = 1024  # rows dequantized at a time: 640 columns x 1024 rows x 4 bytes = 2.6 MB of buffer
LOAD_THREADS = max(1, min(2, os.cpu_count() or 1))
Q8_0 = int(Q.Q8_0)
BLOCK_BYTES_OF = {Q8_0: 34, int(Q.Q5_0): 22, int(Q.Q4_0): 18}  # each block: f16 d first, then its 32 integers
FAST_ROWS = 4  # project_fast's products stay in cache up to this many rows of x; more go through `project`


class QRows:
    """A (rows, cols) Q8_0/Q5_0/Q4_0 matrix as int8 integers and float32 scales; see the module docstring."""

    ndim = 2

    def __init__(self, qs: Array, d: Array, rows: int, dtype: FloatType) -> None:
        self.qs = qs  # (C, nb, R, 32) int8: chunk c holds rows c*R .. c*R+R-1, block-major
        self.d = d  # (C, nb, R) float32: the block scales
        self.chunk = qs.shape[2]  # R
        self.shape = (rows, qs.shape[1] * QK)
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
        qs = np.empty((n_chunks, nb, chunk, QK), dtype=np.int8)
        d = np.empty((n_chunks, nb, chunk), dtype=np.float32)
        pad = n_chunks * chunk - rows
        if pad:  # the last chunk's padding rows: zero weights, never returned
            qs[-1, :, chunk - pad :] = 0
            d[-1, :, chunk - pad :] = 0
        dequantize = DEQUANTIZERS[t.ggml_type]  # type: ignore[index]  # IntEnum keys hash like their ids
        fd = os.open(f.path, os.O_RDONLY)
        try:

            def work(c: int) -> None:
                r0 = c * chunk
                n = min(rows, r0 + chunk) - r0
                raw = os.pread(fd, n * row_bytes, t.offset + r0 * row_bytes)
                if len(raw) != n * row_bytes:  # the reader checked the file's size; a file truncated since
                    raise OSError(f"{f.path}: short read of tensor '{t.name}' at row {r0}")
                blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n, nb, block_bytes)
                scales = np.ascontiguousarray(blocks[:, :, :2]).view("<f2")[:, :, 0].astype(np.float32)  # (n, nb)
                if t.ggml_type == Q8_0:
                    ints = blocks[:, :, 2:].view(np.int8)  # (n, nb, 32)
                else:  # the integers of the exact weights d * k: k = w / d exactly (an exact quotient rounds to itself)
                    w = dequantize(blocks.reshape(-1)).reshape(n, nb, QK)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        k = np.where(scales[:, :, None] != 0, w / scales[:, :, None], np.float32(0))
                    ints = k.astype(np.int8)
                    if not np.array_equal(ints * scales[:, :, None], w):
                        raise ModelFormatError(
                            f"{f.path}: tensor '{t.name}' has block scales that are not finite",
                            fix="the file is damaged; fetch or convert it again",
                        )
                np.copyto(qs[c, :, :n], ints.transpose(1, 0, 2))
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
        q = self.qs[c, :, j]  # (n, nb, 32) int8
        scale = self.d[c, :, j]  # (n, nb)
        w = np.multiply(q, scale[:, :, None], dtype=np.float32)  # (n, nb, 32): exact products d * k
        return w.reshape(idx.shape[0], -1).astype(self.dtype, copy=False)  # (n, cols)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Array:
        """The whole dequantized matrix (rows, cols), for code that needs it as an array."""
        out = self[np.arange(self.shape[0])]
        return out if dtype is None else out.astype(dtype, copy=False)

    def _weights(self, c: int, w: Array) -> Array:
        """Chunk c's exact weights into `w` (R, nb, 32); returns them as (rows of the chunk, cols)."""
        np.copyto(w, self.qs[c].transpose(1, 0, 2), casting="unsafe")  # the integers, exact in float
        np.multiply(w, self.d[c].T[:, :, None], out=w)  # (R, nb, 32): d * k, exact
        r0 = c * self.chunk
        return w.reshape(self.chunk, self.shape[1])[: min(self.shape[0], r0 + self.chunk) - r0]

    def project(self, x: Array) -> Array:
        """x @ W.T for x (n, cols): (n, rows), multiplying by the dequantized weights of each chunk."""
        rows, cols = self.shape
        out = np.empty((x.shape[0], rows), dtype=self.dtype)  # (n, rows)
        w = np.empty((self.chunk, cols // QK, QK), dtype=self.dtype)  # (R, nb, 32): one chunk's weights
        for c in range(self.qs.shape[0]):
            r0 = c * self.chunk
            wc = self._weights(c, w)  # (r, cols)
            out[:, r0 : r0 + wc.shape[0]] = x @ wc.T  # (n, r)
        return out

    def project_fast(self, x: Array) -> Array:
        """x @ W.T for x (n, cols) as sum_b d_b (k_b . x_b), block by block; `project` when n > FAST_ROWS."""
        n, cols = x.shape
        if n > FAST_ROWS:
            return self.project(x)
        rows, nb, r = self.shape[0], cols // QK, self.chunk
        xb = np.ascontiguousarray(x.reshape(n, nb, QK).transpose(1, 2, 0))  # (nb, 32, n)
        out = np.empty((n, rows), dtype=self.dtype)  # (n, rows)
        quants = np.empty((nb, r, QK), dtype=self.dtype)  # (nb, R, 32): one chunk's integers
        sums = np.empty((nb, r, n), dtype=self.dtype)  # (nb, R, n): per-block dot products
        total = np.empty((r, n), dtype=self.dtype)  # (R, n)
        for c in range(self.qs.shape[0]):
            np.copyto(quants, self.qs[c], casting="unsafe")
            np.matmul(quants, xb, out=sums)  # (nb, R, n): k_b . x_b for every row of the chunk
            np.multiply(sums, self.d[c][:, :, None], out=sums)  # (nb, R, n): times d_b
            np.add.reduce(sums, axis=0, out=total)  # (R, n): the blocks in order
            r0 = c * r
            r1 = min(rows, r0 + r)
            out[:, r0:r1] = total[: r1 - r0].T
        return out


def holds(t: TensorInfo) -> bool:
    """Whether `t` is a 2-D Q8_0/Q5_0/Q4_0 tensor `QRows` can hold (every ggml row is whole blocks)."""
    return t.ggml_type in BLOCK_BYTES_OF and len(t.shape) == 2 and t.shape[1] % QK == 0 and t.shape[0] > 0
