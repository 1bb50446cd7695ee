"""Reference backends: the lock (lock/backends.toml) and acquiring a pinned source tree.

Source kinds, in order of precedence:
  local       a checkout or mirror named by --source or the backend's override env var (PARITY_LLAMA_SRC)
  pypi_sdist  an sdist from a PyPI index that vendors the backend at the pinned commit (verified size and
              SHA-256), found with the PEP 691 JSON API and downloaded by parity.core.download (resumed,
              retried, with progress); PARITY_PYPI_INDEX overrides the index URL, PARITY_SDIST_DIR names a
              directory that already holds the archive (air-gapped machines)
  git         a recursive clone of the upstream URL at the pinned commit
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.core import paths
from parity.core.download import DownloadPolicy, Mismatch, TransferFailed, download, fetch_json
from parity.core.fs import atomic_write_text, file_lock, safe_extract, sha256_file
from parity.core.proc import Timer, log, probe, run
from parity.errors import NetworkError, UsageError

DEFAULT_PYPI_INDEX = "https://pypi.org/simple"
# Files a backend's own CMake run writes into its source tree (llama.cpp's common/build-info.cpp in 2024
# trees): they must not change the tree's identity, or every build would invalidate its own cache key.
GENERATED_IN_TREE = frozenset({"build-info.cpp"})


@dataclass(frozen=True)
class SdistSource:
    """An sdist on PyPI that vendors the backend."""

    package: str
    version: str
    filename: str
    sha256: str
    size_bytes: int
    subdir: str


@dataclass(frozen=True)
class GitSubmodule:
    """A submodule pinned at a commit (bitnet.cpp's llama.cpp fork)."""

    path: str
    url: str
    commit: str


@dataclass(frozen=True)
class BackendSpec:
    """One backend as pinned in lock/backends.toml."""

    name: str
    description: str
    git_url: str
    commit: str
    default_source: str
    override_env: str
    compiler: str
    cmake: dict[str, str]
    sdist: SdistSource | None = None
    submodules: tuple[GitSubmodule, ...] = ()
    # Files copied inside the source tree before configuring (bitnet.cpp's LUT kernel header).
    prepare_copy: dict[str, str] = field(default_factory=dict)
    # "cmake": `cmake --install`; "collect": copy the static libraries from the build tree and the headers
    # from `include_dirs` (bitnet.cpp's install rules reference a header that does not exist).
    install: str = "cmake"
    include_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceTree:
    """An acquired source tree and what identifies it (for cache keys and receipts)."""

    path: Path
    kind: str
    commit: str
    fingerprint: str


def load_lock(path: Path | None = None) -> dict[str, BackendSpec]:
    """Parse lock/backends.toml into BackendSpecs; a malformed entry names the backend and key."""
    path = path or paths.lock_dir() / "backends.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(
            f"backend lock not found: {path}", fix="run from a parity checkout or set PARITY_ROOT"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc
    specs: dict[str, BackendSpec] = {}
    for name, entry in data.get("backends", {}).items():
        try:
            specs[name] = _spec(name, entry)
        except KeyError as exc:
            raise UsageError(
                f"{path}: backend '{name}' lacks key {exc}", fix="restore lock/backends.toml from git"
            ) from exc
    return specs


def _spec(name: str, e: dict[str, Any]) -> BackendSpec:
    sd = e.get("pypi_sdist")
    sdist = (
        SdistSource(sd["package"], sd["version"], sd["filename"], sd["sha256"], int(sd["size_bytes"]), sd["subdir"])
        if sd
        else None
    )
    subs = tuple(GitSubmodule(s["path"], s["url"], s["commit"]) for s in e.get("submodules", []))
    return BackendSpec(
        name=name,
        description=e["description"],
        git_url=e["git_url"],
        commit=e["commit"],
        default_source=e["default_source"],
        override_env=e["override_env"],
        compiler=e.get("compiler", "default"),
        cmake={k: str(v) for k, v in e.get("cmake", {}).items()},
        sdist=sdist,
        submodules=subs,
        prepare_copy=dict(e.get("prepare_copy", {})),
        install=e.get("install", "cmake"),
        include_dirs=tuple(e.get("include_dirs", ())),
    )


def get_spec(name: str) -> BackendSpec:
    """The spec of backend `name`, or a UsageError listing the known ones."""
    specs = load_lock()
    if name not in specs:
        raise UsageError(f"unknown backend '{name}'", fix=f"use one of: {', '.join(sorted(specs))}")
    return specs[name]


def source_override(spec: BackendSpec, cli_source: str | None = None) -> Path | None:
    """The local source directory to use instead of the pinned one, if the user gave one."""
    raw = cli_source or os.environ.get(spec.override_env)
    if not raw:
        return None
    p = Path(raw).expanduser().resolve()
    if not (p / "CMakeLists.txt").is_file():
        how = f"--source or {spec.override_env}"
        raise UsageError(
            f"{how} points at {p}, which has no CMakeLists.txt", fix=f"point {how} at a {spec.name} source tree"
        )
    return p


def describe_source(spec: BackendSpec, override: Path | None) -> tuple[str, str, str]:
    """(kind, commit, fingerprint) of the source that *would* be used, without downloading anything."""
    if override is not None:
        commit, fp = _local_fingerprint(override, ignore=set(spec.prepare_copy.values()))
        return "local", commit, fp
    if spec.default_source == "pypi_sdist" and spec.sdist is not None:
        return "pypi_sdist", spec.commit, f"sdist:{spec.sdist.sha256}"
    return "git", spec.commit, "git:" + spec.commit + "".join(f"+{s.path}@{s.commit}" for s in spec.submodules)


def acquire(spec: BackendSpec, override: Path | None, *, verbose: bool = False) -> SourceTree:
    """Return the source tree for `spec`, fetching and verifying it first if needed."""
    kind, commit, fp = describe_source(spec, override)
    if override is not None:
        log(f"{spec.name}: using local source {override}")
        return SourceTree(override, kind, commit, fp)
    if kind == "pypi_sdist":
        assert spec.sdist is not None
        return SourceTree(_acquire_sdist(spec, spec.sdist), kind, commit, fp)
    return SourceTree(_acquire_git(spec, verbose=verbose), kind, commit, fp)


def _local_fingerprint(root: Path, ignore: set[str] | None = None) -> tuple[str, str]:
    """Identify a local tree: its git HEAD plus uncommitted changes, or a stat walk when it is no checkout.

    `ignore` lists files parity itself writes into the tree before building (prepare_copy targets), so
    preparing a tree does not change its identity.
    """
    ignore = ignore or set()
    head = probe(["git", "-C", root, "rev-parse", "HEAD"])
    dirty = probe(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    top = probe(["git", "-C", root, "rev-parse", "--show-toplevel"])
    # a checkout of its own (not a subdirectory of another repository): HEAD plus its uncommitted changes
    if head and dirty is not None and top and Path(top.strip()) == root:
        return head.strip(), "local-git:" + head.strip() + ":" + hashlib.sha256(dirty.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", "build") and not d.startswith("build-"))
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if rel in ignore or fn in GENERATED_IN_TREE:
                continue
            st = os.stat(os.path.join(dirpath, fn))
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "unknown (local tree)", "local-stat:" + h.hexdigest()[:32]


def _acquire_once(spec: BackendSpec, key: str, fill: Callable[[Path], str]) -> Path:
    """third_party/<backend>/<key>/src, made once by `fill(dest)` under a lock; its marker (the JSON `fill`
    returns) is written last, so a half-made tree is never taken for a complete one."""
    dest = paths.third_party_dir() / spec.name / key
    marker = dest / ".parity-source.json"
    if marker.is_file():
        return dest / "src"
    with file_lock(paths.third_party_dir() / f".{spec.name}.lock", what=f"{spec.name} source"):
        if not marker.is_file():
            atomic_write_text(marker, fill(dest))
    return dest / "src"


def _acquire_sdist(spec: BackendSpec, sd: SdistSource) -> Path:
    return _acquire_once(spec, sd.sha256[:16], lambda dest: _extract_sdist(spec, sd, dest))


def _extract_sdist(spec: BackendSpec, sd: SdistSource, dest: Path) -> str:
    """Extract the sdist's llama.cpp tree into `dest`; the marker record."""
    archive = _obtain_archive(sd)
    with Timer(f"{spec.name}: extract {sd.subdir}"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
        try:
            n = safe_extract(archive, tmp / "src", member_prefix=sd.subdir + "/", strip=sd.subdir + "/")
            if n == 0 or not (tmp / "src" / "CMakeLists.txt").is_file():
                raise UsageError(f"{archive} has no {sd.subdir}/CMakeLists.txt", fix="check the lock's subdir entry")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return f'{{"sha256": "{sd.sha256}", "subdir": "{sd.subdir}", "commit": "{spec.commit}"}}\n'


def _obtain_archive(sd: SdistSource) -> Path:
    """The verified sdist archive: from the download cache, a local mirror directory, or the index."""
    dl_dir = paths.cache_dir() / "downloads"
    target = dl_dir / sd.filename
    if target.is_file() and sha256_file(target) == sd.sha256:
        return target
    mirror = os.environ.get("PARITY_SDIST_DIR")
    if mirror:
        candidate = Path(mirror) / sd.filename
        if not candidate.is_file():
            raise UsageError(
                f"PARITY_SDIST_DIR={mirror} has no {sd.filename}", fix=f"copy {sd.filename} there or unset it"
            )
        got = sha256_file(candidate)
        if got != sd.sha256:
            raise UsageError(
                f"{candidate} has SHA-256 {got}, the lock pins {sd.sha256}", fix="replace it with the pinned file"
            )
        return candidate
    index = os.environ.get("PARITY_PYPI_INDEX", DEFAULT_PYPI_INDEX).rstrip("/")
    policy = DownloadPolicy.from_env()
    url = _sdist_url(index, sd, policy)
    with Timer(f"download {sd.filename} ({sd.size_bytes / 1e6:.1f} MB)"):
        _download(url, target, sd, policy)
    return target


def _sdist_url(index: str, sd: SdistSource, policy: DownloadPolicy) -> str:
    """Find the archive's URL with the PEP 691 JSON simple API and check the index's hash against the lock."""
    page = f"{index}/{sd.package}/"
    try:
        files = fetch_json(page, policy, accept="application/vnd.pypi.simple.v1+json")["files"]
        if not isinstance(files, list):
            raise TypeError("'files' is not a list")
    except (TransferFailed, KeyError, TypeError) as exc:
        raise NetworkError(
            f"cannot read the package index {page}: {exc}",
            fix="check the network or set PARITY_SDIST_DIR / PARITY_PYPI_INDEX",
        ) from exc
    for f in files:
        if isinstance(f, dict) and f.get("filename") == sd.filename:
            listed = f.get("hashes", {}).get("sha256")
            if listed and listed != sd.sha256:
                raise UsageError(f"the index lists {sd.filename} with SHA-256 {listed}, the lock pins {sd.sha256}")
            return str(f["url"])
    raise NetworkError(f"{sd.filename} is not on {page}", fix="check PARITY_PYPI_INDEX or set PARITY_SDIST_DIR")


def _download(url: str, target: Path, sd: SdistSource, policy: DownloadPolicy) -> None:
    """Download `url` to `target` through `<target>.partial` (kept for a resume after a network failure);
    a file that is not the locked one is deleted and never renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        download(url, sd, partial, policy)
    except Mismatch as exc:
        raise UsageError(f"{url}: {exc}", fix="check the mirror; the lock is authoritative") from None
    except TransferFailed as exc:
        raise NetworkError(
            f"download of {url} failed: {exc}", fix="check the network or set PARITY_SDIST_DIR"
        ) from None
    os.replace(partial, target)


def _acquire_git(spec: BackendSpec, *, verbose: bool) -> Path:
    return _acquire_once(spec, spec.commit[:16], lambda dest: _clone(spec, dest, verbose=verbose))


def _clone(spec: BackendSpec, dest: Path, *, verbose: bool) -> str:
    """Clone the pinned commit (and submodules) into `dest`; the marker record."""
    if dest.exists():
        shutil.rmtree(dest)
    src = dest / "src"
    try:
        with Timer(f"{spec.name}: git clone {spec.git_url}"):
            run(["git", "clone", "--no-checkout", spec.git_url, src], verbose=verbose)
            run(["git", "-C", src, "checkout", "--detach", spec.commit], verbose=verbose)
            for sub in spec.submodules:
                run(["git", "-C", src, "submodule", "update", "--init", "--recursive", sub.path], verbose=verbose)
                got = run(["git", "-C", src / sub.path, "rev-parse", "HEAD"]).strip()
                if not got.startswith(sub.commit):
                    raise UsageError(f"{sub.path} is at {got}, the lock pins {sub.commit}")
    except Exception as exc:
        shutil.rmtree(dest, ignore_errors=True)
        out = getattr(exc, "output", "") or str(exc)
        if any(s in out for s in ("Could not resolve host", "unable to access", "Connection", "timed out")):
            raise NetworkError(
                f"cannot clone {spec.git_url}: network unavailable",
                fix=f"set {spec.override_env} to a local checkout",
            ) from exc
        raise
    return f'{{"git_url": "{spec.git_url}", "commit": "{spec.commit}"}}\n'
