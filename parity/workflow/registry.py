"""Which class implements each kind of a windows implementation (`kind = ...` in the implementations file).

The LLM kinds (numpy, llama, bitnet and the protocol v2 kinds cmd, py, logits) are adapters over what
parity.engines.registry opens for their spec; `command` is the windows command protocol v1.
"""

from __future__ import annotations

from parity.workflow.config import ImplSpec
from parity.workflow.external import CommandImpl
from parity.workflow.impls import BridgeImpl, ExternalImpl, Implementation, NumpyImpl, RunContext

KIND_CLASSES: dict[str, type[Implementation]] = {
    "numpy": NumpyImpl,
    "llama": BridgeImpl,
    "bitnet": BridgeImpl,
    "cmd": ExternalImpl,
    "py": ExternalImpl,
    "logits": ExternalImpl,
    "command": CommandImpl,
}


def create(spec: ImplSpec, ctx: RunContext) -> Implementation:
    """The implementation object for a spec (nothing is built or started until its first window)."""
    return KIND_CLASSES[spec.kind](spec, ctx)
