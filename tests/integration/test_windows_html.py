"""The status page renders in a headless browser (Debian `chromium`); shared helpers for the windows tests.

A missing chromium is a failure naming the fix, never a skip: the page is a deliverable, and a page nobody
rendered is not tested.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "windows"
CHROMIUM_FIX = "apt-get update && apt-get install -y chromium"


def windows_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`python -m parity windows ...` (the same as `parity windows ...`, through parity.cli.main) as a user would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "parity", "windows", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def vm_config(tmp_path: Path, *, steps: int, window: int = 6, port_params: str = "", name: str = "vm") -> Path:
    """A copy of examples/windows/vm.toml with absolute command paths and the given geometry."""
    text = (EXAMPLES / "vm.toml").read_text(encoding="utf-8")
    text = text.replace("steps = 240", f"steps = {steps}").replace("window = 6", f"window = {window}")
    text = text.replace('"stackvm.py"', f'"{EXAMPLES / "stackvm.py"}"')
    if port_params:
        text = text.replace(
            '"--impl", "port"], timeout = 30 }', f'"--impl", "port"], timeout = 30, params = {port_params} }}'
        )
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def chromium() -> str:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    exe = next((found for name in names if (found := shutil.which(name))), None)
    if exe is None:
        pytest.fail(f"chromium is not installed, so the status page cannot be rendered (fix: {CHROMIUM_FIX})")
    return exe


def _chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *mode,
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def dump_dom(page: Path, tmp_path: Path) -> str:
    """The DOM after chromium loaded and rendered `page`."""
    return _chromium(page, tmp_path / "chromium-profile", "--dump-dom").stdout


def screenshot(page: Path, tmp_path: Path) -> tuple[int, int, int]:
    """(width, height, bytes) of a PNG screenshot of `page`."""
    png = tmp_path / "status.png"
    _chromium(page, tmp_path / "chromium-profile-shot", f"--screenshot={png}", "--window-size=1000,1400")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height, len(data)


class DomSummary(HTMLParser):
    """What the tests read from a rendered status page."""

    def __init__(self) -> None:
        super().__init__()
        self.window_rows: list[tuple[str, str]] = []
        self.strip_cells: list[str] = []
        self.points: list[str] = []
        self.svgs: list[str] = []
        self.polyline = False
        self.headline = ""
        self._in_headline = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and a.get("id"):
            self.svgs.append(str(a["id"]))
        if tag == "tr" and "data-window" in a:
            self.window_rows.append((str(a["data-window"]), str(a["data-status"])))
        if tag == "rect" and a.get("class") == "window-cell":
            self.strip_cells.append(str(a["data-status"]))
        if tag == "circle" and a.get("class") == "point":
            self.points.append(str(a["data-status"]))
        if tag == "polyline":
            self.polyline = True
        self._in_headline = a.get("id") == "headline"

    def handle_data(self, data: str) -> None:
        if self._in_headline:
            self.headline += data

    def handle_endtag(self, tag: str) -> None:
        self._in_headline = False


def rendered(page: Path, tmp_path: Path) -> DomSummary:
    summary = DomSummary()
    summary.feed(dump_dom(page, tmp_path))
    return summary


def test_status_page_renders_verified_and_unverified_windows(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path, steps=30, port_params='{ bug_step = 14, bug_field = "pc" }')
    run_dir = tmp_path / "run"
    proc = windows_cli("run", "--config", str(cfg), "--run-dir", str(run_dir), "--continue-on-divergence")
    assert proc.returncode == 1, proc.stderr
    dom = rendered(run_dir / "status.html", tmp_path)
    assert dom.svgs == ["verified-chart", "window-strip"] and dom.polyline
    assert dom.window_rows == [
        ("0", "verified"),
        ("6", "verified"),
        ("12", "diverged"),
        ("18", "verified"),
        ("24", "verified"),
    ]
    assert dom.strip_cells == ["verified", "verified", "diverged", "verified", "verified"]
    assert dom.points == ["verified", "verified", "diverged", "verified", "verified"]
    assert "window [12, 18) step 14" in dom.headline and "pc" in dom.headline
    width, height, size = screenshot(run_dir / "status.html", tmp_path)
    assert (width, height) == (1000, 1400) and size > 10_000  # a blank page compresses to far less
