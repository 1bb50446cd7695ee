"""The lock that guards a windows run directory: an flock on `state.lock`.

The kernel releases an flock when its holder dies, however it dies. The file also records the holder's PID,
command and start time, so a lock left behind by a killed run is reported as stale and taken over, and a
live holder is named in the error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO, Any

from parity.errors import UsageError
from parity.workflow.state import now

LOCK_NAME = "state.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory; use as a context manager. `notes` says if a stale lock was taken over."""

    def __init__(self, run_dir: Path, command: str) -> None:
        self.path = run_dir / LOCK_NAME
        self.command = command
        self.notes: list[str] = []
        self._f: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise UsageError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(f)
            f.close()
            who = (
                f"PID {holder.get('pid')} ({holder.get('command', '?')}, since {holder.get('started', '?')})"
                if holder
                else "another process"
            )
            raise UsageError(
                f"run directory {self.path.parent} is in use by {who}",
                fix="wait for it to finish, or stop that process; a lock of a dead process is taken over automatically",
            ) from None
        holder = self._holder(f)
        if holder.get("pid"):
            pid = int(holder["pid"])
            state = "still running but no longer holding the lock" if _pid_alive(pid) else "no longer running"
            self.notes.append(
                f"stale lock on {self.path.parent} from PID {pid} ({holder.get('command', '?')}, started "
                f"{holder.get('started', '?')}; {state}) taken over"
            )
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": now()}, f)
        f.flush()
        os.fsync(f.fileno())
        self._f = f

    @staticmethod
    def _holder(f: IO[str]) -> dict[str, Any]:
        f.seek(0)
        try:
            data = json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        """Clear the holder record and unlock (the file stays: unlinking a locked path races with takers)."""
        if self._f is None:
            return
        with contextlib.suppress(OSError):
            self._f.seek(0)
            self._f.truncate()
            self._f.flush()
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()
        self._f = None
