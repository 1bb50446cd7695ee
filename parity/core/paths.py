"""Where parity keeps things: the project root (lock/, cpp/), the build cache, fetched sources.

Precedence: PARITY_ROOT / PARITY_CACHE / PARITY_THIRD_PARTY env vars; else the root is the checkout this package
lives in (or the current directory), and the build cache and fetched sources are per user, in the platform cache
directory (`user_cache_dir()`: $XDG_CACHE_HOME/parity, else ~/.cache/parity; `build/` and `sources/`). Both are
keyed by what determines them (parity.backends.build, parity.backends.lock), so every clone and project of one
user shares them and builds nothing twice.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # parity/


def project_root() -> Path:
    """The directory holding lock/ and cpp/ (the repository root for a checkout or editable install)."""
    env = os.environ.get("PARITY_ROOT")
    if env:
        return Path(env).resolve()
    candidate = PACKAGE_DIR.parent
    if (candidate / "lock" / "backends.toml").is_file():
        return candidate
    return Path.cwd().resolve()


def schema_path(name: str) -> Path:
    """A JSON Schema shipped with the package (parity/schema/NAME)."""
    return PACKAGE_DIR / "schema" / name


def lock_dir() -> Path:
    """lock/: pinned backends and models."""
    return project_root() / "lock"


def cache_dir() -> Path:
    """Build artifacts and downloads: PARITY_CACHE, else <user cache>/build (shared by every clone)."""
    env = os.environ.get("PARITY_CACHE")
    return Path(env).expanduser().resolve() if env else user_cache_dir().resolve() / "build"


def user_cache_dir() -> Path:
    """The per-user cache root shared by every checkout: `$XDG_CACHE_HOME/parity`, else `~/.cache/parity`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "parity"


def third_party_dir() -> Path:
    """Fetched backend sources (never committed): PARITY_THIRD_PARTY, else <user cache>/sources."""
    env = os.environ.get("PARITY_THIRD_PARTY")
    return Path(env).expanduser().resolve() if env else user_cache_dir().resolve() / "sources"
