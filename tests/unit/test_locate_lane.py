"""parity.check.locate without engines: when a lane is localised, how the record changes its status, the
record's shape (schema), and the --locate / --no-locate flags."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import numpy as np
import pytest

from parity import options
from parity.check import locate
from parity.cli import build_parser
from parity.compare import locate as analysis
from parity.core import paths
from parity.errors import UsageError


def _captured() -> locate.Captured:
    rng = np.random.default_rng(0)
    a = {n: rng.standard_normal((4, 8)).astype(np.float32) for n in ("attn_norm-0", "Qcur-0", "l_out-0")}
    b = {n: v * np.float32(1 + 1e-6) for n, v in a.items()}
    noise = analysis.noise_levels(a, b)
    cfg = [{"name": "ubatch_tail", "status": "measured"}]
    return locate.Captured(a, dict(noise), dict(noise), cfg)


def _schema() -> dict[str, Any]:
    path = paths.project_root() / "parity" / "schema" / "receipt.schema.json"
    out: dict[str, Any] = json.loads(path.read_text())["properties"]["localisation"]
    return out


def test_wanted_and_lane_status() -> None:
    assert locate.wanted("auto", "diverged") and not locate.wanted("auto", "pass")
    assert locate.wanted("on", "pass") and not locate.wanted("off", "diverged")
    out = {"status": "out_of_tolerance"}
    assert locate.lane_status("on", "pass", out) == "diverged"
    assert locate.lane_status("auto", "pass", out) == "pass"  # automatic localisation never changes a verdict
    assert locate.lane_status("on", "pass", {"status": "error"}) == "error"
    assert locate.lane_status("on", "pass", {"status": "ok"}) == "pass"
    assert locate.lane_status("on", "diverged", {"status": "ok"}) == "diverged"


def test_analyse_replay_decides_and_free_rows_are_kept() -> None:
    cap = _captured()
    free = {n: v * np.float32(1.001) if n == "l_out-0" else v for n, v in cap.a.items()}
    replay = dict(cap.a)
    rec = locate.analyse(cap, free, replay)
    assert rec["mode"] == "replay" and rec["status"] == "ok"
    assert rec["free"]["status"] == "out_of_tolerance" and rec["free"]["first"]["name"] == "l_out-0"
    jsonschema.validate(rec, _schema())
    only_free = locate.analyse(cap, free, None, "no replace here")
    assert only_free["mode"] == "free" and only_free["status"] == "out_of_tolerance"
    assert only_free["replay_unavailable"] == "no replace here" and only_free["free"] is None
    jsonschema.validate(only_free, _schema())


def test_unavailable_record_and_line() -> None:
    rec = locate.unavailable("implementation 'logits:x.npz' cannot capture graph tensors")
    jsonschema.validate(rec, _schema())
    assert analysis.summary_line(rec).startswith("localisation unavailable: implementation 'logits:x.npz'")
    assert locate.unavailable("boom", "error")["status"] == "error"


def test_flags() -> None:
    p = build_parser()
    assert vars(p.parse_args(["run", "--locate"]))["locate"] == "on"
    assert vars(p.parse_args(["run", "--no-locate"]))["locate"] == "off"
    assert vars(p.parse_args(["run"]))["locate"] is None
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--locate", "--no-locate"])
    assert options.resolve({}).locate == "auto"
    with pytest.raises(UsageError, match="locate must be auto, on or off"):
        options.resolve({"locate": "always"})


def test_which_models_get_the_dequantized_configuration() -> None:
    from parity.models import modelgen

    # F32 weights multiply as stored; F16 and 8-bit weights round the activations (compare/locate's noise)
    assert [locate.needs_dequantized(modelgen.default_model(v)[0]) for v in ("f32", "f16", "q8_0")] == [
        False,
        True,
        True,
    ]
