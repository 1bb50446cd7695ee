"""Unit tests run without subprocesses or network: a stray call fails loudly instead of silently working."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest


class StrayCall(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_subprocess_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_process(*args: Any, **kwargs: Any) -> Any:
        raise StrayCall(f"unit test started a subprocess: {args[:1]} (use the fp fixture or move it to integration)")

    def refuse_connect(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        raise StrayCall(f"unit test opened a network connection to {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_process)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
