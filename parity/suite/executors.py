"""Where a suite's items are evaluated: local worker processes (default) or Ray actors (`--executor ray`).

Both keep `workers` slots, each holding both sides open for the whole run (parity.suite.sides.Pair: models
loaded once per slot), with DEPTH items queued per slot. `drive` is the one scheduling loop: it hands the
items (canonical order) to idle slots and passes each outcome on as it arrives. A slot whose process dies
(a crash in an in-process engine, a killed actor) fails its in-flight item only and is started again.

Local: `multiprocessing` (spawn) processes, each a `Pair` behind a pipe; a worker whose parent dies reads
EOF and exits. Ray: `--ray-address ADDR` / RAY_ADDRESS joins a running cluster, else a local one is started
for the run on loopback only (LOOPBACK_ENV) and stopped after it; actors need parity, the build and the models at the same
paths on every node (one machine, or a shared filesystem).
"""

from __future__ import annotations

import abc
import contextlib
import multiprocessing
import multiprocessing.connection
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from parity.errors import UsageError
from parity.suite.inputs import Item
from parity.suite.sides import Outcome, Pair, Side

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """The environment of every worker: numpy's BLAS on `threads` threads, whatever the executor.

    A numpy engine's float32 results depend on its BLAS thread count (measured: the default model's mean KLD
    moved in the 3rd digit between 1 and 2 OpenBLAS threads, and Ray sets OMP_NUM_THREADS=1 in a 1-CPU actor),
    so local workers and Ray actors pin the same count (--threads) and the suite key records it.
    """
    return {k: str(threads) for k in BLAS_ENV}


def slot_threads(threads: int, workers: int, *, explicit: bool) -> int:
    """Threads of each side in each slot: `--threads` as given, else the configured budget ([tool.parity]
    threads, PARITY_THREADS) shared by the slots, at least 1.

    Every slot evaluates at once: N slots each running the budget's threads would put N x threads busy
    threads on `threads` cores (llama.cpp's workers spin while they wait for each other), so 2 Ray actors on
    2 cores get 1 thread each (parity.bench.suite_ray measures it).
    """
    return threads if explicit else max(1, threads // max(1, workers))


class Executor(abc.ABC):
    """`workers` slots evaluating items; send() one item to an idle slot, receive() the next outcome."""

    kind = ""

    def __init__(self, impl: Side, ref: Side, mode: str, workers: int, threads: int) -> None:
        self.impl, self.ref, self.mode, self.workers, self.threads = impl, ref, mode, workers, threads

    @abc.abstractmethod
    def send(self, slot: int, item: Item) -> None: ...

    @abc.abstractmethod
    def receive(self) -> tuple[int, Outcome]:
        """The next finished (slot, outcome); a slot that died reports its item as an error and restarts."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers, "threads": self.threads}

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Items queued per slot: while the coordinator persists one outcome (~10 ms: two fsynced files), the slot is
# already computing the next; a kill loses at most DEPTH items per slot, which a resume computes again.
DEPTH = 2


def drive(
    ex: Executor, items: Sequence[Item], on_start: Callable[[Item], None], on_done: Callable[[Item, Outcome], None]
) -> None:
    """Evaluate `items` on `ex`'s slots, DEPTH in flight per slot, calling back as items start and finish."""
    pending = deque(items)
    by_index = {it.index: it for it in items}
    load = dict.fromkeys(range(ex.workers), 0)
    while pending or any(load.values()):
        while pending and min(load.values()) < DEPTH:
            slot = min(load, key=lambda s: (load[s], s))
            item = pending.popleft()
            on_start(item)
            ex.send(slot, item)
            load[slot] += 1
        slot, outcome = ex.receive()
        load[slot] -= 1
        on_done(by_index[outcome.index], outcome)


# ------------------------------------------------------------------------------------------------- local


def _serve(conn: multiprocessing.connection.Connection, impl: Side, ref: Side, mode: str, name: str) -> None:
    """A local worker: both sides opened once, one item per request, until EOF (the parent is gone) or None."""
    pair = Pair(impl, ref, mode, name)
    try:
        while True:
            try:
                item = conn.recv()
            except (EOFError, OSError):
                return
            if item is None:
                return
            try:
                conn.send(pair.evaluate(item))
            except (BrokenPipeError, OSError):
                return
    except KeyboardInterrupt:
        return
    finally:
        pair.close()


class LocalExecutor(Executor):
    kind = "local"

    def __init__(self, impl: Side, ref: Side, mode: str, workers: int, threads: int) -> None:
        super().__init__(impl, ref, mode, workers, threads)
        os.environ.update(thread_env(threads))  # inherited by the spawned workers (this process's BLAS is set up)
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = [None] * workers
        self._conns: list[multiprocessing.connection.Connection | None] = [None] * workers
        self._inflight: dict[int, deque[Item]] = {s: deque() for s in range(workers)}
        self._failed: deque[tuple[int, Outcome]] = deque()  # the rest of a dead worker's queue
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(
            target=_serve, args=(child, self.impl, self.ref, self.mode, f"-w{slot}"), name=f"parity-suite-w{slot}"
        )
        p.daemon = True
        p.start()
        child.close()
        self._procs[slot], self._conns[slot] = p, parent

    def send(self, slot: int, item: Item) -> None:
        conn = self._conns[slot]
        assert conn is not None
        self._inflight[slot].append(item)
        with contextlib.suppress(BrokenPipeError, OSError):  # the worker is gone: receive() reports it
            conn.send(item)

    def receive(self) -> tuple[int, Outcome]:
        if self._failed:
            return self._failed.popleft()
        by_conn = {id(c): s for s, c in enumerate(self._conns) if c is not None and self._inflight[s]}
        ready = multiprocessing.connection.wait([c for c in self._conns if c is not None and id(c) in by_conn])
        conn = ready[0]
        assert isinstance(conn, multiprocessing.connection.Connection)
        slot = by_conn[id(conn)]
        queue = self._inflight[slot]
        try:
            outcome: Outcome = conn.recv()  # a worker answers its requests in order
            queue.popleft()
            return slot, outcome
        except (EOFError, OSError):
            proc = self._procs[slot]
            proc.join(timeout=5)
            why = f"local worker process {proc.pid} died (exit code {proc.exitcode})"
            conn.close()
            self._start(slot)
            self._failed.extend((slot, Outcome(it.index, None, why, 0.0)) for it in queue)
            queue.clear()
            return self._failed.popleft()

    def close(self) -> None:
        for slot, conn in enumerate(self._conns):
            if conn is None:
                continue
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
            conn.close()
            self._conns[slot] = None
        for p in self._procs:
            if p is not None:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()


# --------------------------------------------------------------------------------------------------- ray


class SuiteActor:
    """A Ray actor holding both sides open (made remote by RayExecutor)."""

    def __init__(self, impl: Side, ref: Side, mode: str, name: str) -> None:
        self.pair = Pair(impl, ref, mode, name)

    def evaluate(self, item: Item) -> Outcome:
        return self.pair.evaluate(item)

    def close(self) -> None:
        self.pair.close()


# Ray resolves 127.0.0.1 to the machine's routable address unless "clusters" are off (ray_constants
# ENABLE_RAY_CLUSTER); off, the node's address is loopback and its servers listen there only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray() -> Any:
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise UsageError(
            "--executor ray needs the ray package, which is not installed", fix="pip install 'ray>=2.9'"
        ) from exc
    return ray


class RayExecutor(Executor):
    kind = "ray"

    def __init__(
        self, impl: Side, ref: Side, mode: str, workers: int, threads: int, address: str | None, verbose: bool
    ) -> None:
        super().__init__(impl, ref, mode, workers, threads)
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if not self.address:  # Ray advertises loopback as the node's address (and binds there) with this off
            os.environ.setdefault(LOOPBACK_ENV, "0")
        self.ray = ray = import_ray()
        self._started_here = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": False}
            try:
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:  # a local cluster for this run, on loopback only
                    ray.init(
                        address="local", num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, **kwargs
                    )
                    self._started_here = True
            except ConnectionError as exc:
                from parity.errors import NetworkError

                raise NetworkError(
                    f"cannot connect to the Ray cluster at {self.address}: {exc}",
                    fix="check --ray-address / RAY_ADDRESS (`ray status` on the head), or omit it to start a local one",
                ) from exc
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < workers:  # each actor takes one CPU: more would wait for ever
            raise UsageError(
                f"--workers {workers}: the Ray cluster has {cpus} CPU(s), one per actor",
                fix=f"use --workers {max(cpus, 1)} or add nodes to the cluster",
            )
        self._remote = ray.remote(num_cpus=1, max_restarts=0, runtime_env={"env_vars": thread_env(threads)})(SuiteActor)
        self._actors: list[Any] = [self._new_actor(s) for s in range(workers)]
        self._refs: dict[Any, tuple[int, Item, Any]] = {}

    def _new_actor(self, slot: int) -> Any:
        return self._remote.remote(self.impl, self.ref, self.mode, f"-ray{slot}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ray_address": self.address or "local"}

    def send(self, slot: int, item: Item) -> None:
        actor = self._actors[slot]
        self._refs[actor.evaluate.remote(item)] = (slot, item, actor)

    def receive(self) -> tuple[int, Outcome]:
        ready, _ = self.ray.wait(list(self._refs), num_returns=1)
        slot, item, actor = self._refs.pop(ready[0])
        try:
            outcome: Outcome = self.ray.get(ready[0])
            return slot, outcome
        except self.ray.exceptions.RayError as exc:  # the actor died or raised: this item only
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            first = lines[-1].strip() if lines else ""  # the exception itself, after Ray's traceback
            if self._actors[slot] is actor:  # once per failed actor, whatever it had queued
                with contextlib.suppress(Exception):
                    self.ray.kill(actor)  # it may be alive (an exception, not a crash): free its CPU
                self._actors[slot] = self._new_actor(slot)
            return slot, Outcome(item.index, None, f"Ray actor failed: {type(exc).__name__}: {first}", 0.0)

    def close(self) -> None:
        for actor in self._actors:
            with contextlib.suppress(Exception):
                self.ray.get(actor.close.remote(), timeout=60)
            self.ray.kill(actor)
        self._actors = []
        if self._started_here:
            self.ray.shutdown()
