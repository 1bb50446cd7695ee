"""Issue 15's `parity run` targets in the bench receipt (parity.bench.overhead.run_target, report.run_target_line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from parity.bench import gate, overhead, report
from parity.bench.inputs import ModelRef


def _model(name: str, sha: str = "0" * 64) -> ModelRef:
    return ModelRef(name, Path("m.gguf"), sha, 1)


def test_the_default_model_must_run_within_one_second() -> None:
    t = overhead.run_target(_model("default-f32"), 0.9, 0.1)
    assert t is not None and t["met"] and t["max_wall_s"] == 1.0 and "max_llama_ratio" not in t
    t = overhead.run_target(_model("default-q8_0"), 1.2, 0.1)
    assert t is not None and not t["met"]


def test_gemma_must_run_within_four_seconds_and_three_times_llama_cpp() -> None:
    gemma = _model("gemma3-270m-q4_k_m", overhead.GEMMA3_270M_Q4_K_M)
    t = overhead.run_target(gemma, 3.0, 1.1)
    assert t is not None and t["met"] and t["llama_ratio"] == 3.0 / 1.1
    assert overhead.run_target(gemma, 3.5, 1.1)["met"] is False  # type: ignore[index]  # 3.2x llama.cpp
    assert overhead.run_target(gemma, 4.5, 2.0)["met"] is False  # type: ignore[index]  # over 4 s
    assert overhead.run_target(gemma, 1.0, 0.0)["met"] is False  # type: ignore[index]  # no ratio: not met
    # by content, whatever it is called
    assert overhead.run_target(_model("/x/g.gguf", overhead.GEMMA3_270M_Q4_K_M), 3.0, 1.1) is not None


def test_a_model_the_issue_names_no_target_for_has_none() -> None:
    assert overhead.run_target(_model("/x/other.gguf"), 0.5, 0.1) is None


def _record(target: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "model_sha256": "0" * 64,
        "command": ["python", "-m", "parity", "run"],
        "runs": 3,
        "gen_tokens": 8,
        "median_wall_s": 0.9,
        "cpu_s": [1.1, 1.0, 1.3],
        "cpu_pressure": 0.25,
        "threads": 1,
        **({"target": target} if target is not None else {}),
    }


def test_the_summary_line_says_met_or_not_met() -> None:
    met = _record(overhead.run_target(_model("default-f32"), 0.9, 0.1))
    line = report.run_target_line(met)
    assert line.startswith("`parity run` target: 0.90 s wall <= 1 s") and line.endswith(": met"), line
    assert "CPU 1.10 s" in line and "busy 25%" in line
    gemma = _record(overhead.run_target(_model("g", overhead.GEMMA3_270M_Q4_K_M), 5.0, 1.0))
    line = report.run_target_line(gemma)
    assert "5.0x llama.cpp's own load + compute <= 3x" in line and line.endswith(": NOT met"), line


def test_the_record_validates_against_the_bench_schema() -> None:
    full = json.loads(gate.SCHEMA_PATH.read_text())
    item = Draft202012Validator({**full["properties"]["harness_overhead"]["items"], "$defs": full.get("$defs", {})})
    record = _record(overhead.run_target(_model("g", overhead.GEMMA3_270M_Q4_K_M), 3.0, 1.1))
    assert not list(item.iter_errors(record))
    assert list(item.iter_errors({**record, "target": {**record["target"], "met": "yes"}}))
    assert list(item.iter_errors({**record, "cpu_pressure": 1.5}))
