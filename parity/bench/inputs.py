"""What `parity bench` measures: the models (`resolve_model`) and the implementations with their build plans
(`select_impls`).

Implementations are spec strings of the one registry (parity.engines.spec, parity.engines.registry): `numpy`,
`numpy:dtype=float64`, `llama`, `llama:type_k=f16,flash_attn=on`, `bitnet`, ... and the external kinds `cmd:ARGV`
and `py:module:factory` (docs/PROTOCOL.md; timed through the protocol, parity.bench.lanes.ExternalLane). A lane is
named by its spec's label (`llama`, `llama-type_k-f16`, `cmd`), so the default lanes keep the names baselines know
them by. `logits:FILE` is refused: precomputed logits have nothing to time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.backends import build, lock
from parity.core.fs import sha256_file
from parity.core.proc import log
from parity.engines import spec as impl_specs
from parity.engines.spec import ImplSpec
from parity.errors import ParityError, UsageError

IMPLS = ("numpy", "llama", "bitnet")  # the default lanes (bitnet only where built)
EXTERNAL = ("cmd", "py")  # engines brought by the user, timed through protocol v2 (never a default lane)
NOT_TIMED = ("eval_shape",)  # spec options that do not change what bench times (greedy decoding)


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


@dataclass(frozen=True)
class Impl:
    """One lane to measure: an implementation spec and the build plan of its kind (None for numpy, cmd, py)."""

    spec: ImplSpec
    plan: build.BuildPlan | None

    @property
    def label(self) -> str:
        return self.spec.label


def parse_impls(texts: tuple[str, ...]) -> list[ImplSpec]:
    """--impl values as specs, one per label (empty: IMPLS); UsageError (exit 2) naming a bad one, a `logits:`
    spec, two different external commands (both would be lane `cmd`) or a `cmd:` program that is not there."""
    from parity.engines.external import command_argv

    specs: dict[str, ImplSpec] = {}
    for text in texts or IMPLS:
        s = impl_specs.parse(text)
        if s.kind == "logits":
            raise UsageError(
                f"--impl {text}: parity bench times an implementation computing logits; a logits: file holds "
                "precomputed ones, there is nothing to time",
                fix="bench the engine that wrote them (--impl 'cmd:ARGV' or --impl py:module:factory), "
                "or compare the file with `parity run --impl`",
            )
        if s.kind not in IMPLS + EXTERNAL:
            raise UsageError(
                f"--impl {text}: parity bench measures {', '.join(IMPLS + EXTERNAL)} (KIND[:key=value,...], cmd:ARGV, "
                "py:module:factory)",
                fix="benchmark one of these kinds",
            )
        if s.get("model"):
            raise UsageError(
                f"--impl {text}: parity bench times every lane on --model (model= is for parity suite)",
                fix="drop model=... and pass the file with --model",
            )
        for key in NOT_TIMED:
            if s.get(key) is not None:
                raise UsageError(
                    f"--impl {text}: {key} does not apply to parity bench (it times greedy decoding)",
                    fix=f"drop {key}=...",
                )
        if s.kind in EXTERNAL:
            if s.label in specs and specs[s.label] != s:
                raise UsageError(
                    f"--impl {text}: a second {s.kind}: lane (lane `{s.label}` is {specs[s.label].text})",
                    fix=f"bench one {s.kind}: implementation per run",
                )
            command_argv(s)  # a program that is not there: exit 2 now, not an unavailable lane later
        specs.setdefault(s.label, s)
    return list(specs.values())


def select_impls(impls: tuple[str, ...], verbose: bool = False) -> dict[str, Impl]:
    """Lanes to run by label (`impls`, --impl spec strings; empty: IMPLS) with their kinds' build plans: llama
    is built if missing (streaming the build's output when `verbose`), bitnet only used if built unless asked
    for."""
    chosen = parse_impls(impls)
    plans: dict[str, build.BuildPlan | None] = {kind: None for kind in ("numpy", *EXTERNAL)}
    out: dict[str, Impl] = {}
    for s in chosen:
        key = s.plan_key if s.kind not in plans else s.kind  # kind@source for another source tree
        if key not in plans:
            plan = _plan(s.kind, optional=s.kind == "bitnet" and not impls, verbose=verbose, source=s.get("source"))
            if plan is None:
                continue
            plans[key] = plan
        out[s.label] = Impl(s, plans[key])
    return out


def _plan(impl: str, optional: bool, verbose: bool, source: str | None = None) -> build.BuildPlan | None:
    """The build plan of a C++ kind (from `source`, a local tree, when given); None when `optional` (the
    default bitnet lane) and not built."""
    spec = lock.get_spec(impl)
    try:
        override = lock.source_override(spec, source)
        p = build.plan(spec, override)
    except ParityError as exc:
        if not optional:
            raise
        log(f"bench: skipping bitnet.cpp ({exc})")
        return None
    if not build.is_built(p):
        if optional:
            log(f"bench: bitnet.cpp is not built ({spec.override_env} unset or stale build); skipping it")
            return None
        if (impl == "bitnet" and source is None) or os.environ.get("CI"):
            from parity.errors import BackendUnavailable

            raise BackendUnavailable(f"the {impl} backend is not built", fix=f"nox -s setup_cpp -- --backend {impl}")
        p = build.ensure_built(spec, override, verbose=verbose)
    return p
