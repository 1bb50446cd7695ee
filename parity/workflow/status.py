"""The status artifact of a windows run: `status.md` and a self-contained `status.html`.

Both are regenerated from the state after every window. The page has no external resources and no
script: inline CSS, an inline SVG chart of verified steps over time, an SVG strip with one cell per window
coloured by status, and the same tables as the Markdown. Elements carry ids and `data-status` attributes
(`#headline`, `#verified-chart`, `#window-strip`, `#windows tr[data-status]`) so a test or a script can read
the page without parsing prose.
"""

from __future__ import annotations

import calendar
import html
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parity.workflow.state import replace_text

STATUS_ORDER = ("verified", "diverged", "unverified", "interrupted", "stale", "in_progress", "pending")
COLOURS = {
    "verified": "#2e7d32",
    "diverged": "#c62828",
    "unverified": "#ef6c00",
    "interrupted": "#8e24aa",
    "stale": "#6d4c41",
    "in_progress": "#1565c0",
    "pending": "#b0bec5",
}
EVENTS_SHOWN = 20


def _epoch(ts: str) -> float:
    base, _, frac = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + (int(frac) / 1000 if frac else 0.0)


def counts(state: Mapping[str, Any]) -> Counter[str]:
    """Windows per status."""
    return Counter(w["status"] for w in state["windows"])


def headline(state: Mapping[str, Any]) -> str:
    """One sentence: open divergences first, else 'no divergences found, verified through step N'."""
    run = state["run"]
    open_divs = [d for d in state["divergences"] if d["status"] == "open"]
    n_windows = len(state["windows"])
    c = counts(state)
    end = state["verified_end"]
    through = f"verified through step {end - 1}" if end > run["start"] else "nothing verified yet"
    if open_divs:
        d = open_divs[0]
        more = f" (+{len(open_divs) - 1} more)" if len(open_divs) > 1 else ""
        return (
            f"{len(open_divs)} open divergence(s){more}: window [{d['window']}, {d['window_end']}) step {d['step']} - "
            f"{', '.join(d['diverging'])} differ(s) in {', '.join(d['fields'])}; {through}."
        )
    if c["verified"] == n_windows:
        found = len(state["divergences"])
        if found:
            return f"No open divergences ({found} found, all fixed), {through}."
        return f"No divergences found, {through}."
    rest = n_windows - c["verified"]
    problems = [f"{c[s]} {s}" for s in ("unverified", "interrupted", "stale", "in_progress") if c[s]]
    detail = f" ({', '.join(problems)})" if problems else ""
    prefix = "No divergences found" if not state["divergences"] else "No open divergences"
    return f"{prefix}, {through}; {rest} of {n_windows} windows not verified yet{detail}."


def _participants(attempt: Mapping[str, Any] | None) -> str:
    if attempt is None:
        return ""
    out = []
    for name, p in attempt["participants"].items():
        text = f"{name} {'ref' if p['result'] == 'reference' else p['result']}"
        worst = (p.get("metrics") or {}).get("max_abs_logits")
        if worst is not None:
            text += f" (max |Δ| {worst:.1e})"
        out.append(text)
    return " · ".join(out)


def _latest(w: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return w["attempts"][-1] if w["attempts"] else None


def render_markdown(state: Mapping[str, Any]) -> str:
    """status.md."""
    run = state["run"]
    alts = [i["name"] for i in run["implementations"] if i["role"] == "alternate"]
    c = counts(state)
    lines = [
        f"# parity windows: {run['name']}",
        "",
        f"Reference `{run['reference']}`; alternates {', '.join(f'`{a}`' for a in alts)}; steps "
        f"[{run['start']}, {run['end']}) in windows of {run['window']}; updated {state['updated']}.",
        "",
        f"**{headline(state)}**",
        "",
        "| windows | " + " | ".join(STATUS_ORDER) + " |",
        "|---:|" + "---:|" * len(STATUS_ORDER),
        f"| {len(state['windows'])} | " + " | ".join(str(c[s]) for s in STATUS_ORDER) + " |",
        "",
        "## Windows",
        "",
        "| window | status | attempts | implementations (latest attempt) | finished |",
        "|---|---|---:|---|---|",
    ]
    for w in state["windows"]:
        a = _latest(w)
        finished = (a or {}).get("finished") or ""
        lines.append(
            f"| [{w['start']}, {w['end']}) | {w['status']} | {len(w['attempts'])} | {_participants(a)} | {finished} |"
        )
    if state["divergences"]:
        lines += [
            "",
            "## Divergences",
            "",
            "| id | window | step | status | diverging | fields | report |",
            "|---|---|---:|---|---|---|---|",
        ]
        for d in state["divergences"]:
            status = d["status"] + (f" ({d['fixed']})" if d["fixed"] else "")
            lines.append(
                f"| {d['id']} | [{d['window']}, {d['window_end']}) | {d['step']} | {status} | {', '.join(d['diverging'])} "
                f"| {', '.join(d['fields'])} | [{d['report_md']}]({d['report_md']}) |"
            )
    lines += [
        "",
        "## Passes",
        "",
        "| # | kind | range | started | finished | outcome | windows |",
        "|---:|---|---|---|---|---|---:|",
    ]
    for p in state["passes"]:
        lines.append(
            f"| {p['n']} | {p['kind']} | [{p['from']}, {p['to']}) | {p['started']} | {p['finished'] or ''} | {p['outcome']} "
            f"| {p['windows']} |"
        )
    if state["events"]:
        lines += ["", f"## Events (latest {EVENTS_SHOWN})", ""]
        lines += [f"- {e['time']} {e['kind']}: {e['message']}" for e in state["events"][-EVENTS_SHOWN:]]
    return "\n".join(lines) + "\n"


def _chart(state: Mapping[str, Any]) -> str:
    """SVG: verified steps (y) over wall-clock time (x), one dot per finished window."""
    run = state["run"]
    total: int = run["end"] - run["start"]
    w, h, left, bottom, top, right = 640, 220, 56, 34, 12, 16
    pts = state["timeline"]
    out = [
        f'<svg id="verified-chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="verified steps over time">',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fafafa"/>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#555"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#555"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="11">{total}</text>',
        f'<text x="{left - 6}" y="{h - bottom}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{left - 40}" y="{(h - bottom + top) / 2}" font-size="11" '
        f'transform="rotate(-90 {left - 40} {(h - bottom + top) / 2})" text-anchor="middle">verified steps</text>',
    ]
    if not pts:
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-size="13">no window finished yet</text>')
    else:
        times = [_epoch(p["time"]) for p in pts]
        t0, t1 = times[0], max(times[-1], times[0] + 1e-3)

        def x(t: float) -> float:
            return left + (t - t0) / (t1 - t0) * (w - left - right)

        def y(v: int) -> float:
            return h - bottom - (v / max(total, 1)) * (h - bottom - top)

        coords = " ".join(f"{x(t):.1f},{y(p['verified_steps']):.1f}" for t, p in zip(times, pts, strict=True))
        out.append(
            f'<polyline class="verified-line" fill="none" stroke="{COLOURS["verified"]}" stroke-width="2" points="{coords}"/>'
        )
        for t, p in zip(times, pts, strict=True):
            colour = COLOURS.get(p["status"], "#333")
            label = f"{p['time']}: window {p['window']} {p['status']}; {p['verified_steps']} steps verified (pass {p['pass']})"
            out.append(
                f'<circle class="point" data-status="{html.escape(p["status"])}" cx="{x(t):.1f}" '
                f'cy="{y(p["verified_steps"]):.1f}" r="3" fill="{colour}"><title>{html.escape(label)}</title></circle>'
            )
        out.append(f'<text x="{left}" y="{h - 10}" font-size="11">{html.escape(pts[0]["time"])}</text>')
        out.append(
            f'<text x="{w - right}" y="{h - 10}" font-size="11" text-anchor="end">{html.escape(pts[-1]["time"])}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _strip(state: Mapping[str, Any]) -> str:
    """SVG: one cell per window, coloured by status."""
    windows = state["windows"]
    n = max(len(windows), 1)
    w, h = 640, 28
    cell = w / n
    out = [
        f'<svg id="window-strip" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'role="img" aria-label="status per window">'
    ]
    for i, win in enumerate(windows):
        label = f"[{win['start']}, {win['end']}) {win['status']}"
        out.append(
            f'<rect class="window-cell" data-status="{win["status"]}" data-window="{win["start"]}" x="{i * cell:.2f}" y="0" '
            f'width="{max(cell - 1, 0.5):.2f}" height="{h}" fill="{COLOURS[win["status"]]}"><title>{label}</title></rect>'
        )
    out.append("</svg>")
    return "\n".join(out)


def render_html(state: Mapping[str, Any]) -> str:
    """status.html: self-contained (inline CSS and SVG, no script, no external resources)."""
    run = state["run"]
    e = html.escape
    c = counts(state)
    ok = not any(d["status"] == "open" for d in state["divergences"]) and c["verified"] == len(state["windows"])
    alts = ", ".join(i["name"] for i in run["implementations"] if i["role"] == "alternate")
    legend = " ".join(
        f'<span class="legend"><span class="swatch" style="background:{COLOURS[s]}"></span>{s} ({c[s]})</span>'
        for s in STATUS_ORDER
    )
    rows = []
    for w in state["windows"]:
        a = _latest(w)
        rows.append(
            f'<tr data-status="{w["status"]}" data-window="{w["start"]}"><td>[{w["start"]}, {w["end"]})</td>'
            f'<td class="status st-{w["status"]}">{w["status"]}</td><td>{len(w["attempts"])}</td>'
            f"<td>{e(_participants(a))}</td><td>{e((a or {}).get('finished') or '')}</td>"
            f"<td>{e((a or {}).get('reason') or '')}</td></tr>"
        )
    divs = []
    for d in state["divergences"]:
        divs.append(
            f'<tr data-status="{d["status"]}" data-divergence="{e(d["id"])}"><td>{e(d["id"])}</td>'
            f"<td>[{d['window']}, {d['window_end']})</td><td>{d['step']}</td><td>{d['status']}</td>"
            f"<td>{e(', '.join(d['diverging']))}</td><td>{e(', '.join(d['fields']))}</td>"
            f'<td><a href="{e(d["report_md"])}">{e(d["report_md"])}</a></td></tr>'
        )
    passes = "".join(
        f"<tr><td>{p['n']}</td><td>{p['kind']}</td><td>[{p['from']}, {p['to']})</td><td>{e(p['started'])}</td>"
        f"<td>{e(p['finished'] or '')}</td><td>{p['outcome']}</td><td>{p['windows']}</td></tr>"
        for p in state["passes"]
    )
    events = "".join(
        f"<li>{e(x['time'])} <b>{e(x['kind'])}</b>: {e(x['message'])}</li>" for x in state["events"][-EVENTS_SHOWN:]
    )
    div_section = (
        '<h2>Divergences</h2><table id="divergences"><tr><th>id</th><th>window</th><th>step</th><th>status</th>'
        "<th>diverging</th><th>fields</th><th>report</th></tr>" + "".join(divs) + "</table>"
        if divs
        else '<p id="divergences-none">No divergences recorded.</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>parity windows: {e(run["name"])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
#headline {{ font-size: 1.15em; font-weight: bold; padding: .5em .8em; border-radius: 4px; }}
#headline.ok {{ background: #e8f5e9; }} #headline.bad {{ background: #ffebee; }}
.legend {{ margin-right: 1em; font-size: 12px; }} .swatch {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
{"".join(f".st-{s} {{ color: {c_}; font-weight: bold; }} " for s, c_ in COLOURS.items())}
</style></head>
<body data-verified-end="{state["verified_end"]}" data-windows="{len(state["windows"])}">
<h1>parity windows: {e(run["name"])}</h1>
<p>Reference <b>{e(run["reference"])}</b>; alternates {e(alts)}; steps [{run["start"]}, {run["end"]}) in windows of
{run["window"]}; updated {e(state["updated"])}.</p>
<p id="headline" class="{"ok" if ok else "bad"}">{e(headline(state))}</p>
<h2>Verified steps over time</h2>
{_chart(state)}
<h2>Windows</h2>
<div>{legend}</div>
{_strip(state)}
<table id="windows"><tr><th>window</th><th>status</th><th>attempts</th><th>implementations (latest attempt)</th><th>finished</th><th>reason</th></tr>
{"".join(rows)}
</table>
{div_section}
<h2>Passes</h2>
<table id="passes"><tr><th>#</th><th>kind</th><th>range</th><th>started</th><th>finished</th><th>outcome</th><th>windows</th></tr>{passes}</table>
<h2>Events</h2><ul id="events">{events}</ul>
</body></html>
"""


def write(run_dir: Path, state: Mapping[str, Any]) -> tuple[Path, Path]:
    """Regenerate status.md and status.html atomically."""
    md, page = run_dir / "status.md", run_dir / "status.html"
    replace_text(md, render_markdown(state))
    replace_text(page, render_html(state))
    return md, page
