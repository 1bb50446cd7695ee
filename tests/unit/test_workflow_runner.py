"""Windows runner with in-process fake implementations: windows, stop/continue, resume, regression, fixes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from parity.errors import UsageError
from parity.workflow import runner, state
from parity.workflow.config import ImplSpec
from parity.workflow.impls import Implementation, RunContext, Unavailable


class Script:
    """What the fake implementations do; tests mutate it between passes (e.g. to 'fix' an alternate)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []  # (impl, start, count, len(tokens))
        self.bugs: dict[str, dict[int, tuple[str, Any]]] = {}  # impl -> step -> (field, value)
        self.unavailable: dict[str, set[int]] = {}  # impl -> window starts it fails on
        self.short: dict[str, set[int]] = {}  # impl -> window starts it answers one step short
        self.token_shift = 0  # changes the reference's (LLM) tokens: a "fixed" or nondeterministic reference
        self.interrupt_at: tuple[str, int] | None = None  # (impl, start): raise KeyboardInterrupt there

    def record(self, step: int, tokens: list[int], llm: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "step": step,
            "pc": 2 * step,
            "registers": {"a": step % 5, "b": step / 3},
            "stack": [step, step + 1],
        }
        if llm:
            rec["token"] = (sum(tokens[:step]) + step + self.token_shift) % 13
        return rec


class Fake(Implementation):
    def __init__(self, spec: ImplSpec, ctx: RunContext, script: Script) -> None:
        super().__init__(spec, ctx)
        self.script = script

    def _window(self, start: int, count: int, tokens: list[int], trace_dir: Path) -> list[dict[str, Any]]:
        s = self.script
        s.calls.append((self.name, start, count, len(tokens)))
        if s.interrupt_at == (self.name, start):
            raise KeyboardInterrupt
        if start in s.unavailable.get(self.name, set()):
            raise Unavailable(f"{self.name} crashed (simulated) on window {start}")
        seq = list(tokens)
        out = []
        for j in range(count):
            rec = s.record(start + j, seq, self.ctx.llm)
            if self.role == "reference" and self.ctx.llm and len(seq) == start + j:
                seq.append(rec["token"])
            bug = s.bugs.get(self.name, {}).get(start + j)
            if bug:
                field, value = bug
                target = rec
                *parents, leaf = field.split(".")
                for p in parents:
                    target = target[p]
                target[leaf] = value
            out.append(rec)
        if start in s.short.get(self.name, set()):
            out = out[:-1]
        return out


CONFIG = """
[run]
steps = {steps}
window = {window}

[input]
{input}

[fields]
"registers.b" = {{ abs = 1e-6 }}

[[implementation]]
name = "ref"
role = "reference"
kind = "command"
options = {{ command = ["never-run"] }}
{alternates}
"""

ALT = """
[[implementation]]
name = "{name}"
role = "alternate"
kind = "command"
options = {{ command = ["never-run"] }}
"""


def write_config(
    tmp_path: Path, *, steps: int = 24, window: int = 6, alts: tuple[str, ...] = ("alt1", "alt2"), llm: bool = False
) -> Path:
    inp = 'prompt_ids = [1, 2, 3]\nvariant = "f32"' if llm else 'program = ["noop"]'
    text = CONFIG.format(steps=steps, window=window, input=inp, alternates="".join(ALT.format(name=a) for a in alts))
    path = tmp_path / "impls.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_pass(cfg: Path | None, run_dir: Path, script: Script, action: str = "run", **kw: Any) -> runner.Outcome:
    req = runner.Request(action, cfg, run_dir, quiet=True, **kw)
    factory: Callable[[ImplSpec, RunContext], Implementation] = lambda spec, ctx: Fake(spec, ctx, script)  # noqa: E731
    out = runner.execute(req, factory=factory)
    assert state.validation_errors(json.loads((run_dir / "state.json").read_text())) == []
    on_disk, notes = state.StateStore(run_dir).load(repair=False)  # state.json + journal: exactly what is in memory
    assert on_disk == out.state and notes == []
    return out


def statuses(out: runner.Outcome) -> list[str]:
    return [w["status"] for w in out.state["windows"]]


def test_clean_run_verifies_every_window(tmp_path: Path) -> None:
    script = Script()
    out = run_pass(write_config(tmp_path), tmp_path / "run", script)
    assert out.code == 0
    assert statuses(out) == ["verified"] * 4
    assert out.state["verified_end"] == 24 and out.state["verified_steps"] == 24
    assert out.headline == "No divergences found, verified through step 23."
    w = out.state["windows"][0]["attempts"][0]
    assert set(w["participants"]) == {"ref", "alt1", "alt2"}
    assert w["participants"]["alt1"]["result"] == "match"
    assert len(out.state["timeline"]) == 4
    assert (tmp_path / "run" / "status.html").is_file() and (tmp_path / "run" / "status.md").is_file()
    trace = (tmp_path / "run" / w["trace_dir"] / "alt2.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in trace] == list(range(6))


def test_divergence_stops_the_run_and_names_window_step_field_values(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt2"] = {13: ("registers.a", 99)}
    run_dir = tmp_path / "run"
    out = run_pass(write_config(tmp_path), run_dir, script)
    assert out.code == 1
    assert statuses(out) == ["verified", "verified", "diverged", "pending"]
    assert out.stopped and "window [12, 18)" in out.stopped
    (div,) = out.state["divergences"]
    assert (div["window"], div["step"], div["fields"], div["diverging"], div["matching"]) == (
        12,
        13,
        ["registers.a"],
        ["alt2"],
        ["alt1"],
    )
    report = json.loads((run_dir / div["report_json"]).read_text())
    d = report["alternates"]["alt2"]["differences"][0]
    assert (d["step"], d["field"], d["reference"], d["alternate"]) == (13, "registers.a", 3, 99)
    assert report["context"]["steps"] == [11, 12, 13, 14, 15]  # two before (one from the previous window), two after
    md = (run_dir / div["report_md"]).read_text()
    assert "window [12, 18), step 13" in md and "`registers.a`" in md and "`3`" in md and "`99`" in md
    index = (run_dir / "divergences.jsonl").read_text().splitlines()
    assert json.loads(index[0])["id"] == div["id"] == "w000012-a1"
    assert "1 open divergence(s)" in out.headline and "verified through step 11" in out.headline


def test_continue_on_divergence_goes_past(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt1"] = {2: ("pc", -1)}
    out = run_pass(write_config(tmp_path), tmp_path / "run", script, continue_on_divergence=True)
    assert out.code == 1
    assert statuses(out) == ["diverged", "verified", "verified", "verified"]
    assert out.state["verified_end"] == 0 and out.state["verified_steps"] == 18


def test_resume_after_fix_reports_fixed_and_recomputes_nothing_verified(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt2"] = {13: ("registers.a", 99)}
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path)
    run_pass(cfg, run_dir, script)
    script.calls.clear()
    script.bugs.clear()  # the alternate is fixed
    out = run_pass(None, run_dir, script, action="resume")
    assert out.code == 0
    assert sorted({start for _, start, _, _ in script.calls}) == [12, 18]  # windows 0 and 6 were not recomputed
    (div,) = out.state["divergences"]
    assert div["status"] == "fixed" and div["fixed_pass"] == 2 and div["fixed_attempt"] == 2
    w12 = out.state["windows"][2]
    assert [a["status"] for a in w12["attempts"]] == ["diverged", "verified"]
    assert w12["attempts"][1]["fixed"] == [div["id"]]
    assert out.headline == "No open divergences (1 found, all fixed), verified through step 23."
    assert [p["kind"] for p in out.state["passes"]] == ["run", "resume"]


def test_resume_without_fix_reproduces_the_same_divergence(tmp_path: Path) -> None:
    script = Script()
    script.bugs["alt1"] = {7: ("stack", [0])}
    run_dir = tmp_path / "run"
    run_pass(write_config(tmp_path), run_dir, script)
    out = run_pass(None, run_dir, script, action="resume")
    (div,) = out.state["divergences"]
    assert div["status"] == "open" and [r["attempt"] for r in div["reproduced"]] == [2]
    assert out.state["windows"][1]["attempts"][1]["divergence"] == div["id"]
    script.bugs["alt1"] = {8: ("stack", [0])}  # a different bug in the same window supersedes the old report
    out = run_pass(None, run_dir, script, action="resume")
    assert [d["status"] for d in out.state["divergences"]] == ["superseded", "open"]
    assert out.state["divergences"][0]["superseded_by"] == out.state["divergences"][1]["id"] == "w000006-a3"


def test_unavailable_alternate_is_recorded_and_the_other_verifies(tmp_path: Path) -> None:
    script = Script()
    script.unavailable["alt1"] = {6}
    out = run_pass(write_config(tmp_path), tmp_path / "run", script)
    assert out.code == 0
    p = out.state["windows"][1]["attempts"][0]["participants"]
    assert p["alt1"]["status"] == "unavailable" and "crashed (simulated)" in p["alt1"]["reason"]
    assert p["alt2"]["result"] == "match"


def test_window_checked_against_no_alternate_is_never_verified(tmp_path: Path) -> None:
    script = Script()
    script.unavailable = {"alt1": {6}, "alt2": {6}}
    out = run_pass(write_config(tmp_path), tmp_path / "run", script)
    assert out.code == 1
    assert statuses(out) == ["verified", "unverified", "pending", "pending"]
    assert "no alternate took part" in out.state["windows"][1]["attempts"][0]["reason"]
    assert "1 unverified" in out.headline


def test_reference_unavailable_stops_even_with_continue(tmp_path: Path) -> None:
    script = Script()
    script.unavailable["ref"] = {12}
    out = run_pass(write_config(tmp_path), tmp_path / "run", script, continue_on_divergence=True)
    assert statuses(out) == ["verified", "verified", "unverified", "pending"]
    a = out.state["windows"][2]["attempts"][0]
    assert a["participants"]["alt1"]["result"] == "not_run" and "reference unavailable" in a["reason"]


def test_short_output_is_a_length_divergence(tmp_path: Path) -> None:
    script = Script()
    script.short["alt2"] = {0}
    out = run_pass(write_config(tmp_path), tmp_path / "run", script)
    (div,) = out.state["divergences"]
    assert div["fields"] == ["<steps>"] and div["step"] == 5


def test_regression_appends_to_history(tmp_path: Path) -> None:
    script = Script()
    run_dir = tmp_path / "run"
    run_pass(write_config(tmp_path), run_dir, script)
    script.calls.clear()
    out = run_pass(None, run_dir, script, action="regression", from_step=7, to_step=13)
    assert out.code == 0
    assert sorted({start for _, start, _, _ in script.calls}) == [6, 12]
    assert [len(w["attempts"]) for w in out.state["windows"]] == [1, 2, 2, 1]
    assert out.state["windows"][1]["attempts"][1]["mode"] == "regression"
    assert out.state["passes"][-1]["from"] == 7 and out.state["passes"][-1]["to"] == 13
    script.bugs["alt1"] = {20: ("pc", 0)}  # a regression found by re-verifying everything
    out = run_pass(None, run_dir, script, action="regression")
    assert out.code == 1
    assert statuses(out) == ["verified", "verified", "verified", "diverged"]
    assert [len(w["attempts"]) for w in out.state["windows"]] == [2, 3, 3, 2]


def test_regression_range_must_be_inside_the_run(tmp_path: Path) -> None:
    script = Script()
    run_pass(write_config(tmp_path), tmp_path / "run", script)
    with pytest.raises(UsageError, match="not inside the run"):
        run_pass(None, tmp_path / "run", script, action="regression", from_step=10, to_step=99)


def test_existing_run_is_not_restarted_and_fresh_archives_it(tmp_path: Path) -> None:
    script = Script()
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "run"
    run_pass(cfg, run_dir, script)
    with pytest.raises(UsageError, match="already holds a run") as exc:
        run_pass(cfg, run_dir, script)
    assert "resume" in str(exc.value) and "--fresh" in str(exc.value)
    (run_dir / "notes.txt").write_text("mine")
    out = run_pass(cfg, run_dir, script, fresh=True)
    assert len(out.state["passes"]) == 1
    assert (run_dir / "notes.txt").read_text() == "mine"  # only what the run wrote is archived and removed
    archives = list((run_dir / "archive").glob("run-*.tar.gz"))
    assert len(archives) == 1 and list((run_dir / "archive").glob("run-*.README.txt"))


def test_geometry_and_input_changes_are_refused_on_resume(tmp_path: Path) -> None:
    script = Script()
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "run"
    run_pass(cfg, run_dir, script, steps=12)
    with pytest.raises(UsageError, match="--window 4 differs"):
        run_pass(cfg, run_dir, script, action="resume", window=4)
    cfg.write_text(cfg.read_text().replace('program = ["noop"]', 'program = ["other"]'))
    with pytest.raises(UsageError, match="input changed"):
        run_pass(cfg, run_dir, script, action="resume")


def test_changed_implementations_are_recorded(tmp_path: Path) -> None:
    script = Script()
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "run"
    run_pass(cfg, run_dir, script, steps=12)
    write_config(tmp_path, alts=("alt1",))
    out = run_pass(cfg, run_dir, script, action="regression")
    assert any(e["kind"] == "config-changed" for e in out.state["events"])
    assert [i["name"] for i in out.state["run"]["implementations"]] == ["ref", "alt1"]
    assert set(out.state["windows"][0]["attempts"][-1]["participants"]) == {"ref", "alt1"}
    assert len(list((run_dir / "configs").glob("*.toml"))) == 2


def test_interrupted_window_is_recorded_and_recomputed(tmp_path: Path) -> None:
    script = Script()
    script.interrupt_at = ("alt1", 12)
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pass(cfg, run_dir, script)
    st = json.loads((run_dir / "state.json").read_text())
    assert state.validation_errors(st) == []
    assert st["windows"][2]["status"] == "interrupted" and st["passes"][0]["outcome"] == "failed"
    script.interrupt_at = None
    out = run_pass(None, run_dir, script, action="resume")
    assert [a["status"] for a in out.state["windows"][2]["attempts"]] == ["interrupted", "verified"]
    assert out.code == 0


def test_a_killed_pass_is_recovered_on_resume(tmp_path: Path) -> None:
    """The state a SIGKILL leaves behind (attempt and pass still 'running') is recorded as interrupted."""
    script = Script()
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "run"
    run_pass(cfg, run_dir, script, steps=12)
    store = state.StateStore(run_dir)
    st, _ = store.load(repair=False)
    assert st is not None
    st["windows"][1]["attempts"].append({**st["windows"][1]["attempts"][0], "n": 2, "status": "in_progress", "pass": 2})
    st["windows"][1]["status"] = "in_progress"
    st["in_progress"] = {"window": 6, "attempt": 2, "pass": 2, "pid": 999999, "started": state.now()}
    st["passes"].append({**st["passes"][0], "n": 2, "kind": "regression", "outcome": "running", "finished": None})
    store.save(st)
    out = run_pass(None, run_dir, script, action="resume")
    assert out.processed == 0  # window 6 was verified before the killed regression attempt: it stays verified
    w = out.state["windows"][1]
    assert [a["status"] for a in w["attempts"]] == ["verified", "interrupted"] and w["status"] == "verified"
    assert out.state["passes"][1]["outcome"] == "interrupted"
    assert any("was interrupted" in n for n in out.notes)


def test_llm_alternates_are_teacher_forced_on_reference_tokens(tmp_path: Path) -> None:
    script = Script()
    out = run_pass(write_config(tmp_path, llm=True, steps=12, alts=("alt1",)), tmp_path / "run", script)
    assert out.code == 0
    assert script.calls == [("ref", 0, 6, 0), ("alt1", 0, 6, 6), ("ref", 6, 6, 6), ("alt1", 6, 6, 12)]
    tokens = [t for w in out.state["windows"] for t in w["attempts"][0]["reference_tokens"]]
    assert len(tokens) == 12


def test_llm_run_starting_later_computes_the_prefix_once(tmp_path: Path) -> None:
    script = Script()
    cfg = write_config(tmp_path, llm=True, steps=6, alts=("alt1",))
    run_dir = tmp_path / "run"
    out = run_pass(cfg, run_dir, script, start=4)
    assert out.state["prefix_tokens"] is not None and len(out.state["prefix_tokens"]) == 4
    assert script.calls[0] == ("ref", 0, 4, 0) and script.calls[1] == ("ref", 4, 6, 4)
    script.calls.clear()
    run_pass(None, run_dir, script, action="regression")
    assert script.calls[0] == ("ref", 4, 6, 4)  # the prefix is not computed again


def test_changed_reference_tokens_make_later_windows_stale(tmp_path: Path) -> None:
    script = Script()
    run_dir = tmp_path / "run"
    run_pass(write_config(tmp_path, llm=True, steps=18, alts=("alt1",)), run_dir, script)
    script.token_shift = 1  # the reference now decodes differently
    out = run_pass(None, run_dir, script, action="regression", from_step=0, to_step=6)
    assert statuses(out) == ["verified", "stale", "stale"]
    assert any(e["kind"] == "stale" for e in out.state["events"])
    script.calls.clear()
    out = run_pass(None, run_dir, script, action="resume")
    assert statuses(out) == ["verified"] * 3
    assert sorted({start for _, start, _, _ in script.calls}) == [6, 12]


def test_resume_without_config_and_without_state_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds no run"):
        run_pass(None, tmp_path / "empty", Script(), action="resume")
    with pytest.raises(UsageError, match="no run to re-verify"):
        run_pass(write_config(tmp_path), tmp_path / "empty2", Script(), action="regression")


def trace_hashes(run_dir: Path) -> dict[str, str]:
    import hashlib

    files = (p for p in (run_dir / "traces").rglob("*") if p.is_file())
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_truncated_state_recovered_from_backup_rewrites_no_history(tmp_path: Path) -> None:
    """Truncated state recovered from backup: no trace directory overwritten, completed passes stay completed."""
    script = Script()
    run_dir = tmp_path / "run"
    first = run_pass(write_config(tmp_path), run_dir, script)
    before = trace_hashes(run_dir)
    good = (run_dir / "state.json").read_bytes()
    (run_dir / "state.json").write_bytes(good[: len(good) // 3])
    script.calls.clear()
    out = run_pass(None, run_dir, script, action="resume")
    assert any("recovered from state.json.bak" in n and "replayed from journal.jsonl" in n for n in out.notes)
    assert script.calls == [] and out.processed == 0  # nothing verified is computed again
    assert trace_hashes(run_dir) == before  # every trace byte-identical
    assert [p["outcome"] for p in out.state["passes"]] == ["complete", "complete"]
    assert [w["attempts"] for w in out.state["windows"]] == [w["attempts"] for w in first.state["windows"]]
    assert not any(e["kind"] == "interrupted" for e in out.state["events"])


def test_backup_older_than_the_traces_never_reuses_an_attempt_number(tmp_path: Path) -> None:
    """Without the journal, a backup that predates the windows' results: they are computed again as new
    attempts, and the traces of the attempts the backup does not know are kept, byte for byte."""
    script = Script()
    run_dir = tmp_path / "run"
    run_pass(write_config(tmp_path), run_dir, script)
    before = trace_hashes(run_dir)
    (run_dir / "state.json").write_text("{")
    (run_dir / "journal.jsonl").unlink()
    out = run_pass(None, run_dir, script, action="resume")
    assert out.code == 0 and out.processed == 4
    assert all([a["n"] for a in w["attempts"]] == [2] for w in out.state["windows"])
    assert {k: v for k, v in trace_hashes(run_dir).items() if k in before} == before
    assert sum(e["kind"] == "attempts-on-disk" for e in out.state["events"]) == 4
    # The backup's pass was still running and nothing records how it ended: it is reported, not invented.
    assert out.state["passes"][0]["outcome"] == "interrupted"


def test_trace_directory_is_never_written_twice(tmp_path: Path) -> None:
    script = Script()
    run_dir = tmp_path / "run"
    (run_dir / "traces" / "w000006" / "a1").mkdir(parents=True)  # e.g. left by a pass killed after creating it
    (run_dir / "traces" / "w000006" / "a1" / "ref.jsonl").write_text("earlier evidence\n")
    out = run_pass(write_config(tmp_path), run_dir, script)
    assert [a["n"] for a in out.state["windows"][1]["attempts"]] == [2]
    assert (run_dir / "traces" / "w000006" / "a1" / "ref.jsonl").read_text() == "earlier evidence\n"
