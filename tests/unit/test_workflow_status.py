"""Status artifact: the headline, the Markdown summary, the self-contained HTML page."""

from __future__ import annotations

import re
from pathlib import Path

from parity.workflow import status

from .test_workflow_runner import Script, run_pass, write_config


def test_headline_states_no_divergences_and_the_verified_step(tmp_path: Path) -> None:
    out = run_pass(write_config(tmp_path, steps=18), tmp_path / "run", Script())
    assert status.headline(out.state) == "No divergences found, verified through step 17."
    md = (tmp_path / "run" / "status.md").read_text()
    assert "**No divergences found, verified through step 17.**" in md
    assert len(re.findall(r"^\| \[\d+, \d+\) \| verified \|", md, re.M)) == 3


def test_page_distinguishes_verified_from_unverified_windows(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt1"] = {8: ("pc", 0)}
    script.unavailable = {"alt1": {18}, "alt2": {18}}
    out = run_pass(write_config(tmp_path, steps=30), tmp_path / "run", script, continue_on_divergence=True)
    assert [w["status"] for w in out.state["windows"]] == ["verified", "diverged", "verified", "unverified", "verified"]
    page = (tmp_path / "run" / "status.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script|<link|src=|@import|url\(", page)  # self-contained: nothing to fetch
    assert '<svg id="verified-chart"' in page and '<svg id="window-strip"' in page
    assert page.count('class="point"') == 5  # one dot per finished window
    rows = re.findall(r'<tr data-status="(\w+)" data-window="(\d+)">', page)
    assert rows == [("verified", "0"), ("diverged", "6"), ("verified", "12"), ("unverified", "18"), ("verified", "24")]
    assert 'data-divergence="w000006-a1"' in page and 'href="reports/w000006-a1.md"' in page
    assert 'id="headline" class="bad"' in page and "1 open divergence(s)" in page


def test_empty_timeline_and_pending_windows_render(tmp_path: Path) -> None:
    from .test_workflow_state import fresh

    st = fresh()
    page = status.render_html(st)
    assert "no window finished yet" in page and page.count('data-status="pending"') == 2 * 4
    assert status.headline(st) == "No divergences found, nothing verified yet; 4 of 4 windows not verified yet."
