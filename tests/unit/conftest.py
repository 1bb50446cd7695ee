"""Unit tests run without subprocesses or network: a stray call fails loudly instead of silently working."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest


class StrayCall(AssertionError):
    pass


@pytest.fixture(scope="session")
def _user_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _private_user_cache(monkeypatch: pytest.MonkeyPatch, _user_cache_dir: Path) -> None:
    """Per-user caches (file hashes, exported tokenizers: core/paths.user_cache_dir) go to a temporary
    directory, so unit tests neither read a developer's cache nor fill it with thousands of fuzzed files.
    Per test (not session-wide), so integration tests run in the same pytest session see the real caches."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_user_cache_dir))


@pytest.fixture(autouse=True)
def _no_subprocess_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_process(*args: Any, **kwargs: Any) -> Any:
        raise StrayCall(f"unit test started a subprocess: {args[:1]} (use the fp fixture or move it to integration)")

    def refuse_connect(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        raise StrayCall(f"unit test opened a network connection to {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_process)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
