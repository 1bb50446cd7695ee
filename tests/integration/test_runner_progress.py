"""The runner's build progress with a real child process that prints ninja-like status lines."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from parity.core import proc
from parity.core.proc import BuildProgress, CommandError

FAKE_NINJA = """
import os, sys, time
print("-- Build files have been written to: /tmp/x", flush=True)
print("status format:", os.environ.get("NINJA_STATUS"), flush=True)
n = int(sys.argv[1])
for i in range(1, n + 1):
    print(f"[{i}/{n}] Building CXX object obj{i}.o", flush=True)
    time.sleep(float(sys.argv[2]))
    if i == int(sys.argv[3]):
        print("FAILED: obj.o\\nerror: something broke", flush=True)
        sys.exit(1)
"""


@pytest.fixture
def fake_ninja(tmp_path: Path) -> Path:
    script = tmp_path / "fake_ninja.py"
    script.write_text(FAKE_NINJA, encoding="utf-8")
    return script


def test_plain_progress_from_a_real_child(fake_ninja: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "build.log"
    out = proc.run([sys.executable, fake_ninja, "6", "0", "0"], log_file=log_file, progress="building fake")
    err = capsys.readouterr().err
    assert "[6/6] Building CXX object obj6.o" in out
    assert log_file.read_text(encoding="utf-8") == out  # the full output, as without progress
    assert "status format: [%f/%t] " in out  # ninja's status prefix is forced to the parsed format
    lines = err.splitlines()
    assert lines[0].startswith("$ ")
    assert lines[-1].startswith("  building fake [6/6] 100% ")  # always the final state on a non-TTY
    assert "Building CXX object" not in err  # the output itself stays captured


def test_silent_step_still_ticks(fake_ninja: Path) -> None:
    stream = io.StringIO()
    display = BuildProgress("building fake", stream=stream, tty=False, interval=0.2)
    proc.run([sys.executable, fake_ninja, "2", "1.0", "0"], progress=display)
    lines = stream.getvalue().splitlines()
    # 2 s of silence after each status line with a 0.2 s interval: several heartbeat lines, not one at the end
    assert len(lines) >= 3, lines
    assert any(line.startswith("  building fake [1/2] 50% ") for line in lines), lines
    assert lines[-1].startswith("  building fake [2/2] 100% "), lines


def test_tty_progress_from_a_real_child(fake_ninja: Path) -> None:
    stream = io.StringIO()
    display = BuildProgress("building fake", stream=stream, tty=True, interval=0.05)
    proc.run([sys.executable, fake_ninja, "4", "0.2", "0"], progress=display)
    text = stream.getvalue()
    assert "\n" not in text and text.endswith("\r\x1b[K")
    assert "\r  building fake [" in text


def test_failure_keeps_the_tail_and_the_log(
    fake_ninja: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "build.log"
    with pytest.raises(CommandError) as info:
        proc.run([sys.executable, fake_ninja, "5", "0", "3"], log_file=log_file, progress="building fake")
    assert "error: something broke" in str(info.value) and "[3/5]" in str(info.value)
    assert "error: something broke" in log_file.read_text(encoding="utf-8")
    assert capsys.readouterr().err.splitlines()[-1].startswith("  building fake [3/5] 60% ")


def test_verbose_streams_everything_without_a_status_line(fake_ninja: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc.run([sys.executable, fake_ninja, "3", "0", "0"], verbose=True, progress="building fake")
    err = capsys.readouterr().err
    assert "[3/3] Building CXX object obj3.o" in err
    assert "  building fake" not in err
