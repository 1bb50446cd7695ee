"""The two sides of a suite (implementation, reference) as picklable recipes, and one item evaluated on both.

A `Side` is everything needed to open an implementation of the registry (parity.engines.registry) in another
process: a local worker process or a Ray actor opens both sides once and keeps them (models loaded once per
worker). `Pair.evaluate` runs one item: the reference's logits at the scored positions (`Implementation.logits_at`:
the bridged llama.cpp computes the output head for those rows only), then the implementation's, reduced at
once to per-position statistics (parity.suite.stats.compute); the logit rows are dropped before the next
item, so memory is bounded by one item.

A side that fails (a C++ crash or hang: WorkerError; an external engine's garbage) fails that item only: the
pair is closed and reopened for the next item.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.backends.bridge import BackendParams
from parity.backends.build import BuildPlan
from parity.engines import spec as impl_specs
from parity.engines.base import Implementation
from parity.engines.registry import OpenContext, open_implementation
from parity.errors import ParityError
from parity.suite import stats, verdicts
from parity.suite.inputs import Item


@dataclass(frozen=True)
class Side:
    """How to open one side anywhere: its spec, model file, build plan and context parameters."""

    role: str  # "implementation" | "reference"
    spec: str
    model: str
    plan: BuildPlan | None
    params: BackendParams | None
    dtype: str = "float32"
    eval_shape: str = "batch"
    timeout: float = 600.0
    log_dir: str | None = None
    verbose: bool = False
    evidence: bool = False  # the reference of a calibrated suite: each item also keeps verdicts.evidence()

    def open(self, worker_name: str = "") -> Implementation:
        s = impl_specs.parse(self.spec)
        if s.get("model"):  # resolved where the suite started: a Ray actor's working directory is another
            s = impl_specs.ImplSpec(s.kind, tuple((k, self.model if k == "model" else v) for k, v in s.options))
        ctx = OpenContext(
            Path(self.model),
            params=self.params,
            plan=self.plan,
            eval_shape=self.eval_shape,
            dtype=self.dtype,
            log_dir=Path(self.log_dir) if self.log_dir else None,
            log_name=f"suite-{self.role}-{s.label}{worker_name}",
            verbose=self.verbose,
            timeout=self.timeout,
        )
        return open_implementation(s, ctx)


@dataclass(frozen=True)
class Outcome:
    """One item's result: its statistics (None on error), what failed, and how long both sides took."""

    index: int
    values: stats.PositionStats | None
    error: str | None
    seconds: float
    describe: dict[str, dict[str, Any]] | None = None
    evidence: dict[str, Any] | None = None  # parity.suite.verdicts.evidence() (calibrated runs)


class Pair:
    """Both sides opened (lazily, once) in this process; reopened after a side failed."""

    def __init__(self, impl: Side, ref: Side, mode: str, worker_name: str = "") -> None:
        self.sides = (ref, impl)
        self.mode = mode
        self.worker_name = worker_name
        self._open: tuple[Implementation, Implementation] | None = None
        self._described = False

    def _ensure(self) -> tuple[Implementation, Implementation]:
        if self._open is None:
            ref = self.sides[0].open(self.worker_name)
            try:
                impl = self.sides[1].open(self.worker_name)
            except BaseException:
                ref.close()
                raise
            self._open = (ref, impl)
        return self._open

    def evaluate(self, item: Item) -> Outcome:
        """Reference then implementation on the item's tokens, reduced to per-position statistics."""
        t0 = time.perf_counter()
        try:
            ref, impl = self._ensure()
            positions = stats.scored_positions(len(item.tokens), self.mode)
            ref_rows = _rows(ref.logits_at(item.tokens, positions), positions, ref.spec)
            impl_rows = _rows(impl.logits_at(item.tokens, positions), positions, impl.spec)
            values = stats.compute(ref_rows, impl_rows, item.tokens, mode=self.mode, item=item.index)
            evidence = verdicts.evidence(ref_rows, impl_rows, values) if self.sides[0].evidence else None
        except ParityError as exc:  # a side failed (worker crash/hang, bad reply): this item only
            self.close()
            return Outcome(item.index, None, _one_line(exc), time.perf_counter() - t0)
        described = None
        if not self._described:  # once per worker: what the receipt records of each side
            described = {"reference": _describe(ref), "implementation": _describe(impl)}
            self._described = True
        return Outcome(item.index, values, None, time.perf_counter() - t0, described, evidence)

    def close(self) -> None:
        if self._open is not None:
            opened, self._open = self._open, None
            for side in opened:
                with contextlib.suppress(ParityError):
                    side.close()


def _one_line(exc: ParityError) -> str:
    """The error's first line and its fix (a worker's error carries its stderr tail after the first line)."""
    first = (exc.message.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" + (f" (fix: {exc.fix})" if exc.fix else "")


def _describe(impl: Implementation) -> dict[str, Any]:
    try:
        return dict(impl.describe())
    except ParityError as exc:
        return {"spec": impl.spec, "describe_error": str(exc)}


def _rows(logits: np.ndarray, positions: np.ndarray, spec: str) -> np.ndarray:
    """A side's rows of the scored positions, checked: one row per position, every value finite."""
    from parity.errors import WorkerError

    arr = np.asarray(logits)
    shape_ok = arr.ndim == 2 and arr.shape[0] == len(positions)
    # every value finite <=> max and min finite (a NaN anywhere makes both NaN); no n x vocab boolean temporary
    if not shape_ok or (arr.size and not np.isfinite([arr.max(), arr.min()]).all()):
        what = f"shape {arr.shape}" if not shape_ok else "non-finite values"
        raise WorkerError(f"{spec} returned unusable logits for {len(positions)} scored positions ({what})")
    return arr
