"""The logits a lane is compared with: the implementation's own, or (`--numerics mirror`, the ternary lanes) the
numpy engine mirroring the lane's kernels; and how far the engine's other evaluation shape lands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from parity.backends.bridge import BackendParams
from parity.compare import metrics
from parity.options import RunOptions


def numerics_gap(ref: Any, other: Any, shape: str) -> dict[str, Any]:
    """The engine against itself in the other evaluation shape: what mirroring the wrong shape would cost."""
    return {
        "other_shape": "stepwise" if shape == "batch" else "batch",
        **metrics.logit_gap(np.asarray(other), np.asarray(ref)),
    }


def lane_logits(
    backend: str,
    lane_model: Path,
    sequence: list[int],
    logits: np.ndarray,
    seconds: dict[str, float],
    opts: RunOptions,
    params: BackendParams,
    eval_shape: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The logits this lane is compared with, and the receipt's description of how they were computed."""
    from parity.engines.numpy import numerics

    num = numerics.for_lane(opts.numerics, backend, eval_shape, params.type_k, params.type_v)
    if not num.mirroring:
        return logits, num.describe() | {"dtype": opts.dtype}
    from parity.engines.numpy.bitnet import mirrored_logits
    from parity.engines.numpy.ops import DTYPES
    from parity.gguf.reader import open_gguf

    f = open_gguf(lane_model)
    types = {name: t.ggml_type for name, t in f.tensors.items()}
    t0 = time.perf_counter()
    ours = mirrored_logits(f, sequence, num, DTYPES[opts.dtype])
    seconds[f"numpy_mirror_{backend}"] = time.perf_counter() - t0
    return ours, num.describe(types) | {"dtype": opts.dtype, "note": numerics.gap_note(num, types)}
