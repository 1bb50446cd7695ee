"""`report.html`: the page `parity run` / `parity parity-both` write beside their receipts (issue 14).

A pure renderer of receipt dicts (compare/receipts.py; schema parity/schema/receipt.schema.json), one section
per lane: the verdict line; a per-position error chart (1 - cosine, KL(ref || impl), max |dlogit|; log scale
when the values span decades) with the reference's own noise floor shaded when the receipt has `floor` rows
and the verdict's limits drawn (calibrated: k x floor; fixed: the cosine tolerance), the calibrated checks
as a table; the token strip (each token's text from `token_text`, disagreements marked:
top-1 after the token differs, greedy continuation differs); and, when the receipt has `localisation`, the
layer x op heatmap coloured by error / tolerance with the first op out of tolerance outlined
(compare/report_heatmap.py).

Self-contained (compare/html_svg.py: inline CSS and SVG, no script, a CSP that forbids any fetch); every text
from a receipt is escaped. tests/unit/test_report_html.py and tests/integration/test_report_html.py (headless
Chromium, pixels) test it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parity.compare import receipts
from parity.compare.html_svg import Panel, Series, dom_id, esc, fmt, legend, page, panels_svg
from parity.compare.report_heatmap import heatmap, localisations
from parity.core.fs import atomic_write_text

REPORT_NAME = "report.html"
COS, KL, DLOGIT = "#1f77b4", "#9467bd", "#ff7f0e"  # the three series
FLOOR_LINE, FLOOR_FILL = "#6f6f6f", "#d9d9d9"  # the reference's own variation
TOL = "#d62728"  # fixed tolerance rule, disagreement marks
CSS = (
    ".strip{display:flex;flex-wrap:wrap;gap:3px;font-family:ui-monospace,monospace;font-size:13px;margin:.3em 0}"
    ".tok{white-space:pre;border:1px solid #ccc;border-radius:3px;padding:0 3px;background:#fff;min-width:.6em}"
    ".tok.gen{background:#eef4fb;border-color:#9bbbe0}.tok.top1{background:#fde0dd;border-color:#d62728}"
    ".tok.greedy{outline:2px solid #7b3294;outline-offset:1px}.tok.first{font-weight:700;border-width:2px}"
    ".tok.ref{background:#f3e8f8}.sep{color:#777;font-size:11px;align-self:center}"
    ".verdict{font-size:1.05em;padding:6px 10px;border-left:4px solid #999;background:#f7f7f7}"
    ".verdict.pass{border-color:#2e7d32;background:#eef7ee}.verdict.diverged{border-color:#c62828;"
    "background:#fdeeee}.verdict.error{border-color:#6a1b9a;background:#f6eefa}"
    "dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;font-size:.9em}"
    "dl.facts dt{color:#666}dl.facts dd{margin:0;word-break:break-all}"
)


def lane_label(r: Mapping[str, Any]) -> str:
    ref = r.get("reference")
    return str(ref.get("lane")) if isinstance(ref, Mapping) and ref.get("lane") else str(r.get("backend", "?"))


def _status(r: Mapping[str, Any]) -> str:
    status = r.get("status")
    if status in ("pass", "diverged", "error"):
        return str(status)
    return "pass" if r.get("summary", {}).get("all_passed") else "diverged"


def _greedy_words(g: Mapping[str, Any] | None) -> str:
    if not g:
        return ""
    k = g.get("first_difference")
    if k is None:
        return f"greedy continuation identical ({len(g.get('ours', []))} tokens)"
    what = "tie flip" if g.get("verdict") == "tie_flip" else "MISMATCH"
    return f"greedy continuation: {what} at step {k} (reference top-2 gap {fmt(g.get('ref_prob_gap'))})"


def verdict_line(r: Mapping[str, Any]) -> str:
    """One line: why the lane passed or failed (the receipt's `verdict.reason` when it has one)."""
    status = _status(r)
    if status == "error":
        return f"ERROR: {(str(r.get('error') or 'no reason recorded').splitlines() or [''])[0]}"
    v = r.get("verdict")
    if isinstance(v, Mapping) and v.get("reason"):
        mode = f" ({v['mode']})" if v.get("mode") else ""
        where = f"; first position beyond its floor: {v['first']}" if isinstance(v.get("first"), int) else ""
        g = r.get("greedy") or {}
        greedy = f"; {_greedy_words(g)}" if g.get("first_difference") is not None else ""
        return f"{status.upper()}{mode}: {v['reason']}{where}{greedy}"
    s = r.get("summary", {})
    th = r.get("thresholds", {})
    mc = s.get("min_cosine")
    parts = [f"min cosine {'n/a' if mc is None else f'{mc:.10f}'} (tolerance >= {fmt(th.get('cos_tol'), 8)})"]
    parts.append(f"max |dlogit| {fmt(s.get('max_abs'))}, mean KL {fmt(s.get('mean_kl'))}")
    fd = s.get("first_divergence")
    if fd:
        parts.append(f"first divergence at position {fd.get('pos')}")
    g = _greedy_words(r.get("greedy"))
    return f"{status.upper()} (fixed tolerances): " + "; ".join(parts) + (f"; {g}" if g else "")


# ------------------------------------------------------------------------------------------------ chart


def _floor_series(r: Mapping[str, Any], n: int) -> dict[str, list[float | None]]:
    """The reference's own variation per position from `floor.rows`, by metric: the measured distance, or the
    rounding model's when larger (`epsilon`: max |dlogit| <= epsilon, KL <= epsilon^2 / 2; compare/calibrate.py),
    which is what a calibrated verdict is judged against. A `cosine` column is drawn as 1 - cosine."""
    floor = r.get("floor")
    rows = floor.get("rows") if isinstance(floor, Mapping) else None
    out: dict[str, list[float | None]] = {}
    if not isinstance(rows, list):
        return out
    for key in ("cosine", "kl", "max_abs"):
        vals: list[float | None] = [None] * n
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                continue
            pos, v, eps = row.get("pos", i), row.get(key), row.get("epsilon")
            if not (isinstance(pos, int) and 0 <= pos < n and isinstance(v, int | float)):
                continue
            value = max(1.0 - v, 0.0) if key == "cosine" else max(float(v), 0.0)
            if isinstance(eps, int | float) and key in ("kl", "max_abs"):
                value = max(value, float(eps) if key == "max_abs" else 0.5 * float(eps) ** 2)
            vals[pos] = value
        if any(v is not None for v in vals):
            out[key] = vals
    return out


def _limits(r: Mapping[str, Any]) -> dict[str, list[tuple[float, str, str]]]:
    """Horizontal rules per panel: the calibrated limits (k x floor) of the verdict's checks, else the fixed
    cosine tolerance."""
    v = r.get("verdict")
    out: dict[str, list[tuple[float, str, str]]] = {"cosine": [], "kl": [], "max_abs": []}
    checks = v.get("checks") if isinstance(v, Mapping) else None
    if isinstance(v, Mapping) and v.get("mode") == "calibrated" and isinstance(checks, list):
        names = {"mean_kl": ("kl", "calibrated limit of the mean KL"), "max_abs": ("max_abs", "calibrated limit")}
        for c in checks:
            panel, words = names.get(str(c.get("statistic")), (None, ""))
            if panel and isinstance(c.get("threshold"), int | float):
                out[panel].append(
                    (float(c["threshold"]), TOL, f"{words}: {v.get('k')} x floor = {fmt(c['threshold'])}")
                )
        return out
    cos_tol = r.get("thresholds", {}).get("cos_tol")
    if isinstance(cos_tol, int | float):
        out["cosine"].append((max(1.0 - cos_tol, 0.0), TOL, f"fixed tolerance: cosine >= {cos_tol}"))
    return out


def checks_table(r: Mapping[str, Any]) -> str:
    """The calibrated verdict's checks: statistic, value, floor (measured / rounding), limit, ratio."""
    v = r.get("verdict")
    checks = v.get("checks") if isinstance(v, Mapping) else None
    if not isinstance(checks, list) or not checks:
        return ""
    head = "".join(
        f"<th{' class=num' if i else ''}>{h}</th>"
        for i, h in enumerate(("check", "value", "floor", "measured", "rounding", "limit", "x floor", ""))
    )
    body = []
    for c in checks:
        if not isinstance(c, Mapping):
            continue
        cells = [c.get(k) for k in ("value", "floor", "measured_floor", "rounding_floor", "threshold", "ratio")]
        ok = "pass" if c.get("passed") else "fail"
        body.append(
            f"<tr><td>{esc(c.get('statistic'))}</td>"
            + "".join(f'<td class="num">{fmt(x) if isinstance(x, int | float) else "n/a"}</td>' for x in cells)
            + f'<td><span class="badge {ok}">{ok}</span></td></tr>'
        )
    return f'<table class="checks"><tr>{head}</tr>{"".join(body)}</table>'


def error_chart(r: Mapping[str, Any]) -> str:
    rows: list[Mapping[str, Any]] = r.get("rows") or []
    n = len(rows)
    label = lane_label(r)

    def col(key: str, f: Any = float) -> list[float | None]:
        return [None if row.get(key) is None else f(row[key]) for row in rows]

    floor = _floor_series(r, n)
    limits = _limits(r)
    marks = [
        (i, f"position {row.get('pos', i)}: top-1 differs (impl {row['top5_ours'][0]}, ref {row['top5_ref'][0]})")
        for i, row in enumerate(rows)
        if row.get("top1_agree") is False and row.get("top5_ours") and row.get("top5_ref")
    ]
    panels = []
    spec = (
        ("cosine", "1 - cosine", COS, lambda v: max(1.0 - float(v), 0.0)),
        ("kl", "KL(reference || implementation)", KL, float),
        ("max_abs", "max |dlogit|", DLOGIT, float),
    )
    for key, title, colour, f in spec:
        series = []
        if key in floor:
            series.append(
                Series(
                    "the reference's own variation (noise floor)",
                    floor[key],
                    FLOOR_LINE,
                    dashed=True,
                    fill=FLOOR_FILL,
                    css="floor",
                )
            )
        series.insert(0, Series(title, col(key, f), colour))
        rules = limits[key]
        note = "not computed (--metrics without kl)" if key == "kl" else "no values"
        panels.append(Panel(title, series, rules, marks, note))
    n_prompt = r.get("prompt_tokens")
    vlines = []
    if isinstance(n_prompt, int) and 0 < n_prompt < n:
        vlines.append((n_prompt - 0.5, "#555555", "generated tokens start here"))
    fd = r.get("summary", {}).get("first_divergence")
    if isinstance(fd, Mapping) and isinstance(fd.get("pos"), int):
        vlines.append((fd["pos"], TOL, f"first divergence: position {fd['pos']}"))
    svg = panels_svg(f"chart-{dom_id(label)}", panels, n, vlines=vlines)
    items = [(COS, "1 - cosine"), (KL, "KL"), (DLOGIT, "max |dlogit|")]
    if floor:
        items.append((FLOOR_FILL, "within the reference's own variation (measured, or its rounding model when larger)"))
    items += [(TOL, "limit (dashed) / top-1 differs (circles)")]
    return svg + legend(items)


# ------------------------------------------------------------------------------------------- token strip


def _visible(piece: str) -> str:
    """Whitespace made visible, control characters named (the text is escaped afterwards)."""
    out = piece.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")
    out = "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in out)
    return out if out else "∅"


def token_strip(r: Mapping[str, Any]) -> str:
    ids: list[int] = list(r.get("token_ids") or [])
    rows: list[Mapping[str, Any]] = r.get("rows") or []
    text: Mapping[str, str] = r.get("token_text") or {}
    n_prompt: int = r["prompt_tokens"] if isinstance(r.get("prompt_tokens"), int) else len(ids)
    g = r.get("greedy") or {}
    k = g.get("first_difference")
    theirs: list[int] = list(g.get("theirs") or [])
    fd = r.get("summary", {}).get("first_divergence") or {}
    label = dom_id(lane_label(r))

    def piece(t: int) -> str:
        return text.get(str(t), f"#{t}")

    cells = []
    for i, t in enumerate(ids):
        row = rows[i] if i < len(rows) else {}
        cls = ["tok"]
        tip = [f"position {i}, token {t} {piece(t)!r}"]
        if i >= n_prompt:
            cls.append("gen")
            tip.append("generated by the implementation")
        if row.get("top1_agree") is False and row.get("top5_ours") and row.get("top5_ref"):
            cls.append("top1")
            a, b = row["top5_ours"][0], row["top5_ref"][0]
            tip.append(f"next token: implementation's top-1 {a} {piece(a)!r}, reference's {b} {piece(b)!r}")
        if isinstance(k, int) and i >= n_prompt + k:
            cls.append("greedy")
            j = i - n_prompt
            ref_t = theirs[j] if j < len(theirs) else None
            tip.append(
                f"greedy differs: the reference generated {ref_t} {piece(ref_t)!r}"
                if ref_t is not None
                else "greedy differs: the reference's continuation ended"
            )
        if fd.get("pos") == i:
            cls.append("first")
            tip.append("first position out of tolerance")
        if row:
            tip.append(
                f"cosine {fmt(row.get('cosine'), 8)}, KL {fmt(row.get('kl'))}, max |dlogit| {fmt(row.get('max_abs'))}"
            )
        if i == n_prompt and i > 0:
            cells.append('<span class="sep">generated:</span>')
        cells.append(
            f'<span class="{" ".join(cls)}" data-pos="{i}" title="{esc(" | ".join(tip))}">'
            f"{esc(_visible(piece(t)))}</span>"
        )
    out = [f'<div class="strip" id="tokens-{label}">{"".join(cells)}</div>']
    if isinstance(k, int):
        ref_cells = [
            f'<span class="tok ref{" greedy" if j >= k else ""}" title="{esc(f"reference step {j}: {t}")}">'
            f"{esc(_visible(piece(t)))}</span>"
            for j, t in enumerate(theirs)
        ]
        out.append(
            f'<div class="strip" id="reference-greedy-{label}"><span class="sep">reference generated:</span>'
            f"{''.join(ref_cells)}</div>"
        )
    out.append(
        '<p class="legend"><span><i class="sw" style="background:#fde0dd;border:1px solid #d62728"></i>'
        'top-1 after this token differs</span><span><i class="sw" style="outline:2px solid #7b3294"></i>'
        'greedy continuation differs</span><span><i class="sw" style="background:#eef4fb"></i>generated'
        "</span></p>"
    )
    if not text:
        out.append('<p class="muted">This receipt has no token_text: tokens are shown by id.</p>')
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ page


def _facts(r: Mapping[str, Any]) -> str:
    model = r.get("model")
    model_s = model.get("path", "?") if isinstance(model, Mapping) else str(model)
    impl = r.get("implementation", {})
    info = r.get("backend_info", {})
    facts = [
        ("model", model_s),
        ("implementation", impl.get("spec") or impl.get("name") or "numpy"),
        ("reference", f"{r.get('backend')} (commit {str(info.get('commit', '?'))[:12]})"),
        (
            "positions",
            f"{r.get('positions')} ({r.get('prompt_tokens', '?')} prompt + {r.get('generated_tokens', '?')} generated)",
        ),
        ("receipt", f"version {r.get('version')}, {r.get('timestamp', '')}"),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts) + "</dl>"


def lane_section(r: Mapping[str, Any]) -> str:
    label = lane_label(r)
    status = _status(r)
    out = [
        f'<section class="lane" id="lane-{dom_id(label)}" data-status="{status}">',
        f'<h2>{esc(label)} <span class="badge {status}">{status.upper()}</span></h2>',
        f'<p class="verdict {status}" id="verdict-{dom_id(label)}">{esc(verdict_line(r))}</p>',
        checks_table(r),
        _facts(r),
    ]
    if status == "error" and not r.get("rows"):
        out.append(f"<pre>{esc(r.get('error') or 'no reason recorded')}</pre>")
    else:
        out += ["<h3>Error per position</h3>", error_chart(r), "<h3>Tokens</h3>", token_strip(r)]
        for i, loc in enumerate(localisations(r)):
            out.append(heatmap(loc, label, i))
    out.append("</section>")
    return "\n".join(out)


def render(receipts: Sequence[Mapping[str, Any]], title: str = "parity report") -> str:
    """The whole page for a run's receipts (one section per lane)."""
    statuses = [_status(r) for r in receipts]
    overall = "pass" if statuses and all(s == "pass" for s in statuses) else "diverged"
    first = receipts[0] if receipts else {}
    prompt = str(first.get("prompt", ""))
    body = [
        f'<h1>{esc(title)} <span class="badge {overall}" id="overall">{"PASS" if overall == "pass" else "FAIL"}'
        "</span></h1>",
        f'<p class="muted">{sum(s == "pass" for s in statuses)}/{len(statuses)} lanes pass. Prompt: '
        f"<q>{esc(prompt)}</q></p>",
    ]
    body += [lane_section(r) for r in receipts]
    return page(title, "\n".join(body), CSS)


def write(path: Path, receipts: Sequence[Mapping[str, Any]], title: str = "parity report") -> Path:
    """Render and write atomically (core/fs.py); returns the path."""
    atomic_write_text(path, render(receipts, title))
    return path


def write_run(out_dir: Path, lanes: Sequence[tuple[str, Path | None, str | None]], model: str) -> Path:
    """`out_dir/report.html` for a run's lanes: (label, receipt path or None, error). A lane that wrote no
    receipt (it failed before comparing) gets a section saying why."""
    docs: list[Mapping[str, Any]] = []
    for label, path, error in lanes:
        if path is not None:
            docs.append(receipts.load(path))
        else:
            docs.append({"backend": label, "status": "error", "error": error or "the lane wrote no receipt"})
    return write(out_dir / REPORT_NAME, docs, f"parity: {model}")
