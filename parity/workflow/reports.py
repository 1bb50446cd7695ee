"""Divergence reports and archives of a windows run.

Per divergence: `reports/<id>.json` (the full record) and `reports/<id>.md` (readable): window, first
diverging step, which alternates match the reference and which do not, every differing field with both
values and the tolerance that was applied, and a few steps of context from the traces. `divergences.jsonl`
is the index, one line per divergence, rebuilt from those files after every window.

Nothing is deleted silently: `archive_history` packs superseded traces and the reports of fixed divergences
into `archive/history-<time>.tar.gz`, checks the archive, and only then replaces each original by an
archive marker naming the archive and its SHA-256; `archive_run` does the same for a whole run before
`run --fresh` starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_file, atomic_write_json, atomic_write_text, sha256_file
from parity.errors import PermissionDenied
from parity.workflow.compare import FieldDiff, jsonable
from parity.workflow.state import add_event, now, replace_text

REPORT_VERSION = 1
CONTEXT_BEFORE = 2
CONTEXT_AFTER = 2
MAX_DIFFS = 50  # per alternate in one report; the count of all differences is kept
RECORD_CHARS = 240  # a context record longer than this is shortened in the Markdown (never in the JSON)
INDEX_NAME = "divergences.jsonl"
ARCHIVE_MARKER = "ARCHIVED.txt"


def divergence_id(window_start: int, attempt: int) -> str:
    """`w000036-a2`: the window's first step and the attempt that found it (sorts by window)."""
    return f"w{window_start:06d}-a{attempt}"


def trace_path(run_dir: Path, trace_dir: str, impl: str) -> Path:
    return run_dir / trace_dir / f"{impl}.jsonl"


def write_trace(path: Path, records: Sequence[Mapping[str, Any]], *, fsync: bool = True) -> None:
    """One JSON object per line; written atomically so a killed run never leaves half a trace. With
    `fsync=False` the caller syncs it (the runner syncs a window's traces together: sync_files)."""
    text = "".join(json.dumps(jsonable(r), ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text, fsync=fsync)


def sync_files(paths: Sequence[Path], pool: Executor | None = None) -> None:
    """fsync `paths` concurrently: the file system commits them together (one journal commit on ext4 instead of
    one per file, a few ms each)."""

    def one(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if pool is None or len(paths) < 2:
        for p in paths:
            one(p)
    else:
        list(pool.map(one, paths))


def read_trace(path: Path) -> list[dict[str, Any]] | None:
    """A trace's records, or None when it is missing, archived or damaged."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None


def signature(diffs_by_alt: Mapping[str, Sequence[FieldDiff]]) -> str:
    """Digest of each diverging alternate's first difference (step, field, both values)."""
    firsts = {
        alt: [diffs[0].step, diffs[0].field, diffs[0].index, jsonable(diffs[0].reference), jsonable(diffs[0].alternate)]
        for alt, diffs in sorted(diffs_by_alt.items())
        if diffs
    }
    return hashlib.sha256(json.dumps(firsts, sort_keys=True, default=str).encode()).hexdigest()


def _context(
    run_dir: Path,
    state: Mapping[str, Any],
    window: Mapping[str, Any],
    step: int,
    current: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, Any]:
    """Records of the reference and the diverging alternates around `step`, from this window's records and,
    for steps before it, the previous window's latest trace."""
    lo, hi = step - CONTEXT_BEFORE, step + CONTEXT_AFTER
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in current}
    if lo < window["start"]:
        prev = next((w for w in state["windows"] if w["end"] == window["start"]), None)
        done = [a for a in (prev or {}).get("attempts", []) if a["status"] in ("verified", "diverged", "unverified")]
        if done:
            for name in current:
                for r in read_trace(trace_path(run_dir, done[-1]["trace_dir"], name)) or []:
                    if isinstance(r.get("step"), int) and lo <= r["step"] < window["start"]:
                        records[name].append(r)
    for name, recs in current.items():
        records[name] += [jsonable(r) for r in recs if isinstance(r.get("step"), int) and lo <= r["step"] <= hi]
    steps = sorted({r["step"] for recs in records.values() for r in recs})
    return {"steps": steps, "records": records}


def build_report(
    *,
    run_dir: Path,
    state: Mapping[str, Any],
    window: Mapping[str, Any],
    attempt: int,
    pass_n: int,
    reference: str,
    ref_records: Sequence[Mapping[str, Any]],
    diffs_by_alt: Mapping[str, Sequence[FieldDiff]],
    matching: Sequence[str],
    unavailable: Mapping[str, str],
    alt_records: Mapping[str, Sequence[Mapping[str, Any]]],
    tolerances: Mapping[str, str],
) -> dict[str, Any]:
    """The full JSON record of one divergence (one window attempt, all diverging alternates)."""
    diverging = sorted(a for a, d in diffs_by_alt.items() if d)
    step = min(diffs_by_alt[a][0].step for a in diverging)
    per_alt: dict[str, Any] = {}
    fields: list[str] = []
    for alt in diverging:
        diffs = diffs_by_alt[alt]
        first_step = diffs[0].step
        first_fields = [d.field for d in diffs if d.step == first_step]
        fields += [f for f in first_fields if f not in fields]
        per_alt[alt] = {
            "first_step": first_step,
            "fields": first_fields,
            "n_differences": len(diffs),
            "steps_differing": sorted({d.step for d in diffs}),
            "differences": [d.to_dict() for d in diffs[:MAX_DIFFS]],
        }
    current = {reference: ref_records, **{a: alt_records.get(a, []) for a in diverging}}
    return {
        "version": REPORT_VERSION,
        "id": divergence_id(window["start"], attempt),
        "run": state["run"]["name"],
        "window": {"start": window["start"], "end": window["end"]},
        "step": step,
        "pass": pass_n,
        "attempt": attempt,
        "found": now(),
        "reference": reference,
        "diverging": diverging,
        "matching": sorted(matching),
        "unavailable": dict(unavailable),
        "fields": fields,
        "alternates": per_alt,
        "tolerances": {
            f: tolerances.get(f, "exact") for f in {d["field"] for a in per_alt.values() for d in a["differences"]}
        },
        "signature": signature(diffs_by_alt),
        "context": _context(run_dir, state, window, step, current),
    }


def _cell(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > 120:
        text = text[:117] + "..."
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The readable form of a divergence report."""
    w = report["window"]
    lines = [
        f"# Divergence {report['id']}: window [{w['start']}, {w['end']}), step {report['step']}",
        "",
        f"- run: `{report['run']}` (pass {report['pass']}, attempt {report['attempt']}, found {report['found']})",
        f"- reference: `{report['reference']}`",
        f"- diverging: {', '.join(f'`{a}`' for a in report['diverging'])}",
        f"- matching the reference: {', '.join(f'`{a}`' for a in report['matching']) or 'none'}",
    ]
    if report["unavailable"]:
        lines.append("- did not take part: " + "; ".join(f"`{a}`: {r}" for a, r in report["unavailable"].items()))
    lines.append(f"- fields that differ at the first diverging step: {', '.join(f'`{f}`' for f in report['fields'])}")
    for alt, info in report["alternates"].items():
        lines += [
            "",
            f"## `{alt}` vs `{report['reference']}`",
            "",
            f"First difference at step {info['first_step']}; {info['n_differences']} difference(s) in steps "
            f"{', '.join(map(str, info['steps_differing']))}.",
            "",
            "| step | field | reference | alternate | rule / detail |",
            "|---:|---|---|---|---|",
        ]
        for d in info["differences"]:
            name = d["field"] + (f"[{d['index']}]" if d["index"] is not None else "")
            rule = report["tolerances"].get(d["field"], "exact")
            lines.append(
                f"| {d['step']} | `{name}` | {_cell(d['reference'])} | {_cell(d['alternate'])} | {rule}; {d['detail']} |"
            )
        if info["n_differences"] > len(info["differences"]):
            lines.append(
                f"| | ... {info['n_differences'] - len(info['differences'])} more in the JSON report's count | | | |"
            )
    ctx = report["context"]
    lines += ["", f"## Context (steps {', '.join(map(str, ctx['steps']))})", ""]
    for step in ctx["steps"]:
        mark = "  <- first divergence" if step == report["step"] else ""
        lines += [f"### step {step}{mark}", "", "```"]
        for name, recs in ctx["records"].items():
            rec = next((r for r in recs if r.get("step") == step), None)
            text = "(no record)" if rec is None else json.dumps(rec, ensure_ascii=False)
            if len(text) > RECORD_CHARS:
                text = text[: RECORD_CHARS - 3] + "..."
            lines.append(f"{name:>16}: {text}")
        lines += ["```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path, report: Mapping[str, Any]) -> tuple[str, str]:
    """Write reports/<id>.json and .md atomically; returns their paths relative to the run directory."""
    rel_json = f"reports/{report['id']}.json"
    rel_md = f"reports/{report['id']}.md"
    atomic_write_json(run_dir / rel_json, report)
    atomic_write_text(run_dir / rel_md, render_markdown(report))
    return rel_md, rel_json


def rebuild_index(run_dir: Path, state: Mapping[str, Any]) -> Path:
    """divergences.jsonl: every divergence's full report merged with its current status, in the state's order."""
    lines = []
    for d in state["divergences"]:
        status = {k: d[k] for k in ("status", "fixed", "fixed_pass", "fixed_attempt", "superseded_by", "reproduced")}
        try:
            report = json.loads((run_dir / d["report_json"]).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            report = {k: d[k] for k in ("id", "window", "window_end", "step", "diverging", "matching", "fields")}
            report["report_missing"] = d["report_json"]
        lines.append(json.dumps({**report, **status}, ensure_ascii=False))
    path = run_dir / INDEX_NAME
    replace_text(path, "".join(line + "\n" for line in lines))
    return path


def _pack(run_dir: Path, files: list[Path], name: str) -> tuple[Path, str]:
    """Tar+gzip `files` (relative names), verify every member against its source, return (path, sha256).

    Written through core/fs.atomic_write_file: the archive appears only once it is complete and verified,
    with the mode every output gets (0o666 minus the umask).
    """
    dest = _unique(run_dir / "archive" / name)

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=str(f.relative_to(run_dir)), recursive=False)
        with tarfile.open(tmp, "r:gz") as tar:
            sizes = {m.name: m.size for m in tar.getmembers()}
        for f in files:
            rel = str(f.relative_to(run_dir))
            if sizes.get(rel) != f.stat().st_size:
                raise OSError(f"archive check failed for {rel}")

    try:
        atomic_write_file(dest, write)
    except PermissionError as exc:
        raise PermissionDenied(
            f"cannot write archive {dest}: {exc.strerror}", fix="make the run directory writable"
        ) from exc
    return dest, sha256_file(dest)


def _marker_text(archive: Path, sha: str, run_dir: Path, what: str) -> str:
    rel = archive.relative_to(run_dir)
    return f"{what} archived on {now()} to {rel} (sha256 {sha}).\nRestore with: tar -xzf {rel} -C {run_dir}\n"


def _is_marker(path: Path) -> bool:
    """Is this report file already a stub pointing at an archive?"""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(data, dict) and "archived_in" in data
    return text.startswith("This report (")


def _unique(path: Path) -> Path:
    """`path`, or `name-2.tar.gz`, `name-3.tar.gz`, ... : an archive is never overwritten."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(path.name.replace(".tar.gz", f"-{n}.tar.gz"))
        n += 1
    return candidate


def archive_history(run_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """Archive traces of superseded attempts and reports of fixed/superseded divergences; leave archive markers.

    Returns the archive record (also appended to state["archives"]), or None when there was nothing to archive.
    The caller holds the run lock and saves the state afterwards.
    """
    trace_dirs: list[Path] = []
    for w in state["windows"]:
        done = [a for a in w["attempts"] if a["status"] != "in_progress"]
        for a in done[:-1]:  # the latest attempt's traces are the window's current evidence: they stay
            d = run_dir / a["trace_dir"]
            if d.is_dir() and not (d / ARCHIVE_MARKER).exists():
                trace_dirs.append(d)
    reports = []
    for div in state["divergences"]:
        if div["status"] in ("fixed", "superseded"):
            for key in ("report_json", "report_md"):
                p = run_dir / div[key]
                if p.is_file() and not _is_marker(p):
                    reports.append(p)
    files = sorted({f for d in trace_dirs for f in d.rglob("*") if f.is_file()} | set(reports))
    if not files:
        return None
    archive, sha = _pack(run_dir, files, f"history-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz")
    for d in trace_dirs:
        for f in d.rglob("*"):
            if f.is_file():
                f.unlink()
        atomic_write_text(
            d / ARCHIVE_MARKER, _marker_text(archive, sha, run_dir, f"The traces in {d.relative_to(run_dir)} were")
        )
    for p in reports:
        text = _marker_text(archive, sha, run_dir, f"This report ({p.name}) was")
        if p.suffix == ".json":
            atomic_write_json(
                p, {"id": p.stem, "archived_in": str(archive.relative_to(run_dir)), "sha256": sha, "note": text}
            )
        else:
            atomic_write_text(p, text)
    record = {
        "time": now(),
        "path": str(archive.relative_to(run_dir)),
        "sha256": sha,
        "members": len(files),
        "what": f"traces of {len(trace_dirs)} superseded attempt(s), {len(reports)} report file(s) of fixed divergences",
    }
    state["archives"].append(record)
    add_event(state, "archived", f"{record['what']} archived to {record['path']} (archive markers left in place)")
    return record


RUN_ENTRIES = (
    "state.json",
    "state.json.bak",
    "state.json.bak.2",
    "state.json.bak.3",
    "journal.jsonl",
    "status.md",
    "status.html",
    INDEX_NAME,
    "reports",
    "traces",
    "configs",
    "logs",
    "scratch",
    "corrupt",
)


def archive_run(run_dir: Path) -> tuple[Path, str, int]:
    """Archive everything a run wrote in `run_dir` (RUN_ENTRIES), then remove those originals.

    Used by `run --fresh`. Files the run did not write are left alone, and archive/ keeps older archives.
    Returns (archive, sha256, members); a README next to the archive names it.
    """
    tops = [run_dir / name for name in RUN_ENTRIES if (run_dir / name).exists()]
    files = sorted(f for top in tops for f in ([top] if top.is_file() else top.rglob("*")) if f.is_file())
    if not files:
        return run_dir / "archive", "", 0
    archive, sha = _pack(run_dir, files, f"run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz")
    for top in tops:
        if top.is_dir():
            shutil.rmtree(top)
        else:
            with contextlib.suppress(FileNotFoundError):
                top.unlink()
    atomic_write_text(
        run_dir / "archive" / f"{archive.name}.README.txt",
        _marker_text(archive, sha, run_dir, f"The previous run in {run_dir} ({len(files)} files) was"),
    )
    return archive, sha, len(files)
