"""Localisation for one lane (issue 14.3): capture graph tensors, measure the reference's own noise, replay.

`--locate` (opts.locate "on"): every lane, and a lane whose final logits pass still fails (exit 1) when an op's
local error exceeds its tolerance. Default ("auto"): only a lane that diverged is localised, its verdict
unchanged. `--no-locate` ("off"): never. The analysis is parity.compare.locate; this module runs the engines:

1. the lane's reference (configuration A, the lane's own parameters): its default graph tensors;
2. the reference's own noise: configurations that compute the same function (NOISE_CONFIGS), each captured
   freely (free-running noise) and teacher-forced with A's tensors (replay noise, local to each op):
   - `repack_off`: weights in their file layout instead of repacked for the CPU kernels (other kernels);
   - `ubatch_tail`: n_ubatch = n_tokens - 1, so the last token runs alone (matrix x vector kernels);
   - `dequantized` (models with non-F32 matmul weights): the same model with every weight dequantized to F32
     by the engine's own llama-quantize (exactly the same values), so llama.cpp multiplies without rounding
     the activations to 8 bits / F16 first. That rounding is the reference's largest own error on a
     quantized model and no scheduling option moves it: measured on Gemma 3 270M Q4_K_M, replay noise under
     repack/ubatch is <= 2e-6 while the rounding moves a matmul's output by 5-8% (README, "Localisation").
   Threads 1 vs 2 were bit-identical on both models here (not run); n_ubatch 16 moved Gemma through the same
   small-tail kernels `ubatch_tail` exercises (35 tokens: 16 + 16 + 3), and was bit-identical on F32.
3. the implementation: its tensors freely, then teacher-forced with A's tensors (names both graphs have).

An implementation without `tensors` raises Unsupported: with --locate that is exit 2; automatic localisation
records it as unavailable with the reason and leaves the verdict alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from parity.backends.bridge import CAPTURE_BUDGET, BackendParams
from parity.backends.build import BuildPlan
from parity.backends.worker import RemoteModel, Worker
from parity.compare import locate as analysis
from parity.core import paths
from parity.core.fs import atomic_write_file, file_lock
from parity.core.proc import log, run
from parity.engines.base import Implementation
from parity.engines.bridged import BridgedImplementation
from parity.engines.spec import ImplSpec
from parity.errors import ParityError, Unsupported, UsageError, WorkerError

NOISE_CONFIGS = ("repack_off", "ubatch_tail", "dequantized")
MODES = ("auto", "on", "off")
# ggml types a matmul multiplies as stored, without rounding its activations (anything else: F16 or 8-bit)
_EXACT_TYPES = frozenset({"F32", "F64"})


def wanted(mode: str, status: str) -> bool:
    """Whether a lane with `status` (pass | diverged) is localised under mode `mode` (auto | on | off)."""
    return mode == "on" or (mode == "auto" and status == "diverged")


def needs_dequantized(model: Path) -> bool:
    """True when some matrix weight of `model` is not F32 (its matmuls round activations: F16, 8-bit)."""
    from parity.gguf.reader import open_gguf

    f = open_gguf(model)
    return any(len(t.shape) == 2 and t.type_name not in _EXACT_TYPES for t in f.tensors.values())


def dequantized_model(plan: BuildPlan, model: Path, sha256: str, *, verbose: bool = False) -> Path:
    """The F32 copy of `model` written by the backend's own llama-quantize (cached by the source file's sha256)."""
    from parity.backends import quantizer

    out = paths.cache_dir() / "locate" / f"{sha256[:32]}-{plan.backend}-f32.gguf"
    if out.is_file():
        return out
    qp = quantizer.ensure_quantizer(plan.backend, verbose=verbose)
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.with_name(out.name + ".lock"), what=f"the F32 copy of {model.name}"):
        if not out.is_file():  # another process may have written it while this one waited

            def write(tmp: Path) -> None:
                run([qp.binary, "--allow-requantize", model, tmp, "F32", "2"], verbose=verbose)

            atomic_write_file(out, write)
    return out


@dataclasses.dataclass
class Captured:
    """The reference's side of one localisation: configuration A's tensors and the noise per op type."""

    a: dict[str, np.ndarray]
    noise_free: dict[str, dict[str, Any]]
    noise_replay: dict[str, dict[str, Any]]
    configs: list[dict[str, Any]]


def _merge(into: dict[str, dict[str, Any]], config: str, levels: Mapping[str, Mapping[str, Any]]) -> None:
    """Per op type, the largest noise over configurations (and which configuration and tensor gave it)."""
    for op, v in levels.items():
        cur = into.setdefault(op, {"noise": 0.0, "worst": v["worst"], "config": config, "tensors": v["tensors"]})
        if v["noise"] > cur["noise"]:
            cur.update(noise=v["noise"], worst=v["worst"], config=config)


def reference_side(
    a: dict[str, np.ndarray],
    tokens: Sequence[int],
    params: BackendParams,
    dequantized: Path | None,
    open_model: Callable[[str | None, BackendParams], RemoteModel],
) -> Captured:
    """Each noise configuration captured freely and teacher-forced with configuration A's tensors `a`."""
    ids = list(tokens)
    names = list(a)
    variants: list[tuple[str, str | None, BackendParams]] = [
        ("repack_off", None, dataclasses.replace(params, repack=0))
    ]
    if len(ids) >= 2:
        variants.append(("ubatch_tail", None, dataclasses.replace(params, n_ubatch=len(ids) - 1)))
    if dequantized is not None:
        variants.append(("dequantized", str(dequantized), params))
    noise_free: dict[str, dict[str, Any]] = {}
    noise_replay: dict[str, dict[str, Any]] = {}
    configs: list[dict[str, Any]] = []
    for name, model, p in variants:
        t0 = time.perf_counter()
        try:
            m = open_model(model, p)
        except WorkerError as exc:  # e.g. repack off where the llama.h has no switch: recorded, not run
            configs.append({"name": name, "status": "unavailable", "reason": str(exc)})
            continue
        try:
            free = m.capture(ids, names, None, CAPTURE_BUDGET).tensors
            replay = m.capture(ids, names, a, CAPTURE_BUDGET).tensors
        finally:
            m.close()
        lf, lr = analysis.noise_levels(a, free), analysis.noise_levels(a, replay)
        _merge(noise_free, name, lf)
        _merge(noise_replay, name, lr)
        configs.append(
            {
                "name": name,
                "status": "measured",
                "model": model,
                "params": p.to_dict(),
                "max_free": max((v["noise"] for v in lf.values()), default=0.0),
                "max_replay": max((v["noise"] for v in lr.values()), default=0.0),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return Captured(a, noise_free, noise_replay, configs)


def analyse(
    captured: Captured,
    free: Mapping[str, np.ndarray],
    replay: Mapping[str, np.ndarray] | None,
    replay_reason: str | None = None,
    k: float = analysis.K_DEFAULT,
) -> dict[str, Any]:
    """The receipt's `localisation` record: replay decides when the implementation can be teacher-forced,
    free-running otherwise; the free rows are kept either way (they show the error growing through layers)."""
    a = captured.a
    common = {n: a[n] for n in a if n in free}
    f = analysis.localise(free, common, captured.noise_free, "free", k=k)
    r = analysis.localise(replay, common, captured.noise_replay, "replay", k=k) if replay is not None else None
    main = r or f
    return {
        **main.to_dict(),
        "noise": {
            "free": analysis.noise_table(captured.noise_free),
            "replay": analysis.noise_table(captured.noise_replay),
        },
        "configs": captured.configs,
        "free": f.to_dict() if r is not None else None,
        "replay_unavailable": replay_reason,
        "k_note": analysis.K_NOTE,
    }


def unavailable(reason: str, status: str = "unavailable") -> dict[str, Any]:
    return {"status": status, "reason": reason, "mode": None, "first": None, "next": [], "rows": []}


def measure_reference(
    ref: BridgedImplementation,
    tokens: Sequence[int],
    params: BackendParams,
    plan: BuildPlan,
    lane_model: Path,
    lane_sha256: str,
    *,
    log_dir: Path | None = None,
    label: str = "llama",
    verbose: bool = False,
    timeout: float = 600.0,
) -> Captured:
    """Configuration A's default tensors (the open lane reference `ref`) and the noise of every configuration:
    the lane's file under other parameters in `ref`'s worker, the dequantized copy in one more worker."""
    ids = list(tokens)
    a = ref.tensors(ids)
    with ExitStack() as stack:
        workers: list[Worker] = []

        def open_model(path: str | None, p: BackendParams) -> RemoteModel:
            if path is None:
                return ref.open_variant(p)
            if not workers:
                w = Worker(f"{label}-locate-f32", plan.bridge_path, log_dir=log_dir, log_level=1, timeout=timeout)
                workers.append(stack.enter_context(w))
            return RemoteModel(workers[0], path, p)

        deq = (
            dequantized_model(plan, lane_model, lane_sha256, verbose=verbose) if needs_dequantized(lane_model) else None
        )
        return reference_side(a, ids, params, deq, open_model)


def compare_implementation(
    impl: Implementation,
    captured: Captured,
    tokens: Sequence[int],
    free: dict[str, np.ndarray] | None = None,
    k: float = analysis.K_DEFAULT,
) -> dict[str, Any]:
    """The implementation's tensors freely (unless given) and teacher-forced with A's, analysed (analyse())."""
    ids = list(tokens)
    free_i = impl.tensors(ids) if free is None else free
    a = captured.a
    common = [n for n in a if n in free_i]
    if not common:
        return unavailable("the implementation's graph tensors share no name with the reference's")
    try:
        replay_i: dict[str, np.ndarray] | None = impl.tensors(ids, common, {n: a[n] for n in common})
        reason = None
    except (Unsupported, UsageError) as exc:  # can capture but not be teacher-forced: free-running only
        replay_i, reason = None, str(exc)
    return analyse(captured, free_i, replay_i, reason, k)


def localise_lane(
    *,
    impl_open: Callable[[], Implementation],
    plan: BuildPlan,
    ref_spec: ImplSpec,
    lane_model: Path,
    lane_sha256: str,
    params: BackendParams,
    tokens: Sequence[int],
    mode: str,
    log_dir: Path,
    label: str,
    verbose: bool,
    timeout: float,
) -> dict[str, Any]:
    """Localise one lane. Unsupported propagates under --locate (exit 2); otherwise a failure is recorded as the
    record's status (unavailable | error) and never changes the lane's verdict by itself."""
    t0 = time.perf_counter()
    ids = list(tokens)
    try:
        with impl_open() as impl:
            free_i = impl.tensors(ids)  # first: an implementation without tensors costs no reference work
            with BridgedImplementation(
                ref_spec,
                plan,
                lane_model,
                params,
                log_dir=log_dir,
                log_name=f"{label}-locate",
                verbose=verbose,
                timeout=timeout,
            ) as ref:
                captured = measure_reference(
                    ref,
                    ids,
                    params,
                    plan,
                    lane_model,
                    lane_sha256,
                    log_dir=log_dir,
                    label=label,
                    verbose=verbose,
                    timeout=timeout,
                )
            record = compare_implementation(impl, captured, ids, free_i)
    except Unsupported as exc:
        if mode == "on":
            raise
        return unavailable(str(exc))
    except ParityError as exc:
        log(f"{label}: localisation failed: {exc}")
        return unavailable(str(exc), "error")
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def lane_status(mode: str, status: str, record: Mapping[str, Any]) -> str:
    """The lane's status after localisation: with --locate an op out of tolerance fails a lane whose logits
    pass (diverged) and a localisation that could not run is a lane error; automatic localisation changes
    nothing."""
    if mode != "on" or status != "pass":
        return status
    if record.get("status") == "out_of_tolerance":
        return "diverged"
    return "error" if record.get("status") == "error" else status
