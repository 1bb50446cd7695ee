"""numpy's BLAS on one thread for every forward pass of the numpy engine (ops.bound).

A forward pass is a hundred or more BLAS calls, and a QRows product (engines/numpy/qrows.py) hundreds more
(Gemma 3's head: 256 chunks of 1,024 rows). OpenBLAS splits each call over its threads (as many as cores by
default) and the threads meet at the end of every call; on a shared 2-core machine the partner is often not
scheduled, and each call then waits for it. Measured here at load average 8-10: the head's product for 16 rows
took 3.9 s with 2 threads and 0.47 s with 1 (one float32 product of the whole matrix: 0.32-0.43 s either way).
The thread count also moved results by float32 rounding. `one_thread()` sets OpenBLAS to one thread for the
duration and restores the count after (parity.bench.host.blas_threads does the same for a whole benchmark).
Other BLAS libraries are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

Setters = tuple[Callable[[int], object], Callable[[], int]]
_lock = threading.Lock()
_depth = [0, 1]  # blocks inside one_thread() now, and the thread count the first of them found
_found: list[tuple[Callable[[int], object], Callable[[], int], str] | None] = []  # the lookup, done once per process


def openblas_library() -> tuple[Callable[[int], object], Callable[[], int], str] | None:
    """(set_num_threads, get_num_threads, library path) of the OpenBLAS numpy loaded into this process, or None.

    One lookup per process (parity.bench.host.blas_threads uses it too)."""
    if _found:
        return _found[0]
    import numpy  # noqa: F401 - loads the BLAS library

    found: tuple[Callable[[int], object], Callable[[], int], str] | None = None
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    paths = sorted({ln.split()[-1] for ln in maps if "openblas" in ln.rsplit("/", 1)[-1].lower() and "/" in ln})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{name}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{name}_get_num_threads{suffix}", None)
                if found is None and setter is not None and getter is not None:
                    found = (setter, getter, path)
    _found.append(found)
    return found


def openblas_setters() -> Setters | None:
    """(set_num_threads, get_num_threads) of the OpenBLAS numpy loaded into this process, or None."""
    found = openblas_library()
    return None if found is None else (found[0], found[1])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """OpenBLAS on one thread inside the block (nothing changes when it already is, or without OpenBLAS).

    Blocks may overlap in threads of one process (the windows workflow's numpy alternates, parallel lanes): the
    first to enter sets one thread, the last to leave restores the count, so no forward pass ever runs part of
    its calls on more threads because another pass finished first."""
    found = openblas_setters()
    if found is None:
        yield
        return
    with _lock:
        if _depth[0] == 0:
            _depth[1] = int(found[1]())
            if _depth[1] > 1:
                found[0](1)
        _depth[0] += 1
    try:
        yield
    finally:
        with _lock:
            _depth[0] -= 1
            if _depth[0] == 0 and _depth[1] > 1:
                found[0](_depth[1])
