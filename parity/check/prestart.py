"""Backend worker processes started before the main job is even imported (issue 15: `parity run` startup).

A worker process takes ~0.3 s to start (an interpreter, numpy, the bridge library); importing the main job
(numpy, the numpy engine, jsonschema, gguf-py) takes about as long. parity.api.check() therefore spawns the
worker of each already built reference backend first, with nothing but this module, the build plan and the
worker imported, and hands the started workers to the job (check/early.py opens the vocabulary in them).

Nothing here decides anything: a spec that does not parse, a backend that is not built, a worker that fails
to start are all left to the job, which reports them in its usual order (bad input first, then preflight
and repair). A worker the job did not take is closed (`discard`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from parity.backends import build, lock
from parity.backends.worker import Worker
from parity.engines import spec as impl_specs
from parity.errors import ParityError
from parity.options import RunOptions

T = TypeVar("T")


def in_background(fn: Callable[[], T]) -> Future[T]:
    """Run `fn` in a thread of its own (it waits on a worker's pipe: no GIL held while it waits)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-early")
    try:
        return pool.submit(fn)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one task


def built_plan(backend: str, source: str | None = None) -> build.BuildPlan | None:
    """`backend`'s build plan when it is already built, else None (nothing is built or raised here: the job's
    preflight does that, after the input checks)."""
    try:
        spec = lock.get_spec(backend)
        p = build.plan(spec, lock.source_override(spec, source))
    except ParityError:
        return None
    return p if build.is_built(p) else None


def spawn_worker(kind: str, plan: build.BuildPlan, opts: RunOptions) -> Future[Worker]:
    """Start `kind`'s worker process in the background (the job's logs directory, its log level and timeout)."""

    def work() -> Worker:
        return Worker(
            kind,
            plan.bridge_path,
            log_dir=Path(opts.out_dir) / "logs",
            log_level=3 if opts.verbose else 1,
            timeout=opts.timeout,
        )

    return in_background(work)


def spawn(opts: RunOptions, references: list[str]) -> dict[str, Future[Worker]]:
    """A started worker per plan key of the reference specs whose backend is built (the first spec of a key).

    Only into an out directory an earlier run made (its logs/ exists): the options are not validated yet,
    and a run that then fails on a bad flag must not create directories (the job starts its workers itself)."""
    started: dict[str, Future[Worker]] = {}
    if not (Path(opts.out_dir) / "logs").is_dir():
        return started
    for text in references:
        try:
            ref = impl_specs.parse(text)
            if not ref.bridged or ref.plan_key in started:
                continue
            plan = built_plan(ref.kind, ref.get("source"))
        except Exception:  # whatever is wrong, the job finds it and says so in its own order
            continue
        if plan is not None:
            started[ref.plan_key] = spawn_worker(ref.kind, plan, opts)
    return started


def discard(started: dict[str, Future[Worker]]) -> None:
    """Close every worker the job did not take (waiting for its start first)."""
    while started:
        f = started.popitem()[1]
        with contextlib.suppress(BaseException):  # one that failed to start has nothing to close
            f.result().close()
