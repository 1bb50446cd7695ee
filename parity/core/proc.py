"""The one place subprocesses run (scikit-build-core style).

Every command is echoed, its output captured, and a failure raises an error that carries the command, the
return code and the tail of the output, so a failed build says exactly what failed.

A long build is not silent: with `progress=` the runner reads ninja's `[n/N]` status prefix from the output
and shows "  building libllama [123/456] 27% 1m12s" - redrawn in place on a terminal, as a plain line every
few seconds (and once at the end) otherwise. The full output still goes to the log file.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from parity.core.progress import StatusLine
from parity.errors import BuildError, ParityError

TAIL_LINES = 40
# How often a build's status line is redrawn (parity.core.progress): on a terminal, and in logs / CI consoles.
# ninja's default status format, set explicitly so a user's NINJA_STATUS cannot hide the progress.
NINJA_STATUS = "[%f/%t] "
_NINJA_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] ")


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


def parse_ninja_progress(line: str) -> tuple[int, int] | None:
    """(finished, total) from a ninja status line "[12/345] Building C object ...", else None."""
    match = _NINJA_PROGRESS.match(line)
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    return (done, total) if 0 <= done <= total and total > 0 else None


def format_elapsed(seconds: float) -> str:
    """Elapsed time, compact: "7s", "1m12s", "1h02m03s"."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def build_progress_line(label: str, done: int | None, total: int | None, elapsed: float) -> str:
    """ "  building libllama [123/456] 27% 1m12s" (no counts yet: "  building libllama 3s")."""
    if done is None or total is None:
        return f"  {label} {format_elapsed(elapsed)}"
    return f"  {label} [{done}/{total}] {100 * done // total}% {format_elapsed(elapsed)}"


class BuildProgress(StatusLine):
    """The status line of one build, fed the build's output line by line.

    On a TTY the line is redrawn in place (at most every `interval` s, default 0.1); otherwise a plain line is
    printed at most every `interval` s (default 5) and always once at `close`. `tick` redraws without new
    output, so a long compile step still shows the clock moving. `clock` is injectable for tests.
    """

    done: int | None = None  # ninja's [done/total], once the output has shown one
    total: int | None = None
    _text = ""  # the line last shown

    def line(self, now: float | None = None) -> str:
        """The current status line."""
        elapsed = (self.clock() if now is None else now) - self.t0
        return build_progress_line(self.label, self.done, self.total, elapsed)

    def feed(self, line: str) -> None:
        """One line of the build's output: take its `[n/N]` if it has one, then redraw if the interval passed."""
        parsed = parse_ninja_progress(line)
        if parsed is not None:
            self.done, self.total = parsed
        self.tick()

    def tick(self) -> None:
        """Redraw when `interval` seconds have passed since the last line drawn."""
        now = self.clock()
        if now - self._last >= self.interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self.tty and self._drawn and text == self._text:
            self._last = now
            return  # a terminal already shows it
        self.show(text, now)
        self._text = text

    def close(self) -> None:
        """The final state: a last plain line, or on a TTY the terminal line cleared for the step summary."""
        if self.tty:
            self.clear()
            return
        self._draw(self.clock())


def _lines_with_ticks(stream: Iterable[str], interval: float) -> Iterator[str | None]:
    """The lines of `stream`, with None whenever `interval` seconds pass without one (a reader thread)."""
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        try:
            for line in stream:
                q.put(line)
        finally:
            q.put(None)

    threading.Thread(target=pump, name="runner-output", daemon=True).start()
    while True:
        try:
            item = q.get(timeout=interval)
        except queue.Empty:
            yield None
            continue
        if item is None:
            return
        yield item


def signal_name(returncode: int) -> str:
    """The name of the signal that ended a process (returncode -N): SIGABRT, or "signal 40" for a real-time one."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def log_tail(path: Path, n: int) -> list[str]:
    """The last `n` lines of a child's log file (none when it cannot be read)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []


def probe(cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None) -> str | None:
    """A quiet question to a program (`git rev-parse HEAD`, `c++ --version`): its stdout, or None when it is
    missing or fails. Nothing is echoed; use run() for work whose output the user may need."""
    try:
        done = subprocess.run([os.fspath(c) for c in cmd], cwd=cwd, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    verbose: bool = False,
    log_file: Path | None = None,
    progress: str | BuildProgress | None = None,
) -> str:
    """Run `cmd`, echoing it; return its combined output or raise CommandError.

    With `verbose` the output streams to stderr as it comes; otherwise it is captured (and written to
    `log_file` when given) and only shown on failure. `progress` (a label such as "building libllama", or a
    BuildProgress) shows ninja's `[n/N]` progress while the output is captured; every `cmake --build` passes
    one. With `verbose` it is ignored: the streamed output already shows ninja's lines.
    """
    args = [os.fspath(c) for c in cmd]
    log(f"$ {shlex.join(args)}")
    full_env = dict(os.environ)
    display: BuildProgress | None = None
    if progress is not None and not verbose:
        display = progress if isinstance(progress, BuildProgress) else BuildProgress(progress)
        full_env["NINJA_STATUS"] = NINJA_STATUS
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
    if display is None:
        for line in proc.stdout:
            chunks.append(line)
            if verbose:
                sys.stderr.write(line)
    else:
        try:
            for item in _lines_with_ticks(proc.stdout, display.interval):
                if item is not None:
                    chunks.append(item)
                    display.feed(item)
                else:
                    display.tick()
        finally:
            display.close()
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
