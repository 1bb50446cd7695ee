"""parity/suite/report.py: the suite's HTML page (histogram, CDF, items worst first), parsed back.

tests/integration/test_report_html.py renders it in Chromium after a real `parity suite`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from parity.compare import receipts
from parity.suite import receipt as suite_receipt_mod
from parity.suite import report
from tests.report_fixtures import SUITE_SCRIPT_ID, suite_receipt
from tests.unit.test_report_html import Page


def test_fixture_is_a_valid_suite_receipt() -> None:
    r, _ = suite_receipt()
    assert receipts.validation_errors(r, suite_receipt_mod.SCHEMA_PATH) == []


def test_page_has_histogram_cdf_and_items_worst_first() -> None:
    r, kld = suite_receipt()
    page = Page(report.render(r, kld))
    assert {"kld-histogram", "kld-cdf", "items", "verdict", "statistics", "overall"} <= page.ids()
    bars = page.find("rect", **{"class": "bar"})
    drawn = sum(1 for _ in bars)
    assert drawn >= 5  # the KLD spreads over several bins
    rows = [a for t, a in page.tags if t == "tr" and "data-index" in a]
    assert [int(a["data-index"]) for a in rows] == r["worst"]  # the receipt's worst order (all six are in it)
    assert [a["data-status"] for a in rows][:2] == ["error", "fail"]
    assert len(page.find("polyline", **{"class": "cdf"})) == 1
    # markers in both charts: mean, median, 99th percentile and the item limit
    assert len(page.find("line", **{"class": "marker"})) == 2 * 4
    text = "".join(page.text)
    assert "Mean    KLD" in text and r["verdict"]["reason"] in text


def test_histogram_bar_heights_follow_the_counts() -> None:
    r, _ = suite_receipt()
    page = Page(report.histogram_svg(r))
    bars = page.find("rect", **{"class": "bar"})
    heights = [float(b["height"]) for b in bars]
    counts = [c for c in r["histogram"]["counts"] if c]
    x = report._x_scale(r)
    left = sum(c for e, c in zip(r["histogram"]["edges"][1:], r["histogram"]["counts"], strict=False) if e <= x.lo)
    expected = ([r["histogram"]["below"] + left] if r["histogram"]["below"] + left else []) + [
        c for e, c in zip(r["histogram"]["edges"], r["histogram"]["counts"], strict=False) if c and e >= x.lo * 0.999
    ]
    assert len(heights) == len(expected) and sum(expected) == sum(counts) + r["histogram"]["below"]
    # proportional: the tallest bar is the largest count
    assert heights.index(max(heights)) == expected.index(max(expected))
    ratios = [h / c for h, c in zip(heights, expected, strict=True)]
    assert max(ratios) - min(ratios) < 1e-6 * max(ratios) + 0.2  # rounded to 0.1 px


def test_cdf_exact_and_from_bins() -> None:
    r, kld = suite_receipt()
    pts, exact = report.cdf_points(r, kld)
    assert exact and pts[-1][1] == 1.0 and len(pts) <= report.CDF_POINTS
    values = [v for v, _ in pts]
    assert values == sorted(values) and values[0] == float(np.min(kld)) and values[-1] == float(np.max(kld))
    pts, exact = report.cdf_points(r, None)
    assert not exact and pts[-1][1] == 1.0 and len(pts) == len(r["histogram"]["edges"])
    assert "bin edges" in report.cdf_svg(r, None)


def test_untrusted_text_is_escaped() -> None:
    r, kld = suite_receipt()
    html = report.render(r, kld)
    assert "<script" not in html.lower()
    page = Page(html)
    assert not page.find("script")
    assert SUITE_SCRIPT_ID in page.text
    assert "the reference's worker crashed (signal 11) <core>" in page.text


def test_empty_and_incomplete_receipts_render() -> None:
    r, _ = suite_receipt()
    empty = copy.deepcopy(r)
    empty.update(items=[], worst=[], statistics=None, statistics_text="no scored position\n", status="incomplete")
    empty["histogram"].update(counts=[0] * len(empty["histogram"]["counts"]), below=0, above=0)
    page = Page(report.render(empty))
    assert "kld-histogram" in page.ids() and "kld-cdf" not in page.ids()
    assert any("No scored position" in t for t in page.text)


def test_many_items_are_cut_with_a_note() -> None:
    r, kld = suite_receipt()
    item = r["items"][0]
    r["items"] = [{**item, "index": i, "id": f"x{i}"} for i in range(report.MAX_TABLE_ROWS + 7)]
    page = Page(report.render(r, kld))
    assert len([a for t, a in page.tags if t == "tr" and "data-index" in a]) == report.MAX_TABLE_ROWS
    assert any("7 more item(s) in suite.json" in t for t in page.text)


def test_write_reads_the_values_it_can_find(tmp_path: Path) -> None:
    r, _ = suite_receipt()
    path = report.write(tmp_path, r)  # no store here: the CDF comes from the bins, said on the page
    assert path == tmp_path / "report.html"
    assert "bin edges" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
