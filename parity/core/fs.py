"""Filesystem helpers: atomic writes, hashing, safe archive extraction, a process-wide file lock.

The one file hash (`sha256_file`, streamed in CHUNK blocks) and the one atomic writer (`atomic_write_*`) of
parity live here; other modules call these rather than their own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from parity.errors import ParityError, PermissionDenied, UsageError

CHUNK = 1 << 20


class Hasher(Protocol):
    """What `hash_into` feeds: any hashlib object."""

    def update(self, data: bytes, /) -> None: ...


def hash_into(h: Hasher, path: Path, chunk: int = CHUNK) -> int:
    """Feed the bytes of `path` into `h`, `chunk` bytes at a time; return how many there were."""
    count = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            count += len(block)
    return count


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    hash_into(h, path, chunk)
    return h.hexdigest()


def sha256_file_cached(path: Path, cache: Path) -> str:
    """SHA-256 of `path`, remembered in the directory `cache` under the file's identity and change stamps.

    The stamp is (device, inode, size, mtime_ns, ctime_ns): any write, replacement or touch of the file
    changes it (ctime cannot be set by a user), so a changed file is hashed again. The cache is only an
    optimisation: an unreadable or unwritable entry means hashing the file, never a wrong digest.
    """

    def stamp() -> list[int]:
        st = path.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    before = stamp()
    entry = cache / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        record = json.loads(entry.read_text())
        digest = record.get("sha256") if isinstance(record, dict) and record.get("stamp") == before else None
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    if stamp() == before:  # not changed while it was being read
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write_json(entry, {"path": str(path.resolve()), "stamp": before, "sha256": digest})
        except (OSError, ParityError):
            pass
    return digest


def sha256_if_readable(path: Path) -> str | None:
    """SHA-256 of a file, or None when it cannot be read (missing, a directory, no permission)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def _read_umask() -> int:
    """The process umask, without changing it: Linux reports it in /proc/self/status ("Umask:", kernel 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way to read it is to set it: done once, at import, before any thread of ours exists.
    old = os.umask(0o022)
    os.umask(old)
    return old


_IMPORT_UMASK = _read_umask()


def current_umask() -> int:
    """The umask new files get: read afresh on Linux (it may change at run time), else the one at import.

    Never calls os.umask() after import: that call is process-global, and a thread creating a file between
    setting and restoring it would get the wrong mode.
    """
    return _read_umask() if sys.platform.startswith("linux") else _IMPORT_UMASK


def new_file_mode() -> int:
    """Permission bits of a new regular file under the current umask (0o644 under 022, 0o600 under 077)."""
    return 0o666 & ~current_umask()


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create `.<name>.<random>.tmp` beside `path` exclusively, mode 0o666 minus the umask (like open()).

    tempfile.mkstemp would create it 0o600 whatever the umask; here the kernel applies the umask (and a default
    ACL of the directory, if any), exactly as for a file created with open().
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def _replace_via_temp(path: Path, fill: Callable[[int, Path], None]) -> None:
    """Create a temp file beside `path`, let `fill(fd, tmp)` write it (and close fd), then rename it over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except PermissionError as exc:
        raise PermissionDenied(
            f"cannot write in {path.parent}: {exc.strerror}", fix="choose a writable directory"
        ) from exc
    try:
        fill(fd, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsync, then rename.

    Readers see either the old file or the new one, never a half-written one. With `fsync=False` the rename is
    still atomic but a power loss may cost the newest version (for files rebuilt often from other state).

    Permissions: the file gets 0o666 minus the process umask (0o644 under the usual 022, 0o600 under 077),
    like any file created with open(); that is the one knob for who may read parity's outputs. The mode of a
    file being replaced is deliberately not carried over: every output is rebuilt by parity, not edited by
    hand, so it follows the umask of the run that wrote it; that also repairs files left 0o600 by versions
    that wrote through mkstemp. To keep outputs private, run with umask 077.
    """

    def fill(fd: int, tmp: Path) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    _replace_via_temp(path, fill)


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Atomic write for writers that want a path rather than bytes (e.g. gguf.GGUFWriter): `write(tmp)` fills
    an empty temp file beside `path` (same mode rules as atomic_write_bytes), which is fsynced and renamed."""

    def fill(fd: int, tmp: Path) -> None:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    _replace_via_temp(path, fill)


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    """Atomic UTF-8 text write (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


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
    import tarfile  # imported here: most parity commands never extract an archive (startup time, issue 15)

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
    from filelock import FileLock, Timeout  # imported here: ~0.05 s that a warm `parity run` never needs

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
