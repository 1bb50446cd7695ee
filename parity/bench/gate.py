"""Benchmark statistics, baselines and the regression gate of `parity bench`.

Statistics: every figure is a list of per-repetition samples (tokens/s) summarised as median, min, max,
mean, standard deviation, *spread* = (max - min) / median (the width of the repetitions, reported) and
*mad* = median(|x - median|) / median (the relative median absolute deviation, reported; the rule uses the MAD
of the log samples, because one repetition pre-empted by another job on a shared machine moves the range a lot
and the MAD hardly).

The rule (one rule for absolute throughputs, same-run ratios and the llama-bench cross-check) lives in
parity.bench.noise: the change of the medians on a log scale against a noise band made of the samples' own
dispersion (standard error of each median from its MAD) and the CPU time the lanes were denied (cpu_wait);
pass, FAIL beyond THRESHOLD (10 %), or "noisy" (too noisy to judge, exit 7) when the band is wider than the
threshold. A sample is never one short evaluation: our lanes time enough back-to-back evaluations for a sample
to last parity.bench.lanes.MIN_SAMPLE_S (llama-bench: as many repetitions per invocation), so one scheduler
time slice on a shared machine cannot dominate it. Ratios (e.g. numpy ÷ llama.cpp prompt throughput) are
computed per repetition from interleaved measurements, so machine load that slows both implementations
cancels out; they are gated by the same rule.

Baselines: `baselines/<YYYYmmdd>-<machine>.json` (directory: PARITY_BASELINE_DIR, else <project>/baselines);
a plain run compares with the newest baseline of the same machine slug whose receipt version (how samples
are taken), settings (prompt and generation lengths, threads) and set of (model SHA-256, implementation)
pairs equal the current run's.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parity.bench import noise
from parity.compare import receipts
from parity.core import paths
from parity.errors import UsageError

THRESHOLD = 0.10
METRICS = ("pp", "tg")
BASELINE_ENV = "PARITY_BASELINE_DIR"
SCHEMA_PATH = paths.schema_path("bench.schema.json")  # bench receipts and baselines


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, mean, stdev, spread, mad and upper quartile (q75) of per-sample figures."""
    if not samples:
        raise ValueError("no samples to summarize")
    xs = [float(x) for x in samples]
    med = statistics.median(xs)
    lo, hi = min(xs), max(xs)
    return {
        "samples": xs,
        "median": med,
        "min": lo,
        "max": hi,
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "spread": (hi - lo) / med if med > 0 else 0.0,
        "mad": statistics.median(abs(x - med) for x in xs) / med if med > 0 else 0.0,
        "q75": statistics.quantiles(xs, n=4, method="inclusive")[2] if len(xs) > 1 else xs[0],
    }


def ratio_samples(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repetition ratios of two interleaved measurements (repetition i of each)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"ratio of {len(numerator)} and {len(denominator)} samples: repetitions must pair up")
    return [n / d for n, d in zip(numerator, denominator, strict=True) if d > 0]


def judge(baseline: dict[str, Any], current: dict[str, Any], threshold: float = THRESHOLD) -> noise.Decision:
    """The gate: a throughput (or ratio) must not drop beyond the threshold (stats of each run; parity.bench.noise)."""
    return noise.decide(noise.of_stats(baseline), noise.of_stats(current), threshold)


def judge_agreement(reference: dict[str, Any], ours: dict[str, Any], threshold: float = THRESHOLD) -> noise.Decision:
    """The cross-check: ours must agree with the reference within the threshold, in either direction."""
    return noise.decide(noise.of_stats(reference), noise.of_stats(ours), threshold, two_sided=True)


def finite(x: float) -> float | None:
    """A figure for JSON: None for an infinite band (no noise estimate)."""
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class GateRow:
    """One line of the gate table."""

    kind: str  # throughput | ratio
    model: str
    subject: str  # implementation, or "numpy/llama" for a ratio
    metric: str  # pp | tg
    baseline: float | None
    current: float | None
    change: float | None
    allowed: float | None
    status: str  # pass | FAIL | noisy | missing (in the baseline, not measured now) | new (not in the baseline)
    band: float | None = None  # the noise band (relative half-width); None: no noise estimate
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _figures(receipt: dict[str, Any]) -> dict[tuple[str, str, str, str], tuple[str, dict[str, Any]]]:
    """(kind, model sha256, subject, metric) -> (model name, stats) for every successful figure of a receipt."""
    names = {m["sha256"]: m["name"] for m in receipt["models"]}
    out: dict[tuple[str, str, str, str], tuple[str, dict[str, Any]]] = {}
    for r in receipt["results"]:
        if r["status"] != "ok":
            continue
        for metric in METRICS:
            out[("throughput", r["model_sha256"], r["impl"], metric)] = (names[r["model_sha256"]], r[metric])
    for q in receipt["ratios"]:
        out[("ratio", q["model_sha256"], q["name"], q["metric"])] = (names[q["model_sha256"]], q["stats"])
    return out


def compare(baseline: dict[str, Any], current: dict[str, Any], threshold: float = THRESHOLD) -> list[GateRow]:
    """Gate rows for every figure of the baseline and the current run (rule in the module docstring)."""
    base, cur = _figures(baseline), _figures(current)
    rows: list[GateRow] = []
    for key in sorted(set(base) | set(cur)):
        kind, _sha, subject, metric = key
        if key not in cur:
            name, b = base[key]
            rows.append(GateRow(kind, name, subject, metric, b["median"], None, None, None, "missing"))
            continue
        name, c = cur[key]
        if key not in base:
            rows.append(GateRow(kind, name, subject, metric, None, c["median"], None, None, "new"))
            continue
        b = base[key][1]
        v = judge(b, c, threshold)
        rows.append(
            GateRow(
                kind,
                name,
                subject,
                metric,
                b["median"],
                c["median"],
                v.change,
                v.allowed,
                v.status,
                finite(v.band),
                v.reason,
            )
        )
    return rows


def gate_failed(rows: Sequence[GateRow]) -> bool:
    """A regression beyond noise, or a figure the baseline has that this run could not measure."""
    return any(r.status in ("FAIL", "missing") for r in rows)


def gate_noisy(rows: Sequence[GateRow]) -> bool:
    """Some figure could not be judged: its noise band is wider than the threshold."""
    return any(r.status == noise.NOISY for r in rows)


# ------------------------------------------------------------------------------------------- baselines


def baseline_dir() -> Path:
    """PARITY_BASELINE_DIR, else <project root>/baselines."""
    env = os.environ.get(BASELINE_ENV)
    return Path(env).expanduser().resolve() if env else paths.project_root() / "baselines"


def slugify(text: str) -> str:
    """Lower-case, alphanumerics and single dashes only (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def baseline_name(date: str, machine_slug: str) -> str:
    """`<YYYYmmdd>-<machine slug>.json`."""
    if not re.fullmatch(r"\d{8}", date):
        raise ValueError(f"baseline date must be YYYYmmdd, got {date!r}")
    return f"{date}-{machine_slug}.json"


def match_key(receipt: dict[str, Any]) -> tuple[Any, ...]:
    """What must be equal for two runs to be comparable: receipt version (how samples are taken), machine,
    settings, (model, implementation) pairs."""
    s = receipt["settings"]
    pairs = sorted((r["model_sha256"], r["impl"]) for r in receipt["results"])
    version = receipt.get("version", 1)
    return (version, receipt["machine"]["slug"], s["prompt_tokens"], s["gen_tokens"], s["threads"], tuple(pairs))


def describe_key(key: tuple[Any, ...]) -> str:
    """One-line description of a match key (for 'no matching baseline' messages)."""
    version, slug, pp, tg, threads, pairs = key
    impls = sorted({impl for _sha, impl in pairs})
    n_models = len({s for s, _ in pairs})
    return f"receipt v{version}, machine {slug}, {pp}/{tg} tokens, {threads} threads, {n_models} model(s) x {impls}"


def find_baseline(current: dict[str, Any], directory: Path | None = None) -> tuple[Path | None, str]:
    """The newest matching baseline and a sentence saying what was found (or why nothing matched)."""
    directory = directory or baseline_dir()
    slug = current["machine"]["slug"]
    candidates = sorted(directory.glob(f"*-{slug}.json")) if directory.is_dir() else []
    if not candidates:
        return None, f"no baseline for machine {slug} in {directory}"
    want = match_key(current)
    matching: list[tuple[str, Path]] = []
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if match_key(data) == want:
                matching.append((str(data.get("timestamp", "")), path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a bench baseline of this version: ignored, like a stray file
    if not matching:
        return None, (
            f"{len(candidates)} baseline(s) for machine {slug} in {directory}, none with the same settings, "
            f"models and implementations ({describe_key(want)})"
        )
    ts, path = max(matching)
    return path, f"baseline {path} ({ts})"


def load_baseline(path: Path) -> dict[str, Any]:
    """Read and validate a baseline file; UsageError naming it when it is not a bench receipt."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot read baseline {path}: {exc}", fix="delete it or write a new one with --baseline"
        ) from exc
    errors = receipts.validation_errors(data, SCHEMA_PATH)
    if errors:
        raise UsageError(f"{path} is not a valid bench baseline: {errors[0]}", fix="write a new one with --baseline")
    return data


def failure_reasons(receipt: dict[str, Any]) -> list[str]:
    """Why a bench run fails (exit 1), empty when it passes: the one rule `finish` and the report both use."""
    reasons = []
    bad = [g for g in receipt["gate"]["rows"] if g["status"] in ("FAIL", "missing")]
    if bad:
        reasons.append(f"{len(bad)} figure(s) regressed or missing vs the baseline")
    xfail = [c for c in receipt["cross_check"] if c["status"] == "FAIL"]
    if xfail:
        reasons.append(f"{len(xfail)} llama-bench cross-check(s) disagree beyond the noise")
    errors = [r for r in receipt["results"] if r["status"] == "error"]
    if errors:
        reasons.append(f"{len(errors)} implementation(s) failed during measurement (not verified)")
    probe = receipt.get("protocol_overhead")
    if probe and probe["verdict"] == "FAIL":
        reasons.append(f"protocol overhead {probe['median_s']:.3f} s above its bar of {probe['bar_s']:g} s")
    return reasons


def noisy_reasons(receipt: dict[str, Any]) -> list[str]:
    """Why a bench run cannot judge (exit 7, TooNoisy), when nothing failed: figures whose noise band is wider
    than the threshold (parity.bench.noise)."""
    reasons = []
    rows = [g for g in receipt["gate"]["rows"] if g["status"] == noise.NOISY]
    if rows:
        reasons.append(f"{len(rows)} figure(s) vs the baseline: {rows[0].get('reason') or 'noise band too wide'}")
    xnoisy = [c for c in receipt["cross_check"] if c["status"] == noise.NOISY]
    if xnoisy:
        reasons.append(f"llama-bench cross-check: {xnoisy[0].get('reason') or 'noise band too wide'}")
    probe = receipt.get("protocol_overhead")
    if probe and probe["verdict"] == noise.NOISY:
        reasons.append(f"protocol overhead {probe['median_s']:.3f} s above its bar while the CPU was busy")
    return reasons
