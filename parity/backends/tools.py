"""llama.cpp's tools (`llama-bench`, `llama-quantize`, `llama-perplexity`), built from the SAME pinned source as libllama.

Running llama-bench and the cross-check live in parity.bench.llama_bench. The tools need LLAMA_BUILD_COMMON and LLAMA_BUILD_TOOLS, which the library build leaves off, so it gets its
own build directory beside the library's: cache/<backend>-<lib_key>-tools/. The library key already covers
the source fingerprint, the CMake options, the compiler and the CPU, so the tools build is valid exactly
when the library build is. Only the `llama-bench` target is built (static libraries, like the main build).
A receipt (<target>.json) is written last and marks each tool complete. parity.backends.quantizer builds
llama-quantize in the same tree through ensure_tool(); ensure_llama_perplexity() builds llama-perplexity there
(the suite's agreement check and throughput figure: parity.backends.perplexity).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.backends import build, lock
from parity.core import paths
from parity.core.fs import atomic_write_json, file_lock
from parity.core.proc import Timer, log, run
from parity.errors import BuildError

TOOLS_RECEIPT_VERSION = 1
TARGET = "llama-bench"
PERPLEXITY_TARGET = "llama-perplexity"
# What the tools build adds to the library's options: llama-bench links llama-common.
TOOLS_CMAKE = {"LLAMA_BUILD_COMMON": "ON", "LLAMA_BUILD_TOOLS": "ON"}


@dataclass(frozen=True)
class ToolsPlan:
    """Where llama-bench for one library plan is built, and with which options."""

    lib: build.BuildPlan
    tools_dir: Path
    cmake: dict[str, str]
    target: str = TARGET

    @property
    def build_dir(self) -> Path:
        return self.tools_dir / "build"

    @property
    def tool_dir(self) -> Path:
        return self.tools_dir

    @property
    def binary(self) -> Path:
        # Both llama.h generations set CMAKE_RUNTIME_OUTPUT_DIRECTORY to <build>/bin.
        return self.build_dir / "bin" / self.target

    @property
    def receipt_path(self) -> Path:
        return self.tools_dir / f"{self.target}.json"


def tools_plan(p: build.BuildPlan, target: str = TARGET, extra_cmake: dict[str, str] | None = None) -> ToolsPlan:
    """The tools build that belongs to library plan `p` (same source, options plus `extra_cmake`).

    Every tool of one backend (llama-bench, llama-quantize) shares this build tree, so a second tool compiles
    only its own sources.
    """
    return ToolsPlan(
        lib=p,
        tools_dir=paths.cache_dir() / f"{p.backend}-{p.lib_key}-tools",
        cmake={**p.cmake, **(TOOLS_CMAKE if extra_cmake is None else extra_cmake)},
        target=target,
    )


def is_built(tp: ToolsPlan) -> bool:
    """True when llama-bench and its receipt exist for exactly this plan."""
    return tp.binary.is_file() and tp.receipt_path.is_file()


def init_cache(tp: ToolsPlan) -> str:
    """CMake init-cache script of the tools build (options in a file, as in parity.backends.build)."""
    lines = [f'set({k} "{v}" CACHE STRING "" FORCE)' for k, v in sorted(tp.cmake.items())]
    lines += [
        f'set(CMAKE_C_COMPILER "{tp.lib.cc}" CACHE FILEPATH "" FORCE)',
        f'set(CMAKE_CXX_COMPILER "{tp.lib.cxx}" CACHE FILEPATH "" FORCE)',
    ]
    return "\n".join(lines) + "\n"


def commands(tp: ToolsPlan, src: Path, jobs: int) -> list[list[str]]:
    """The exact configure / build commands (asserted by unit tests)."""
    return [
        ["cmake", "-S", str(src), "-B", str(tp.build_dir), "-G", "Ninja", "-C", str(tp.tools_dir / "init-cache.cmake")],
        ["cmake", "--build", str(tp.build_dir), "--target", tp.target, "--parallel", str(jobs)],
    ]


def read_receipt(tp: ToolsPlan) -> dict[str, Any]:
    """The receipt of a completed tools build."""
    data: dict[str, Any] = json.loads(tp.receipt_path.read_text(encoding="utf-8"))
    return data


def find_llama_bench(spec: lock.BackendSpec, override: Path | None = None) -> ToolsPlan | None:
    """The built llama-bench for the pinned source, or None (never builds)."""
    tp = tools_plan(build.plan(spec, override))
    return tp if is_built(tp) else None


def ensure_llama_bench(
    spec: lock.BackendSpec, override: Path | None = None, *, verbose: bool = False, jobs: int | None = None
) -> ToolsPlan:
    """Build llama-bench from the backend's pinned source unless an identical build is cached."""
    if spec.name != "llama":
        raise BuildError(
            f"llama-bench is built only for the mainline llama backend, not {spec.name!r}", fix="use --backend llama"
        )
    return ensure_tool(spec, override, TARGET, TOOLS_CMAKE, verbose=verbose, jobs=jobs)


def ensure_llama_perplexity(
    spec: lock.BackendSpec, override: Path | None = None, *, verbose: bool = False, jobs: int | None = None
) -> ToolsPlan:
    """Build llama-perplexity from the backend's pinned source unless an identical build is cached."""
    if spec.name != "llama":
        raise BuildError(
            f"llama-perplexity is built only for the mainline llama backend, not {spec.name!r}",
            fix="use --backend llama",
        )
    return ensure_tool(spec, override, PERPLEXITY_TARGET, TOOLS_CMAKE, verbose=verbose, jobs=jobs)


def ensure_tool(
    spec: lock.BackendSpec,
    override: Path | None,
    target: str,
    extra_cmake: dict[str, str],
    *,
    verbose: bool = False,
    jobs: int | None = None,
) -> ToolsPlan:
    """Build CMake target `target` of the backend's pinned source in its tools tree unless already built."""
    t0 = time.perf_counter()
    tp = tools_plan(build.plan(spec, override), target, extra_cmake)
    if is_built(tp):
        log(f"{spec.name}: {target} up to date ({tp.binary})")
        return tp
    with file_lock(paths.cache_dir() / f".{spec.name}.tools.lock", what=f"the {spec.name} tools build ({target})"):
        if is_built(tp):
            return tp
        src = lock.acquire(spec, override, verbose=verbose)
        for rel, dest in spec.prepare_copy.items():  # bitnet.cpp's LUT header, as the library build does
            dst = src.path / dest
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.path / rel, dst)
        tp.tools_dir.mkdir(parents=True, exist_ok=True)
        (tp.tools_dir / "init-cache.cmake").write_text(init_cache(tp), encoding="utf-8")
        jobs = jobs or os.cpu_count() or 2
        for label, cmd in zip(("configure", "build"), commands(tp, src.path, jobs), strict=True):
            with Timer(f"{spec.name}: {target} {label}"):
                shown = f"{spec.name}: building {target}" if label == "build" else None
                run(cmd, verbose=verbose, log_file=tp.tools_dir / f"{target}-{label}.log", progress=shown)
        if not tp.binary.is_file():
            raise BuildError(f"the build produced no {tp.binary}", fix=f"see {tp.tools_dir / (target + '-build.log')}")
        atomic_write_json(
            tp.receipt_path,
            {
                "version": TOOLS_RECEIPT_VERSION,
                "backend": spec.name,
                "target": target,
                "binary": str(tp.binary),
                "source": {
                    "kind": src.kind,
                    "path": str(src.path),
                    "commit": src.commit,
                    "fingerprint": src.fingerprint,
                },
                "cmake": tp.cmake,
                "compiler": {"cc": tp.lib.cc, "cxx": tp.lib.cxx, "version": tp.lib.compiler_version},
                "cpu": tp.lib.cpu,
                "lib_key": tp.lib.lib_key,
                "seconds": round(time.perf_counter() - t0, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    log(f"{spec.name}: {target} built in {time.perf_counter() - t0:.1f} s -> {tp.binary}")
    return tp


def clean(tp: ToolsPlan) -> None:
    """Remove a tools build (e.g. after a failed configure left a broken cache)."""
    shutil.rmtree(tp.tools_dir, ignore_errors=True)
