"""The reference's own variation (issue 14): one lane's reference evaluated under other evaluation orders.

For a lane whose reference evaluated the shared sequence in its own configuration (`base`), the floor
evaluates the same token ids again, in the same worker, under configurations that compute the same function
in another order, and hands the logits to parity.compare.calibrate (the statistics):

- `stepwise` one token per llama_decode (or `batch` when the lane itself is stepwise): other kernels (matrix
  x vector instead of matrix x matrix), other accumulation order;
- `repack_off` the weights left in their file layout (llama_model_params.use_extra_bufts = false), where
  llama.cpp repacks them for its CPU kernels by default. bitnet.cpp's 2024 llama.h has no such switch: the
  configuration is recorded as unavailable there.

Both run on one thread (see _configs). Measured too (README, "Verdicts"): thread counts never moved a logit;
n_ubatch splits moved Gemma 3 270M Q4_K_M by as much as `stepwise` through the same single-row kernels (no
information for the cost); flash attention and an F16 KV cache are another kernel and another precision. The floor
is cached on disk (~/.cache/parity/floor), keyed by everything that determines it: the model's sha256, the backend
build (commit, source fingerprint, bridge key) and the CPU it reports, the lane's parameters, the token ids and
the configurations; a repeat run reads it back instead of evaluating anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.backends.bridge import BackendParams
from parity.backends.build import BuildPlan
from parity.compare import calibrate, metrics
from parity.core import paths
from parity.core.fs import atomic_write_json
from parity.engines.bridged import BridgedImplementation
from parity.options import RunOptions

FLOOR_VERSION = 4  # bump when what a floor record holds or how it is computed changes (old entries are ignored)


def cache_dir() -> Path:
    """Where floors are cached: the per-user cache root's floor/ (~/.cache/parity/floor), shared by clones."""
    return paths.user_cache_dir() / "floor"


def rounding_model(model: Path, params: BackendParams | None = None) -> dict[str, Any]:
    """The rounding model's inputs: the coarsest format the reference rounds to - its matmul weights'
    activation formats, its K/V cache types and flash attention's F16 (from the lane's `params`) - and how
    many matmul weights there are."""
    from parity.gguf.reader import open_gguf
    from parity.gguf.types import type_name

    f = open_gguf(model)
    types = [t.type_name for t in f.tensors.values() if len(t.shape) == 2]
    u, fmt = calibrate.activation_roundoff(types)
    if params is not None:  # a K/V cache or flash attention coarser than the activations sets the precision
        stored = [type_name(params.type_k), type_name(params.type_v)] + (["F16"] if params.flash_attn == 1 else [])
        u_kv, fmt_kv = calibrate.storage_roundoff(stored)
        if u_kv > u:
            u, fmt = u_kv, f"{fmt_kv} (KV cache / attention)"
    return {"unit_roundoff": u, "format": fmt, "n_matmul": len(types), "model": calibrate.__name__}


def cache_key(
    model_sha256: str,
    plan: BuildPlan,
    system_info: str,
    params: BackendParams,
    eval_shape: str,
    tokens: Sequence[int],
    configs: Sequence[str],
) -> str:
    """The hex digest that names a floor in the cache: it changes whenever anything the floor depends on does."""
    ident = {
        "version": FLOOR_VERSION,
        "model_sha256": model_sha256,
        "backend": plan.backend,
        "commit": plan.commit,
        "source_fingerprint": plan.source_fingerprint,
        "bridge_key": plan.bridge_key,
        "system_info": system_info,
        "params": params.to_dict(),
        "eval_shape": eval_shape,
        "tokens": list(tokens),
        "configs": list(configs),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _load(path: Path) -> dict[str, Any] | None:
    """A cached floor, or None when absent or unreadable (a damaged entry is measured again and replaced)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == FLOOR_VERSION else None


def _configs(params: BackendParams, eval_shape: str) -> list[tuple[str, BackendParams, str]]:
    """(name, context parameters, evaluation shape) of each configuration to run.

    Each runs on one thread: ggml splits a matmul's output rows between threads and computes every row the same
    way, so the thread count never moved a logit (measured: README, "Verdicts"), while a 2-thread decode waits
    on the other thread at every op, which costs ~0.4 s per single-token decode on a loaded 2-core machine
    against ~1 ms on one thread. Were it ever to move one, that movement would be the reference's own too."""
    one = dataclasses.replace(params, n_threads=1)
    other = "stepwise" if eval_shape == "batch" else "batch"
    repack = ("repack_off", 0) if params.repack else ("repack_on", 1)
    return [(other, one, other), (repack[0], dataclasses.replace(one, repack=repack[1]), eval_shape)]


def _evaluate(
    ref: BridgedImplementation, params: BackendParams, shape: str, tokens: list[int]
) -> tuple[np.ndarray | None, str | None]:
    """One configuration's logits, or None and why it is unavailable on this backend."""
    if params.repack != 1 and ref.hello.get("api_generation") == 1:
        return None, "this llama.h (bitnet.cpp's 2024 fork) has no weight-repacking switch (use_extra_bufts)"
    if params == ref.params:
        return ref.evaluate(tokens, shape), None
    variant = ref.open_variant(params)
    try:
        return np.asarray(variant.eval(tokens) if shape == "batch" else variant.eval_stepwise(tokens)), None
    finally:
        variant.close()


def measure(
    ref: BridgedImplementation,
    base: np.ndarray | Callable[[], np.ndarray],
    tokens: Sequence[int],
    params: BackendParams,
    eval_shape: str,
    model: Path,
    model_sha256: str,
    plan: BuildPlan,
    *,
    use_cache: bool = True,
) -> dict[str, Any]:
    """The lane's floor record (the receipt's `floor`): configurations, per-position rows, summary, cost.

    `base` is the lane's own logits of `tokens`, or a function that evaluates them: called on a cache miss only
    (parity suite measures sampled items whose floors are usually cached)."""
    t0 = time.perf_counter()
    ids = list(tokens)
    planned = _configs(params, eval_shape)
    names = [f"{n}:{s}:{json.dumps(_changed(params, c), sort_keys=True)}" for n, c, s in planned]
    key = cache_key(model_sha256, plan, str(ref.hello.get("system_info", "")), params, eval_shape, ids, names)
    path = cache_dir() / f"{key}.json"
    if use_cache and (hit := _load(path)) is not None:
        hit["cache"] = {"hit": True, "key": key, "path": str(path)}
        hit["seconds"] = round(time.perf_counter() - t0, 4)
        hit["measured_seconds"] = hit.get("measured_seconds")
        return hit
    if callable(base):
        base = base()
    rounding = rounding_model(model, params)
    logits: dict[str, np.ndarray] = {}
    described: list[dict[str, Any]] = []
    for name, cfg, shape in planned:
        t1 = time.perf_counter()
        out, why = _evaluate(ref, cfg, shape, ids)
        entry: dict[str, Any] = {"name": name, "shape": shape, "params": _changed(params, cfg)}
        entry["seconds"] = round(time.perf_counter() - t1, 4)
        if out is None:
            entry.update(status="unavailable", reason=why)
        else:
            logits[name] = out
            entry["status"] = "measured"
        described.append(entry)
    eps = calibrate.rounding_epsilon(base, rounding["unit_roundoff"], rounding["n_matmul"])
    summaries, rows, summary = calibrate.measure_floor(base, logits, eps)
    by_name = {s["name"]: s for s in summaries}
    for entry in described:
        entry.update(by_name.get(entry["name"], {}))
    elapsed = round(time.perf_counter() - t0, 4)
    record: dict[str, Any] = {
        "version": FLOOR_VERSION,
        "base": {"eval_shape": eval_shape, **params.to_dict()},
        "configs": described,
        "rounding": rounding,
        "rows": rows,
        "summary": summary,
        "measured_seconds": elapsed,
    }
    if use_cache:
        atomic_write_json(path, _finite(record))
    record["cache"] = {"hit": False, "key": key, "path": str(path) if use_cache else None}
    record["seconds"] = elapsed
    return record


def _changed(base: BackendParams, other: BackendParams) -> dict[str, int]:
    a, b = base.to_dict(), other.to_dict()
    return {k: v for k, v in b.items() if a.get(k) != v}


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: replace them by None (a floor never holds them; a guard for odd logits)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def judge(
    opts: RunOptions,
    ours: np.ndarray,
    ref: np.ndarray,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    greedy: dict[str, Any],
    floor: dict[str, Any] | None,
    n_prompt: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(verdict, greedy, summary) of a compared lane: fixed keeps the --cos-tol/--mse-tol summary as it is;
    calibrated judges against the floor, and the summary's all_passed / first_divergence follow that verdict."""
    if opts.verdict == "fixed" or floor is None:
        return calibrate.fixed_verdict(summary, opts.cos_tol, opts.mse_tol), greedy, summary
    v = calibrate.verdict(ours, ref, floor["rows"], floor["summary"], opts.tie_margin, rows=rows)
    greedy = calibrate.greedy_with_floor(greedy, floor["rows"], n_prompt, v["k"])
    first = None if v["first"] is None else metrics.divergence_record(rows[v["first"]])
    return v, greedy, {**summary, "all_passed": v["passed"], "first_divergence": first}
