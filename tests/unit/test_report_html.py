"""compare/report_html.py (the run's report.html), compare/html_svg.py (scales, colours) and check/pieces.py.

The pages are parsed back with html.parser; tests/integration/test_report_html.py renders them in Chromium.
"""

from __future__ import annotations

import copy
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from parity.check import pieces
from parity.compare import html_svg, receipts, report_heatmap, report_html
from parity.tokenize.bpe import bytes_to_unicode
from tests.report_fixtures import PLANTED, SCRIPT_PIECE, lane_receipt, valid


class Page(HTMLParser):
    """Tags, ids, classes and text of a rendered page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self._stack: list[str] = []
        self.tok_text: list[str] = []
        self._in_tok = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        self._in_tok = tag == "span" and "tok" in a.get("class", "").split()

    def handle_endtag(self, tag: str) -> None:
        self._in_tok = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_tok:
            self.tok_text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}


def test_receipt_fixture_is_valid() -> None:
    assert valid(lane_receipt()) == []


def test_lane_section_has_chart_strip_heatmap_and_verdict() -> None:
    r = lane_receipt()
    page = Page(report_html.render([r]))
    assert {"chart-llama", "tokens-llama", "heatmap-llama", "verdict-llama", "lane-llama"} <= page.ids()
    # three panels, each with the implementation's series and the noise floor shaded
    assert len(page.find("polyline", **{"class": "series"})) == 3
    assert len(page.find("polygon", **{"class": "floor-fill"})) == 2  # KL and max |dlogit| (no cosine floor)
    # one token cell per position; generated ones marked; the greedy difference from step 2 on
    cells = [a for t, a in page.tags if t == "span" and "tok" in a.get("class", "").split() and "data-pos" in a]
    assert len(cells) == len(r["token_ids"])
    gen = [c for c in cells if "gen" in c["class"].split()]
    assert [int(c["data-pos"]) for c in gen] == list(range(r["prompt_tokens"], len(r["token_ids"])))
    greedy = [int(c["data-pos"]) for c in cells if "greedy" in c["class"].split()]
    assert greedy == list(range(r["prompt_tokens"] + 2, len(r["token_ids"])))
    flips = {int(c["data-pos"]) for c in cells if "top1" in c["class"].split()}
    assert flips == {row["pos"] for row in r["rows"] if not row["top1_agree"]} and flips
    line = report_html.verdict_line(r)
    assert line.startswith(f"DIVERGED (calibrated): {r['verdict']['reason']}; first position beyond its floor: ")
    assert line.endswith(
        "greedy continuation: MISMATCH at step 2 (reference top-2 gap " + f"{r['greedy']['ref_prob_gap']:.3g})"
    )
    fixed = lane_receipt(floor=False)
    assert report_html.verdict_line(fixed).startswith("DIVERGED (fixed tolerances): min cosine 0.99")
    assert f"first divergence at position {fixed['summary']['first_divergence']['pos']}" in report_html.verdict_line(
        fixed
    )


def test_heatmap_cells_and_first_op() -> None:
    r = lane_receipt()
    loc = r["localisation"]
    assert loc["first"]["name"] == PLANTED
    page = Page(report_html.render([r]))
    cells = page.find("rect", **{"class": "cell", "data-mode": "replay"})
    measured = [c for c in cells if c["data-status"] != "none"]
    assert len(measured) == len(loc["rows"])
    free = page.find("rect", **{"class": "cell", "data-mode": "free"})  # the free-running map beside it
    out_free = {(c["data-layer"], c["data-op"]) for c in free if c["data-status"] == "out"}
    assert ("3", "Qcur") in out_free and ("5", "l_out") in out_free and ("global", "result_output") in out_free
    assert {"heatmap-llama", "heatmap-llama-1"} <= page.ids()
    out = [(c["data-layer"], c["data-op"]) for c in cells if c["data-status"] == "out"]
    assert out == [("3", "Qcur")]
    first_rows = [row for row in loc["rows"] if row["name"] == PLANTED]
    colour = report_heatmap.heat_colour(first_rows[0]["ratio"])
    assert [c["fill"] for c in cells if c["data-status"] == "out"] == [colour]
    assert len(page.find("rect", **{"class": "first"})) == 2  # in each map
    assert any("First op out of tolerance" in t for t in page.text)
    # layers as rows (global ops in their own row), ops as columns
    assert {c["data-layer"] for c in cells} == {*map(str, range(6)), "global"}


def test_untrusted_text_is_escaped() -> None:
    r = lane_receipt()
    html = report_html.render([r])
    assert "<script" not in html.lower()
    page = Page(html)
    assert not page.find("script") and not page.find("b")  # the pieces' tags stayed text
    assert SCRIPT_PIECE in page.tok_text
    assert ' "quoted" & <b>bold</b>↵' in page.tok_text  # newline made visible, quotes and & intact
    assert "What is <2+2>?" in "".join(page.text)  # the prompt, as text
    # attributes: a quote in a piece cannot end the title attribute
    titles = [a["title"] for t, a in page.tags if t == "span" and "title" in a]
    assert any('"quoted"' in t for t in titles)


def test_self_contained_no_fetch_no_script() -> None:
    html = report_html.render([lane_receipt()])
    page = Page(html)
    csp = page.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and "default-src 'none'" in csp[0]["content"]
    for _, a in page.tags:
        for k, v in a.items():
            if k in ("src", "href") or (k != "xmlns" and "://" in v):
                raise AssertionError(f"external reference {k}={v!r}")
    assert not page.find("link") and not page.find("img") and not page.find("script")


def test_old_and_error_receipts_render() -> None:
    old = lane_receipt(floor=False, localised=False)
    for key in ("token_text", "status", "greedy", "prompt_tokens", "generated_tokens", "token_ids"):
        old.pop(key)
    old["version"] = 1
    page = Page(report_html.render([old]))
    assert "chart-llama" in page.ids() and "heatmap-llama" not in page.ids()
    assert not page.find("polygon", **{"class": "floor-fill"})
    err = {"backend": "bitnet", "status": "error", "error": "worker crashed: <signal 11>"}
    page = Page(report_html.render([lane_receipt(), err]))
    assert {"lane-llama", "lane-bitnet"} <= page.ids()
    assert any("worker crashed: <signal 11>" in t for t in page.text)
    assert page.find("span", id="overall")


def test_kl_not_computed_is_said() -> None:
    r = lane_receipt(floor=False)
    for row in r["rows"]:
        row["kl"] = None
    text = "".join(Page(report_html.render([r])).text)
    assert "not computed (--metrics without kl)" in text


def test_verdict_line_prefers_the_calibrated_reason() -> None:
    r = lane_receipt()
    r["verdict"] = {"mode": "calibrated", "reason": "mean KL 4.8e-3 = 1.2x the reference's own variation"}
    r["greedy"]["first_difference"] = None
    assert report_html.verdict_line(r) == "DIVERGED (calibrated): mean KL 4.8e-3 = 1.2x the reference's own variation"
    r["status"] = "error"
    r["error"] = "line one\nline two"
    assert report_html.verdict_line(r) == "ERROR: line one"


def test_calibrated_limits_and_checks_table() -> None:
    r = lane_receipt()
    checks = {c["statistic"]: c for c in r["verdict"]["checks"]}
    page = Page(report_html.render([r]))
    rules = page.find("line", **{"class": "rule"})
    assert len(rules) == 2  # KL and max |dlogit| limits; the fixed cosine tolerance is not the rule here
    table = [t for t in page.text if t in ("mean_kl", "max_abs", "fail", "pass")]
    assert table[:2] == ["mean_kl", "fail"] and table[2:4] == ["max_abs", "fail"], table
    assert checks["mean_kl"]["threshold"] > 0
    # the shaded floor is the larger of the measured variation and the rounding model (epsilon)
    series = report_html._floor_series(r, len(r["rows"]))
    row = r["floor"]["rows"][3]
    assert series["max_abs"][3] == max(row["max_abs"], row["epsilon"])
    assert series["kl"][3] == max(row["kl"], 0.5 * row["epsilon"] ** 2)
    fixed = lane_receipt(floor=False)
    rules = Page(report_html.render([fixed])).find("line", **{"class": "rule"})
    assert len(rules) == 1  # the cosine tolerance


def test_localisation_unavailable_is_said() -> None:
    r = lane_receipt()
    r["localisation"] = {"mode": "replay", "status": "unavailable", "reason": "cmd: engines answer no tensors"}
    text = "".join(Page(report_html.render([r])).text)
    assert "unavailable: cmd: engines answer no tensors" in text


def test_non_finite_error_is_out_of_tolerance() -> None:
    r = lane_receipt()
    row = next(x for x in r["localisation"]["rows"] if x["name"] == "ffn_out-5")
    row.update(error=None, ratio=None, out_of_tolerance=True)
    cells = Page(report_html.render([r])).find("rect", **{"class": "cell", "data-mode": "replay"})
    cell = next(c for c in cells if c["data-layer"] == "5" and c["data-op"] == "ffn_out")
    assert cell["data-status"] == "out" and cell["fill"] == report_heatmap.BEYOND[-1][1]


def test_scale_is_log_when_values_span_decades() -> None:
    s = html_svg.value_scale([1e-9, 1e-3, 0.0], 100, 0)
    assert s is not None and s.log and s.lo == 1e-9 and s.hi == 1e-3
    assert s(0.0) == 100 and s(1e-3) == 0 and abs(s(1e-6) - 50) < 1e-9
    lin = html_svg.value_scale([1.0, 5.0], 100, 0)
    assert lin is not None and not lin.log and lin.lo == 0 and lin(0.0) == 100
    assert html_svg.value_scale([None, math.nan], 100, 0) is None  # type: ignore[list-item]
    assert [round(t, 6) for t in html_svg.nice_ticks(0, 38, 10)] == [float(x) for x in range(0, 39, 5)]


def test_heat_colour_scale() -> None:
    hc = report_heatmap.heat_colour
    assert hc(None) == report_heatmap.MISSING and hc(math.nan) == report_heatmap.MISSING
    assert hc(1e-6) == report_heatmap.WITHIN[0][1] and hc(1.0) == report_heatmap.WITHIN[-1][1]
    assert hc(1.0001) != hc(1.0) and hc(1e6) == hc(math.inf) == report_heatmap.BEYOND[-1][1]
    light = [sum(int(hc(x)[i : i + 2], 16) for i in (1, 3, 5)) for x in (1.5, 10, 100)]
    assert light == sorted(light, reverse=True)  # darker red as the ratio grows beyond 1
    assert hc(0.1) == "#a6dba0"  # green between pale (far within) and yellow (at the tolerance)


def test_write_run_validates_and_writes(tmp_path: Path) -> None:
    r = lane_receipt(floor=False, localised=False)
    receipts.write(tmp_path / "receipt_llama.json", r)
    path = report_html.write_run(
        tmp_path, [("llama", tmp_path / "receipt_llama.json", None), ("bitnet", None, "no build")], "m.gguf"
    )
    assert path == tmp_path / "report.html"
    page = Page(path.read_text(encoding="utf-8"))
    assert {"lane-llama", "lane-bitnet"} <= page.ids()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["receipt_llama.json", "report.html"]  # no temp left


def test_token_text_is_optional_and_checked() -> None:
    r = lane_receipt(floor=False, localised=False)
    assert receipts.validation_errors(r) == []
    bad = copy.deepcopy(r)
    bad["token_text"] = {"x1": "a"}
    assert receipts.validation_errors(bad)
    bad["token_text"] = {"1": 5}
    assert receipts.validation_errors(bad)
    del bad["token_text"]
    assert receipts.validation_errors(bad) == []


def _vocab(model: str, tokens: list[str], types: list[int]) -> pieces.Vocab | None:
    md: dict[str, Any] = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
    }
    return pieces.Vocab.from_metadata(md)


def test_pieces_sentencepiece_and_byte_level() -> None:
    spm = _vocab(
        "llama", ["<unk>", "<s>", "\u2581the", "<0x0A>", "<0xE2>", "a\u2581b", "<mask>"], [2, 3, 1, 6, 6, 1, 4]
    )
    assert pieces.token_text(spm, [2, 3, 4, 5, 1, 0, 6, 99, 2]) == {
        "2": " the",
        "3": "\n",
        "4": "\ufffd",
        "5": "a b",
        "1": "<s>",
        "0": "<unk>",
        "6": "<mask>",
    }
    table = bytes_to_unicode()
    word = "".join(table[b] for b in " héllo\n".encode())
    bpe = _vocab("gpt2", ["<|bos|>", word, "x"], [3, 1, 1])
    assert pieces.token_text(bpe, [0, 1, 2]) == {"0": "<|bos|>", "1": " héllo\n", "2": "x"}
    assert pieces.token_text(None, [1]) == {} and pieces.Vocab.from_metadata({}) is None
    long = _vocab("gpt2", ["y" * 100], [1])
    assert pieces.token_text(long, [0])["0"] == "y" * 63 + "…"


def test_receipt_ids_cover_sequence_top1_and_reference_greedy() -> None:
    rows: list[dict[str, Any]] = [{"top5_ours": [5, 1], "top5_ref": [6, 1]}, {"top5_ours": [], "top5_ref": []}]
    assert pieces.receipt_ids([1, 2], rows, [9]) == [1, 2, 5, 6, 9]
