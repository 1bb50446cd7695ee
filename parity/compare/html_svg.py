"""Self-contained HTML pages with inline SVG charts: the page shell, scales, line charts, colour scales.

Shared by the run report (compare/report_html.py) and the suite report (suite/report.py). Everything a page
needs is inline (CSS, SVG); no script, no font, no image is fetched, and the page's Content-Security-Policy
forbids any fetch and any script, so a page opened from disk makes no network request. Every text that comes
from a receipt goes through `esc` (token pieces and prompts are untrusted).
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# default-src 'none': nothing is fetched, no script runs; inline styles are the page's own.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
BASE_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:1040px;"
    "padding:0 1em;color:#222;background:#fff}"
    "h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.2em;margin:1.2em 0 .3em;border-bottom:1px solid #ddd}"
    "h3{font-size:1em;margin:1em 0 .3em}"
    ".badge{display:inline-block;padding:1px 8px;border-radius:3px;color:#fff;font-size:.85em;"
    "vertical-align:middle}"
    ".pass{background:#2e7d32}.diverged,.fail{background:#c62828}.error{background:#6a1b9a}"
    ".incomplete,.missing{background:#757575}"
    "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}"
    "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
    ".muted{color:#666}.legend span{margin-right:1.2em;white-space:nowrap}"
    ".sw{display:inline-block;width:12px;height:10px;margin-right:4px;vertical-align:middle}"
    "pre{background:#f6f6f6;padding:8px;overflow-x:auto;white-space:pre-wrap}"
    "svg text{font-family:system-ui,sans-serif}"
)


def esc(value: object) -> str:
    """HTML-escaped text (also safe inside a double- or single-quoted attribute)."""
    return html.escape(str(value), quote=True)


def dom_id(text: str) -> str:
    """A string made safe for an id attribute (labels may hold ':' '=' '/' ...)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text) or "x"


def page(title: str, body: str, css: str = "") -> str:
    """The whole document: charset, CSP, inline CSS, no script."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{BASE_CSS}{css}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for people: n/a, 0, or `digits` significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


# ---------------------------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    """Maps a value in [lo, hi] to pixels [p0, p1] (p1 < p0 for a y axis), linearly or in log10."""

    lo: float
    hi: float
    p0: float
    p1: float
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            a, b, x = math.log10(self.lo), math.log10(self.hi), math.log10(v)
        else:
            a, b, x = self.lo, self.hi, v
        t = 0.0 if b == a else (x - a) / (b - a)
        return self.p0 + min(max(t, 0.0), 1.0) * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        if self.log:
            lo, hi = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            step = max(1, math.ceil((hi - lo) / 6))
            return [10.0**e for e in range(lo, hi + 1, step) if self.lo <= 10.0**e <= self.hi * 1.0001]
        return nice_ticks(self.lo, self.hi)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def value_scale(values: Sequence[float], p0: float, p1: float, decades: float = 2.0) -> Scale | None:
    """A y scale for `values` (None when there is no finite value): log10 when the positive values span at
    least `decades` decades (zeros then sit on the bottom edge), else linear from 0."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    pos = [v for v in finite if v > 0]
    if pos and max(pos) / min(pos) >= 10.0**decades:
        lo = 10.0 ** math.floor(math.log10(min(pos)))
        hi = 10.0 ** math.ceil(math.log10(max(pos)))
        return Scale(lo, hi if hi > lo else lo * 10, p0, p1, log=True)
    hi = max([*finite, 0.0])
    lo = min([*finite, 0.0])
    if hi == lo:
        hi = lo + 1.0
    return Scale(lo, hi * 1.05 if hi > 0 else hi, p0, p1)


# ---------------------------------------------------------------------------------------------- colours


def _hex(c: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(v):02x}" for v in c)


def _rgb(h: str) -> tuple[int, int, int]:
    return int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)


def ramp(stops: Sequence[tuple[float, str]], x: float) -> str:
    """Colour at `x` on a piecewise-linear ramp of (position, #rrggbb) stops, clamped at both ends."""
    if x <= stops[0][0]:
        return stops[0][1]
    for (a, ca), (b, cb) in itertools.pairwise(stops):
        if x <= b:
            t = (x - a) / (b - a)
            ra, rb = _rgb(ca), _rgb(cb)
            return _hex(tuple(ra[i] + t * (rb[i] - ra[i]) for i in range(3)))  # type: ignore[arg-type]
    return stops[-1][1]


# ---------------------------------------------------------------------------------------------- charts


@dataclass
class Series:
    """One line of a panel: values per x (None = no value), drawn as a polyline; `fill` shades below it."""

    name: str
    values: Sequence[float | None]
    colour: str
    dashed: bool = False
    fill: str | None = None
    css: str = "series"


@dataclass
class Panel:
    """One chart panel: a title, its series, horizontal rules (value, colour, label), marked points."""

    title: str
    series: list[Series]
    rules: list[tuple[float, str, str]] = field(default_factory=list)
    marks: list[tuple[int, str]] = field(default_factory=list)  # (x index, tooltip): red dots on series[0]
    note: str = ""  # shown instead of the chart when no series has a value


LEFT, RIGHT, PANEL_H, GAP, BOTTOM = 64, 16, 130, 34, 30


def panels_svg(
    svg_id: str,
    panels: Sequence[Panel],
    n: int,
    *,
    width: int = 960,
    vlines: Sequence[tuple[float, str, str]] = (),
    x_label: str = "position",
) -> str:
    """Panels stacked over one shared x axis 0..n-1; `vlines` are (x, colour, label) across every panel."""
    height = GAP + len(panels) * (PANEL_H + GAP) + BOTTOM - GAP
    x = Scale(-0.5, max(n - 0.5, 0.5), LEFT, width - RIGHT)
    out = [
        f'<svg id="{esc(svg_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(svg_id)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for k, panel in enumerate(panels):
        top = GAP + k * (PANEL_H + GAP)
        bottom = top + PANEL_H
        out.append(
            f'<text x="{LEFT}" y="{top - 8}" font-size="13" font-weight="600" fill="#222">{esc(panel.title)}</text>'
        )
        out.append(
            f'<rect x="{LEFT}" y="{top}" width="{width - LEFT - RIGHT}" height="{PANEL_H}" fill="#fbfbfb" '
            'stroke="#cccccc"/>'
        )
        values = [v for s in panel.series for v in s.values if v is not None] + [r[0] for r in panel.rules]
        y = value_scale(values, bottom, top)
        if y is None or not any(v is not None for s in panel.series for v in s.values):
            out.append(
                f'<text x="{(LEFT + width - RIGHT) / 2}" y="{(top + bottom) / 2}" font-size="12" fill="#666" '
                f'text-anchor="middle">{esc(panel.note or "no values")}</text>'
            )
            continue
        for t in y.ticks():
            py = y(t)
            out.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e4e4e4"/>')
            out.append(
                f'<text x="{LEFT - 4}" y="{py + 4:.1f}" font-size="10" fill="#555" text-anchor="end">{fmt(t, 2)}</text>'
            )
        if y.log:
            out.append(
                f'<text x="{width - RIGHT}" y="{top - 8}" font-size="10" fill="#777" text-anchor="end">'
                "log scale (a 0 sits on the bottom edge)</text>"
            )
        drawn = [_series(s, x, y, bottom) for s in panel.series]
        out += [part for fills, _ in drawn for part in fills]  # shaded areas first, under every line
        out += [part for _, lines in reversed(drawn) for part in lines]  # series[0] last: on top
        for value, colour, label in panel.rules:
            py = y(value)
            out.append(
                f'<line class="rule" x1="{LEFT}" x2="{width - RIGHT}" y1="{py:.1f}" y2="{py:.1f}" stroke="{colour}" '
                f'stroke-width="1.5" stroke-dasharray="6 4"><title>{esc(label)}</title></line>'
            )
        first = panel.series[0] if panel.series else None
        for idx, tip in panel.marks:
            v = first.values[idx] if first is not None and 0 <= idx < len(first.values) else None
            if v is not None:
                out.append(
                    f'<circle class="mark" cx="{x(idx):.1f}" cy="{y(v):.1f}" r="4" fill="none" stroke="#d62728" '
                    f'stroke-width="2"><title>{esc(tip)}</title></circle>'
                )
        for vx, colour, label in vlines:
            out.append(
                f'<line x1="{x(vx):.1f}" x2="{x(vx):.1f}" y1="{top}" y2="{bottom}" stroke="{colour}" '
                f'stroke-dasharray="3 3"><title>{esc(label)}</title></line>'
            )
    axis_y = GAP + len(panels) * (PANEL_H + GAP) - GAP
    for t in nice_ticks(0, max(n - 1, 1), 10):
        if t == int(t) and t <= n - 1:
            out.append(
                f'<text x="{x(t):.1f}" y="{axis_y + 14}" font-size="10" fill="#555" text-anchor="middle">{int(t)}</text>'
            )
    out.append(
        f'<text x="{(LEFT + width - RIGHT) / 2}" y="{axis_y + 27}" font-size="11" fill="#444" '
        f'text-anchor="middle">{esc(x_label)}</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def _series(s: Series, x: Scale, y: Scale, bottom: float) -> tuple[list[str], list[str]]:
    """A series as (shaded areas, polylines broken where a value is missing with a point per value)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for i, v in enumerate(s.values):
        if v is None or not math.isfinite(v):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((x(i), y(v)))
    fills: list[str] = []
    out: list[str] = []
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    for run in (r for r in runs if r):
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in run)
        if s.fill:
            area = f"{run[0][0]:.1f},{bottom} {pts} {run[-1][0]:.1f},{bottom}"
            fills.append(f'<polygon class="{s.css}-fill" points="{area}" fill="{s.fill}" stroke="none"/>')
        out.append(
            f'<polyline class="{s.css}" points="{pts}" fill="none" stroke="{s.colour}" stroke-width="2"{dash}>'
            f"<title>{esc(s.name)}</title></polyline>"
        )
        if not s.fill and len(run) <= 400:
            out.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.2" fill="{s.colour}"/>' for px, py in run)
    return fills, out


def legend(items: Sequence[tuple[str, str]]) -> str:
    """A row of colour swatches with labels."""
    spans = "".join(f'<span><i class="sw" style="background:{c}"></i>{esc(label)}</span>' for c, label in items)
    return f'<p class="legend">{spans}</p>'
