"""The one registry of implementations: a spec string in, an Implementation out (docs/ARCHITECTURE.md).

`parity run --impl/--reference`, `parity parity-both`, `parity bench --impl` and the windows TOML `kind` +
`options` all name implementations the same way (parity.engines.spec). Kinds: `numpy`, `llama`, `bitnet`
(built in), `cmd:`, `py:`, `logits:` (brought by the user: parity.engines.external, docs/PROTOCOL.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from parity.backends.bridge import BackendParams
from parity.backends.build import BuildPlan
from parity.engines.base import Implementation
from parity.engines.bridged import BridgedImplementation, apply_spec
from parity.engines.external import CommandImplementation, LogitsFileImplementation
from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.impl import NumpyImplementation
from parity.engines.spec import ImplSpec
from parity.gguf.reader import GGUFFile


@dataclass(frozen=True)
class OpenContext:
    """What opening an implementation needs beyond its spec.

    `params` are the bridged kinds' base context parameters (the spec's options are applied on top);
    `plan` is the built backend of a bridged kind (parity.check.inputs.preflight makes sure it exists).
    """

    model: Path | GGUFFile
    params: BackendParams | None = None
    plan: BuildPlan | None = None
    eval_shape: str = "batch"
    dtype: str = "float32"
    log_dir: Path | None = None
    log_name: str | None = None
    verbose: bool = False
    timeout: float = 600.0


def open_implementation(spec: ImplSpec, ctx: OpenContext, engine: NumpyEngine | None = None) -> Implementation:
    """Open `spec` on `ctx.model`. A numpy `engine` already built for the model is reused."""
    model_path = ctx.model.path if isinstance(ctx.model, GGUFFile) else ctx.model
    if spec.get("model") and Path(spec.get("model") or "").expanduser().resolve() != model_path.resolve():
        # a side with its own model file (`llama:model=q4_0.gguf`): that file, and no engine built for another
        model_path, engine = Path(spec.get("model") or "").expanduser().resolve(), None
        ctx = dataclasses.replace(ctx, model=model_path)
    if spec.kind in ("cmd", "py"):
        return CommandImplementation(spec, model_path, timeout=ctx.timeout, log_dir=ctx.log_dir, log_name=ctx.log_name)
    if spec.kind == "logits":
        return LogitsFileImplementation(spec)
    if spec.kind == "numpy":
        if engine is None:
            engine = NumpyEngine(ctx.model, dtype=spec.get("dtype") or ctx.dtype)
        return NumpyImplementation(engine, spec.text)
    if ctx.plan is None or ctx.params is None:
        raise ValueError(f"{spec.text}: a bridged implementation needs a build plan and base parameters")
    return BridgedImplementation(
        spec,
        ctx.plan,
        model_path,
        apply_spec(spec, ctx.params),
        eval_shape=ctx.eval_shape,
        log_dir=ctx.log_dir,
        log_name=ctx.log_name,
        verbose=ctx.verbose,
        timeout=ctx.timeout,
    )
