"""Presenting a bench receipt: the text tables on stdout and `report.html` with an inline SVG bar chart.

No dependencies beyond the standard library: the chart is hand-written SVG (one horizontal bar per
implementation and model, min-max whiskers over the repetitions, llama-bench's figures beside ours).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from parity.bench import gate

METRIC_TITLES = {"pp": "prompt processing", "tg": "token generation"}
COLORS = {
    "numpy": "#4e79a7",
    "llama": "#f28e2b",
    "bitnet": "#59a14f",
    "llama-bench": "#b07aa1",
    "cmd": "#76b7b2",
    "py": "#edc948",
}


def _names(receipt: dict[str, Any]) -> dict[str, str]:
    return {m["sha256"]: m["name"] for m in receipt["models"]}


def fmt_rate(x: float | None) -> str:
    """Tokens/s with about four significant digits."""
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def fmt_pct(x: float | None, signed: bool = True) -> str:
    """A fraction as a percentage."""
    if x is None:
        return "-"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def fmt_bytes(n: int | None) -> str:
    """Bytes as MiB."""
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A plain aligned text table."""
    right = right or [i > 1 for i in range(len(header))]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [f"{c:>{w}}" if r else f"{c:<{w}}" for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _stats_cells(s: dict[str, Any] | None) -> list[str]:
    if s is None:
        return ["-", "-", "-", "-"]
    rng = f"{fmt_rate(s['min'])}..{fmt_rate(s['max'])}"
    return [fmt_rate(s["median"]), rng, fmt_pct(s["spread"], False), fmt_pct(s["mad"], False)]


def results_table(receipt: dict[str, Any]) -> str:
    """One row per (model, implementation): pp and tg median / range / spread / MAD, load time, peak RSS."""
    names = _names(receipt)
    rows = []
    for r in receipt["results"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status'].upper()}: {r.get('reason') or ''}"[:60]
        rows.append(
            [
                names[r["model_sha256"]],
                r["impl"],
                *_stats_cells(r.get("pp")),
                *_stats_cells(r.get("tg")),
                "-" if r.get("load_s") is None else f"{r['load_s']:.2f} s",
                fmt_bytes(r.get("peak_rss_bytes")),
                "-" if r.get("rpc_overhead_ms") is None else f"{r['rpc_overhead_ms']:.3f}",
                status,
            ]
        )
    header = ["model", "impl", "pp tok/s", "pp range", "spread", "mad", "tg tok/s", "tg range", "spread", "mad"]
    header += ["load", "peak RSS", "rpc ms", "status"]
    return table(header, rows, [False, False, *[True] * 11, False])


def ratios_table(receipt: dict[str, Any]) -> str:
    """Same-run ratios (per repetition), e.g. numpy/llama."""
    names = _names(receipt)
    rows = [
        [
            names[q["model_sha256"]],
            q["name"],
            q["metric"],
            *[f"{q['stats'][k]:.4g}" for k in ("median", "min", "max")],
            fmt_pct(q["stats"]["spread"], False),
            fmt_pct(q["stats"]["mad"], False),
        ]
        for q in receipt["ratios"]
    ]
    return table(["model", "ratio", "metric", "median", "min", "max", "spread", "mad"], rows, [False] * 3 + [True] * 5)


def cross_check_table(receipt: dict[str, Any]) -> str:
    """Our llama.cpp lane vs llama-bench (matched settings), with llama-bench's defaults and our precise lane."""
    names = _names(receipt)
    default = {(b["model_sha256"]): b for b in receipt["llama_bench"] if b["config"] == "default"}
    precise = {r["model_sha256"]: r for r in receipt["results"] if r["impl"] == "llama"}
    rows = []
    for c in receipt["cross_check"]:
        d = default.get(c["model_sha256"], {}).get(c["metric"])
        p = precise.get(c["model_sha256"], {}).get(c["metric"])
        rows.append(
            [
                names[c["model_sha256"]],
                c["metric"],
                fmt_rate(c["ours"]["median"]),
                fmt_rate(c["theirs"]["median"]),
                fmt_pct(c["change"]),
                "±" + fmt_pct(c["allowed"], False),
                _band(c.get("band"), "band" in c),
                c["status"],
                fmt_rate(p["median"] if p else None),
                fmt_rate(d["median"] if d else None),
            ]
        )
    header = ["model", "metric", "ours median", "llama-bench median", "ours vs it", "allowed", "noise", "status"]
    header += ["ours F32 KV median", "llama-bench defaults median"]
    return table(header, rows, [False, False, True, True, True, True, True, False, True, True])


def _band(band: float | None, present: bool) -> str:
    """A noise band (parity.bench.noise) as ±x%; "n/a" without a noise estimate; "-" in receipts before it."""
    if not present:
        return "-"
    return "n/a" if band is None else "±" + fmt_pct(band, False)


def gate_table(receipt: dict[str, Any]) -> str:
    """The comparison with the baseline, one row per figure."""
    rows = [
        [
            g["kind"],
            g["model"],
            g["subject"],
            g["metric"],
            fmt_rate(g["baseline"]) if g["kind"] == "throughput" else _num(g["baseline"]),
            fmt_rate(g["current"]) if g["kind"] == "throughput" else _num(g["current"]),
            fmt_pct(g["change"]),
            "-" if g["allowed"] is None else "-" + fmt_pct(g["allowed"], False),
            _band(g.get("band"), "band" in g and g["status"] not in ("missing", "new")),
            g["status"],
        ]
        for g in receipt["gate"]["rows"]
    ]
    header = ["kind", "model", "subject", "metric", "baseline", "current", "change", "fails below", "noise", "status"]
    return table(header, rows, [False] * 4 + [True] * 5 + [False])


def protocol_overhead_line(receipt: dict[str, Any]) -> str | None:
    """The protocol overhead figure (parity.bench.protocol_probe) in one line, or None when it was not measured."""
    p = receipt.get("protocol_overhead")
    if not p:
        return None
    return (
        f"protocol overhead: one logits reply of {p['positions']} x {p['vocab']} float32 ({p['bytes'] / 1e6:.1f} MB) "
        f"through protocol v2 to a child process: median {p['median_s']:.3f} s ({p['min_s']:.3f}..{p['max_s']:.3f}, "
        f"{len(p['samples'])} requests); bar {p['bar_s']:g} s: {p['verdict']}"
    )


def harness_overhead_lines(receipt: dict[str, Any]) -> list[str]:
    """One line per model of the harness overhead figure (parity.bench.overhead)."""
    names = _names(receipt)
    lines = []
    for h in receipt.get("harness_overhead", []):
        name = names.get(h["model_sha256"], h["model_sha256"][:12])
        if "error" in h:
            lines.append(f"harness overhead ({name}): not measured, `parity run` failed: {h['error']}")
            continue
        engines = ", ".join(
            f"{k} {e['load_s']:.2f} s load + {e['compute_s']:.3f} s compute" for k, e in h["engines"].items()
        )
        lines.append(
            f"harness overhead ({name}, `parity run --max-tokens {h['gen_tokens']}`, median of {h['runs']}): "
            f"{h['median_wall_s']:.2f} s wall - engines {h['engines_s']:.2f} s ({engines}) = "
            f"{h['overhead_s']:.2f} s ({h['overhead_fraction']:.0%} of the run)"
        )
        if "target" in h:
            lines.append(f"  {run_target_line(h)}")
    return lines


def run_target_line(h: dict[str, Any]) -> str:
    """Issue 15's target for one harness_overhead record (parity.bench.overhead.run_target), met or NOT met."""
    t = h["target"]
    text = f"`parity run` target: {t['wall_s']:.2f} s wall <= {t['max_wall_s']:g} s"
    if "max_llama_ratio" in t:
        ratio = "-" if t["llama_ratio"] is None else f"{t['llama_ratio']:.1f}x"
        text += f", {ratio} llama.cpp's own load + compute <= {t['max_llama_ratio']:g}x"
    cpu = h.get("cpu_s")
    if cpu:
        text += f"; CPU {sorted(cpu)[len(cpu) // 2]:.2f} s (median, workers included)"
    if h.get("cpu_pressure") is not None:
        text += f"; machine busy {h['cpu_pressure']:.0%} of the time"
    return text + (": met" if t["met"] else ": NOT met")


def _sampling(settings: dict[str, Any]) -> str:
    """How samples were taken, for the summary line (receipts before min_sample_s said `warmup_reps`)."""
    if "min_sample_s" in settings:
        return (
            f"each >= {settings['min_sample_s'] * 1e3:.0f} ms of evaluations after one untimed warm-up "
            "evaluation; counts per figure: evals_per_sample, warmup_evals"
        )
    return f"{settings.get('warmup_reps', '?')} warm-up"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def render_text(receipt: dict[str, Any]) -> str:
    """The whole text summary: settings, results, ratios, cross-check, gate, verdict."""
    m, s = receipt["machine"], receipt["settings"]
    parts = [
        f"parity bench: {m['cpu_model']} ({m['n_cpus']} CPUs, machine {m['slug']}); "
        f"{s['prompt_tokens']}-token prompt, {s['gen_tokens']} generated tokens, {s['reps']} reps, "
        f"{s['threads']} threads; tokens/s, median of the samples"
        + (f" (each >= {s['min_sample_s'] * 1e3:.0f} ms of evaluations)" if "min_sample_s" in s else ""),
        "",
        results_table(receipt),
    ]
    if receipt["ratios"]:
        parts += ["", "same-run ratios (per repetition, interleaved):", ratios_table(receipt)]
    if receipt["cross_check"]:
        parts += [
            "",
            "llama-bench cross-check, median of each (ours: a llama.cpp lane with llama-bench's batch sizes, "
            "KV F16, flash attention off, same warm-up and evaluations per sample; pp must agree within "
            '10%, judged only when the noise band is narrower than that (README, "The bench rule")):',
            cross_check_table(receipt),
        ]
    probe = protocol_overhead_line(receipt)
    if probe:
        parts += ["", probe]
    overhead = harness_overhead_lines(receipt)
    if overhead:
        parts += ["", *overhead]
    gate_run = receipt["gate"]
    parts += ["", gate_run["note"]]
    if gate_run["rows"]:
        parts += [
            f"gate: FAIL when a figure drops more than {gate_run['threshold']:.0%}; too noisy to judge when its noise "
            'band (both runs\' dispersion and CPU waiting) is wider than that (README, "The bench rule")',
            gate_table(receipt),
        ]
    parts += ["", verdict(receipt)]
    return "\n".join(parts)


def verdict(receipt: dict[str, Any]) -> str:
    """The last line: overall status and exit code, with the reasons for a failure."""
    reasons = gate.failure_reasons(receipt) or gate.noisy_reasons(receipt)
    if receipt["exit_code"] == 7:
        return "bench: TOO NOISY TO JUDGE (exit 7): " + "; ".join(reasons)
    head = "FAIL" if receipt["exit_code"] else receipt["status"].upper()
    return f"bench: {head} (exit {receipt['exit_code']})" + (": " + "; ".join(reasons) if reasons else "")


# ------------------------------------------------------------------------------------------------- HTML


def _bars(receipt: dict[str, Any], metric: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, label, stats) per bar of one metric: our implementations, then llama-bench (matched)."""
    names = _names(receipt)
    bars = [(names[r["model_sha256"]], r["impl"], r[metric]) for r in receipt["results"] if r.get(metric)]
    for b in receipt["llama_bench"]:
        if b.get(metric):
            bars.append((names[b["model_sha256"]], f"llama-bench ({b['config']})", b[metric]))
    return sorted(bars, key=lambda t: t[0])


def svg_chart(receipt: dict[str, Any], metric: str, width: int = 760) -> str:
    """A horizontal bar chart of median tokens/s with min-max whiskers, grouped by model."""
    bars = _bars(receipt, metric)
    if not bars:
        return ""
    row, label_w, pad = 22, 250, 70
    top = 30
    height = top + row * len(bars) + 10 * len({b[0] for b in bars}) + 10
    peak = max(s["max"] for _, _, s in bars) or 1.0
    plot_w = width - label_w - pad

    def x(v: float) -> float:
        return label_w + plot_w * v / peak

    title = html.escape(f"{METRIC_TITLES[metric]} ({metric}), tokens/s")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{title}">',
        f'<text x="4" y="18" font-size="14" font-weight="bold">{title}</text>',
    ]
    y, last_model = top, None
    for model, label, s in bars:
        if model != last_model and last_model is not None:
            y += 10
        last_model = model
        color = COLORS.get(label.split(" ")[0]) or COLORS.get(label.split("-")[0], "#888")  # a spec label: its kind
        name = html.escape(f"{model} · {label}")
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" font-size="12" text-anchor="end">{name}</text>')
        out.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{x(s["median"]) - label_w:.1f}" height="{row - 6}" fill="{color}">'
            f"<title>{name}: median {fmt_rate(s['median'])} tok/s, min {fmt_rate(s['min'])}, "
            f"max {fmt_rate(s['max'])}</title></rect>"
        )
        mid = y + row / 2
        out.append(
            f'<line x1="{x(s["min"]):.1f}" y1="{mid}" x2="{x(s["max"]):.1f}" y2="{mid}" '
            'stroke="#222" stroke-width="1.5"/>'
        )
        out.append(
            f'<text x="{x(s["max"]) + 4:.1f}" y="{y + 15}" font-size="11">{html.escape(fmt_rate(s["median"]))}</text>'
        )
        y += row
    out.append("</svg>")
    return "\n".join(out)


def _html_table(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def render_html(receipt: dict[str, Any]) -> str:
    """A self-contained report: settings, one inline SVG chart per metric, and the text tables."""
    m, s = receipt["machine"], receipt["settings"]
    charts = "\n".join(svg_chart(receipt, metric) for metric in ("pp", "tg"))
    sections = [
        "<h2>Throughput</h2>",
        charts,
        "<h2>Results</h2>",
        _html_table(results_table(receipt)),
    ]
    if receipt["ratios"]:
        sections += ["<h2>Same-run ratios</h2>", _html_table(ratios_table(receipt))]
    if receipt["cross_check"]:
        sections += ["<h2>llama-bench cross-check</h2>", _html_table(cross_check_table(receipt))]
    probe = protocol_overhead_line(receipt)
    if probe:
        sections += ["<h2>Protocol overhead</h2>", f"<p>{html.escape(probe)}</p>"]
    sections += ["<h2>Gate</h2>", f"<p>{html.escape(receipt['gate']['note'])}</p>"]
    if receipt["gate"]["rows"]:
        sections.append(_html_table(gate_table(receipt)))
    sections.append(f"<p><b>{html.escape(verdict(receipt))}</b></p>")
    blas = (m.get("numpy_blas") or {}).get("blas") or {}
    head = (
        f"{m['cpu_model']}, {m['n_cpus']} CPUs, {m['platform']}, Python {m['python']}, "
        f"numpy {m['numpy_blas']['numpy']} ({blas.get('name', '?')} {blas.get('version', '')}); "
        f"{s['prompt_tokens']}-token prompt, {s['gen_tokens']} generated tokens, {s['reps']} samples per figure "
        f"({_sampling(s)}), {s['threads']} threads; {receipt['timestamp']}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>parity bench</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}pre{background:#f6f6f6;padding:8px;"
        "overflow-x:auto}</style></head><body>\n"
        f"<h1>parity bench</h1>\n<p>{html.escape(head)}</p>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
