"""Build progress of the subprocess runner: ninja's [n/N] parsed, the status line throttled (fake clock)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from parity.core import proc, progress
from parity.core.proc import BuildProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[1/456] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o\n", (1, 456)),
        ("[456/456] Linking CXX static library src/libllama.a", (456, 456)),
        ("[0/3] Re-checking globbed directories...", (0, 3)),
        ("ninja: no work to do.", None),
        ("  [1/2] indented is not ninja's prefix", None),
        ("[3/2] more done than total", None),
        ("[1/0] empty plan", None),
        ("[12/34]no space after the bracket", None),
        ("-- Configuring done", None),
    ],
)
def test_parse_ninja_progress(line: str, expected: tuple[int, int] | None) -> None:
    assert proc.parse_ninja_progress(line) == expected


def test_line_format() -> None:
    assert proc.build_progress_line("building libllama", 123, 456, 72.4) == "  building libllama [123/456] 26% 1m12s"
    assert proc.build_progress_line("building libllama", None, None, 3.0) == "  building libllama 3s"
    assert proc.format_elapsed(3725) == "1h02m05s"
    assert proc.format_elapsed(59.9) == "59s"


def test_plain_output_is_throttled_and_always_ends_with_the_final_state() -> None:
    clock, out = FakeClock(), io.StringIO()
    bp = BuildProgress("building libllama", stream=out, tty=False, clock=clock)
    assert bp.interval == progress.PLAIN_INTERVAL
    for n in range(1, 11):  # 10 steps, one per second
        clock.now += 1.0
        bp.feed(f"[{n}/10] Building CXX object o{n}.o\n")
    clock.now += 0.5
    bp.feed("ninja: build stopped\n")  # a line without counts keeps the last ones
    bp.close()
    assert out.getvalue().splitlines() == [
        "  building libllama [5/10] 50% 5s",  # at most one line per 5 s
        "  building libllama [10/10] 100% 10s",
        "  building libllama [10/10] 100% 10s",  # close: always the final state
    ]


def test_plain_output_ticks_while_one_step_takes_long() -> None:
    clock, out = FakeClock(), io.StringIO()
    bp = BuildProgress("building llama-quantize", stream=out, tty=False, clock=clock)
    clock.now += 1
    bp.feed("[1/3] Building CXX object llama.cpp.o\n")
    for _ in range(12):  # 12 s of silence from the compiler: ticks from the reader's timeout
        clock.now += 1
        bp.tick()
    assert out.getvalue().splitlines() == [
        "  building llama-quantize [1/3] 33% 5s",
        "  building llama-quantize [1/3] 33% 10s",
    ]


def test_quick_build_prints_only_the_end() -> None:
    clock, out = FakeClock(), io.StringIO()
    bp = BuildProgress("building llama bridge", stream=out, tty=False, clock=clock)
    bp.feed("[1/2] Building CXX object parity_bridge.cpp.o\n")
    clock.now += 2
    bp.feed("[2/2] Linking CXX shared library libparity_bridge_llama.so\n")
    bp.close()
    assert out.getvalue() == "  building llama bridge [2/2] 100% 2s\n"


def test_tty_redraws_one_line_and_clears_it_at_the_end() -> None:
    clock, out = FakeClock(), io.StringIO()
    bp = BuildProgress("building libllama", stream=out, tty=True, clock=clock)
    assert bp.interval == progress.TTY_INTERVAL
    bp.feed("[1/4] a\n")  # no time passed: not drawn
    clock.now += 0.05
    bp.feed("[2/4] b\n")  # 0.05 s: still within the redraw interval
    clock.now += 0.1
    bp.feed("[3/4] c\n")
    clock.now += 61
    bp.feed("[4/4] d\n")
    bp.close()
    text = out.getvalue()
    assert "\n" not in text
    assert text == (
        "\r  building libllama [3/4] 75% 0s\x1b[K"
        "\r  building libllama [4/4] 100% 1m01s\x1b[K"
        "\r\x1b[K"  # cleared, so the step summary that follows starts at column 0
    )


def test_tty_that_never_drew_writes_nothing() -> None:
    out = io.StringIO()
    bp = BuildProgress("building libllama", stream=out, tty=True, clock=FakeClock())
    bp.feed("[1/1] done\n")
    bp.close()
    assert out.getvalue() == ""


def test_tty_is_detected_from_the_stream() -> None:
    assert BuildProgress("x", stream=io.StringIO()).tty is False  # StringIO.isatty() is False


def test_tty_does_not_rewrite_an_unchanged_line() -> None:
    clock, out = FakeClock(), io.StringIO()
    bp = BuildProgress("building libllama", stream=out, tty=True, clock=clock)
    clock.now += 0.2
    bp.feed("[1/4] a\n")
    for _ in range(5):  # ticks within the same second: the text does not change
        clock.now += 0.12
        bp.tick()
    assert out.getvalue() == "\r  building libllama [1/4] 25% 0s\x1b[K"
    clock.now += 0.5
    bp.tick()
    assert out.getvalue().endswith("\r  building libllama [1/4] 25% 1s\x1b[K")


def test_signal_name_names_real_time_signals_too(tmp_path: Path) -> None:
    """A child killed by a signal Python has no name for (a real-time one) is still described, not a crash."""
    import signal

    from parity.core.proc import log_tail, signal_name

    assert (
        signal_name(-signal.SIGABRT) == "SIGABRT"
        and signal_name(-(signal.SIGRTMIN + 3)) == f"signal {signal.SIGRTMIN + 3}"
    )
    log = tmp_path / "child.log"
    assert log_tail(log, 3) == []
    log.write_text("a\nb\nc\nd\n")
    assert log_tail(log, 2) == ["c", "d"]
