"""The decision rule of `parity bench`: pass, FAIL, or too noisy to judge (one rule for the baseline gate, the
same-run ratios and the llama-bench cross-check).

Each side of a comparison is a list of samples (tokens/s, or a same-run ratio). On a log scale:

    d     = log(median_current / median_baseline)           (the change; 0 = unchanged)
    sigma = max(1.4826 * MAD, IQR / 1.349)                  (the log samples' spread, two robust estimates of
                                                              one sigma: MAD, not stdev, so one pre-empted sample
                                                              barely moves it; the interquartile range (inclusive
                                                              quartiles), so a second mode holding 2 of 5 samples
                                                              does - seen on an idle 2-core VM: llama.cpp's pp
                                                              samples sat near 18k or 31k tokens/s, 3 + 2, and a
                                                              MAD of the 3 FAILed unchanged code at -40%)
    se    = 1.2533 * sigma / sqrt(n)                         (standard error of a median)
    wait  = -log(1 - max(cpu_wait, cpu_pressure))           (how busy the CPU was: cpu_wait is the fraction of the
                                                              lane's runnable time spent waiting for a CPU, from
                                                              /proc/<pid>/task/*/schedstat; cpu_pressure the
                                                              fraction of the wall time some task of the machine
                                                              waited, Linux PSI: an oversubscribed machine slows a
                                                              lane that never waits, through shared caches, memory
                                                              and SMT siblings; see bench.host)
    band  = Z * sqrt(se_base^2 + se_cur^2) + wait_base + wait_cur      (half-width, Z = 2: about 95 %)
    tau   = -log(1 - threshold)                              (threshold 10 %: tau = 0.105)

    too noisy  when band > tau, or either side has fewer than MIN_SAMPLES samples
    FAIL       when d < -tau (the gate: a drop), |d| > tau (the cross-check: either way)
    pass       otherwise

Why this resolves a 20 % slowdown: when band <= tau, an unchanged figure's estimate lies within tau of 0 and a
figure 20 % slower (d = -0.223) lies below -0.223 + tau = -0.118 < -tau, so each lands on its own side of the
threshold; a band wider than tau cannot tell the two apart, and the verdict says so instead of guessing.
Waiting for a CPU lowers a throughput by up to that fraction, which dispersion does not show when every sample
waited alike (a CPU burner on every core), so it widens the band: a busy machine is "too noisy", never a
regression.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Z = 2.0
MIN_SAMPLES = 3
SE_MEDIAN = 1.2533  # se(median) = 1.2533 sigma / sqrt(n) for normal samples
MAD_SIGMA = 1.4826  # sigma = 1.4826 MAD for normal samples
IQR_SIGMA = 1.349  # sigma = IQR / 1.349 for normal samples
MAX_WAIT = 0.99
PASS, FAIL, NOISY = "pass", "FAIL", "noisy"


@dataclass(frozen=True)
class Estimate:
    """One side of a comparison on a log scale."""

    log_median: float
    se: float  # standard error of log_median (inf with fewer than MIN_SAMPLES samples)
    wait: float  # -log(1 - cpu_wait); 0 when not measured
    n: int


def estimate(samples: Sequence[float], cpu_wait: float | None = None, cpu_pressure: float | None = None) -> Estimate:
    """The log-median of positive samples, its standard error and the contention term."""
    logs = [math.log(x) for x in samples if x > 0]
    if not logs:
        return Estimate(0.0, math.inf, 0.0, 0)
    med = statistics.median(logs)
    n = len(logs)
    mad = statistics.median(abs(x - med) for x in logs)
    if n >= MIN_SAMPLES:
        q1, _, q3 = statistics.quantiles(logs, n=4, method="inclusive")
        se = SE_MEDIAN * max(MAD_SIGMA * mad, (q3 - q1) / IQR_SIGMA) / math.sqrt(n)
    else:
        se = math.inf
    wait = -math.log(1.0 - min(max(cpu_wait or 0.0, cpu_pressure or 0.0, 0.0), MAX_WAIT))
    return Estimate(med, se, wait, n)


def of_stats(stats: dict[str, Any]) -> Estimate:
    """The estimate of a receipt figure (gate.summarize stats, optionally with cpu_wait)."""
    return estimate(stats["samples"], stats.get("cpu_wait"), stats.get("cpu_pressure"))


@dataclass(frozen=True)
class Decision:
    """One comparison: change and band as relative figures (exp(x) - 1), the verdict and why."""

    change: float  # current / baseline - 1 (of the medians)
    band: float  # 1 - exp(-band): the band as a relative drop, comparable with the threshold; inf without an estimate
    allowed: float  # the threshold (relative)
    status: str  # pass | FAIL | noisy
    reason: str

    @property
    def passed(self) -> bool:
        return self.status == PASS


def _relative(x: float) -> float:
    return math.expm1(x) if math.isfinite(x) and x < 700 else math.inf


def decide(base: Estimate, cur: Estimate, threshold: float, two_sided: bool = False) -> Decision:
    """Apply the rule (module docstring) to `cur` against `base`."""
    tau = -math.log(1.0 - threshold)
    d = cur.log_median - base.log_median
    band = Z * math.hypot(base.se, cur.se) + base.wait + cur.wait
    change, width = _relative(d), -math.expm1(-band)  # noisy exactly when width > threshold
    if min(base.n, cur.n) < MIN_SAMPLES:
        return Decision(change, math.inf, threshold, NOISY, f"fewer than {MIN_SAMPLES} samples: no noise estimate")
    if band > tau:
        why = f"noise band ±{width:.1%} is wider than the {threshold:.0%} it must resolve"
        if base.wait + cur.wait > tau / 2:
            why += " (the CPU was busy: tasks waited for a core)"
        return Decision(change, width, threshold, NOISY, why)
    beyond = abs(d) > tau if two_sided else d < -tau
    if beyond:
        return Decision(
            change, width, threshold, FAIL, f"{change:+.1%} is beyond ±{threshold:.0%} (noise ±{width:.1%})"
        )
    return Decision(change, width, threshold, PASS, f"{change:+.1%} within {threshold:.0%} (noise ±{width:.1%})")
