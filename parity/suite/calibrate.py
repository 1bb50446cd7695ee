"""The reference's own variation at suite scale: the floor a calibrated suite verdict is judged by (issue 16).

parity run measures the whole floor of its one sequence (check/floor.py: the reference again one token per
decode and with weight repacking off). Doing that for every item of a suite would cost 2-3x the suite (a
stepwise pass is a decode per token). Instead:

- every item gets the rounding model of the reference's working precision on its own logits
  (compare/calibrate.py: sigma = u sqrt(n) std(logits), eps = u sqrt(n) max|logit| per position, from the
  evidence the worker keeps: parity.suite.verdicts.evidence), which costs a few passes over the scored rows;
- the floor is MEASURED with check/floor.measure (the same configurations, the same per-user cache
  ~/.cache/parity/floor) on a bounded sample: SAMPLE_ITEMS items spread evenly over the whole suite (the same
  for every shard), each cut to its first SAMPLE_TOKENS tokens. How far the measured variation exceeds the
  rounding model there (`scale`: mean KL over the model's, max |dlogit| over the model's, and the largest
  lead movement over sqrt(2) sigma at any sampled position; each the largest over the sampled items) scales
  every item's rounding model, i.e. an item's floor is max(scale, 1) x its rounding model. The ratio of the
  reference's measured variation to its rounding model is a property of its kernels and precision on this
  machine, not of the text, which is what lets a few hundred positions calibrate thousands.

The record (`measure()`) goes to the out directory (FLOOR_FILE, which `parity suite merge` reads back) and to
the receipt's `floor`. A reference that is not a C++ backend has no evaluation orders to measure: a calibrated
suite needs `--verdict fixed` there (exit 2, `check_reference`).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parity.check import floor as check_floor
from parity.core.fs import atomic_write_json
from parity.engines import spec as impl_specs
from parity.errors import ParityError, UsageError
from parity.suite.inputs import Item
from parity.suite.sides import Side

FLOOR_FILE = "floor.json"
FLOOR_VERSION = 1
SAMPLE_ITEMS = 3  # items whose floor is measured
SAMPLE_TOKENS = 64  # tokens of each (a prefix): bounds the stepwise pass (a decode per token) and the comparison


def check_reference(spec: str) -> None:
    """Exit 2 unless the reference is a C++ backend (the only kind whose evaluation orders can be varied)."""
    if not impl_specs.parse(spec).bridged:
        raise UsageError(
            f"--reference {spec}: a calibrated verdict measures the reference's own variation in llama.cpp's "
            f"evaluation orders, and {spec} is not a C++ backend",
            fix="pass --verdict fixed (with --max-mean-kld X), or a llama/bitnet reference",
        )


def sample(items: Sequence[Item], n: int = SAMPLE_ITEMS) -> list[Item]:
    """`n` items spread evenly over the suite (first and last included), by canonical index: every shard of
    one suite measures the same ones."""
    ordered = sorted(items, key=lambda it: it.index)
    if len(ordered) <= n:
        return ordered
    picks = sorted({round(j * (len(ordered) - 1) / (n - 1)) for j in range(n)}) if n > 1 else [0]
    return [ordered[i] for i in picks]


def _lead_ratio(rows: Sequence[Mapping[str, Any]]) -> float:
    """The largest movement of the reference's top-1 vs top-2 lead over the rounding model's sqrt(2) sigma."""
    out = 0.0
    for r in rows:
        sigma = float(r.get("sigma") or 0.0)
        if sigma > 0:
            out = max(out, float(r["lead_move"]) / (math.sqrt(2.0) * sigma))
    return out


def _dispersion(records: Sequence[tuple[Item, int, Mapping[str, Any]]]) -> float | None:
    """The coefficient of variation (sd / mean) of the reference's per-position KL over the rounding model's
    0.5 sigma^2, over every sampled position; None when no position moved (then judge() assumes 1)."""
    ratios = [
        float(r["kl"]) / (0.5 * float(r["sigma"]) ** 2)
        for _, _, rec in records
        for r in rec["rows"]
        if r.get("sigma") and float(r["sigma"]) > 0
    ]
    mean = sum(ratios) / len(ratios) if ratios else 0.0
    if mean <= 0:
        return None
    return math.sqrt(sum((x - mean) ** 2 for x in ratios) / len(ratios)) / mean


def _ratio(measured: float, model: float) -> float:
    return measured / model if model > 0 else 0.0


def summarize(records: Sequence[tuple[Item, int, Mapping[str, Any]]]) -> dict[str, Any]:
    """The suite floor from check/floor.measure's records of the sampled items ((item, tokens measured, record)):
    the per-sample summaries and the scales (each the largest over the samples)."""
    samples = []
    for it, n, rec in records:
        s = rec["summary"]
        samples.append(
            {
                "index": it.index,
                "id": it.id,
                "n_tokens": n,
                "mean_kl": s["mean_kl"],
                "rounding_mean_kl": s["rounding_mean_kl"],
                "max_abs": s["max_abs"],
                "rounding_max_abs": s["rounding_max_abs"],
                "max_lead_move": s["max_lead_move"],
                "top1_flips": s["top1_flips"],
                "scale": {
                    "mean_kl": _ratio(s["mean_kl"], s["rounding_mean_kl"]),
                    "max_abs": _ratio(s["max_abs"], s["rounding_max_abs"]),
                    "lead_move": _lead_ratio(rec["rows"]),
                },
                "cache_hit": bool((rec.get("cache") or {}).get("hit")),
                "seconds": rec.get("seconds"),
            }
        )
    first = records[0][2] if records else {}
    rounding = dict(first.get("rounding") or {})
    if rounding:
        rounding["relative"] = rounding["unit_roundoff"] * math.sqrt(max(int(rounding["n_matmul"]), 1))
    scale = {k: max((smp["scale"][k] for smp in samples), default=0.0) for k in ("mean_kl", "max_abs", "lead_move")}
    configs = [
        {k: c.get(k) for k in ("name", "shape", "params", "status", "reason", "moved")}
        for c in first.get("configs", [])
    ]
    return {
        "configs": configs,
        "rounding": rounding,
        "samples": samples,
        "scale": scale,
        "dispersion": _dispersion(records),
    }


def measure(ref: Side, items: Sequence[Item], model_sha256: str, out_dir: Path | None = None) -> dict[str, Any]:
    """The suite's floor record: the sampled items' floors through check/floor.measure in one reference worker
    opened here (its own process; closed after), summarized; written to out_dir/FLOOR_FILE when given.
    A reference that fails here makes the record's status `error` (every item's calibrated verdict is then an
    error naming it), never a harness crash."""
    from parity.engines.bridged import BridgedImplementation

    t0 = time.perf_counter()
    picked = sample(items)
    record: dict[str, Any] = {
        "version": FLOOR_VERSION,
        "status": "measured",
        "error": None,
        "method": (
            f"check/floor.py on {len(picked)} sampled item(s) (first {SAMPLE_TOKENS} tokens each); every item's "
            "floor is its rounding model times max(scale, 1)"
        ),
    }
    measured: list[tuple[Item, int, Mapping[str, Any]]] = []
    try:
        impl = ref.open("-floor")
        try:
            if not isinstance(impl, BridgedImplementation) or ref.plan is None or ref.params is None:
                raise UsageError(f"--reference {ref.spec} is not a C++ backend", fix="pass --verdict fixed")
            for it in picked:
                ids = list(it.tokens[:SAMPLE_TOKENS])
                rec = check_floor.measure(
                    impl,
                    functools.partial(impl.logits, ids),  # evaluated on a cache miss only
                    ids,
                    ref.params,
                    impl.eval_shape,
                    Path(ref.model),
                    model_sha256,
                    ref.plan,
                )
                measured.append((it, len(ids), rec))
        finally:
            impl.close()
    except UsageError:
        raise
    except ParityError as exc:  # the reference's worker failed (crash, hang): recorded, judged as an error
        first = (exc.message.strip().splitlines() or [""])[0]
        record.update(status="error", error=f"{type(exc).__name__}: {first}")
    record.update(summarize(measured))
    record["seconds"] = round(time.perf_counter() - t0, 4)
    if out_dir is not None:
        atomic_write_json(out_dir / FLOOR_FILE, record)
    return record


class Background:
    """measure() in a daemon thread while the items are computed (its worker is one more process: on a machine
    with a core to spare it costs no wall time); result() waits for it and re-raises what it raised."""

    def __init__(self, ref: Side, items: Sequence[Item], model_sha256: str, out_dir: Path | None) -> None:
        self._out: list[dict[str, Any]] = []
        self._exc: list[BaseException] = []

        def run() -> None:
            try:
                self._out.append(measure(ref, items, model_sha256, out_dir))
            except BaseException as exc:  # handed to result(), in the main thread
                self._exc.append(exc)

        self._thread = threading.Thread(target=run, name="parity-suite-floor", daemon=True)
        self._thread.start()

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self._exc:
            raise self._exc[0]
        return self._out[0]


def read(dirs: Sequence[Path]) -> dict[str, Any] | None:
    """The floor record of these out directories (a merge reads its shards'): the first measured one, else the
    first found (an error record), else None."""
    found = []
    for d in dirs:
        try:
            data = json.loads((d / FLOOR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == FLOOR_VERSION:
            found.append(data)
    return next((f for f in found if f.get("status") == "measured"), found[0] if found else None)
