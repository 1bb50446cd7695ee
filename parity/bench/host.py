"""Facts about the machine `parity bench` runs on: CPU, numpy's BLAS and its thread limit, and how long a
process waited for a CPU (the contention term of parity.bench.noise). Re-exported by parity.bench.lanes."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from parity.bench import gate
from parity.core import machine

MACHINE_ENV = "PARITY_BENCH_MACHINE"


def cpu_info(text: str | None = None) -> tuple[str, list[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo (or `text`), read by parity.core.machine."""
    info = machine.cpu_info(text)
    return info.model, list(info.flags)


def blas_info() -> dict[str, Any]:
    """numpy's BLAS (numpy.show_config), threadpoolctl's view when installed, and the thread env vars."""
    import numpy as np

    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        show: Any = np.show_config
        deps = show(mode="dicts")["Build Dependencies"]
        blas = deps.get("blas", {})
        info["blas"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration") if k in blas}
    except (TypeError, KeyError, AttributeError):
        info["blas"] = None
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-not-found, unused-ignore]

        info["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads")} for p in threadpool_info()
        ]
    except ImportError:
        info["threadpools"] = None
    info["env"] = {
        k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    }
    return info


def machine_info() -> dict[str, Any]:
    """CPU, flags, core count, Python/numpy/BLAS; `slug` names baselines (PARITY_BENCH_MACHINE overrides)."""
    model, flags = cpu_info()
    n = os.cpu_count() or 1
    return {
        "slug": gate.slugify(os.environ.get(MACHINE_ENV) or f"{model}-{n}cpu"),
        "hostname": platform.node(),
        "cpu_model": model,
        "cpu_flags": flags,
        "n_cpus": n,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy_blas": blas_info(),
    }


def _openblas_setters() -> tuple[Any, Any, str] | None:
    """(set_num_threads, get_num_threads, library path) of the OpenBLAS numpy loads into this process, if any."""
    from parity.engines.numpy.blas import openblas_library

    return openblas_library()


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[dict[str, Any]]:
    """Limit numpy's BLAS to `n` threads while benchmarking, like the C++ engines' --threads; restore after.

    threadpoolctl when installed, else OpenBLAS's own setter through ctypes (what threadpoolctl calls).
    Without it, two BLAS threads on a shared 2-core machine make the numpy timings swing by 50x, as
    threads spin-wait for a partner that is not scheduled. Yields what was done, for the receipt.
    """
    import numpy  # noqa: F401 - threadpoolctl limits the libraries already loaded

    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="blas"):
            yield {"threads": n, "method": "threadpoolctl"}
        return
    found = _openblas_setters()
    if found is None:
        yield {"threads": None, "method": "not controlled (no threadpoolctl, no OpenBLAS found)"}
        return
    setter, getter, path = found
    before = int(getter())
    setter(n)
    try:
        yield {"threads": n, "method": f"OpenBLAS set_num_threads ({Path(path).name}); was {before}"}
    finally:
        setter(before)


def cpu_pressure_us() -> int | None:
    """Microseconds during which some runnable task of the machine waited for a CPU (Linux PSI, the `some total`
    of /proc/pressure/cpu), or None where the kernel does not expose it. Over an interval it says how busy the
    whole machine was: a lane can run undisturbed on its core while the other core's oversubscription still
    slows it (shared caches, memory bandwidth, SMT siblings), which its own waiting time does not show."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_times(pids: Sequence[int]) -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable but waiting for one) summed over every thread of `pids`, from the scheduler's
    /proc/<pid>/task/<tid>/schedstat; None where the kernel does not expose it (then no contention is known)."""
    run = wait = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in tasks:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                run, wait = run + int(fields[0]), wait + int(fields[1])
            except (OSError, ValueError, IndexError):
                continue  # a thread that exited meanwhile
    return run, wait
