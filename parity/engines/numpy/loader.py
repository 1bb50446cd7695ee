"""Dequantizing a model's weights fast and lean (issue 15: load <= 2 s, peak RSS).

`dequantized` gives exactly what parity.gguf.dequant.dequantize gives (the same per-type functions, applied to
whole rows: every ggml row is a whole number of blocks, and blocks are independent), but
- reads the tensor's bytes with os.pread in chunks of CHUNK_BYTES instead of through the memory map, so the
  file's pages never count toward this process's resident set (the engine keeps only what it computes from them);
- writes each chunk's values straight into the output array in the engine dtype, so the temporaries of a chunk
  (a few times CHUNK_BYTES) are the only memory beyond the result (a 262,144 x 640 Q8_0 embedding dequantized
  in one piece needs three full-size float32 temporaries, 2 GB);
- dequantizes chunks on LOAD_THREADS threads (numpy and pread release the GIL on arrays this size).
Types whose blocks span rows (bitnet.cpp's I2_S: one scale per tensor) and 1-D tensors go through
`dequantize` unchanged.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType as Q

from parity.gguf.dequant import DEQUANTIZERS, dequantize
from parity.gguf.reader import GGUFFile, TensorInfo

Array = npt.NDArray[Any]
FloatType = type[np.floating[Any]]

CHUNK_BYTES = 2 << 20
HUGE_BYTES = 64 << 20
LOAD_THREADS = max(1, min(4, os.cpu_count() or 1))
ROW_LOCAL = frozenset(
    int(t) for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0)
)


Q8_0 = int(Q.Q8_0)


def q8_0_into(data: Array, out: Array) -> None:
    """dequantize_q8_0 (y = qs[j] * d, in float32: exact) written into `out` without temporaries of its size."""
    blocks = data.reshape(-1, 34)  # (nb, 34): f16 d, int8 qs[32]
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (nb, 1)
    np.multiply(blocks[:, 2:].view(np.int8), d, out=out.reshape(-1, 32), dtype=np.float32, casting="unsafe")


def empty(shape: tuple[int, ...], dtype: type[np.generic], mapped_from: int = HUGE_BYTES) -> Array:
    """An uninitialised array; one of `mapped_from` bytes or more in 4 KiB pages (an anonymous memory map).

    A mapped array goes back to the system when it is freed. The heap does not always: after a malloc'd block
    of a few MB is freed, glibc raises its mmap threshold and serves later blocks up to that size from arenas
    that keep their pages, so an engine's weights may stay resident after the engine is gone (engines/numpy/qrows.py
    maps all of its arrays).

    numpy asks the kernel for transparent huge pages for every array of 4 MB or more; where the kernel's THP
    defrag is `madvise`, faulting them in may compact memory first. Measured here (2-core EPYC, 24 GB, page
    cache full) for Gemma's 671 MB embedding: 0.16 s the first time, then 2.1-2.8 s of CPU, against a steady
    0.4-0.5 s in 4 KiB pages; a pass over the array (the tied head's matrix-vector product) took the same time
    in both (105 ms).
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size < mapped_from or size == 0:
        return np.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def dequantized(f: GGUFFile, t: TensorInfo, dtype: FloatType) -> Array:
    """Tensor `t` of `f` as a new (t.shape) array of `dtype`; values identical to `dequantize(t)`."""
    rows = t.shape[0] if len(t.shape) == 2 else 0
    if t.ggml_type not in ROW_LOCAL or rows < 2 or t.n_bytes % rows:
        return dequantize(t).astype(dtype, copy=False)
    fn = DEQUANTIZERS[t.ggml_type]  # type: ignore[index]  # IntEnum keys hash like their ids
    row_bytes = t.n_bytes // rows
    step = max(1, CHUNK_BYTES // row_bytes)
    out = empty(t.shape, dtype, 1 << 20)  # mapped from 1 MB: freed weights leave no resident heap (`empty`)
    fd = os.open(f.path, os.O_RDONLY)
    try:

        def work(r0: int) -> None:
            r1 = min(rows, r0 + step)
            size = (r1 - r0) * row_bytes
            raw = os.pread(fd, size, t.offset + r0 * row_bytes)
            if len(raw) != size:  # the reader checked the file's size; a file truncated since is caught here
                raise OSError(f"{f.path}: short read of tensor '{t.name}' at row {r0}")
            data = np.frombuffer(raw, dtype=np.uint8)
            if t.ggml_type == Q8_0:
                q8_0_into(data, out[r0:r1])
            else:
                out[r0:r1] = fn(data).reshape(r1 - r0, -1)

        starts = range(0, rows, step)
        if len(starts) == 1 or LOAD_THREADS == 1:
            for r0 in starts:
                work(r0)
        else:
            with ThreadPoolExecutor(LOAD_THREADS) as pool:
                list(pool.map(work, starts))
    finally:
        os.close(fd)
    return out
