"""Where parity keeps things: the project root (lock/, cpp/), the build cache, fetched sources.

Precedence: PARITY_ROOT / PARITY_CACHE / PARITY_THIRD_PARTY env vars, else the checkout this package
lives in, else the current directory.
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
    """Build artifacts and downloads (git-ignored)."""
    env = os.environ.get("PARITY_CACHE")
    return Path(env).resolve() if env else project_root() / "cache"


def user_cache_dir() -> Path:
    """The per-user cache root shared by every checkout: `$XDG_CACHE_HOME/parity`, else `~/.cache/parity`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "parity"


def third_party_dir() -> Path:
    """Fetched backend sources (git-ignored, never committed)."""
    env = os.environ.get("PARITY_THIRD_PARTY")
    return Path(env).resolve() if env else project_root() / "third_party"
