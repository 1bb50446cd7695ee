"""How `parity bench` measures: implementation lanes, the timed region, and the facts about the machine.

A lane (`Lane`) is one implementation with one model loaded, and its one timed operation: `evaluate`, K
back-to-back greedy evaluations, each timed where it runs. `InProcessLane` holds an engine in this process
(the numpy engine; a test may wrap it, e.g. to slow it down); `WorkerLane` a C++ backend in THE worker process
(parity.backends.worker) in its timed mode: the evaluations are timed inside the worker, so the pipe round
trip is not measured (`rpc_overhead_ms` records it for reference); `ExternalLane` an engine brought by the user
(`cmd:ARGV`, `py:module:factory`) in its own process speaking protocol v2 (docs/PROTOCOL.md), timed here around
each request, so the protocol is part of its figures. `open_lane` opens the lane for a `LaneSpec`
(an implementation spec of parity.engines.spec: the numpy lane is opened through parity.engines.registry, a C++
lane's context parameters are the bench's base parameters with the spec applied, parity.bench.main.lane_params);
`parity bench` takes it as a parameter (bench.run_bench). Peak memory:
a worker's (or an external engine's) VmHWM read before it exits; for numpy, this process's VmHWM after resetting
it before loading.
`calibrate` and `measure` say how samples are taken and record what ran (`Figure`), including how long the
lane's processes waited for a CPU while they were timed (`cpu_times`, the contention term of parity.bench.noise).
"""

from __future__ import annotations

import abc
import contextlib
import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from parity.backends import build
from parity.backends.worker import RemoteModel, Worker, time_greedy
from parity.bench import gate
from parity.bench.host import MACHINE_ENV as MACHINE_ENV  # re-exported: the bench's machine facts
from parity.bench.host import _openblas_setters as _openblas_setters
from parity.bench.host import blas_info as blas_info
from parity.bench.host import blas_threads as blas_threads
from parity.bench.host import cpu_info as cpu_info
from parity.bench.host import cpu_pressure_us as cpu_pressure_us
from parity.bench.host import cpu_times as cpu_times
from parity.bench.host import machine_info as machine_info
from parity.engines.spec import ImplSpec
from parity.errors import UsageError

if TYPE_CHECKING:
    from parity.backends.bridge import BackendParams
    from parity.engines.external import CommandImplementation

MIN_SAMPLE_S = 0.05  # a sample is at least this long: back-to-back evaluations (see calibrate)
MAX_EVALS_PER_SAMPLE = 1000
XCHECK_LABEL = "llama-kvf16"  # the cross-check lane (no spec label has this form: `llama-<key>-<value>`)

# ------------------------------------------------------------------------------------------- machine


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


class Greedy(Protocol):
    """Anything that evaluates a prompt and continues it greedily (an engine, a bridge model)."""

    def greedy(self, tokens: list[int], n_new: int) -> list[int]: ...


class Engine(Greedy, Protocol):
    """What an in-process lane evaluates: parity.engines.numpy.engine.NumpyEngine (or a wrapper of it)."""

    n_vocab: int
    architecture: str


class Lane(abc.ABC):
    """One implementation with one model loaded, open for measurement.

    `evaluate` is the only timed operation: `count` back-to-back greedy evaluations of `tokens` with `n_new`
    new tokens, timed where they run, one duration per evaluation. A lane counts the evaluations it ran
    (`evaluations`), so what the receipt says was run can be checked against what was.
    """

    def __init__(self, label: str, impl: str, n_vocab: int, architecture: str, record: dict[str, Any]) -> None:
        self.label, self.impl = label, impl  # label: a spec's (numpy, llama-type_k-f16) or XCHECK_LABEL; impl: kind
        self.n_vocab, self.architecture = n_vocab, architecture
        self.record = record
        self.evaluations = 0

    def evaluate(self, tokens: list[int], n_new: int, count: int) -> list[float]:
        """Durations (seconds) of `count` evaluations of greedy(tokens, n_new)."""
        seconds = self._evaluate(tokens, n_new, count)
        self.evaluations += len(seconds)
        return seconds

    @abc.abstractmethod
    def _evaluate(self, tokens: list[int], n_new: int, count: int) -> list[float]: ...

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """The processes doing the lane's timed work (their CPU waiting is recorded per figure)."""

    @abc.abstractmethod
    def close(self) -> dict[str, Any]:
        """Release the implementation; returns peak-memory facts for the receipt."""


class InProcessLane(Lane):
    """An engine in this process (the numpy engine); tests wrap `engine` to change what is timed."""

    def __init__(self, label: str, engine: Engine, record: dict[str, Any], reset_rss: bool) -> None:
        super().__init__(label, "numpy", engine.n_vocab, engine.architecture, record)
        self.engine: Engine | None = engine
        self._reset_rss = reset_rss

    def _evaluate(self, tokens: list[int], n_new: int, count: int) -> list[float]:
        if self.engine is None:
            raise UsageError(f"the {self.label} lane is closed")
        return time_greedy(self.engine, tokens, n_new, count)

    def pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> dict[str, Any]:
        hwm = _status_kb("self", "VmHWM") if self._reset_rss else None
        self.engine = None
        gc.collect()
        if hwm is not None:
            return {"peak_rss_bytes": hwm, "rss_method": "VmHWM of the harness process, reset before loading"}
        import resource

        return {
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_method": "ru_maxrss of the harness process (whole lifetime)",
        }


def open_numpy(model_path: Path, spec: ImplSpec | None = None) -> InProcessLane:
    """The numpy engine in this process, opened through the registry (spec `numpy[:dtype=...]`, default float32);
    peak RSS is this process's VmHWM, reset before loading."""
    from parity.engines.numpy.impl import NumpyImplementation
    from parity.engines.registry import OpenContext, open_implementation

    spec = spec or ImplSpec("numpy")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    impl = open_implementation(spec, OpenContext(model=model_path))
    load = time.perf_counter() - t0
    assert isinstance(impl, NumpyImplementation)
    engine = impl.engine  # timed directly: the in-process lane calls greedy with nothing in between
    return InProcessLane(spec.label, engine, {"load_s": load, "config": {"dtype": engine.dtype}}, reset)


class WorkerLane(Lane):
    """A C++ backend in a worker process, timed there; peak RSS is the worker's VmHWM read before it exits."""

    def __init__(
        self, label: str, impl: str, worker: Worker, model: RemoteModel, info: dict[str, Any], record: dict[str, Any]
    ) -> None:
        super().__init__(label, impl, int(info["n_vocab"]), str(info["architecture"]), record)
        self.worker, self.model = worker, model

    def _evaluate(self, tokens: list[int], n_new: int, count: int) -> list[float]:
        return self.model.time_greedy(tokens, n_new, count)

    def pids(self) -> list[int]:
        return [self.worker.pid]

    def close(self) -> dict[str, Any]:
        hwm = _status_kb(self.worker.pid, "VmHWM")
        self.worker.close()
        return {"peak_rss_bytes": hwm, "rss_method": "VmHWM of the worker process before exit"}


def open_cpp(
    label: str, impl: str, p: build.BuildPlan, model_path: Path, params: BackendParams, log_dir: Path
) -> WorkerLane:
    """A C++ backend in a worker process (parity.backends.worker), evaluations timed inside it."""
    t0 = time.perf_counter()
    w = Worker(label, p.bridge_path, log_dir=log_dir)
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        model = RemoteModel(w, str(model_path), params)
        info = model.info()
        load = time.perf_counter() - t1
        trips = []
        for _ in range(20):  # the round trip of a trivial call: NOT part of the figures, shown for reference
            t2 = time.perf_counter()
            w.ping()
            trips.append(time.perf_counter() - t2)
    except BaseException:
        w.close()
        raise
    receipt = build.read_receipt(p)
    record = {
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
    }
    return WorkerLane(label, impl, w, model, info, record)


class ExternalLane(Lane):
    """An engine brought by the user (`cmd:`, `py:`): parity.engines.external.CommandImplementation, one process
    speaking protocol v2 for the whole bench. Each evaluation is its `greedy(tokens, n_new)` timed in this process:
    the request, the engine's work, the reply and its decoding - the protocol is part of the figure, because that
    is what using the engine through parity costs. An engine with the `greedy` capability answers one `greedy`
    request per evaluation; one without gets a `logits` request per step (parity takes the argmax of the last row),
    of the whole sequence so far, as `parity run` decodes it. Peak RSS: the engine process's VmHWM before it exits.
    """

    def __init__(
        self, label: str, engine: CommandImplementation, n_vocab: int, architecture: str, record: dict[str, Any]
    ) -> None:
        super().__init__(label, engine.kind, n_vocab, architecture, record)
        self.engine = engine

    def _evaluate(self, tokens: list[int], n_new: int, count: int) -> list[float]:
        return time_greedy(self.engine, tokens, n_new, count)

    def pids(self) -> list[int]:
        return [self.engine.proc.pid]

    def close(self) -> dict[str, Any]:
        hwm = _status_kb(self.engine.proc.pid, "VmHWM") if self.engine.proc.poll() is None else None
        self.engine.close()
        return {"peak_rss_bytes": hwm, "rss_method": "VmHWM of the engine process before exit"}


THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def thread_env(n: int) -> Iterator[dict[str, str]]:
    """The conventional thread-count variables set to `n` where the user has not set them, while an external
    engine starts (it inherits them); yields what the engine sees. parity cannot set an external engine's threads
    otherwise, and a BLAS spinning 2 threads on a shared 2-core machine made the echo engine's pp 75x slower."""
    added = {k: str(n) for k in THREAD_ENV if k not in os.environ}
    os.environ.update(added)
    try:
        yield {k: os.environ[k] for k in THREAD_ENV}
    finally:
        for k in added:
            os.environ.pop(k, None)


def open_external(spec: LaneSpec) -> ExternalLane:
    """A `cmd:`/`py:` implementation opened through the registry (parity.engines.registry), started with
    `thread_env(spec.threads)`; its vocabulary is the width of the logits it returns for one token (an untimed
    `logits` request). The architecture is the model's, not the engine's: bench_model reads it (once per model)
    when no other lane reports it."""
    from parity.engines.external import CommandImplementation
    from parity.engines.registry import OpenContext, open_implementation

    t0 = time.perf_counter()
    with thread_env(spec.threads) as env:
        impl = open_implementation(
            spec.impl, OpenContext(model=spec.model_path, log_dir=spec.log_dir, log_name=f"bench-{spec.label}")
        )
    try:
        load = time.perf_counter() - t0
        assert isinstance(impl, CommandImplementation)
        n_vocab = int(impl.logits([0]).shape[1])
        record = {"load_s": load, "config": {"thread_env": env}, "implementation": impl.describe()}
    except BaseException:
        impl.close()
        raise
    return ExternalLane(spec.label, impl, n_vocab, "", record)


@dataclass(frozen=True)
class LaneSpec:
    """What to open: an implementation (`impl`, its build plan; None for numpy, cmd, py) on a model, as lane `label`;
    `params`: a C++ lane's context parameters (spec applied); `threads`: what an external engine is asked for
    (thread_env)."""

    label: str
    impl: ImplSpec
    plan: build.BuildPlan | None
    model_path: Path
    params: BackendParams | None
    log_dir: Path
    threads: int = 1


def open_lane(spec: LaneSpec) -> Lane:
    """The lane `parity bench` measures for `spec` (its default lane opener)."""
    if spec.impl.kind == "numpy":
        return open_numpy(spec.model_path, spec.impl)
    if spec.impl.kind in ("cmd", "py"):
        return open_external(spec)
    if spec.plan is None or spec.params is None:
        raise UsageError(f"the {spec.label} lane needs a build plan and context parameters")
    return open_cpp(spec.label, spec.impl.kind, spec.plan, spec.model_path, spec.params, spec.log_dir)


LaneOpener = Callable[[LaneSpec], Lane]


@dataclass
class Figure:
    """How one metric of one lane was measured: samples (tokens/s) and the evaluations behind them."""

    n_tokens: int  # tokens per evaluation: the prompt (pp) or the generated tokens (tg)
    evals_per_sample: int = 1
    warmup_evals: int = 0  # untimed evaluations: calibration and one before every sample
    timed_evals: int = 0
    samples: list[float] = field(default_factory=list)
    cpu_ns: list[int] = field(default_factory=lambda: [0, 0])  # (on a CPU, waiting) during the timed samples
    cpu_known: bool = True
    psi_us: list[int] = field(default_factory=lambda: [0, 0])  # (machine stalled, wall) during the timed samples
    psi_known: bool = True

    def add_pressure(self, before: int | None, after: int | None, wall_us: int) -> None:
        """Add one sample's machine-wide CPU pressure (host.cpu_pressure_us before and after it)."""
        if before is None or after is None:
            self.psi_known = False
            return
        self.psi_us[0] += max(0, after - before)
        self.psi_us[1] += max(0, wall_us)

    @property
    def cpu_pressure(self) -> float | None:
        """The fraction of the timed samples' wall time during which some task of the machine waited for a CPU."""
        return min(1.0, self.psi_us[0] / self.psi_us[1]) if self.psi_known and self.psi_us[1] > 0 else None

    def add_cpu(self, before: tuple[int, int] | None, after: tuple[int, int] | None) -> None:
        """Add one sample's scheduler times (cpu_times before and after it)."""
        if before is None or after is None:
            self.cpu_known = False
            return
        self.cpu_ns[0] += max(0, after[0] - before[0])
        self.cpu_ns[1] += max(0, after[1] - before[1])

    @property
    def cpu_wait(self) -> float | None:
        """The fraction of the timed samples' runnable time the lane spent waiting for a CPU (None: unknown)."""
        total = sum(self.cpu_ns)
        return self.cpu_ns[1] / total if self.cpu_known and total > 0 else None

    def stats(self) -> dict[str, Any]:
        """gate.summarize of the samples, plus what ran and how long it waited for a CPU."""
        out = {
            **gate.summarize(self.samples),
            "evals_per_sample": self.evals_per_sample,
            "warmup_evals": self.warmup_evals,
            "timed_evals": self.timed_evals,
        }
        if self.cpu_wait is not None:
            out["cpu_wait"] = self.cpu_wait
        if self.cpu_pressure is not None:
            out["cpu_pressure"] = self.cpu_pressure
        return out


def workload(metric: str, ids: list[int], gen_tokens: int) -> tuple[list[int], int, int]:
    """(tokens, n_new, tokens counted) of one evaluation: pp evaluates the whole prompt in one batch and
    produces one token; tg produces `gen_tokens` tokens one evaluation at a time from one token at depth 0."""
    return (ids, 1, len(ids)) if metric == "pp" else (ids[:1], gen_tokens, gen_tokens)


def calibrate(
    lanes: Sequence[Lane], prompt_tokens: int, gen_tokens: int, min_sample_s: float = MIN_SAMPLE_S
) -> dict[str, dict[str, Figure]]:
    """Warm every lane up and choose its evaluations per sample, so a sample lasts at least `min_sample_s`.

    One untimed warm-up evaluation (caches, thread pools, first-touch pages), then single evaluations are
    timed until they add up to half of `min_sample_s` (at least one): evaluations per sample =
    ceil(min_sample_s / their median). A tiny model's 1.5 ms evaluation thus becomes a sample of about 30
    evaluations, which one scheduler time slice (a few ms on a shared machine) cannot dominate.
    All of these count as warm-up evaluations.
    """
    ids = prompt_ids(prompt_tokens, min(lane.n_vocab for lane in lanes))
    out: dict[str, dict[str, Figure]] = {lane.label: {} for lane in lanes}
    for metric in gate.METRICS:
        tokens, n_new, n_tokens = workload(metric, ids, gen_tokens)
        for lane in lanes:
            lane.evaluate(tokens, n_new, 1)
            probe: list[float] = []
            while not probe or (sum(probe) < min_sample_s / 2 and len(probe) < MAX_EVALS_PER_SAMPLE):
                probe += lane.evaluate(tokens, n_new, 1)
            per_eval = statistics.median(probe)
            k = math.ceil(min_sample_s / per_eval) if per_eval > 0 else MAX_EVALS_PER_SAMPLE
            out[lane.label][metric] = Figure(n_tokens, max(1, min(k, MAX_EVALS_PER_SAMPLE)), 1 + len(probe))
    return out


def measure(
    lanes: Sequence[Lane],
    figures: dict[str, dict[str, Figure]],
    prompt_tokens: int,
    gen_tokens: int,
    reps: int,
    between: Callable[[], object] | None = None,
) -> dict[str, dict[str, Figure]]:
    """`reps` interleaved rounds of pp, then of tg, over every lane; adds the samples to `figures` (calibrate).

    In a round each lane runs one untimed warm-up evaluation (the other lanes' work evicted its caches;
    llama-bench too warms up once before its repetitions), then one sample: `evals_per_sample` evaluations,
    each timed, sample = tokens x evaluations / their summed time. `between` (llama-bench's invocation)
    runs after each round of prompt processing.
    """
    ids = prompt_ids(prompt_tokens, min(lane.n_vocab for lane in lanes))
    for metric in gate.METRICS:
        tokens, n_new, _ = workload(metric, ids, gen_tokens)
        for _ in range(reps):
            for lane in lanes:
                fig = figures[lane.label][metric]
                lane.evaluate(tokens, n_new, 1)
                fig.warmup_evals += 1
                before, psi, t0 = cpu_times(lane.pids()), cpu_pressure_us(), time.perf_counter()
                seconds = lane.evaluate(tokens, n_new, fig.evals_per_sample)
                fig.add_cpu(before, cpu_times(lane.pids()))
                fig.add_pressure(psi, cpu_pressure_us(), int((time.perf_counter() - t0) * 1e6))
                fig.timed_evals += len(seconds)
                fig.samples.append(fig.n_tokens * len(seconds) / sum(seconds))
            if between is not None and metric == "pp":
                between()
    return figures
