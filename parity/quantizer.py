"""Each engine's own `llama-quantize`, built from the SAME pinned source as its library, and run by parity.

A ternary model is converted into an engine's native format by that engine's quantizer, never by parity:
bitnet.cpp's fork writes I2_S, mainline llama.cpp writes TQ2_0 / TQ1_0. The tool gets its own build
directory beside the library's, cache/<backend>-<lib_key>-quantize/, keyed by the library key (which covers
the source fingerprint, CMake options, compiler and CPU), so the quantizer build is valid exactly when the
library build is. Only the `llama-quantize` target is built. A receipt (quantize.json) marks it complete.

Why the extra CMake options differ per backend: mainline puts the tool under tools/ behind
LLAMA_BUILD_COMMON + LLAMA_BUILD_TOOLS (the library build turns both off); the 2024 fork adds common/ and
examples/ (where its quantizer lives) unconditionally, so the library's own options already define the
target. LLAMA_BUILD_COMMON/EXAMPLES are still switched on there so the init-cache says what is built.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity import backends, build, paths
from parity.errors import BuildError, UsageError
from parity.fsutil import atomic_write_json, file_lock
from parity.runner import Timer, log, run

QUANTIZE_RECEIPT_VERSION = 1
TARGET = "llama-quantize"
EXTRA_CMAKE: dict[str, dict[str, str]] = {
    "llama": {"LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_TOOLS": "ON"},
    "bitnet": {"LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_EXAMPLES": "ON"},
}


@dataclass(frozen=True)
class QuantizerPlan:
    """Where one backend's llama-quantize is built, and with which options."""

    lib: build.BuildPlan
    tool_dir: Path
    cmake: dict[str, str]

    @property
    def build_dir(self) -> Path:
        return self.tool_dir / "build"

    @property
    def binary(self) -> Path:
        # Both trees set CMAKE_RUNTIME_OUTPUT_DIRECTORY to <build>/bin.
        return self.build_dir / "bin" / TARGET

    @property
    def receipt_path(self) -> Path:
        return self.tool_dir / "quantize.json"


def quantizer_plan(p: build.BuildPlan) -> QuantizerPlan:
    """The quantizer build belonging to library plan `p` (same source, options plus EXTRA_CMAKE)."""
    if p.backend not in EXTRA_CMAKE:
        raise UsageError(
            f"parity knows no llama-quantize build for backend {p.backend!r}",
            fix=f"use one of {', '.join(EXTRA_CMAKE)}",
        )
    return QuantizerPlan(
        lib=p,
        # The same build tree as parity.build_tools' llama-bench (identical options for mainline): a second
        # tool target then compiles only its own sources instead of the whole library again.
        tool_dir=paths.cache_dir() / f"{p.backend}-{p.lib_key}-tools",
        cmake={**p.cmake, **EXTRA_CMAKE[p.backend]},
    )


def is_built(qp: QuantizerPlan) -> bool:
    """True when llama-quantize and its receipt exist for exactly this plan."""
    return qp.binary.is_file() and qp.receipt_path.is_file()


def init_cache(qp: QuantizerPlan) -> str:
    """CMake init-cache script of the quantizer build (options in a file, as in parity.build)."""
    lines = [f'set({k} "{v}" CACHE STRING "" FORCE)' for k, v in sorted(qp.cmake.items())]
    lines += [
        f'set(CMAKE_C_COMPILER "{qp.lib.cc}" CACHE FILEPATH "" FORCE)',
        f'set(CMAKE_CXX_COMPILER "{qp.lib.cxx}" CACHE FILEPATH "" FORCE)',
    ]
    return "\n".join(lines) + "\n"


def build_commands(qp: QuantizerPlan, src: Path, jobs: int) -> list[list[str]]:
    """The exact configure / build commands (asserted by unit tests)."""
    return [
        ["cmake", "-S", str(src), "-B", str(qp.build_dir), "-G", "Ninja", "-C", str(qp.tool_dir / "init-cache.cmake")],
        ["cmake", "--build", str(qp.build_dir), "--target", TARGET, "--parallel", str(jobs)],
    ]


def read_receipt(qp: QuantizerPlan) -> dict[str, Any]:
    """The receipt of a completed quantizer build."""
    data: dict[str, Any] = json.loads(qp.receipt_path.read_text(encoding="utf-8"))
    return data


def find_quantizer(backend: str) -> QuantizerPlan | None:
    """The built llama-quantize of `backend`'s pinned (or overridden) source, or None; never builds."""
    spec = backends.get_spec(backend)
    qp = quantizer_plan(build.plan(spec, backends.source_override(spec)))
    return qp if is_built(qp) else None


def ensure_quantizer(backend: str, *, verbose: bool = False, jobs: int | None = None) -> QuantizerPlan:
    """Build `backend`'s llama-quantize from its pinned (or overridden) source unless an identical build exists."""
    spec = backends.get_spec(backend)
    override = backends.source_override(spec)
    t0 = time.perf_counter()
    qp = quantizer_plan(build.plan(spec, override))
    if is_built(qp):
        log(f"{backend}: llama-quantize up to date ({qp.binary})")
        return qp
    with file_lock(paths.cache_dir() / f".{backend}.tools.lock", what=f"the {backend} tools build (llama-quantize)"):
        if is_built(qp):
            return qp
        src = backends.acquire(spec, override, verbose=verbose)
        for rel, target in spec.prepare_copy.items():  # bitnet.cpp's LUT header, as the library build does
            dst = src.path / target
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.path / rel, dst)
        qp.tool_dir.mkdir(parents=True, exist_ok=True)
        (qp.tool_dir / "init-cache.cmake").write_text(init_cache(qp), encoding="utf-8")
        jobs = jobs or os.cpu_count() or 2
        for label, cmd in zip(("configure", "build"), build_commands(qp, src.path, jobs), strict=True):
            with Timer(f"{backend}: llama-quantize {label}"):
                run(cmd, verbose=verbose, log_file=qp.tool_dir / f"{label}.log")
        if not qp.binary.is_file():
            raise BuildError(f"the build produced no {qp.binary}", fix=f"see {qp.tool_dir / 'build.log'}")
        atomic_write_json(
            qp.receipt_path,
            {
                "version": QUANTIZE_RECEIPT_VERSION,
                "backend": backend,
                "target": TARGET,
                "binary": str(qp.binary),
                "source": {
                    "kind": src.kind,
                    "path": str(src.path),
                    "commit": src.commit,
                    "fingerprint": src.fingerprint,
                },
                "cmake": qp.cmake,
                "compiler": {"cc": qp.lib.cc, "cxx": qp.lib.cxx, "version": qp.lib.compiler_version},
                "cpu": qp.lib.cpu,
                "lib_key": qp.lib.lib_key,
                "seconds": round(time.perf_counter() - t0, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    log(f"{backend}: llama-quantize built in {time.perf_counter() - t0:.1f} s -> {qp.binary}")
    return qp


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
