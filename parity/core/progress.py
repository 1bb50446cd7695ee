"""Progress on the terminal: `StatusLine`, one line redrawn in place on a TTY and printed as a plain line every
few seconds elsewhere (log files, CI consoles); `Progress`, a transfer's line (parity.core.download), on top of
it, as is parity.core.proc's BuildProgress. Formatting is pure functions (`format_bytes`, `format_rate`,
`format_eta`, `progress_bar`, `progress_line`), testable without a terminal or a clock.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

# A terminal redraw costs little, but more than ~10 per second only flickers.
TTY_INTERVAL = 0.1
# Log files and CI consoles keep every line, so one every few seconds is plenty.
PLAIN_INTERVAL = 5.0


def format_bytes(count: float) -> str:
    """Human-readable binary size: "512 B", "1.5 KiB", "241.4 MiB"."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024.0 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable: the loop returns at the last unit")


def format_rate(bytes_per_second: float) -> str:
    """Transfer rate, e.g. "12.3 MiB/s"."""
    return f"{format_bytes(bytes_per_second)}/s"


def format_eta(seconds: float | None) -> str:
    """Remaining time as "m:ss" or "h:mm:ss"; "--:--" while it cannot be estimated yet."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360_000:
        return "--:--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """A fixed-width ASCII bar: "[#####-----]" (ASCII so any console shows it)."""
    fraction = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    filled = int(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(label: str, done: int, total: int, rate: float, *, bar: bool) -> str:
    """One status line: label, optional bar, percent, bytes done/total, rate and ETA."""
    percent = 100.0 * done / total if total > 0 else 100.0
    eta = (total - done) / rate if rate > 0 else None
    parts = [label]
    if bar:
        parts.append(progress_bar(done, total))
    parts += [
        f"{percent:5.1f}%",
        f"{format_bytes(done)} / {format_bytes(total)}",
        format_rate(rate),
        f"ETA {format_eta(eta)}",
    ]
    return "  ".join(parts)


class StatusLine:
    """The status line of `label` on `stream` (default stderr): `show` redraws it in place on a TTY and prints it
    as a plain line otherwise; `clear` wipes a redrawn line. `interval` (default TTY_INTERVAL on a TTY, else
    PLAIN_INTERVAL) is how often subclasses redraw; `clock` is injectable for tests."""

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else _isatty(self.stream)
        self.interval = interval if interval is not None else (TTY_INTERVAL if self.tty else PLAIN_INTERVAL)
        self.clock = clock
        self.t0 = clock()
        self._last = self.t0
        self._drawn = False  # a line was printed (and, on a TTY, is still on screen)

    def show(self, text: str, now: float) -> None:
        """Print `text` as the status line at time `now`."""
        self._last = now
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Wipe a redrawn terminal line, so the caller's summary line starts at column 0."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


class Progress(StatusLine):
    """Reports the progress of one transfer of `total` bytes.

    The first update is shown at once (a slow link shows progress from its first bytes); after that, on a TTY
    the line is redrawn in place every `interval` seconds, otherwise a plain line is printed every `interval`.
    `start` is the byte offset a resumed download begins at: it counts as done but not towards the rate.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        start: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(label, stream=stream, tty=tty, interval=interval, clock=clock)
        self.total = total
        self.start = start
        self.done = start

    def rate(self, now: float | None = None) -> float:
        """Bytes per second transferred since this Progress began (resumed bytes excluded)."""
        elapsed = (self.clock() if now is None else now) - self.t0
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """The current status line."""
        return progress_line(self.label, self.done, self.total, self.rate(now), bar=self.tty)

    def update(self, done: int) -> None:
        """Record that `done` bytes (absolute offset) are in place; print when the interval has passed."""
        self.done = done
        now = self.clock()
        if self._drawn and now - self._last < self.interval:
            return
        if not self._drawn and done >= self.total:
            return  # done in one block: the caller's summary line says so, a 100% line would be noise
        self.show(self.line(now), now)

    def close(self) -> None:
        """Clear a redrawn terminal line, so the caller's summary line starts at column 0."""
        self.clear()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
