"""The suite receipt (suite.json, parity/schema/suite.schema.json) and the text summary printed from it.

`build` reads one out directory (a run, a shard) or several (a merge) and computes everything from the
persisted per-item statistics, in canonical item order: the dataset statistics (parity.suite.stats), one row
and verdict per item (parity.suite.verdicts), the worst items and the KLD histogram. Because nothing comes
from memory of the run, a resumed, sharded-and-merged or Ray run writes the same statistics as an
uninterrupted local one. The HTML report (parity.suite.report) is drawn from this receipt alone.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np

from parity import __version__
from parity.compare import receipts
from parity.core import paths
from parity.suite import stats, verdicts
from parity.suite.store import RECEIPT, Store, in_shard

SCHEMA_PATH = paths.schema_path("suite.schema.json")
VERSION = 2  # 2: the calibrated verdict (verdict.mode, items' ratio/floor/calibrated, the top-level floor)


def _side(manifest: dict[str, Any], role: str, described: dict[str, Any] | None) -> dict[str, Any]:
    side = dict(manifest["sides"][role])
    side["describe"] = (described or {}).get(role)
    return side


def build(
    stores: list[Store],
    rule: verdicts.Rule,
    executor: dict[str, Any],
    errors: dict[int, str] | None = None,
    merged: bool = False,
) -> dict[str, Any]:
    """The receipt of `stores` (one run or shard; several for a merge): every figure from the persisted items."""
    manifest = stores[0].manifest
    shard = None if merged else manifest.get("shard")
    all_items = manifest["items"]  # [[id, n_tokens], ...] of the whole suite, canonical order
    covered = [i for i in range(len(all_items)) if in_shard(i, tuple(shard) if shard else None)]
    done: dict[int, tuple[Store, dict[str, Any]]] = {}
    for st in stores:
        for index, rec in st.done().items():
            done.setdefault(index, (st, rec))
    errors = errors or {}
    rows, parts = [], []
    for i in covered:
        item_id, n_tokens = all_items[i]
        if i in done:
            st, rec = done[i]
            values = st.load_values(i)
            parts.append(values)
            row = verdicts.item_row(i, item_id, n_tokens, values, None, rule, rec.get("evidence"))
            row["seconds"] = rec.get("seconds")
        else:
            row = verdicts.item_row(i, item_id, n_tokens, None, errors.get(i), rule)
        rows.append(row)
    everything = stats.concat(parts) if parts else stats.empty(stats.MODE_ENCODING[manifest["mode"]])
    summary = stats.summarize(everything)
    verdict = verdicts.overall(rows, rule)
    described = next((d for d in (st.sides() for st in stores) if d), None)
    missing = [r["index"] for r in rows if r["status"] == "missing"]
    return {
        "kind": "parity-suite",
        "version": VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "parity_version": __version__,
        "suite_key": manifest["suite_key"],
        "input": manifest["input"],
        "scoring": {
            "mode": manifest["mode"],
            "description": _scoring_words(manifest["mode"]),
            "n_positions": len(everything),
        },
        "implementation": _side(manifest, "implementation", described),
        "reference": _side(manifest, "reference", described),
        "executor": {**executor, "shard": {"k": shard[0], "n": shard[1]} if shard else None},
        "verdict": verdict,
        "floor": dict(rule.floor) if isinstance(rule, verdicts.Calibrated) else None,
        "complete": not missing,
        "n_items": len(rows),
        "n_done": len(parts),
        "missing": missing,
        "statistics": summary if len(everything) else None,
        "statistics_text": stats.format_text(summary),
        "items": rows,
        "worst": verdicts.worst(rows),
        "histogram": verdicts.histogram(np.asarray(everything.kld, dtype=np.float64)),
        "status": verdict["status"],
        "exit_code": verdicts.EXIT_CODES[verdict["status"]],
        "report_html": None,
    }


def _scoring_words(mode: str) -> str:
    if mode == "perplexity":
        return "llama-perplexity's positions: n_ctx/2 .. n_ctx-2 of each chunk, its uint16 base encoding and float32 numerics"
    return "every position that has a next token (0 .. n-2 of each item), in double precision"


def write(out_dir: Path, receipt: dict[str, Any]) -> Path:
    """Validate against the schema and write OUT/suite.json atomically."""
    path = out_dir / RECEIPT
    receipts.write(path, receipt, SCHEMA_PATH)
    return path


def _f(x: Any, fmt: str = "{:.6f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(receipt: dict[str, Any], path: Path | None = None) -> str:
    """The text summary: what ran, the statistics as llama-perplexity prints them, the verdict, the worst items."""
    r = receipt
    shard = r["executor"].get("shard")
    where = f", shard {shard['k']}/{shard['n']}" if shard else ""
    head = (
        f"parity suite: {r['implementation']['spec']} vs reference {r['reference']['spec']}: "
        f"{r['n_done']}/{r['n_items']} items{where}, {r['input']['mode']} {Path(r['input']['path']).name}, "
        f"{r['scoring']['n_positions']} scored positions ({r['scoring']['mode']})"
    )
    lines = [head, "", r["statistics_text"].rstrip("\n"), ""]
    v = r["verdict"]
    lines.append(f"verdict: {v['status'].upper()}: {v['reason']}")
    calibrated = v.get("mode") == "calibrated"
    if calibrated:
        lines.append(f"floor: {verdicts.floor_line(r.get('floor'))}")
    by_index = {row["index"]: row for row in r["items"]}
    if r["worst"]:
        what = "ratio to the item's floor, mean KL, max KLD, same top" if calibrated else "mean KLD, max KLD, same top"
        lines.append(f"worst items ({what}):")
        for i in r["worst"][:5]:
            row = by_index[i]
            detail = (
                row["reason"]
                if row["status"] == "error"
                else (
                    (f"{_f(row.get('ratio'), '{:.3g}x')}  " if calibrated else "")
                    + f"{_f(row['mean_kld'], '{:.3e}')}  {_f(row['max_kld'], '{:.3e}')}  {_f(row['same_top'], '{:.2%}')}"
                )
            )
            lines.append(f"  {row['status'].upper():5} #{i} {row['id']}: {detail}")
    if r["missing"]:
        lines.append(f"missing: {len(r['missing'])} item(s); `parity suite ... --resume` computes them")
    rate = r["executor"].get("tokens_per_second")
    if rate:
        lines.append(f"throughput: {rate:.1f} tokens/s ({r['executor']['kind']}, {r['executor']['workers']} worker(s))")
    if path is not None:
        lines.append(f"receipt: {path}")
    if r.get("report_html"):
        lines.append(f"report: {r['report_html']}")
    return "\n".join(lines)
