"""Field-by-field comparison of step records: tolerances, nesting, lists, ties, lengths."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from parity.workflow.compare import STEPS_FIELD, compare_records_step, compare_window, ranked_ids_match
from parity.workflow.config import EXACT, FieldRule

RULES: dict[str, FieldRule] = {
    "x": FieldRule(mode="tolerance", abs=1e-3),
    "r": FieldRule(mode="tolerance", rel=1e-2),
    "top_logits": FieldRule(mode="tolerance", abs=1e-3),
    "top_ids": FieldRule(ties_within="top_logits"),
    "logits": FieldRule(mode="tolerance", abs=1e-3, optional=True),
    "digest": FieldRule(mode="ignore"),
}


def rules(path: str) -> FieldRule:
    import re

    probe = re.sub(r"\[\d+\]", "", path)
    while probe not in RULES:
        if "." not in probe:
            return EXACT
        probe = probe.rsplit(".", 1)[0]
    return RULES[probe]


def diffs(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(d.field, d.reference, d.alternate) for d in compare_records_step(7, a, b, rules)]


def test_exact_and_tolerances() -> None:
    assert diffs({"pc": 3, "x": 1.0, "r": 100.0}, {"pc": 3, "x": 1.0009, "r": 100.9}) == []
    assert diffs({"pc": 3}, {"pc": 4}) == [("pc", 3, 4)]
    assert diffs({"x": 1.0}, {"x": 1.002}) == [("x", 1.0, 1.002)]
    assert diffs({"r": 100.0}, {"r": 101.5}) == [("r", 100.0, 101.5)]
    assert diffs({"pc": 1}, {"pc": 1.0}) == []  # 1 == 1.0: JSON does not distinguish them reliably
    assert diffs({"flag": True}, {"flag": 1}) == [("flag", True, 1)]  # but a bool is not a number
    assert diffs({"x": math.nan}, {"x": math.nan}) == []
    assert diffs({"x": math.nan}, {"x": 0.0})[0][0] == "x"


def test_nested_fields_are_named_by_dotted_path() -> None:
    a = {"registers": {"pc": 1, "sp": 2, "flags": {"z": True}}, "op": "add"}
    b = {"registers": {"pc": 1, "sp": 3, "flags": {"z": False}}, "op": "add"}
    assert diffs(a, b) == [("registers.sp", 2, 3), ("registers.flags.z", True, False)]


def test_missing_optional_and_ignored_fields() -> None:
    assert diffs({"pc": 1, "extra": 2}, {"pc": 1}) == [("extra", 2, None)]
    assert diffs({"pc": 1}, {"pc": 1, "new": 0}) == [("new", None, 0)]
    assert diffs({"pc": 1, "logits": [1.0]}, {"pc": 1}) == []  # optional: compared only when both have it
    assert diffs({"digest": "a"}, {"digest": "b"}) == []


def test_lists_short_and_long() -> None:
    (d,) = compare_records_step(0, {"stack": [1, 2, 3]}, {"stack": [1, 5, 3]}, rules)
    assert (d.field, d.index, d.reference, d.alternate) == ("stack", 1, [1, 2, 3], [1, 5, 3])
    ref = np.arange(100, dtype=np.float32)
    alt = ref.copy()
    alt[[40, 70]] += np.float32(0.5)
    (d,) = compare_records_step(0, {"logits": ref}, {"logits": list(map(float, alt))}, rules)
    assert (d.field, d.index, d.reference, d.alternate) == ("logits", 40, 40.0, 40.5)
    assert "2 of 100 elements differ" in d.detail and "max |Δ| 0.5" in d.detail
    (d,) = compare_records_step(0, {"stack": [1, 2]}, {"stack": [1, 2, 3]}, rules)
    assert d.detail == "length 2 vs 3"
    nested = compare_records_step(0, {"mem": [{"v": 1}, {"v": 2}]}, {"mem": [{"v": 1}, {"v": 9}]}, rules)
    assert [(d.field, d.index) for d in nested] == [("mem", 1)]


def test_top_ids_may_swap_only_within_the_logit_tolerance() -> None:
    tol = FieldRule(mode="tolerance", abs=1e-3)
    assert ranked_ids_match([5, 7, 9], [5, 9, 7], [3.0, 2.0, 1.9995], tol)
    assert not ranked_ids_match([5, 7, 9], [5, 9, 7], [3.0, 2.0, 1.9], tol)
    assert ranked_ids_match([5, 7, 9], [5, 7, 11], [3.0, 2.0, 1.9], tol)  # 11 came from just below the cut
    assert not ranked_ids_match([5, 7, 9], [11, 7, 9], [3.0, 2.0, 1.9], tol)
    assert not ranked_ids_match([5, 7], [7, 7], [3.0, 2.9999], tol)
    a = {"top_ids": [5, 7, 9], "top_logits": [3.0, 2.0, 1.9995]}
    swapped = {"top_ids": [5, 9, 7], "top_logits": [3.0, 2.0002, 1.9996]}  # a tie at 1e-3 resolved the other way
    assert compare_records_step(0, a, swapped, rules) == []
    off = {"top_ids": [5, 9, 7], "top_logits": [3.0, 2.0, 1.997]}
    assert [d.field for d in compare_records_step(0, a, off, rules)] == ["top_logits"]
    far = {"top_ids": [5, 9, 7], "top_logits": [3.0, 2.0, 1.9995]}
    a_far = {"top_ids": [5, 7, 9], "top_logits": [3.0, 2.0, 1.5]}
    assert [d.field for d in compare_records_step(0, a_far, far, rules)] == ["top_ids", "top_logits"]


def test_window_length_mismatch_is_a_difference() -> None:
    ref = [{"step": s} for s in range(10, 16)]
    out = compare_window(10, ref, ref[:4], rules)
    assert [(d.step, d.field, d.reference, d.alternate) for d in out] == [(14, STEPS_FIELD, 6, 4)]
    assert compare_window(10, ref, ref, rules) == []
