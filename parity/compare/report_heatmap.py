"""The layer x op heatmap of a lane's localisation (the receipt's `localisation`, compare/locate.py) for
report.html: rows are layers (layer-less ops in a "global" row), columns ops in graph order, each cell
coloured by error / tolerance (compare/report_html.py uses it; the colours are tested in pixels by
tests/integration/test_report_html.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from parity.compare.html_svg import dom_id, esc, fmt, legend, ramp

MISSING = "#e6e6e6"  # a heatmap cell with no measurement
# error / tolerance, on log10: under 1 pale -> green -> yellow; 1 and over orange -> red (a visible jump at 1)
WITHIN = ((-3.0, "#f2faef"), (-1.0, "#a6dba0"), (0.0, "#ffe58a"))
BEYOND = ((0.0, "#fc8d59"), (1.0, "#d73027"), (2.0, "#a50026"))


MODE_WORDS = {
    "replay": "Each op of the implementation fed the reference's own inputs: only that op's local error.",
    "free": "Both engines running freely: how the error grows through the layers.",
}


def heat_colour(ratio: float | None) -> str:
    """The heatmap colour of an op whose error is `ratio` times its tolerance (None: not measured)."""
    if ratio is None or math.isnan(ratio) or ratio < 0:
        return MISSING
    if math.isinf(ratio):
        return BEYOND[-1][1]
    x = math.log10(max(ratio, 1e-12))
    return ramp(WITHIN, x) if ratio <= 1 else ramp(BEYOND, x)


def _ratio(row: Mapping[str, Any]) -> float | None:
    """error / tolerance; infinite for an op out of tolerance whose error is not finite (JSON null)."""
    ratio = row.get("ratio")
    if isinstance(ratio, int | float):
        return float(ratio)
    err, tol = row.get("error"), row.get("tolerance")
    if isinstance(err, int | float) and isinstance(tol, int | float) and tol > 0:
        return float(err) / float(tol)
    return math.inf if row.get("out_of_tolerance") else None


def _first_name(loc: Mapping[str, Any]) -> str | None:
    first = loc.get("first")
    if isinstance(first, Mapping):
        return str(first.get("name")) if first.get("name") is not None else None
    return None if first is None else str(first)


def heatmap(loc: Mapping[str, Any], label: str, index: int = 0) -> str:
    """The layer x op grid of one localisation: rows are layers (global ops last), columns ops in graph order."""
    rows = [row for row in loc.get("rows") or [] if isinstance(row, Mapping)]
    first = _first_name(loc)
    mode = str(loc.get("mode", ""))
    head = f"<h3>Localisation{f' ({esc(mode)})' if mode else ''}</h3>" + (
        f'<p class="muted">{esc(MODE_WORDS[mode])}</p>' if mode in MODE_WORDS else ""
    )
    if not rows:
        why = ": ".join(str(x) for x in (loc.get("status", "no rows"), loc.get("reason")) if x)
        return head + f'<p class="muted localisation">No op was compared ({esc(why)}).</p>'
    ops: list[str] = list(dict.fromkeys(str(row.get("op", row.get("name"))) for row in rows))
    layers = sorted({row["layer"] for row in rows if isinstance(row.get("layer"), int)})
    has_global = any(not isinstance(row.get("layer"), int) for row in rows)
    ylabels = [str(x) for x in layers] + (["global"] if has_global else [])
    cell: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        y = str(row["layer"]) if isinstance(row.get("layer"), int) else "global"
        cell[(y, str(row.get("op", row.get("name"))))] = row
    cw = max(26, min(80, 860 // max(len(ops), 1)))
    ch = 18 if len(ylabels) <= 40 else 10
    left, top = 58, 86
    width, height = left + cw * len(ops) + 70, top + ch * len(ylabels) + 10  # room for the last rotated label
    svg_id = f"heatmap-{dom_id(label)}" + (f"-{index}" if index else "")
    out = [
        f'<svg id="{svg_id}" class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="layer by op heatmap">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="4" y="{top - 6}" font-size="10" fill="#555">layer</text>',
    ]
    for j, op in enumerate(ops):
        cx = left + j * cw + cw / 2
        out.append(
            f'<text x="{cx:.1f}" y="{top - 6}" font-size="10" fill="#333" transform="rotate(-40 {cx:.1f} '
            f'{top - 6})">{esc(op)}</text>'
        )
    outline = None
    for i, y in enumerate(ylabels):
        py = top + i * ch
        out.append(
            f'<text x="{left - 4}" y="{py + ch - 5}" font-size="10" fill="#333" text-anchor="end">{esc(y)}</text>'
        )
        for j, op in enumerate(ops):
            c = cell.get((y, op))
            ratio = None if c is None else _ratio(c)
            px = left + j * cw
            if c is None:
                tip, status = "not measured", "none"
            else:
                tip = (
                    f"{c.get('name')}: error {fmt(c.get('error'))}, tolerance {fmt(c.get('tolerance'))}, "
                    f"noise {fmt(c.get('noise'))}, ratio {fmt(ratio)}"
                )
                out_of = c.get("out_of_tolerance")
                out_of = out_of if isinstance(out_of, bool) else ratio is not None and ratio > 1
                status = "out" if out_of else ("none" if ratio is None else "within")
            out.append(
                f'<rect class="cell" data-mode="{esc(mode)}" data-op="{esc(op)}" data-layer="{esc(y)}" '
                f'data-status="{status}" '
                f'x="{px}" y="{py}" width="{cw - 1}" height="{ch - 1}" fill="{heat_colour(ratio)}">'
                f"<title>{esc(tip)}</title></rect>"
            )
            if c is not None and first is not None and str(c.get("name")) == first:
                outline = (px, py)
    if outline:
        out.append(
            f'<rect class="first" x="{outline[0] - 1}" y="{outline[1] - 1}" width="{cw + 1}" height="{ch + 1}" '
            'fill="none" stroke="#000000" stroke-width="2.5"/>'
        )
    out.append("</svg>")
    return head + "\n".join(out) + _heat_legend() + _localisation_words(loc, rows, first)


def _heat_legend() -> str:
    items = [
        (heat_colour(0.001), "error <= 0.001 x tolerance"),
        (heat_colour(0.1), "0.1 x"),
        (heat_colour(1.0), "1 x: at the tolerance"),
        (heat_colour(1.0001), "over: out of tolerance"),
        (heat_colour(10.0), "10 x"),
        (heat_colour(100.0), ">= 100 x"),
        (MISSING, "not measured"),
    ]
    return legend(items)


def _localisation_words(loc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], first: str | None) -> str:
    by_name = {str(row.get("name")): row for row in rows}
    nxt = [str(x.get("name") if isinstance(x, Mapping) else x) for x in loc.get("next") or []]
    if first is not None:
        fallback = loc.get("first")
        row: Mapping[str, Any] = by_name.get(first) or (fallback if isinstance(fallback, Mapping) else {})
        words = (
            f"First op out of tolerance: <strong>{esc(first)}</strong> (layer {esc(row.get('layer', '?'))}, op "
            f"{esc(row.get('op', '?'))}): error {fmt(row.get('error'))} = {fmt(_ratio(row))} x its tolerance "
            f"{fmt(row.get('tolerance'))} (noise of this op type {fmt(row.get('noise'))})."
        )
        if nxt:
            words += " Next: " + ", ".join(esc(x) for x in nxt[:8]) + "."
    else:
        ratios = [(r_, row) for row in rows if (r_ := _ratio(row)) is not None]
        top = max(ratios, key=lambda t: t[0]) if ratios else None
        words = "No op out of tolerance" + (
            f" (largest: {esc(top[1].get('name'))} at {fmt(top[0])} x its tolerance)." if top else "."
        )
    status = f' <span class="muted">status: {esc(loc["status"])}</span>' if loc.get("status") else ""
    return f'<p class="localisation">{words}{status}</p>'


def localisations(r: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The receipt's localisations to draw: its main one (replay when the implementation could be teacher-forced)
    and, kept beside it (check/locate.py), the free-running one that shows the error growing through the layers."""
    loc = r.get("localisation")
    if isinstance(loc, list):
        return [x for x in loc if isinstance(x, Mapping)]
    if not isinstance(loc, Mapping):
        return []
    free = loc.get("free")
    return [loc, free] if isinstance(free, Mapping) and free.get("rows") else [loc]
