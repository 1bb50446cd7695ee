"""What `parity bench` measures: the models (`resolve_model`) and the implementations with their build plans
(`select_impls`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.backends import build, lock
from parity.core.fs import sha256_file
from parity.core.proc import log
from parity.errors import ParityError, UsageError

IMPLS = ("numpy", "llama", "bitnet")


@dataclass(frozen=True)
class ModelRef:
    """A model to benchmark."""

    name: str
    path: Path
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "size_bytes": self.size_bytes}


def resolve_model(spec: str) -> ModelRef:
    """`default-<variant>` (embedded model), a GGUF path, or a parity.fetch lock name (e.g. gemma3-270m-q4_k_m)."""
    from parity.models.modelgen import default_model

    if spec in ("default", "default-f32", "default-f16", "default-q8_0"):
        path, _tok = default_model(spec.removeprefix("default-") if spec != "default" else "f32")
        name = "default-f32" if spec == "default" else spec
    elif Path(spec).expanduser().is_file():
        path, name = Path(spec).expanduser().resolve(), Path(spec).stem
    elif "/" in spec or spec.endswith(".gguf"):
        raise UsageError(f"--model {spec}: no such file", fix="pass an existing GGUF path or a model name")
    else:
        try:
            from parity.models import fetch
        except ImportError as exc:
            raise UsageError(f"--model {spec}: not a file, and parity.fetch is unavailable", fix="pass a path") from exc
        path, name = fetch.model_path(spec), spec
    return ModelRef(name, path, sha256_file(path), path.stat().st_size)


def select_impls(impls: tuple[str, ...], verbose: bool = False) -> dict[str, build.BuildPlan | None]:
    """Implementations to run (`impls`, --impl; empty: all of IMPLS) and their build plans: llama is built if
    missing (streaming the build's output when `verbose`), bitnet only used if built unless asked for."""
    chosen = list(dict.fromkeys(impls)) or list(IMPLS)
    plans: dict[str, build.BuildPlan | None] = {}
    for impl in chosen:
        if impl == "numpy":
            plans[impl] = None
            continue
        spec = lock.get_spec(impl)
        optional = impl == "bitnet" and not impls  # used when present, never built implicitly
        try:
            override = lock.source_override(spec)
            p = build.plan(spec, override)
        except ParityError as exc:
            if not optional:
                raise
            log(f"bench: skipping bitnet.cpp ({exc})")
            continue
        if not build.is_built(p):
            if optional:
                log(f"bench: bitnet.cpp is not built ({spec.override_env} unset or stale build); skipping it")
                continue
            if impl == "bitnet" or os.environ.get("CI"):
                from parity.errors import BackendUnavailable

                raise BackendUnavailable(
                    f"the {impl} backend is not built", fix=f"nox -s setup_cpp -- --backend {impl}"
                )
            p = build.ensure_built(spec, override, verbose=verbose)
        plans[impl] = p
    return plans
