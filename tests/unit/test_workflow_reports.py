"""Divergence reports and archives: the report's content, the index, nothing deleted without an archive."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from parity.core import fs
from parity.workflow import reports

from .test_workflow_runner import Script, run_pass, write_config


def test_report_markdown_names_everything(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt1"] = {9: ("registers.b", 3.5)}
    run_dir = tmp_path / "run"
    out = run_pass(write_config(tmp_path, steps=18), run_dir, script)
    (div,) = out.state["divergences"]
    report = json.loads((run_dir / div["report_json"]).read_text())
    assert report["tolerances"] == {"registers.b": "abs 1e-06"}
    assert report["matching"] == ["alt2"] and report["diverging"] == ["alt1"] and report["step"] == 9
    md = (run_dir / div["report_md"]).read_text()
    for part in (
        "# Divergence w000006-a1: window [6, 12), step 9",
        "`registers.b`",
        "`3.0`",
        "`3.5`",
        "abs 1e-06",
        "### step 9  <- first divergence",
        "matching the reference: `alt2`",
    ):
        assert part in md, part


def test_archive_moves_old_traces_and_fixed_reports_behind_archive_markers(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt1"] = {9: ("pc", 0)}
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, steps=18)
    run_pass(cfg, run_dir, script)
    script.bugs.clear()
    out = run_pass(None, run_dir, script, action="resume")
    st = out.state
    (div,) = st["divergences"]
    old_trace = run_dir / st["windows"][1]["attempts"][0]["trace_dir"]
    before = {p.name: p.read_bytes() for p in old_trace.iterdir()}
    md_before = (run_dir / div["report_md"]).read_text()
    record = reports.archive_history(run_dir, st)
    assert record is not None and record["members"] == len(before) + 2
    with tarfile.open(run_dir / record["path"]) as tar:
        names = set(tar.getnames())
        for name, data in before.items():
            member = tar.extractfile(f"{st['windows'][1]['attempts'][0]['trace_dir']}/{name}")
            assert member is not None and member.read() == data
        assert div["report_md"] in names
        md = tar.extractfile(div["report_md"])
        assert md is not None and md.read().decode() == md_before
    assert [p.name for p in old_trace.iterdir()] == [reports.ARCHIVE_MARKER]
    assert record["sha256"] in (old_trace / reports.ARCHIVE_MARKER).read_text()
    assert "archived on" in (run_dir / div["report_md"]).read_text()
    current = run_dir / st["windows"][1]["attempts"][1]["trace_dir"]
    assert (current / "alt1.jsonl").exists()  # the latest attempt's traces are the window's evidence: kept
    assert st["archives"] == [record] and st["events"][-1]["kind"] == "archived"
    assert reports.archive_history(run_dir, st) is None  # idempotent: nothing left to archive
    index = reports.rebuild_index(run_dir, st)
    line = json.loads(index.read_text().splitlines()[0])
    assert line["status"] == "fixed" and line["archived_in"] == record["path"]


def test_an_archive_that_fails_its_check_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("{}\n")
    (tmp_path / "d").mkdir()  # a directory's member has size 0, its stat size does not: the check fails
    with pytest.raises(OSError, match="archive check failed for d"):
        reports._pack(tmp_path, [tmp_path / "t.jsonl", tmp_path / "d"], "a.tar.gz")
    assert list((tmp_path / "archive").iterdir()) == []
    archive, sha = reports._pack(tmp_path, [tmp_path / "t.jsonl"], "a.tar.gz")
    assert archive == tmp_path / "archive" / "a.tar.gz" and sha == fs.sha256_file(archive)
