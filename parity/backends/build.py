"""Building a backend: libllama with CMake + Ninja, then parity's bridge with scikit-build-core.

Artifacts live in <cache>/<backend>-<key>/, keyed by the source fingerprint, the CMake options, the compiler
and the CPU (GGML_NATIVE builds for the host CPU). <cache> is per user (parity.core.paths.cache_dir: the
platform cache directory, PARITY_CACHE overrides), so another clone, a CI run on the same runner or another
project finds an entry it did not build. The bridge sits in a subdirectory keyed by its own sources, so
editing cpp/ rebuilds only the bridge. A build receipt (build.json) marks an entry complete: a second run
finds it and rebuilds nothing.

Concurrency and killed builds: one lock per backend and cache (<cache>/.<backend>.build.lock, the name older
parity versions use too) makes a second builder wait, then find the entry built. Each part is built in a staging directory beside its final
place (<entry>.partial, <entry>/bridge-<key>.partial), emptied first if an earlier build died there, and
renamed into place only when complete (`_publish`, one rename); so a half-written entry is never found,
never used, and never resumed from. The libllama build tree is dropped before the rename (its CMake cache
names the staging path); the installed prefix, the logs and lib.json stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parity.backends import lock
from parity.core import machine, paths
from parity.core.fs import atomic_write_file, atomic_write_json, file_lock
from parity.core.proc import Timer, log, probe, run
from parity.errors import BackendUnavailable, BuildError

BUILD_RECEIPT_VERSION = 1
BRIDGE_SOURCES = ("cpp/parity_bridge.h", "cpp/parity_bridge.cpp", "CMakeLists.txt")


@dataclass(frozen=True)
class BuildPlan:
    """Everything that determines a build, and where its artifacts go."""

    backend: str
    source_kind: str
    commit: str
    source_fingerprint: str
    cmake: dict[str, str]
    cc: str
    cxx: str
    compiler_version: str
    cpu: str
    lib_key: str
    bridge_key: str
    lib_dir: Path
    bridge_dir: Path

    @property
    def bridge_path(self) -> Path:
        return self.bridge_dir / f"libparity_bridge_{self.backend}.so"

    @property
    def receipt_path(self) -> Path:
        return self.bridge_dir / "build.json"


def _compilers(spec: lock.BackendSpec) -> tuple[str, str]:
    if spec.compiler == "clang":
        return shutil.which("clang") or "clang", shutil.which("clang++") or "clang++"
    cc = os.environ.get("CC") or shutil.which("cc") or "cc"
    cxx = os.environ.get("CXX") or shutil.which("c++") or "c++"
    return cc, cxx


def _compiler_version(cxx: str) -> str:
    out = probe([cxx, "--version"])
    if out is None:
        raise BackendUnavailable(
            f"C++ compiler {cxx} not usable (missing, or `{cxx} --version` failed)",
            fix="apt-get install clang"
            if "clang" in Path(cxx).name
            else "install a C++ compiler (apt-get install g++)",
        )
    return out.splitlines()[0].strip() if out.strip() else cxx


def cpu_fingerprint() -> str:
    """Machine + CPU feature flags: a GGML_NATIVE build is only valid on a CPU with the same flags."""
    flags = " ".join(sorted(machine.cpu_info().flags))
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def plan(spec: lock.BackendSpec, override: Path | None) -> BuildPlan:
    """Compute the build plan (cache keys, paths) without touching the network or building anything."""
    kind, commit, fp = lock.describe_source(spec, override)
    cc, cxx = _compilers(spec)
    version = _compiler_version(cxx)
    cpu = cpu_fingerprint()
    lib_key = _digest({"source": fp, "cmake": spec.cmake, "cc": version, "cpu": cpu, "v": BUILD_RECEIPT_VERSION})
    root = paths.project_root()
    bridge_src = hashlib.sha256()
    for rel in BRIDGE_SOURCES:
        bridge_src.update((root / rel).read_bytes())
    bridge_key = _digest({"lib": lib_key, "bridge": bridge_src.hexdigest()})
    lib_dir = paths.cache_dir() / f"{spec.name}-{lib_key}"
    return BuildPlan(
        backend=spec.name,
        source_kind=kind,
        commit=commit,
        source_fingerprint=fp,
        cmake=dict(spec.cmake),
        cc=cc,
        cxx=cxx,
        compiler_version=version,
        cpu=cpu,
        lib_key=lib_key,
        bridge_key=bridge_key,
        lib_dir=lib_dir,
        bridge_dir=lib_dir / f"bridge-{bridge_key}",
    )


def is_built(p: BuildPlan) -> bool:
    """True when the bridge and its receipt exist for exactly this plan."""
    return p.bridge_path.is_file() and p.receipt_path.is_file()


def read_receipt(p: BuildPlan) -> dict[str, Any]:
    """The build receipt of a completed build."""
    data: dict[str, Any] = json.loads(p.receipt_path.read_text(encoding="utf-8"))
    return data


def ensure_built(
    spec: lock.BackendSpec, override: Path | None = None, *, verbose: bool = False, jobs: int | None = None
) -> BuildPlan:
    """Build the backend and its bridge unless an identical build is cached. Returns the plan."""
    t0 = time.perf_counter()
    p = plan(spec, override)
    if is_built(p):
        log(f"{spec.name}: up to date ({p.bridge_path}) [{time.perf_counter() - t0:.2f} s]")
        return p
    with file_lock(lock_path(p), what=f"the {spec.name} build"):
        if is_built(p):  # another process finished it while we waited
            log(f"{spec.name}: up to date ({p.bridge_path})")
            return p
        src = lock.acquire(spec, override, verbose=verbose)
        lib_seconds = 0.0
        if not lib_complete(p.lib_dir):
            stage = _staging(p.lib_dir)
            lib_seconds = _build_lib(spec, p, src.path, verbose=verbose, jobs=jobs, into=stage)
            shutil.rmtree(stage / "build")  # objects; its CMake cache names the staging path: never reusable
            _publish(stage, p.lib_dir)
        else:
            log(f"{spec.name}: libllama up to date ({p.lib_dir / 'prefix'})")
        bridge_stage = _staging(p.bridge_dir)
        staged = dataclasses.replace(p, bridge_dir=bridge_stage)
        with Timer(f"{spec.name}: bridge (scikit-build-core)") as t:
            _build_bridge(staged, verbose=verbose)
        receipt = {
            "version": BUILD_RECEIPT_VERSION,
            "backend": spec.name,
            "source": {"kind": src.kind, "path": str(src.path), "commit": src.commit, "fingerprint": src.fingerprint},
            "cmake": p.cmake,
            "compiler": {"cc": p.cc, "cxx": p.cxx, "version": p.compiler_version},
            "cpu": p.cpu,
            "lib_key": p.lib_key,
            "bridge_key": p.bridge_key,
            "bridge": str(p.bridge_path),
            "durations_s": {"libllama": round(lib_seconds, 2), "bridge": round(t.seconds, 2)},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0],
        }
        atomic_write_json(staged.receipt_path, receipt)
        _publish(bridge_stage, p.bridge_dir)
    log(f"{spec.name}: built in {time.perf_counter() - t0:.1f} s -> {p.bridge_path}")
    return p


def lock_path(p: BuildPlan) -> Path:
    """The build lock of a backend in a cache (every clone using the cache takes it before building there)."""
    return p.lib_dir.with_name(f".{p.backend}.build.lock")


def lib_complete(lib_dir: Path) -> bool:
    """A published libllama entry: lib.json and the installed llama.h."""
    return (lib_dir / "lib.json").is_file() and (lib_dir / "prefix" / "include" / "llama.h").is_file()


def _staging(final: Path) -> Path:
    """An empty staging directory beside `final` (<final>.partial). Called under the entry's lock, so whatever
    is there is what a killed build left behind: it is deleted, never resumed from."""
    stage = final.with_name(final.name + ".partial")
    if stage.exists():
        log(f"discarding {stage} (left by an interrupted build)")
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def _publish(stage: Path, final: Path) -> None:
    """Move a complete staging directory into place with one rename. Whatever sits at `final` is incomplete
    (the caller checked under the lock: an interrupted build of an older parity that built in place): it is
    moved aside first, then deleted."""
    if final.exists():
        aside = final.with_name(f"{final.name}.stale-{os.getpid()}")
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(stage, final)


def _init_cache(p: BuildPlan, prefix: Path) -> str:
    """CMake init-cache script: the options live in a file, not on a 40-flag command line."""
    lines = [f'set({k} "{v}" CACHE STRING "" FORCE)' for k, v in sorted(p.cmake.items())]
    lines += [
        f'set(CMAKE_C_COMPILER "{p.cc}" CACHE FILEPATH "" FORCE)',
        f'set(CMAKE_CXX_COMPILER "{p.cxx}" CACHE FILEPATH "" FORCE)',
        f'set(CMAKE_INSTALL_PREFIX "{prefix}" CACHE PATH "" FORCE)',
        'set(CMAKE_INSTALL_LIBDIR "lib" CACHE PATH "" FORCE)',
    ]
    return "\n".join(lines) + "\n"


def cmake_commands(
    p: BuildPlan, src: Path, jobs: int, install: str = "cmake", root: Path | None = None
) -> list[list[str]]:
    """The exact configure / build (/ install) commands for libllama in `root` (default: the entry itself;
    ensure_built passes its staging directory) (asserted by unit tests)."""
    root = root or p.lib_dir
    build = root / "build"
    cmds = [
        ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-C", str(root / "init-cache.cmake")],
        ["cmake", "--build", str(build), "--parallel", str(jobs)],
    ]
    if install == "cmake":
        cmds.append(["cmake", "--install", str(build)])
    return cmds


def collect_install(build_dir: Path, src: Path, include_dirs: tuple[str, ...], prefix: Path) -> None:
    """Install by copying: every static library of the build tree, and llama.h/ggml*.h from include_dirs."""
    (prefix / "lib").mkdir(parents=True, exist_ok=True)
    (prefix / "include").mkdir(parents=True, exist_ok=True)
    libs = sorted(build_dir.rglob("*.a"))
    if not libs:
        raise BuildError(f"no static libraries under {build_dir}", fix="see the build log beside it")
    for lib in libs:
        shutil.copy2(lib, prefix / "lib" / lib.name)
    for rel in include_dirs:
        for header in sorted((src / rel).glob("*.h")):
            shutil.copy2(header, prefix / "include" / header.name)
    if not (prefix / "include" / "llama.h").is_file():
        raise BuildError(
            f"llama.h not found in {', '.join(include_dirs)} of {src}", fix="check include_dirs in the lock"
        )


def _build_lib(
    spec: lock.BackendSpec, p: BuildPlan, src: Path, *, verbose: bool, jobs: int | None, into: Path | None = None
) -> float:
    """Build and install libllama in `into` (default: the entry itself); lib.json, written last, names the
    entry's prefix."""
    root = into or p.lib_dir
    prefix = root / "prefix"
    done = root / "lib.json"
    if lib_complete(root):
        log(f"{spec.name}: libllama up to date ({prefix})")
        return 0.0
    for rel, target in spec.prepare_copy.items():
        dst = src / target
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
    root.mkdir(parents=True, exist_ok=True)
    (root / "init-cache.cmake").write_text(_init_cache(p, prefix), encoding="utf-8")
    if prefix.exists():
        shutil.rmtree(prefix)
    jobs = jobs or os.cpu_count() or 2
    t0 = time.perf_counter()
    labels = ("configure", "build", "install")
    for label, cmd in zip(
        labels, cmake_commands(p, src, jobs, spec.install, root), strict=False
    ):  # no install step for "collect"
        with Timer(f"{spec.name}: libllama {label}"):
            shown = f"{spec.name}: building libllama" if label == "build" else None
            run(cmd, verbose=verbose, log_file=root / f"{label}.log", progress=shown)
    if spec.install == "collect":
        with Timer(f"{spec.name}: libllama install (collect)"):
            collect_install(root / "build", src, spec.include_dirs, prefix)
    seconds = time.perf_counter() - t0
    atomic_write_json(done, {"seconds": round(seconds, 2), "prefix": str(p.lib_dir / "prefix")})
    return seconds


def bridge_command(p: BuildPlan, wheel_dir: Path) -> list[str]:
    """PEP 517 build_wheel through scikit-build-core, defining which backend to compile the bridge against."""
    settings = {
        "cmake.define.PARITY_BACKEND": p.backend,
        "cmake.define.PARITY_LLAMA_PREFIX": str(p.lib_dir / "prefix"),
        "cmake.define.CMAKE_C_COMPILER": p.cc,
        "cmake.define.CMAKE_CXX_COMPILER": p.cxx,
        "build-dir": str(p.bridge_dir / "build"),
        "wheel.license-files": "[]",
    }
    code = (
        "import json, sys; from scikit_build_core.build import build_wheel; "
        "print(build_wheel(sys.argv[1], json.loads(sys.argv[2])))"
    )
    return [sys.executable, "-c", code, str(wheel_dir), json.dumps(settings)]


def _build_bridge(p: BuildPlan, *, verbose: bool) -> None:
    p.bridge_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parity-wheel-") as tmp:
        out = run(
            bridge_command(p, Path(tmp)),
            cwd=paths.project_root(),
            verbose=verbose,
            log_file=p.bridge_dir / "bridge.log",
            progress=f"{p.backend}: building bridge",
        )
        wheel = Path(tmp) / out.strip().splitlines()[-1]
        member = f"parity_bridge_lib/libparity_bridge_{p.backend}.so"
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(member)
        except (KeyError, FileNotFoundError, zipfile.BadZipFile) as exc:
            raise BuildError(
                f"scikit-build-core produced no {member} in {wheel.name}", fix="see " + str(p.bridge_dir / "bridge.log")
            ) from exc

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o755)

    atomic_write_file(p.bridge_path, write)


def plan_dict(p: BuildPlan) -> dict[str, Any]:
    """JSON-friendly view of a plan."""
    d = asdict(p)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
