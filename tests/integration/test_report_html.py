"""The HTML reports render in headless Chromium: run report.html (issue 14) and the suite report (issue 16).

One Chromium launch per page dumps the DOM, takes a screenshot, logs the console and writes a net log. The
screenshot's pixels are decoded here (PNG: zlib + the five row filters) and checked: the chart's series and
the noise floor are drawn, the heatmap cells have the colours the renderer gave them. No console message
(the page has no script; a blocked fetch or script would be reported there by the CSP), no request made by
the page. The Chromium helpers are the windows page tests' (tests/integration/test_windows_html.py).
CPU cost measured on the shared 2-core machine (load ~18, so wall times were ~5x): the control page 0.6 s, the
test receipt 4.5 s, the real run 10 s (a py: planted engine with --locate: floor, captures, both maps), the real
suite 4.3 s, plus ~3 s of pytest start; the PNG decode is about 1 s of that per 1100 x 2000 screenshot.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.backends import build
from parity.compare import receipts, report_heatmap, report_html
from parity.models import modelgen
from parity.suite import report as suite_report
from tests.report_fixtures import PLANTED, SCRIPT_PIECE, SUITE_SCRIPT_ID, lane_receipt

from .conftest import run_cli
from .test_windows_html import _chromium

WIDTH = 1100


def png_pixels(path: Path) -> np.ndarray:
    """(height, width, 3) uint8 RGB of an 8-bit non-interlaced RGB/RGBA PNG (what Chromium writes).

    Rows are unfiltered along anti-diagonals (pixel (y, x) needs (y, x-1), (y-1, x), (y-1, x-1) only), so
    each step is a vector operation over all rows: about a second for a 1100 x 1800 screenshot."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, [], b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * bpp + 1)
    kind_of = raw[:, 0].astype(np.int16)[:, None]
    filtered = raw[:, 1:].reshape(h, w, bpp).astype(np.int16)
    n_d = w + h - 1
    ys = np.arange(h)
    xs = np.arange(n_d)[:, None] - ys[None, :]  # (n_d, h): x of row y on diagonal d
    valid = (xs >= 0) & (xs < w)
    skew = np.where(valid[:, :, None], filtered[ys[None, :], np.clip(xs, 0, w - 1)], 0).astype(np.int16)
    rec = np.zeros((n_d + 2, h + 1, bpp), np.int16)  # rec[d + 2, y + 1] = pixel (y, d - y), zero padded
    choose = [kind_of == 1, kind_of == 2, kind_of == 3, kind_of == 4]
    for d in range(n_d):
        a, b, c = rec[d + 1, 1:], rec[d + 1, :-1], rec[d, :-1]  # left, up, up-left
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.select(choose, [a, b, (a + b) >> 1, paeth], 0)
        rec[d + 2, 1:] = np.where(valid[d][:, None], (skew[d] + pred) & 255, 0)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pixels: np.ndarray = rec[xx + yy + 2, yy + 1][:, :, :3].astype(np.uint8)
    return pixels


def colour_counts(pixels: np.ndarray) -> Counter[str]:
    flat = pixels.reshape(-1, 3).astype(np.int64)
    keys, counts = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2], return_counts=True)
    return Counter({f"#{int(k):06x}": int(c) for k, c in zip(keys, counts, strict=True)})


@dataclass
class Rendered:
    dom: str
    console: list[str]  # every console message the page produced
    page_requests: list[str]  # URLs the page (not Chromium's own services) asked the network for
    pixels: np.ndarray
    colours: Counter[str]


def render(page: Path, tmp_path: Path, height: int) -> Rendered:
    """Load `page` once in headless Chromium: DOM, console, net log and a WIDTH x `height` screenshot."""
    png, netlog = tmp_path / f"{page.stem}.png", tmp_path / f"{page.stem}-netlog.json"
    proc = _chromium(
        page,
        tmp_path / f"profile-{page.stem}",
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        "--enable-logging=stderr",
        "--v=0",
        f"--log-net-log={netlog}",
        f"--window-size={WIDTH},{height}",
        f"--screenshot={png}",
        "--dump-dom",
    )
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(netlog.read_text(encoding="utf-8"))
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requests = [
        e["params"]["url"]
        for e in log["events"]
        if names.get(e["type"]) == "URL_REQUEST_START_JOB"
        and str(e.get("params", {}).get("network_isolation_key", "")).startswith("file://")
    ]
    pixels = png_pixels(png)
    assert pixels.shape == (height, WIDTH, 3)
    return Rendered(proc.stdout, console, requests, pixels, colour_counts(pixels))


def test_the_detectors_see_a_console_message_and_a_request(tmp_path: Path) -> None:
    """The checks below can fail: a page that logs and fetches is caught by both."""
    page = tmp_path / "control.html"
    page.write_text(
        '<!DOCTYPE html><html><body><p>control</p><script>console.error("control message")</script>'
        '<img src="http://control.invalid/x.png"></body></html>',
        encoding="utf-8",
    )
    r = render(page, tmp_path, 200)
    assert any("control message" in line for line in r.console), r.console
    assert r.page_requests == ["http://control.invalid/x.png"]


def assert_heatmaps_drawn(r: Rendered, loc: dict[str, Any], first_name: str) -> None:
    """Every cell of the receipt's localisation maps (replay, and free beside it) has its colour on screen,
    and the first op's colour covers no more than its cells."""
    rows = loc["rows"] + ((loc.get("free") or {}).get("rows") or [])
    cell = re.search(r'<rect class="cell"[^>]* width="(\d+)" height="(\d+)"', r.dom)
    assert cell, "no heatmap cell in the DOM"
    area = int(cell.group(1)) * int(cell.group(2))  # pixels of one cell (the renderer leaves 1 px between cells)
    expected = Counter(report_heatmap.heat_colour(row["ratio"]) for row in rows)
    first = report_heatmap.heat_colour(next(row["ratio"] for row in loc["rows"] if row["name"] == first_name))
    assert first not in {report_heatmap.heat_colour(x) for x in (1e-3, 0.1, 0.5, 1.0)}  # out-of-tolerance red
    for colour, cells in expected.items():
        assert r.colours[colour] >= 0.6 * cells * area, (colour, cells, r.colours[colour])
    assert r.colours[first] <= (expected[first] + 0.2) * area  # the first op's cells, nothing else that red


@pytest.mark.compile
@pytest.mark.model
def test_parity_run_writes_a_report_that_renders(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """A real run on the default model (the numpy engine with one layer's ffn_norm weights scaled, localised)."""
    impl = "py:tests.planted.bugs:factory_norm_weights"
    proc = run_cli("run", "--out-dir", str(tmp_path), "--format", "json", "--impl", impl, "--locate")
    assert proc.returncode == 1, proc.stderr  # the planted bug diverges
    assert json.loads(proc.stdout)["overall"]["report"] == str(tmp_path / "report.html")
    receipt = receipts.load(tmp_path / "receipt_llama.json")
    assert receipt["token_text"] and set(map(str, receipt["token_ids"])) <= set(receipt["token_text"])
    loc = receipt["localisation"]
    assert loc["status"] == "out_of_tolerance" and loc["first"]["name"] == "ffn_norm-1"
    r = render(tmp_path / "report.html", tmp_path, 2000)
    assert r.console == [] and r.page_requests == []
    for part in ('id="chart-llama"', 'id="tokens-llama"', 'id="heatmap-llama"', "DIVERGED", "ffn_norm-1"):
        assert part in r.dom, part
    assert r.dom.count('class="tok') >= receipt["positions"]
    # the three series and the floor are drawn: pixels of each colour, far more than a legend swatch (12 x 10)
    for colour in (report_html.COS, report_html.KL, report_html.DLOGIT):
        assert r.colours[colour] > 400, (colour, r.colours.most_common(12))
    assert r.colours[report_html.FLOOR_FILL] > 5000, r.colours.most_common(12)  # a swatch is 120 px
    chart = r.pixels[400:1000, 60:1000]
    assert len(np.unique(chart.reshape(-1, 3), axis=0)) > 20  # not a blank region
    assert_heatmaps_drawn(r, loc, "ffn_norm-1")


def test_report_renders_floor_heatmap_and_escaped_pieces(tmp_path: Path) -> None:
    r_ = lane_receipt()
    page = report_html.write(tmp_path / "report.html", [r_])
    r = render(page, tmp_path, 2300)
    assert r.console == [], r.console  # no script ran, nothing was blocked
    assert r.page_requests == []
    assert "<script" not in r.dom.lower().replace("&lt;script", "")  # the piece stayed text
    assert SCRIPT_PIECE.replace("<", "&lt;").replace(">", "&gt;") in r.dom
    # the noise floor is shaded (KL and max |dlogit| panels): a large area of its fill colour
    assert r.colours[report_html.FLOOR_FILL] > 20_000, r.colours.most_common(12)
    # every heatmap cell has its colour: count pixels per expected colour (cells are 1 px apart)
    assert_heatmaps_drawn(r, r_["localisation"], PLANTED)
    assert r.colours[report_heatmap.MISSING] >= 0.6 * 25 * 17  # cells with no op in that layer are grey (>= 26x18)


@pytest.mark.compile
@pytest.mark.model
def test_parity_suite_writes_a_report_that_renders(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    items = [
        {"id": SUITE_SCRIPT_ID, "text": "The quick brown fox jumps over the lazy dog."},
        {"id": 'arith "2+2" & more', "text": "What is 2+2? Four, and 3+3 is six."},
        {"id": "ids", "tokens": [1, *range(40, 72)]},
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    out = tmp_path / "suite"
    proc = run_cli(
        "suite", "--prompts", str(prompts), "--threads", "1", "--out-dir", str(out), "--format", "json",
        "--model-gguf", str(modelgen.default_model("q8_0")[0]),
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rec = json.loads(proc.stdout)
    assert rec["report_html"] == str(out / "report.html")
    r = render(out / "report.html", tmp_path, 1000)
    assert r.console == [] and r.page_requests == []
    assert "<script" not in r.dom.lower().replace("&lt;script", "")
    assert SUITE_SCRIPT_ID.replace("<", "&lt;").replace(">", "&gt;") in r.dom
    assert r.dom.count("data-index=") == len(items)
    assert 'id="kld-histogram"' in r.dom and 'id="kld-cdf"' in r.dom and "bin edges" not in r.dom  # exact CDF
    # the histogram's bars and the CDF's line are drawn: pixels of their colours well beyond the legend swatches
    assert r.colours[suite_report.BARS] > 3000, r.colours.most_common(12)
    assert r.colours[suite_report.CDF] > 600, r.colours.most_common(12)
