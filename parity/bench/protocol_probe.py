"""The protocol overhead figure of `parity bench`: seconds to move one Gemma-sized logits reply through protocol v2.

A real child process (`python -m parity.engines.pyhost parity.bench.protocol_probe:zeros`, the py: kind) answers
`logits` requests with zeros of shape [len(tokens), VOCAB] float32; parity reads them as it reads any engine's
(parity.engines.external.CommandImplementation.logits: parity.engines.protocol's Reader over a real pipe, then
the shape and finiteness checks). What is timed is the whole request: header out, the engine's reply (encoding
and writing 72 x 262144 x 4 = 75.5 MB), reading and decoding it. Nothing is subtracted: the engine's own work is
allocating zeros, negligible beside the copies and the pipe. The bar (issue 13): at most BAR_S on the bench's
machine, median of SAMPLES requests; `parity bench` fails (exit 1) above it, unless the two processes waited
for a CPU so long that the median without that wait (median x (1 - cpu_wait)) is within the bar: then the verdict
is "noisy" (too noisy to judge, exit 7; parity.bench.noise).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from parity.bench.host import cpu_pressure_us, cpu_times

POSITIONS = 72  # Gemma 3 270M, a 72-position check
VOCAB = 262144  # Gemma 3's vocabulary
BAR_S = 0.25
SAMPLES = 7
WARMUP = 1
TARGET = "parity.bench.protocol_probe:zeros"


class Zeros:
    """An engine whose logits are zeros of the asked length over VOCAB (its cost: one allocation)."""

    def __init__(self, vocab: int = VOCAB) -> None:
        self.vocab = vocab

    def describe(self) -> dict[str, str]:
        return {"name": "protocol-probe", "version": "1"}

    def logits(self, tokens: list[int]) -> np.ndarray:
        return np.zeros((len(tokens), self.vocab), dtype=np.float32)


def zeros(model_path: str | None = None) -> Zeros:
    """The pyhost factory (`py:parity.bench.protocol_probe:zeros`); the model is not read."""
    return Zeros()


def measure(
    positions: int = POSITIONS,
    samples: int = SAMPLES,
    bar_s: float = BAR_S,
    log_dir: Path | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Time `samples` logits requests of `positions` tokens (after WARMUP untimed ones) through a pyhost child;
    the receipt's `protocol_overhead` record, verdict `pass` when the median is at most `bar_s`."""
    from parity.engines.external import CommandImplementation
    from parity.engines.spec import ImplSpec

    spec = ImplSpec("py", (("target", TARGET),))
    tokens = list(range(positions))
    seconds: list[float] = []
    ran = waited = stalled = 0
    known = True
    psi_known = True
    wall = 0.0
    with CommandImplementation(spec, Path("-"), timeout=timeout, log_dir=log_dir, log_name="protocol-probe") as impl:
        pids = [os.getpid(), impl.proc.pid]
        for i in range(WARMUP + samples):
            before, psi = cpu_times(pids), cpu_pressure_us()
            t0 = time.perf_counter()
            out = impl.logits(tokens)
            dt = time.perf_counter() - t0
            after, psi_after = cpu_times(pids), cpu_pressure_us()
            if before is None or after is None:
                known = False
            elif i >= WARMUP:
                ran, waited = ran + after[0] - before[0], waited + after[1] - before[1]
            if psi is None or psi_after is None:
                psi_known = False
            elif i >= WARMUP:
                stalled, wall = stalled + psi_after - psi, wall + dt * 1e6
            if out.shape != (positions, VOCAB):
                raise AssertionError(f"protocol probe: logits of shape {out.shape}, asked ({positions}, {VOCAB})")
            del out
            if i >= WARMUP:
                seconds.append(dt)
    med = statistics.median(seconds)
    wait = waited / (ran + waited) if known and ran + waited > 0 else None
    pressure = min(1.0, stalled / wall) if psi_known and wall > 0 else None
    busy = max(wait or 0.0, pressure or 0.0)
    verdict = "pass" if med <= bar_s else ("noisy" if med * (1 - busy) <= bar_s else "FAIL")
    return {
        "positions": positions,
        "vocab": VOCAB,
        "bytes": 4 * positions * VOCAB,
        "command": impl.argv,
        "samples": seconds,
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "warmup": WARMUP,
        "bar_s": bar_s,
        "verdict": verdict,
        "cpu_wait": wait,
        "cpu_pressure": pressure,
        "method": (
            "wall time of one logits request each (request out, the engine's encode and write, parity's read, "
            "decode and finiteness check) through a real pipe to a pyhost child answering zeros; nothing subtracted"
        ),
    }
