"""How `parity bench` measures: implementation lanes, the timed region, and the facts about the machine.

A lane is one implementation with one model loaded: the numpy engine in this process, or a C++ backend in a
timed worker process (`serve` below: parity.worker's protocol and isolation, but each call is timed inside
the worker, so the pipe round trip is not measured; `rpc_overhead_ms` records it for reference). Peak memory:
a worker's VmHWM read before it exits; for numpy, this process's VmHWM after resetting it before loading.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity import bench_gate, build
from parity.errors import ParityError, UsageError

if TYPE_CHECKING:
    from parity.bridge import BackendParams

MACHINE_ENV = "PARITY_BENCH_MACHINE"
SLOWDOWN_ENV = "PARITY_BENCH_SLOWDOWN"
IMPL_LABELS = ("numpy", "llama", "bitnet", "llama-kvf16")  # implementations and the cross-check lane

# ------------------------------------------------------------------------------------------- machine


def cpu_info(text: str | None = None) -> tuple[str, list[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo (or `text`)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
    model, flags = "", list[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = value.split()
    return model or platform.machine(), flags


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
        "slug": bench_gate.slugify(os.environ.get(MACHINE_ENV) or f"{model}-{n}cpu"),
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
    import numpy  # noqa: F401 - loads the BLAS library

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    paths = sorted({ln.split()[-1] for ln in maps if "openblas" in ln.rsplit("/", 1)[-1].lower() and "/" in ln})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter, path
    return None


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


def _status_kb(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def prompt_ids(n: int, n_vocab: int) -> list[int]:
    """A fixed, deterministic prompt of n token ids spread over the vocabulary (content does not matter)."""
    return [(7 + 131 * i) % n_vocab for i in range(n)]


# ------------------------------------------------------------------------------------------------ lanes


@dataclass
class Lane:
    """One implementation on one model, open for measurement."""

    label: str  # numpy | llama | bitnet | llama-kvf16
    impl: str
    pp: Callable[[list[int], float], float]  # (prompt ids, test-only delay) -> seconds, timed where it runs
    tg: Callable[[int, int, float], float]  # (first token, steps, test-only delay) -> seconds
    n_vocab: int
    architecture: str
    close: Callable[[], dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)


def open_numpy(model_path: Path) -> Lane:
    """The numpy engine in this process; peak RSS is this process's VmHWM, reset before loading."""
    from parity.engine_numpy import NumpyEngine

    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    engine = NumpyEngine(model_path, dtype="float32")
    load = time.perf_counter() - t0

    def close() -> dict[str, Any]:
        nonlocal engine
        hwm = _status_kb("self", "VmHWM") if reset else None
        del engine
        gc.collect()
        if hwm is not None:
            return {"peak_rss_bytes": hwm, "rss_method": "VmHWM of the harness process, reset before loading"}
        import resource

        return {
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_method": "ru_maxrss of the harness process (whole lifetime)",
        }

    return Lane(
        "numpy",
        "numpy",
        lambda ids, delay: timed(lambda: engine.greedy(ids, 1), delay),
        lambda first, n, delay: timed(lambda: engine.greedy([first], n), delay),
        engine.n_vocab,
        engine.architecture,
        close,
        {"load_s": load, "config": {"dtype": "float32"}},
    )


def parse_slowdown(raw: str | None) -> dict[str, float]:
    """PARITY_BENCH_SLOWDOWN=<impl>:<seconds>[,...] -> {impl: seconds} (test-only hook)."""
    out: dict[str, float] = {}
    for part in (raw or "").split(","):
        if not part.strip():
            continue
        impl, sep, secs = part.strip().partition(":")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if not sep or impl not in IMPL_LABELS or value < 0:
            raise UsageError(
                f"{SLOWDOWN_ENV}={raw!r} is malformed", fix=f"use <impl>:<seconds>, impl in {IMPL_LABELS[:3]}"
            )
        out[impl] = value
    return out


def timed(fn: Callable[[], object], delay: float) -> float:
    """Seconds taken by fn() plus the test-only delay, which is inside the timed region on purpose."""
    t0 = time.perf_counter_ns()
    fn()
    if delay:
        time.sleep(delay)
    return (time.perf_counter_ns() - t0) / 1e9


def serve(lib_path: str) -> None:
    """Timed worker main loop (`python -m parity.bench_lanes LIB`): the bridge in this process, timed here.

    Like parity.worker (same framing; llama.cpp's output goes to the log, never into the protocol stream),
    but a call returns the seconds it took measured *inside* this process, so the pipe round trip and the
    harness's wake-up latency (about 1 ms on a busy 2-core machine) are not part of any figure.
    """
    from parity.bridge import Bridge
    from parity.worker import _recv, _send

    proto_out = os.fdopen(os.dup(1), "wb")
    proto_in = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    try:
        bridge = Bridge(Path(lib_path))
        bridge.set_log_level(1)
    except Exception as exc:
        _send(proto_out, ("err", "load", f"cannot load bridge {lib_path}: {exc}"))
        return
    _send(proto_out, ("ok", {"api_generation": bridge.api_generation(), "system_info": bridge.system_info()}))
    model: Any = None
    while True:
        try:
            method, args = _recv(proto_in)
        except EOFError:
            return
        try:
            if method == "open":
                t0 = time.perf_counter()
                model = bridge.open(*args)
                result: Any = (model.info(), time.perf_counter() - t0)
            elif method == "pp":
                ids, delay = args
                result = timed(functools.partial(model.greedy, ids, 1), delay)
            elif method == "tg":
                first, n, delay = args
                result = timed(functools.partial(model.greedy, [first], n), delay)
            elif method == "ping":
                result = None
            elif method == "exit":
                if model is not None:
                    model.close()
                _send(proto_out, ("ok", None))
                return
            else:
                raise ValueError(f"unknown method {method!r}")
            _send(proto_out, ("ok", result))
        except Exception as exc:
            _send(proto_out, ("err", "bridge", f"{type(exc).__name__}: {exc}"))


class TimedWorker:
    """The harness side of `serve`: a child process with its own log, death detection and timeout."""

    def __init__(self, label: str, lib_path: Path, log_dir: Path, timeout: float = 600.0) -> None:
        import subprocess

        log_dir.mkdir(parents=True, exist_ok=True)
        self.label, self.timeout = label, timeout
        self.log_path = log_dir / f"worker_{label}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the worker
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parity.bench_lanes", str(lib_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self.hello: dict[str, Any] = self._receive("start")

    def _death(self, during: str) -> ParityError:
        from parity.errors import WorkerError

        self.proc.kill()
        code = self.proc.wait()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return WorkerError(
            f"{self.label} bench worker ended (exit code {code}) during {during}" + (f"\n{tail}" if tail else ""),
            fix=f"see {self.log_path}",
        )

    def _receive(self, during: str) -> Any:
        import select

        from parity.errors import WorkerError
        from parity.worker import _recv

        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while not select.select([self.proc.stdout], [], [], 0.2)[0]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self._death(during)
        try:
            reply = _recv(self.proc.stdout)
        except (EOFError, OSError):
            raise self._death(during) from None
        if reply[0] != "ok":
            raise WorkerError(f"{self.label} {during} failed: {reply[2]}")
        return reply[1]

    def call(self, method: str, *args: Any) -> Any:
        """One request and its reply (or the worker's death as a WorkerError)."""
        from parity.worker import _send

        assert self.proc.stdin is not None
        try:
            _send(self.proc.stdin, (method, args))
        except OSError:
            raise self._death(method) from None
        return self._receive(method)

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        import subprocess

        if self.proc.poll() is None:
            try:
                self.call("exit")
                self.proc.wait(timeout=10)
            except (ParityError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._log):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def open_cpp(label: str, impl: str, p: build.BuildPlan, model_path: Path, params: BackendParams, log_dir: Path) -> Lane:
    """A C++ backend in a timed worker process; peak RSS is the worker's VmHWM read before it exits."""
    t0 = time.perf_counter()
    w = TimedWorker(label, p.bridge_path, log_dir)
    started = time.perf_counter() - t0
    try:
        info, load = w.call("open", str(model_path), params)
        trips = []
        for _ in range(20):  # the round trip of a trivial call: NOT part of the figures, shown for reference
            t2 = time.perf_counter()
            w.call("ping")
            trips.append(time.perf_counter() - t2)
    except BaseException:
        w.close()
        raise

    def close() -> dict[str, Any]:
        hwm = _status_kb(w.proc.pid, "VmHWM")
        w.close()
        return {"peak_rss_bytes": hwm, "rss_method": "VmHWM of the worker process before exit"}

    receipt = build.read_receipt(p)
    return Lane(
        label,
        impl,
        lambda ids, delay: float(w.call("pp", ids, delay)),
        lambda first, n, delay: float(w.call("tg", first, n, delay)),
        int(info["n_vocab"]),
        str(info["architecture"]),
        close,
        {
            "load_s": load,
            "worker_start_s": started,
            "rpc_overhead_ms": sorted(trips)[len(trips) // 2] * 1e3,
            "config": params.to_dict(),
            "backend": {
                "commit": p.commit,
                "source_kind": p.source_kind,
                "cmake": receipt.get("cmake", {}),
                "compiler": receipt.get("compiler", {}),
                "system_info": w.hello.get("system_info", ""),
            },
        },
    )


def measure(
    lanes: list[Lane],
    prompt_tokens: int,
    gen_tokens: int,
    reps: int,
    slowdown: dict[str, float],
    between: Callable[[], object] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Warm up, then `reps` interleaved repetitions of pp and tg for every lane -> {label: {metric: tokens/s}}.

    `between` (llama-bench's repetition) runs after each round of prompt-processing repetitions.
    """
    n_vocab = min(lane.n_vocab for lane in lanes)
    ids = prompt_ids(prompt_tokens, n_vocab)
    n_tokens = {"pp": prompt_tokens, "tg": gen_tokens}

    def run_one(lane: Lane, metric: str, delay: float) -> float:
        return lane.pp(ids, delay) if metric == "pp" else lane.tg(ids[0], gen_tokens, delay)

    out: dict[str, dict[str, list[float]]] = {lane.label: {"pp": [], "tg": []} for lane in lanes}
    for metric in bench_gate.METRICS:
        for lane in lanes:
            run_one(lane, metric, 0.0)  # warm-up: caches, thread pools, first-touch pages
        for _ in range(reps):
            for lane in lanes:
                run_one(lane, metric, 0.0)  # untimed: the other lanes' round evicted this one's caches
                seconds = run_one(lane, metric, slowdown.get(lane.label, 0.0))
                out[lane.label][metric].append(n_tokens[metric] / seconds)
            if between is not None and metric == "pp":
                between()
    return out


if __name__ == "__main__":
    serve(sys.argv[1])
