"""Filesystem helpers: atomic writes, hashing, safe archive extraction, a process-wide file lock."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock, Timeout

from parity.errors import ParityError, PermissionDenied, UsageError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsync, then rename.

    Readers see either the old file or the new one, never a half-written one.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except PermissionError as exc:
        raise PermissionDenied(
            f"cannot write in {path.parent}: {exc.strerror}", fix="choose a writable directory"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomic UTF-8 text write."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: 2-space indent, sorted keys off (field order is part of readability), newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _is_within(name: str) -> bool:
    return not PurePosixPath(name).is_absolute() and ".." not in PurePosixPath(name).parts


def safe_extract(archive: Path, dest: Path, *, member_prefix: str = "", strip: str = "") -> int:
    """Extract a tar archive, refusing anything that could escape `dest`.

    Rejects absolute paths, `..` components, device files, hard links, and symlinks whose target leaves the
    tree. Only members under `member_prefix` are extracted, with `strip` removed from their names. `.git`
    files and directories are skipped: sources are pinned by hash, not by a git checkout. Returns the number
    of files extracted.
    """
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            name = m.name
            if not _is_within(name):
                raise UsageError(f"refusing archive member with an unsafe path: {name!r} in {archive}")
            if member_prefix and not (name == member_prefix.rstrip("/") or name.startswith(member_prefix)):
                continue
            rel = name[len(strip) :] if strip and name.startswith(strip) else name
            rel = rel.lstrip("/")
            if not rel or any(p == ".git" for p in PurePosixPath(rel).parts):
                continue
            if m.isdev() or m.islnk():
                raise UsageError(
                    f"refusing archive member {name!r} in {archive}: hard links and devices are not allowed"
                )
            if m.issym():
                target = PurePosixPath(rel).parent / m.linkname
                if PurePosixPath(m.linkname).is_absolute() or not _normalised_within(target):
                    raise UsageError(
                        f"refusing symlink {name!r} -> {m.linkname!r} in {archive}: it points outside the tree"
                    )
            # The "data" filter (PEP 706) is a second line of defence behind the checks above.
            tar.extract(m.replace(name=rel, deep=False), dest, filter="data")
            if m.isfile():
                count += 1
    return count


def _normalised_within(p: PurePosixPath) -> bool:
    depth = 0
    for part in p.parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in (".", ""):
            depth += 1
    return True


@contextmanager
def file_lock(path: Path, *, what: str, timeout: float = 3600.0) -> Iterator[None]:
    """Hold an exclusive lock file while a cache entry is built; concurrent runs wait for each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=1.0)
    except Timeout:
        print(
            f"waiting for another parity process holding the lock on {what} ({path}) ...", file=sys.stderr, flush=True
        )
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise ParityError(
                f"timed out after {timeout:.0f} s waiting for the lock on {what}",
                fix=f"remove {path} if no parity process is running",
            ) from exc
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionDenied(
                f"cannot create lock file {path}: {exc.strerror}",
                fix="choose a writable cache directory (PARITY_CACHE)",
            ) from exc
        raise
    try:
        yield
    finally:
        lock.release()
