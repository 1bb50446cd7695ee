"""Backend work the main job starts early, in a background thread, while the main thread works (issue 15).

Each C++ backend runs in its own worker process, so what it does overlaps with the main process for free on
a second core; the thread here only starts it and waits on its pipe (no GIL held while waiting). Two steps
overlap this way (check/job.py):

- `start_vocab`: the worker process starts (check/prestart.py started it before the job was imported) and
  opens the model's vocabulary (seconds for a 262k vocabulary) while the main thread opens the GGUF, builds
  the numpy engine and loads the tokenizer authority. Only for a backend that is already built: one that
  needs building is built where it always was, after the input checks (a bad input never starts a build).
- `open_lane`: the lane's first worker loads the whole model under the lane's parameters while the main
  thread runs the implementation under test. Only the load: the lane's own evaluations start after it,
  so llama.cpp's threads never compete with numpy's for the cores (ggml's spin barriers slow down by
  orders of magnitude when a core is taken away).

Errors are not lost and not reordered: a future's exception is raised where the work used to run (a worker
that cannot load the model is still exit 2 in tokenization, a lane's crash still a lane error), and work
nobody collected is waited for and closed (`discard`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from parity.backends.bridge import BackendParams
from parity.backends.build import BuildPlan
from parity.backends.worker import RemoteModel, Worker
from parity.check import prestart
from parity.check.inputs import open_vocab
from parity.engines.bridged import BridgedImplementation
from parity.engines.spec import ImplSpec
from parity.options import RunOptions


def start_vocab(
    kind: str, plan: BuildPlan, model: Path, opts: RunOptions, spawned: Future[Worker] | None = None
) -> Future[tuple[Worker, RemoteModel]]:
    """Start `kind`'s worker (or take the one check/prestart.py `spawned`) and open `model`'s vocabulary in it
    (inputs.open_vocab: a refusal is exit 2)."""
    spawning = spawned if spawned is not None else prestart.spawn_worker(kind, plan, opts)

    def work() -> tuple[Worker, RemoteModel]:
        w = spawning.result()
        try:
            return w, open_vocab(w, kind, model)
        except BaseException:
            w.close()
            raise

    return prestart.in_background(work)


@dataclass
class OpenedLane:
    """A lane's reference with its model loaded in the background, and the parameters it was loaded under."""

    label: str
    params: BackendParams
    ref: Future[BridgedImplementation]
    started: float  # time.perf_counter() when the load began
    seconds: float | None = None  # how long the load took (set by the background thread)


def open_lane(
    lane: ImplSpec,
    plan: BuildPlan,
    model: Path,
    params: BackendParams,
    eval_shape: str,
    worker: Worker,
    opts: RunOptions,
    out_dir: Path,
) -> OpenedLane:
    """Load `model` in `worker` (the lane's, from tokenization) as the lane `lane` will, in the background."""
    opened = OpenedLane(lane.label, params, Future(), time.perf_counter())

    def work() -> BridgedImplementation:
        try:
            return _reference(lane, plan, model, params, eval_shape, opts, out_dir, worker)
        finally:
            opened.seconds = time.perf_counter() - opened.started

    opened.ref = prestart.in_background(work)
    return opened


def discard_vocab(f: Future[tuple[Worker, RemoteModel]]) -> None:
    """Wait for a start_vocab nobody collected and close what it started (its error, if any, is dropped:
    the error being raised instead is the one the user sees)."""
    try:
        w, vm = f.result()
    except BaseException:  # it closed its worker itself
        return
    with contextlib.suppress(BaseException):  # the worker may be dead; closing it below is what matters
        vm.close()
    w.close()


def discard_lane(opened: OpenedLane) -> None:
    """Wait for an open_lane nobody collected and close the reference it opened."""
    try:
        ref = opened.ref.result()
    except BaseException:  # BridgedImplementation closed its worker itself
        return
    ref.close()


def open_lanes(
    refs: list[ImplSpec],
    plans: dict[str, BuildPlan],
    spare: dict[str, Worker],
    models: Callable[[str], Path],
    params_of: Callable[[ImplSpec], BackendParams],
    opts: RunOptions,
) -> dict[str, OpenedLane]:
    """open_lane for the first lane of each plan key, in the worker its tokenization started (taken from
    `spare`), keyed by lane label. `models(kind)` is the file a lane of that kind loads."""
    opened: dict[str, OpenedLane] = {}
    for lane in refs:
        worker = spare.pop(lane.plan_key, None)
        if worker is None:  # a later lane of the same plan key starts its own worker, as before
            continue
        shape = lane.get("eval_shape") or opts.eval_shape
        opened[lane.label] = open_lane(
            lane, plans[lane.plan_key], models(lane.kind), params_of(lane), shape, worker, opts, Path(opts.out_dir)
        )
    return opened


def lane_reference(
    opened: OpenedLane | None,
    lane: ImplSpec,
    plan: BuildPlan,
    model: Path,
    params: BackendParams,
    eval_shape: str,
    opts: RunOptions,
    out_dir: Path,
    worker: Callable[[], Worker | None],
) -> tuple[BridgedImplementation, float | None]:
    """The lane's reference: the one opened in the background when it was loaded under `params`, else (that
    one closed) a new one in `worker()` (a started worker, or None for a new one); with the seconds the
    background load took (None when it was not used). A worker's failure raises WorkerError here."""
    if opened is not None and opened.params == params:
        return opened.ref.result(), opened.seconds
    if opened is not None:
        discard_lane(opened)
    return _reference(lane, plan, model, params, eval_shape, opts, out_dir, worker()), None


def _reference(
    lane: ImplSpec,
    plan: BuildPlan,
    model: Path,
    params: BackendParams,
    eval_shape: str,
    opts: RunOptions,
    out_dir: Path,
    worker: Worker | None,
) -> BridgedImplementation:
    """The lane's reference as job.run_lane opens it (its log beside the run's, named after the lane)."""
    return BridgedImplementation(
        lane,
        plan,
        model,
        params,
        eval_shape=eval_shape,
        log_dir=out_dir / "logs",
        log_name=lane.label,
        verbose=opts.verbose,
        timeout=opts.timeout,
        worker=worker,
    )


@dataclass
class Background:
    """What prepare() started in the background and has not handed on yet (discarded when it fails)."""

    started: dict[str, Future[tuple[Worker, RemoteModel]]] = field(default_factory=dict)  # by plan key
    opened: dict[str, OpenedLane] = field(default_factory=dict)  # by lane label
    spawned: dict[str, Future[Worker]] = field(default_factory=dict)  # check/prestart.py's, by plan key

    def start_vocabs(self, by_key: dict[str, ImplSpec], models: Callable[[str], Path], opts: RunOptions) -> None:
        """start_vocab for each plan key whose backend is built (in the worker prestart spawned, if any)."""
        for key, r in by_key.items():
            if (built := prestart.built_plan(r.kind, r.get("source"))) is not None:
                spawned = self.spawned.pop(key, None)
                self.started[key] = start_vocab(r.kind, built, models(r.kind), opts, spawned)

    def discard(self) -> None:
        prestart.discard(self.spawned)
        while self.started:
            discard_vocab(self.started.popitem()[1])
        while self.opened:
            discard_lane(self.opened.popitem()[1])
