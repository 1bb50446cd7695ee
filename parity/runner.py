"""The one place subprocesses run (scikit-build-core style).

Every command is echoed, its output captured, and a failure raises an error that carries the command, the
return code and the tail of the output, so a failed build says exactly what failed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from parity.errors import BuildError, ParityError

TAIL_LINES = 40


class CommandError(BuildError):
    """A command exited non-zero. Subclass of BuildError (exit 5); callers may re-classify."""

    def __init__(self, cmd: Sequence[str], returncode: int, output: str) -> None:
        tail = "\n".join(output.splitlines()[-TAIL_LINES:])
        super().__init__(
            f"command failed with exit code {returncode}: {shlex.join(cmd)}\n--- last output ---\n{tail}",
            fix="read the output above; rerun with --verbose for the full log",
        )
        self.cmd = list(cmd)
        self.returncode = returncode
        self.output = output


def log(message: str) -> None:
    """Progress line on stderr (stdout is reserved for results, e.g. --format json)."""
    print(message, file=sys.stderr, flush=True)


def step(label: str, seconds: float) -> None:
    """Print a finished step with its duration right-aligned (cibuildwheel style)."""
    log(f"{label:<64}{seconds:>9.2f} s")


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    verbose: bool = False,
    log_file: Path | None = None,
) -> str:
    """Run `cmd`, echoing it; return its combined output or raise CommandError.

    With `verbose` the output streams to stderr as it comes; otherwise it is captured (and written to
    `log_file` when given) and only shown on failure.
    """
    args = [os.fspath(c) for c in cmd]
    log(f"$ {shlex.join(args)}")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise BuildError(f"command not found: {args[0]}", fix=f"install {args[0]} and retry") from exc
    except PermissionError as exc:
        raise ParityError(f"cannot execute {args[0]}: {exc}") from exc
    chunks: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        chunks.append(line)
        if verbose:
            sys.stderr.write(line)
    proc.wait()
    output = "".join(chunks)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(output, encoding="utf-8")
    if proc.returncode != 0:
        raise CommandError(args, proc.returncode, output)
    return output


class Timer:
    """Context manager measuring a step and printing it when done."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if exc[0] is None:
            step(self.label, self.seconds)
