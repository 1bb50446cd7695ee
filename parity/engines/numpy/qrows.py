"""A Q8_0 vocabulary matrix (token_embd, output) kept in its quantized form (issue 15: peak RSS, token generation).

Gemma 3's tied head is 262,144 x 640 in Q8_0: 178 MB in the file, 671 MB as float32. `Q8Rows` holds the int8
quants (1 byte a weight) and the per-block scales as float32 (1/8 byte a weight), and dequantizes
CHUNK_ROWS rows at a time into a buffer that stays in cache:

- `rows[ids]` (the embedding lookup) and `project(x)` (x @ W.T, the plain path) use exactly the weights
  parity.gguf.dequant gives (a Q8_0 weight d * q is exact in float32: an f16 scale times an int8), so the
  logits are those of the float32 matrix up to the order in which the matrix product adds;
- `project_fast(x)` (the KV-cached greedy step) never forms the weights: per 32-wide block b it takes the
  integer quants' dot products with x, then adds the blocks' scaled sums, y_i = sum_b d_ib (q_ib . x_b).
  A different order of float32 roundings of the same sum (tests/unit/test_engine_qrows.py bounds it by
  float32 rounding), at about the speed of streaming the float32 matrix from memory, from a quarter of the bytes.

Layout: the rows are cut into chunks of CHUNK_ROWS rows; a chunk stores its quants block-major, (nb, R, 32)
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

from parity.gguf.reader import GGUFFile, TensorInfo

Array = npt.NDArray[Any]
FloatType = type[np.floating[Any]]

QK = 32  # values per Q8_0 block
BLOCK_BYTES = 2 + QK  # f16 scale, 32 int8 quants
CHUNK_ROWS = 1024  # rows dequantized at a time: 640 columns x 1024 rows x 4 bytes = 2.6 MB of buffer
LOAD_THREADS = max(1, min(2, os.cpu_count() or 1))
Q8_0 = int(Q.Q8_0)


class Q8Rows:
    """A (rows, cols) Q8_0 matrix as quants and scales, dequantized chunk by chunk; see the module docstring."""

    ndim = 2

    def __init__(self, qs: Array, d: Array, rows: int, dtype: FloatType) -> None:
        self.qs = qs  # (C, nb, R, 32) int8: chunk c holds rows c*R .. c*R+R-1, block-major
        self.d = d  # (C, nb, R) float32: the block scales
        self.shape = (rows, qs.shape[1] * QK)
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        self.nbytes = qs.nbytes + d.nbytes

    @classmethod
    def load(cls, f: GGUFFile, t: TensorInfo, dtype: FloatType) -> Q8Rows:
        """Read Q8_0 tensor `t` of `f` ((rows, cols), cols a multiple of 32) with pread, chunk by chunk."""
        rows, cols = t.shape
        nb = cols // QK
        row_bytes = nb * BLOCK_BYTES
        n_chunks = -(-rows // CHUNK_ROWS)
        qs = np.empty((n_chunks, nb, CHUNK_ROWS, QK), dtype=np.int8)
        d = np.empty((n_chunks, nb, CHUNK_ROWS), dtype=np.float32)
        pad = n_chunks * CHUNK_ROWS - rows
        if pad:  # the last chunk's padding rows: zero weights, never returned
            qs[-1, :, CHUNK_ROWS - pad :] = 0
            d[-1, :, CHUNK_ROWS - pad :] = 0
        fd = os.open(f.path, os.O_RDONLY)
        try:

            def work(c: int) -> None:
                r0 = c * CHUNK_ROWS
                n = min(rows, r0 + CHUNK_ROWS) - r0
                raw = os.pread(fd, n * row_bytes, t.offset + r0 * row_bytes)
                if len(raw) != n * row_bytes:  # the reader checked the file's size; a file truncated since
                    raise OSError(f"{f.path}: short read of tensor '{t.name}' at row {r0}")
                blocks = np.frombuffer(raw, dtype=np.uint8).reshape(n, nb, BLOCK_BYTES)
                np.copyto(qs[c, :, :n], blocks[:, :, 2:].view(np.int8).transpose(1, 0, 2))
                scales = np.ascontiguousarray(blocks[:, :, :2]).view("<f2")[:, :, 0]  # (n, nb) f16
                np.copyto(d[c, :, :n], scales.T, casting="unsafe")  # f16 -> f32, exact

            with ThreadPoolExecutor(LOAD_THREADS) as pool:
                list(pool.map(work, range(n_chunks)))
        finally:
            os.close(fd)
        return cls(qs, d, rows, dtype)

    def __getitem__(self, ids: Array) -> Array:
        """Rows `ids` (n,), dequantized: (n, cols) in the engine dtype, exactly as parity.gguf.dequant gives them."""
        idx = np.asarray(ids)
        c, j = np.divmod(idx, CHUNK_ROWS)  # (n,) each
        q = self.qs[c, :, j]  # (n, nb, 32) int8
        scale = self.d[c, :, j]  # (n, nb)
        w = np.multiply(q, scale[:, :, None], dtype=np.float32)  # (n, nb, 32): exact products d * q
        return w.reshape(idx.shape[0], -1).astype(self.dtype, copy=False)  # (n, cols)

    def project(self, x: Array) -> Array:
        """x @ W.T for x (n, cols): (n, rows), multiplying by the dequantized weights of each chunk."""
        rows, cols = self.shape
        nb = cols // QK
        out = np.empty((x.shape[0], rows), dtype=self.dtype)  # (n, rows)
        w = np.empty((CHUNK_ROWS, nb, QK), dtype=self.dtype)  # (R, nb, 32): one chunk's weights, row-major
        for c in range(self.qs.shape[0]):
            np.copyto(w, self.qs[c].transpose(1, 0, 2), casting="unsafe")  # integer quants, exact in float
            np.multiply(w, self.d[c].T[:, :, None], out=w)  # (R, nb, 32): d * q, exact
            r0 = c * CHUNK_ROWS
            r1 = min(rows, r0 + CHUNK_ROWS)
            out[:, r0:r1] = x @ w.reshape(CHUNK_ROWS, cols)[: r1 - r0].T  # (n, r1 - r0)
        return out

    def project_fast(self, x: Array) -> Array:
        """x @ W.T for x (n, cols) as sum_b d_b (q_b . x_b): the quants' block dot products, then their scaled sum."""
        n, cols = x.shape
        rows, nb = self.shape[0], cols // QK
        xb = np.ascontiguousarray(x.reshape(n, nb, QK).transpose(1, 2, 0))  # (nb, 32, n)
        out = np.empty((n, rows), dtype=self.dtype)  # (n, rows)
        quants = np.empty((nb, CHUNK_ROWS, QK), dtype=self.dtype)  # (nb, R, 32): one chunk's quants
        sums = np.empty((nb, CHUNK_ROWS, n), dtype=self.dtype)  # (nb, R, n): per-block dot products
        total = np.empty((CHUNK_ROWS, n), dtype=self.dtype)  # (R, n)
        for c in range(self.qs.shape[0]):
            np.copyto(quants, self.qs[c], casting="unsafe")
            np.matmul(quants, xb, out=sums)  # (nb, R, n): q_b . x_b for every row of the chunk
            np.multiply(sums, self.d[c][:, :, None], out=sums)  # (nb, R, n): times d_b
            np.add.reduce(sums, axis=0, out=total)  # (R, n): the blocks in order
            r0 = c * CHUNK_ROWS
            r1 = min(rows, r0 + CHUNK_ROWS)
            out[:, r0:r1] = total[: r1 - r0].T
        return out


def is_q8_rows(t: TensorInfo) -> bool:
    """Whether `t` is a 2-D Q8_0 tensor `Q8Rows` can hold (every ggml Q8_0 row is whole blocks)."""
    return t.ggml_type == Q8_0 and len(t.shape) == 2 and t.shape[1] % QK == 0 and t.shape[0] > 0
