"""Each engine's own `llama-quantize`, built from the SAME pinned source as its library, and run by parity.

A ternary model is converted into an engine's native format by that engine's quantizer, never by parity:
bitnet.cpp's fork writes I2_S, mainline llama.cpp writes TQ2_0 / TQ1_0. The tool gets its own build
directory beside the library's, cache/<backend>-<lib_key>-tools/, keyed by the library key (which covers
the source fingerprint, CMake options, compiler and CPU), so the quantizer build is valid exactly when the
library build is. It is a target of the backend's shared tools tree (parity.backends.tools).

Why the extra CMake options differ per backend: mainline puts the tool under tools/ behind
LLAMA_BUILD_COMMON + LLAMA_BUILD_TOOLS (the library build turns both off); the 2024 fork adds common/ and
examples/ (where its quantizer lives) unconditionally, so the library's own options already define the
target. LLAMA_BUILD_COMMON/EXAMPLES are still switched on there so the init-cache says what is built.
"""

from __future__ import annotations

from pathlib import Path

from parity.backends import build, lock, tools
from parity.errors import UsageError

TARGET = "llama-quantize"
EXTRA_CMAKE: dict[str, dict[str, str]] = {
    "llama": {"LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_TOOLS": "ON"},
    "bitnet": {"LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_EXAMPLES": "ON"},
}


# One backend's llama-quantize build: a target of its shared tools tree (parity.backends.tools).
QuantizerPlan = tools.ToolsPlan


def quantizer_plan(p: build.BuildPlan) -> QuantizerPlan:
    """The quantizer build belonging to library plan `p` (same source, options plus EXTRA_CMAKE)."""
    if p.backend not in EXTRA_CMAKE:
        raise UsageError(
            f"parity knows no llama-quantize build for backend {p.backend!r}",
            fix=f"use one of {', '.join(EXTRA_CMAKE)}",
        )
    return tools.tools_plan(p, TARGET, EXTRA_CMAKE[p.backend])


is_built = tools.is_built
init_cache = tools.init_cache
build_commands = tools.commands
read_receipt = tools.read_receipt


def find_quantizer(backend: str) -> QuantizerPlan | None:
    """The built llama-quantize of `backend`'s pinned (or overridden) source, or None; never builds."""
    spec = lock.get_spec(backend)
    qp = quantizer_plan(build.plan(spec, lock.source_override(spec)))
    return qp if is_built(qp) else None


def ensure_quantizer(backend: str, *, verbose: bool = False, jobs: int | None = None) -> QuantizerPlan:
    """Build `backend`'s llama-quantize from its pinned (or overridden) source unless an identical build exists."""
    if backend not in EXTRA_CMAKE:
        quantizer_plan(build.plan(lock.get_spec(backend), None))  # raises the UsageError naming the backends
    spec = lock.get_spec(backend)
    return tools.ensure_tool(spec, lock.source_override(spec), TARGET, EXTRA_CMAKE[backend], verbose=verbose, jobs=jobs)


def quantize_command(
    qp: QuantizerPlan, src: Path, dst: Path, ftype: str, *, threads: int, keep_embedding_f16: bool = True
) -> list[str]:
    """The llama-quantize command line converting `src` to `ftype` (e.g. "TQ2_0", "I2_S").

    `keep_embedding_f16` asks for the token embedding (tied to the output in bitnet models) to stay F16:
    mainline otherwise writes a tied embedding as Q6_K (its OUTPUT rule), which would make the output
    head lossy and hide the ternary comparison behind a 6-bit one. Both flags exist in both trees.
    """
    cmd = [str(qp.binary)]
    if keep_embedding_f16:
        cmd += ["--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    return [*cmd, str(src), str(dst), ftype, str(threads)]
