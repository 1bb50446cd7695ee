"""The suite's HTML report (issue 16): `report.html` beside suite.json, written by `parity suite` and `merge`.

From the suite receipt (parity/schema/suite.schema.json): the verdict (its mode and rule; calibrated: how the
reference's own variation was measured, and every item's ratio to its floor and that floor), what ran, the statistics as printed
(llama-perplexity's KL-divergence definitions, parity.suite.stats), a KLD histogram (the receipt's log10 bins,
with the positions below and above them), the KLD CDF, and the per-item table, worst items first (errors, then
failures, then by mean KLD). The CDF is exact when the per-position KLD values are at hand (passed in, or read
from the out directory's items, or from the merged shards' directories: parity.suite.store), else drawn from
the histogram's bin edges. Self-contained like the run report (compare/html_svg.py: inline CSS and SVG, no
script, a CSP that forbids any fetch); every text from the receipt (item ids, reasons, paths) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.compare.html_svg import Scale, esc, fmt, legend, page
from parity.core.fs import atomic_write_text
from parity.errors import ParityError
from parity.suite import verdicts

REPORT_NAME = "report.html"
BARS, CDF, LIMIT, MARK = "#4c78a8", "#f58518", "#d62728", "#555555"
MAX_TABLE_ROWS = 500  # the table's length; the receipt holds every item
CDF_POINTS = 400  # quantiles drawn of an exact CDF
W, H, LEFT, RIGHT, TOP, BOTTOM, ZERO_W = 960, 230, 64, 16, 14, 44, 46
CSS = (
    ".verdict{font-size:1.05em;padding:6px 10px;border-left:4px solid #999;background:#f7f7f7}"
    ".verdict.pass{border-color:#2e7d32;background:#eef7ee}.verdict.fail{border-color:#c62828;background:#fdeeee}"
    ".verdict.error{border-color:#6a1b9a;background:#f6eefa}"
    "dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;font-size:.9em}"
    "dl.facts dt{color:#666}dl.facts dd{margin:0;word-break:break-all}"
    "tr.item-fail td,tr.item-error td{background:#fff5f5}td.reason{max-width:28em}"
)


def _x_scale(receipt: Mapping[str, Any]) -> Scale:
    """The log10 KLD axis, right of the slot for what falls below it: whole decades from the first non-empty
    histogram bin to the last one, or to ten times the item limit when that is further (so it is drawn)."""
    h = receipt.get("histogram") or {}
    edges, counts = list(h.get("edges") or [1e-12, 1e2]), list(h.get("counts") or [])
    used = [i for i, c in enumerate(counts) if c]
    lo, hi = (edges[used[0]], edges[used[-1] + 1]) if used else (edges[0], edges[-1])
    limit = _limit(receipt)[0]
    if isinstance(limit, int | float) and limit > 0:
        hi = max(hi, 10 * limit)
    lo = max(edges[0], 10.0 ** math.floor(math.log10(lo)))
    hi = min(edges[-1], 10.0 ** math.ceil(math.log10(hi)))
    return Scale(lo, hi if hi > lo else lo * 10, LEFT + ZERO_W, W - RIGHT, log=True)


def _frame(svg_id: str, title: str) -> list[str]:
    return [
        f'<svg id="{svg_id}" class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
        f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="#fbfbfb" '
        'stroke="#cccccc"/>',
    ]


def _x_axis(x: Scale, below_label: str) -> list[str]:
    base = H - BOTTOM
    out = [
        f'<text x="{LEFT + ZERO_W / 2}" y="{base + 14}" font-size="10" fill="#555" text-anchor="middle">'
        f"{esc(below_label)}</text>"
    ]
    lo, hi = round(math.log10(x.lo)), round(math.log10(x.hi))
    step = max(1, math.ceil((hi - lo) / 8))
    for e in range(lo + step, hi + 1, step):
        px = x(10.0**e)
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{base}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{px:.1f}" y="{base + 14}" font-size="10" fill="#555" text-anchor="middle">1e{e}</text>')
    out.append(
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{base + 32}" font-size="11" fill="#444" text-anchor="middle">'
        "KL divergence per scored position, nats (log scale)</text>"
    )
    return out


def _vlines(x: Scale, lines: Sequence[tuple[float | None, str, str]]) -> list[str]:
    out = []
    for value, colour, label in lines:
        if value is None or not value > 0:
            continue
        px = x(min(max(value, x.lo), x.hi))
        out.append(
            f'<line class="marker" x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{H - BOTTOM}" stroke="{colour}" '
            f'stroke-width="1.5" stroke-dasharray="5 3"><title>{esc(label)}</title></line>'
        )
    return out


def _limit(receipt: Mapping[str, Any]) -> tuple[float | None, str]:
    """The item limit drawn on the KLD axis: fixed, --max-mean-kld; calibrated, k x the median item's mean-KL
    floor (each item has its own floor: the table gives every item's ratio)."""
    v = receipt.get("verdict") or {}
    if v.get("mode") == "calibrated":
        floors = sorted(r["floor"] for r in receipt.get("items") or [] if isinstance(r.get("floor"), int | float))
        if not floors or not isinstance(v.get("k"), int | float):
            return None, ""
        value = float(v["k"]) * floors[len(floors) // 2]
        return value, f"k x the median item's mean-KL floor {fmt(value)} (the reference's own variation)"
    limit = (v.get("thresholds") or {}).get("max_mean_kld")
    return limit, f"an item's mean KLD limit {fmt(limit)}"


def _markers(receipt: Mapping[str, Any]) -> list[tuple[float | None, str, str]]:
    k = (receipt.get("statistics") or {}).get("kld") or {}
    limit, limit_label = _limit(receipt)
    return [
        (k.get("mean"), MARK, f"mean KLD {fmt(k.get('mean'))}"),
        (k.get("median"), MARK, f"median KLD {fmt(k.get('median'))}"),
        (
            (k.get("percentiles") or {}).get("99.0"),
            MARK,
            f"99th percentile {fmt((k.get('percentiles') or {}).get('99.0'))}",
        ),
        (limit, LIMIT, limit_label),
    ]


def histogram_svg(receipt: Mapping[str, Any]) -> str:
    h = receipt.get("histogram") or {}
    edges, counts = list(h.get("edges") or []), list(h.get("counts") or [])
    if len(edges) < 2 or len(counts) != len(edges) - 1:
        return '<p class="muted">No histogram in this receipt.</p>'
    below, above = int(h.get("below", 0)), int(h.get("above", 0))
    x = _x_scale(receipt)
    below += sum(c for e, c in zip(edges[1:], counts, strict=False) if e <= x.lo)  # bins left of the axis
    top = max([*counts, below, above, 1])
    y = Scale(0, top * 1.08, H - BOTTOM, TOP)
    out = _frame("kld-histogram", "KLD histogram")
    for tick in (0, top // 2, top):
        out.append(
            f'<text x="{LEFT - 4}" y="{y(tick) + 4:.1f}" font-size="10" fill="#555" text-anchor="end">{tick}</text>'
        )
    bars: list[tuple[float, float, int, str]] = [
        (LEFT + 4, LEFT + ZERO_W - 6, below, f"{below} positions with KLD < {fmt(x.lo)} (0 included)")
    ]
    bars += [
        (x(edges[i]), x(edges[i + 1]), c, f"{c} positions with {fmt(edges[i])} <= KLD < {fmt(edges[i + 1])}")
        for i, c in enumerate(counts)
        if edges[i] >= x.lo * 0.999
    ]
    if above:
        bars.append((W - RIGHT - 8, W - RIGHT, above, f"{above} positions with KLD >= {fmt(edges[-1])}"))
    for x0, x1, c, tip in bars:
        if c:
            out.append(
                f'<rect class="bar" x="{x0:.1f}" y="{y(c):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                f'height="{y(0) - y(c):.1f}" fill="{BARS}"><title>{esc(tip)}</title></rect>'
            )
    out += _x_axis(x, f"< {fmt(x.lo, 1)}") + _vlines(x, _markers(receipt))
    out.append("</svg>")
    return "\n".join(out)


def cdf_points(receipt: Mapping[str, Any], kld: np.ndarray | None) -> tuple[list[tuple[float, float]], bool]:
    """(KLD value, fraction of positions <= it) points, and whether they are exact (from the values)."""
    if kld is not None and kld.size:
        v = np.sort(np.asarray(kld, dtype=np.float64))
        n = v.size
        idx = np.unique(np.linspace(0, n - 1, min(n, CDF_POINTS)).round().astype(np.int64))
        return [(float(v[i]), (i + 1) / n) for i in idx], True
    h = receipt.get("histogram") or {}
    edges, counts = list(h.get("edges") or []), list(h.get("counts") or [])
    total = sum(counts) + int(h.get("below", 0)) + int(h.get("above", 0))
    if not total or len(edges) < 2:
        return [], False
    acc = int(h.get("below", 0))
    pts = [(float(edges[0]), acc / total)]
    for e, c in zip(edges[1:], counts, strict=False):
        acc += c
        pts.append((float(e), acc / total))
    return pts, False


def cdf_svg(receipt: Mapping[str, Any], kld: np.ndarray | None) -> str:
    pts, exact = cdf_points(receipt, kld)
    if not pts:
        return '<p class="muted">No scored position.</p>'
    x = _x_scale(receipt)
    y = Scale(0.0, 1.0, H - BOTTOM, TOP)
    out = _frame("kld-cdf", "KLD CDF")
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{LEFT - 4}" y="{y(t) + 4:.1f}" font-size="10" fill="#555" text-anchor="end">{t:g}</text>')
    zero = sum(1 for v, _ in pts if v < x.lo)
    below_frac = max((f for v, f in pts if v < x.lo), default=0.0)
    if zero:  # positions below the axis (0 included) as a bar in their slot
        out.append(
            f'<rect class="cdf-zero" x="{LEFT + 4}" y="{y(below_frac):.1f}" width="{ZERO_W - 10}" '
            f'height="{y(0) - y(below_frac):.1f}" fill="{CDF}" opacity="0.5"><title>'
            f"{esc(f'{below_frac:.1%} of positions have KLD < {fmt(x.lo)}')}</title></rect>"
        )
    line = [(x(x.lo), y(below_frac))] + [(x(min(v, x.hi)), y(f)) for v, f in pts if v >= x.lo]
    if len(line) > 1:
        points = " ".join(f"{px:.1f},{py:.1f}" for px, py in line)
        what = "exact, from every scored position" if exact else "at the histogram's bin edges"
        out.append(
            f'<polyline class="cdf" points="{points}" fill="none" stroke="{CDF}" stroke-width="2.5">'
            f"<title>{what}</title></polyline>"
        )
    out += _x_axis(x, f"< {fmt(x.lo, 1)}") + _vlines(x, _markers(receipt))
    out.append("</svg>")
    return "\n".join(out) + (
        ""
        if exact
        else '<p class="muted">CDF at the histogram\'s bin edges (the per-position values were not found).</p>'
    )


def _order(items: Sequence[Mapping[str, Any]], worst: Sequence[int]) -> list[Mapping[str, Any]]:
    """The receipt's worst items first, then errors, failures, passes by mean KLD (highest first), missing last."""
    rank = {"error": 0, "fail": 1, "pass": 2, "missing": 3}
    first = {i: n for n, i in enumerate(worst)}

    def key(r: Mapping[str, Any]) -> tuple[int, int, float, int]:
        m = r.get("mean_kld")
        return (
            first.get(r.get("index", -1), len(first)),
            rank.get(str(r.get("status")), 4),
            -(m if isinstance(m, int | float) else math.inf),
            int(r.get("index", 0)),
        )

    return sorted(items, key=key)


def items_table(receipt: Mapping[str, Any]) -> str:
    items = [r for r in receipt.get("items") or [] if isinstance(r, Mapping)]
    rows = _order(items, receipt.get("worst") or [])
    calibrated = (receipt.get("verdict") or {}).get("mode") == "calibrated"
    cols = (
        *((("ratio", "ratio to floor"), ("floor", "mean-KL floor")) if calibrated else ()),
        ("mean_kld", "mean KLD"),
        ("max_kld", "max KLD"),
        ("kld_p99", "KLD p99"),
        ("same_top", "same top"),
        ("rms_dp", "RMS Δp"),
        ("ppl_ref", "PPL ref"),
        ("ppl_impl", "PPL impl"),
        ("n_scored", "scored"),
    )
    head = (
        "<tr><th class=num>#</th><th>item</th><th>verdict</th>"
        + "".join(f"<th class=num>{esc(label)}</th>" for _, label in cols)
        + "<th>reason</th></tr>"
    )
    body = []
    for r in rows[:MAX_TABLE_ROWS]:
        status = str(r.get("status", "missing"))
        cells = "".join(f'<td class="num">{fmt(r.get(k), 4)}</td>' for k, _ in cols)
        body.append(
            f'<tr class="item-{esc(status)}" data-index="{esc(r.get("index"))}" data-status="{esc(status)}">'
            f'<td class="num">{esc(r.get("index"))}</td><td>{esc(r.get("id"))}</td>'
            f'<td><span class="badge {esc(status)}">{esc(status)}</span></td>{cells}'
            f'<td class="reason">{esc(r.get("reason") or "")}</td></tr>'
        )
    more = len(rows) - MAX_TABLE_ROWS
    note = f'<p class="muted">{more} more item(s) in suite.json.</p>' if more > 0 else ""
    return f'<table id="items">{head}{"".join(body)}</table>{note}'


def _facts(r: Mapping[str, Any]) -> str:
    inp, sc, ex = r.get("input") or {}, r.get("scoring") or {}, r.get("executor") or {}
    impl, ref = r.get("implementation") or {}, r.get("reference") or {}
    shard = ex.get("shard")
    facts = [
        ("implementation", f"{impl.get('spec')}  ({(impl.get('model') or {}).get('path')})"),
        ("reference", f"{ref.get('spec')}  ({(ref.get('model') or {}).get('path')})"),
        (
            "input",
            f"{inp.get('mode')} {inp.get('path')}: {inp.get('n_items')} items, {inp.get('n_tokens')} tokens"
            + (f", ctx {inp['ctx']}" if inp.get("ctx") else ""),
        ),
        ("scoring", f"{sc.get('mode')}: {sc.get('description')} ({sc.get('n_positions')} positions)"),
        (
            "executor",
            f"{ex.get('kind')}, {ex.get('workers')} worker(s)"
            + (f", shard {shard['k']}/{shard['n']}" if isinstance(shard, Mapping) else "")
            + (f", {fmt(ex.get('tokens_per_second'))} tokens/s" if ex.get("tokens_per_second") else ""),
        ),
        ("done", f"{r.get('n_done')} of {r.get('n_items')} items" + ("" if r.get("complete") else " (incomplete)")),
        ("receipt", f"version {r.get('version')}, {r.get('created', '')}, parity {r.get('parity_version', '')}"),
    ]
    v = r.get("verdict") or {}
    facts.insert(0, ("verdict", f"{v.get('mode', 'fixed')}: {v.get('rule', '')}"))
    if v.get("mode") == "calibrated":
        facts.insert(1, ("floor", verdicts.floor_line(r.get("floor"))))
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts) + "</dl>"


def render(receipt: Mapping[str, Any], kld: np.ndarray | None = None) -> str:
    """The whole page; `kld` (optional): every scored position's KLD, for an exact CDF."""
    status = str(receipt.get("status", "incomplete"))
    v = receipt.get("verdict") or {}
    impl, ref = (
        (receipt.get("implementation") or {}).get("label", "?"),
        (receipt.get("reference") or {}).get("label", "?"),
    )
    title = f"parity suite: {impl} vs {ref}"
    body = [
        f'<h1>{esc(title)} <span class="badge {esc(status)}" id="overall">{esc(status.upper())}</span></h1>',
        f'<p class="verdict {esc(status)}" id="verdict">{esc(v.get("reason", ""))}</p>',
        f'<p class="muted">{esc(v.get("rule", ""))}: {esc(v.get("n_pass", 0))} pass, {esc(v.get("n_fail", 0))} fail, '
        f"{esc(v.get('n_error', 0))} error</p>",
        _facts(receipt),
        "<h2>KL divergence per position</h2>",
        histogram_svg(receipt),
        cdf_svg(receipt, kld),
        legend(
            [
                (BARS, "positions per bin"),
                (CDF, "fraction of positions <= x"),
                (MARK, "mean, median, 99th percentile"),
                (LIMIT, _limit(receipt)[1] or "an item's mean KLD limit"),
            ]
        ),
        "<h2>Items, worst first</h2>",
        items_table(receipt),
        "<h2>Statistics</h2>",
        f'<pre id="statistics">{esc(receipt.get("statistics_text", ""))}</pre>',
    ]
    return page(title, "\n".join(body), CSS)


def position_kld(out_dir: Path, receipt: Mapping[str, Any]) -> np.ndarray | None:
    """Every scored position's KLD of the receipt's done items, from the out directory's items (a run or shard)
    or the merged directories'; None when they are not all found (then the CDF comes from the histogram)."""
    from parity.suite.store import Store

    wanted = [int(r["index"]) for r in receipt.get("items") or [] if r.get("status") in ("pass", "fail")]
    ex = receipt.get("executor") or {}
    dirs = [Path(d) for d in ex.get("merged_from") or []] or [out_dir]
    found: dict[int, np.ndarray] = {}
    try:
        for d in dirs:
            st = Store.open_read(d)
            for index in st.done():
                if index in wanted and index not in found:
                    found[index] = np.asarray(st.load_values(index).kld, dtype=np.float64)
    except (ParityError, OSError, ValueError, KeyError):  # the exact CDF is an extra: fall back to the bins
        return None
    if len(found) != len(wanted):
        return None
    return np.concatenate([found[i] for i in sorted(found)]) if found else np.zeros(0)


def write(out_dir: Path, receipt: Mapping[str, Any], kld: np.ndarray | None = None) -> Path:
    """`out_dir/report.html` (atomic, core/fs.py); returns its path."""
    if kld is None:
        kld = position_kld(out_dir, receipt)
    path = out_dir / REPORT_NAME
    atomic_write_text(path, render(receipt, kld))
    return path
