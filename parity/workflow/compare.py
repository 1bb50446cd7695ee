"""Compare an alternate's step records with the reference's, field by field.

Records are JSON objects (dicts). Nested objects are compared key by key under dotted paths
(`registers.pc`); lists element by element; numbers exactly unless their field has a tolerance; everything
else exactly. Full logit rows may be numpy arrays (kept in memory by the built-in engines, never written
to traces). A different number of steps is itself a difference (field `<steps>`), never a warning.

numpy is used only when a value is a numpy object, which can only happen once something imported numpy:
a run of external commands (records parsed from JSON) never pays for importing it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from parity.workflow.config import FieldRule

STEPS_FIELD = "<steps>"
SHORT_LIST = 16  # lists up to this long are shown whole in reports; longer ones at the differing index
Rules = Callable[[str], FieldRule]


@dataclass(frozen=True)
class FieldDiff:
    """One field of one step that differs: both values, and how far apart they are."""

    step: int
    field: str
    reference: Any
    alternate: Any
    detail: str
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "field": self.field,
            "index": self.index,
            "reference": self.reference,
            "alternate": self.alternate,
            "detail": self.detail,
        }


def _numpy() -> ModuleType | None:
    """numpy if it is loaded (a value can only be a numpy object then)."""
    return sys.modules.get("numpy")


def _is_array(x: Any) -> bool:
    np = _numpy()
    return np is not None and isinstance(x, np.ndarray)


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy (numpy scalars and arrays become Python numbers and lists)."""
    np = _numpy()
    if np is not None:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int | float):
        return True
    np = _numpy()
    return np is not None and isinstance(x, np.integer | np.floating)


def _numeric_vector(x: Any) -> Any:
    """A 1-D numeric array as float64 ndarray (numpy input) or list of floats (JSON input), else None."""
    if _is_array(x):
        return x.astype("float64", copy=False) if x.ndim == 1 and x.dtype.kind in "iuf" else None
    if isinstance(x, list | tuple) and x and all(_is_number(v) for v in x):
        return [float(v) for v in x]
    return None


def _numbers_equal(a: float, b: float, rule: FieldRule) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if rule.mode == "tolerance":
        return abs(a - b) <= rule.tolerance(a)
    return a == b


def _show(x: Any) -> Any:
    v = jsonable(x)
    if isinstance(v, list) and len(v) > SHORT_LIST:
        return {"length": len(v), "head": v[:8]}
    return v


def ranked_ids_match(
    ref_ids: Sequence[Any], alt_ids: Sequence[Any], ref_values: Sequence[float], tol: FieldRule
) -> bool:
    """Do two ranked id lists agree up to ties? Used for top-k ids ranked by their logits.

    Where the lists differ at rank j, the alternate's id must be one the reference ranks at a value within
    twice the tolerance of the reference's value at j (the two are tied at this precision), or, if the
    reference does not list it at all, rank j must be tied with the reference's last entry (the id came
    from just below the cut). Top-k alone cannot show how far below the cut that id sat in the reference;
    the full-logits field of the built-in engines checks it.
    """
    if not ref_ids or len(ref_ids) != len(alt_ids) or len(ref_values) != len(ref_ids):
        return False
    if len(set(map(str, alt_ids))) != len(alt_ids):
        return False
    last = float(ref_values[-1])
    for j, (r, a) in enumerate(zip(ref_ids, alt_ids, strict=True)):
        if r == a:
            continue
        vj = float(ref_values[j])
        slack = 2 * tol.tolerance(vj)
        if a in ref_ids:
            if abs(float(ref_values[list(ref_ids).index(a)]) - vj) > slack:
                return False
        elif abs(vj - last) > slack:
            return False
    return True


def _vector_detail(bad: list[int], n: int, worst: int, worst_delta: float, rule: FieldRule) -> str:
    return (
        f"{len(bad)} of {n} elements differ ({rule.describe()}); first at [{bad[0]}]; "
        f"max |Δ| {worst_delta:.3g} at [{worst}]"
    )


def _compare_vector(step: int, path: str, a: Any, b: Any, rule: FieldRule) -> FieldDiff | None:
    """Two numeric vectors of equal length: numpy when either is an array (full logit rows), else Python."""
    if _is_array(a) or _is_array(b):
        import numpy as np

        va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        nan_a, nan_b = np.isnan(va), np.isnan(vb)
        delta = np.abs(va - vb)
        if rule.mode == "tolerance":
            bad_mask = (delta > rule.abs + rule.rel * np.abs(va)) | (nan_a != nan_b)
        else:
            bad_mask = (va != vb) | (nan_a != nan_b)
        bad_mask &= ~(nan_a & nan_b)
        if not bad_mask.any():
            return None
        bad = [int(i) for i in np.flatnonzero(bad_mask)]
        finite = np.where(np.isnan(delta), -1.0, delta)
        worst = int(np.argmax(finite))
        worst_delta = float(finite[worst])
        n = int(va.size)
        ref_at: Any = va.tolist() if n <= SHORT_LIST else float(va[bad[0]])
        alt_at: Any = vb.tolist() if n <= SHORT_LIST else float(vb[bad[0]])
    else:
        ref_list, alt_list = list(a), list(b)
        bad = [i for i, (x, y) in enumerate(zip(ref_list, alt_list, strict=True)) if not _numbers_equal(x, y, rule)]
        if not bad:
            return None
        deltas = [-1.0 if math.isnan(x - y) else abs(x - y) for x, y in zip(ref_list, alt_list, strict=True)]
        worst = max(range(len(deltas)), key=deltas.__getitem__)
        worst_delta = deltas[worst]
        n = len(ref_list)
        ref_at = ref_list if n <= SHORT_LIST else ref_list[bad[0]]
        alt_at = alt_list if n <= SHORT_LIST else alt_list[bad[0]]
    return FieldDiff(step, path, ref_at, alt_at, _vector_detail(bad, n, worst, worst_delta, rule), index=bad[0])


def compare_values(
    step: int, path: str, ref: Any, alt: Any, rules: Rules, ref_record: Mapping[str, Any], alt_record: Mapping[str, Any]
) -> list[FieldDiff]:
    """Differences between two values of field `path` (empty when they match under the field's rule)."""
    rule = rules(path)
    if rule.mode == "ignore":
        return []
    if isinstance(ref, Mapping) and isinstance(alt, Mapping):
        return compare_records_step(step, ref, alt, rules, prefix=f"{path}.")
    va, vb = _numeric_vector(ref), _numeric_vector(alt)
    is_seq_a = isinstance(ref, list | tuple) or _is_array(ref)
    is_seq_b = isinstance(alt, list | tuple) or _is_array(alt)
    if is_seq_a and is_seq_b:
        if len(ref) != len(alt):
            return [FieldDiff(step, path, _show(ref), _show(alt), f"length {len(ref)} vs {len(alt)}")]
        if rule.ties_within:
            values = ref_record.get(rule.ties_within)
            if (
                (isinstance(values, list | tuple) or _is_array(values))
                and list(jsonable(ref)) != list(jsonable(alt))
                and ranked_ids_match(
                    list(jsonable(ref)), list(jsonable(alt)), list(jsonable(values)), rules(rule.ties_within)
                )
            ):
                return []
        if va is not None and vb is not None:  # numeric lists (logits, ids): vectorised
            d = _compare_vector(step, path, va, vb, rule)
            return [d] if d else []
        bad: list[tuple[int, FieldDiff]] = []
        for i, (x, y) in enumerate(zip(ref, alt, strict=True)):
            sub = compare_values(step, f"{path}[{i}]", x, y, rules, {}, {})
            if sub:
                bad.append((i, sub[0]))
        if not bad:
            return []
        i, first = bad[0]
        detail = f"{len(bad)} of {len(ref)} elements differ; first at [{i}]"
        if len(ref) <= SHORT_LIST:
            return [FieldDiff(step, path, _show(ref), _show(alt), detail, i)]
        return [FieldDiff(step, first.field, first.reference, first.alternate, f"{detail}: {first.detail}", i)]
    if _is_number(ref) and _is_number(alt):
        a, b = float(ref), float(alt)
        if _numbers_equal(a, b, rule):
            return []
        detail = (
            f"|Δ| {abs(a - b):.3g} > {rule.tolerance(a):.3g} ({rule.describe()})"
            if rule.mode == "tolerance"
            else "not equal"
        )
        return [FieldDiff(step, path, jsonable(ref), jsonable(alt), detail)]
    if type(ref) is not type(alt) and not (_is_number(ref) and _is_number(alt)):
        return [FieldDiff(step, path, _show(ref), _show(alt), f"type {type(ref).__name__} vs {type(alt).__name__}")]
    if ref == alt:
        return []
    return [FieldDiff(step, path, _show(ref), _show(alt), "not equal")]


def compare_records_step(
    step: int, ref: Mapping[str, Any], alt: Mapping[str, Any], rules: Rules, prefix: str = ""
) -> list[FieldDiff]:
    """Differences between two records of one step (keys in the reference's order, then the alternate's)."""
    out: list[FieldDiff] = []
    keys = list(ref) + [k for k in alt if k not in ref]
    for key in keys:
        path = f"{prefix}{key}"
        rule = rules(path)
        if rule.mode == "ignore":
            continue
        if key not in ref or key not in alt:
            if rule.optional:
                continue
            side = "alternate" if key not in alt else "reference"
            out.append(
                FieldDiff(
                    step,
                    path,
                    _show(ref.get(key)),
                    _show(alt.get(key)),
                    f"missing in the {side}",
                )
            )
            continue
        out.extend(compare_values(step, path, ref[key], alt[key], rules, ref, alt))
    return out


def logits_max_abs(ref_records: Sequence[Mapping[str, Any]], alt_records: Sequence[Mapping[str, Any]]) -> float | None:
    """max |Δ| over the full logit rows of a window, when both sides kept them in memory (built-in engines)."""
    worst: float | None = None
    for r, a in zip(ref_records, alt_records, strict=False):
        x: Any = r.get("logits")
        y: Any = a.get("logits")
        if not (_is_array(x) and _is_array(y)) or x.shape != y.shape:
            return None
        import numpy as np

        d = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
        worst = d if worst is None else max(worst, d)
    return worst


def compare_window(
    start: int, ref_records: Sequence[Mapping[str, Any]], alt_records: Sequence[Mapping[str, Any]], rules: Rules
) -> list[FieldDiff]:
    """All differences of one alternate in one window, in step order; a length mismatch is one of them."""
    out: list[FieldDiff] = []
    for j, (r, a) in enumerate(zip(ref_records, alt_records, strict=False)):
        out.extend(compare_records_step(start + j, r, a, rules))
    if len(ref_records) != len(alt_records):
        n = min(len(ref_records), len(alt_records))
        out.append(
            FieldDiff(
                start + n,
                STEPS_FIELD,
                len(ref_records),
                len(alt_records),
                f"length mismatch: the reference produced {len(ref_records)} steps, the alternate {len(alt_records)}",
            )
        )
    return out
