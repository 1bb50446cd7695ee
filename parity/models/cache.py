"""The model cache: `<cache>/<sha256>/<filename>` plus `<filename>.meta.json` (source, time, size, a
verification stamp keyed on size + mtime, and for HTTP downloads the connect / read timeouts used).

`<cache>` is `$PARITY_MODEL_CACHE`, else `$XDG_CACHE_HOME/parity/models` (default `~/.cache/parity/models`).
A file whose stamp matches its size and mtime was hashed and matched the lock; it is not hashed again.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from parity.core.download import DownloadPolicy
from parity.core.fs import atomic_write_json
from parity.errors import UsageError
from parity.models.lock import HEX64, LOCK_FIX, LockedFile, check_name

CACHE_ENV = "PARITY_MODEL_CACHE"


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
    if not HEX64.fullmatch(item.sha256):
        raise UsageError(f"invalid sha256 {item.sha256!r} for {item.filename}", fix=LOCK_FIX)
    path = cache / item.sha256 / item.filename
    if path.resolve().parent != (cache / item.sha256).resolve():
        raise UsageError(f"cache path for {item.filename!r} escapes {cache}", fix=LOCK_FIX)
    return path


def _meta_path(final: Path) -> Path:
    return final.with_name(final.name + ".meta.json")


def _read_meta(final: Path) -> dict[str, Any]:
    try:
        meta = json.loads(_meta_path(final).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def stamp_ok(final: Path, item: LockedFile) -> bool:
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


def write_meta(
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
