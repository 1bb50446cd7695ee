"""Receipts: one JSON file per lane, validated against the JSON Schema shipped in parity/schema/."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from parity.errors import UsageError
from parity.fsutil import atomic_write_json

RECEIPT_VERSION = 2
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "receipt.schema.json"


@cache
def schema() -> dict[str, Any]:
    """The receipt JSON Schema."""
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


def validation_errors(receipt: Any) -> list[str]:
    """Human-readable schema violations (empty when valid)."""
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(schema())
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in v.iter_errors(receipt)]


def write(path: Path, receipt: dict[str, Any]) -> None:
    """Validate, then write atomically. A receipt that does not match the schema is a bug: never written."""
    errors = validation_errors(receipt)
    if errors:
        raise AssertionError(f"internal error: receipt for {path.name} violates the schema: {errors[:3]}")
    atomic_write_json(path, receipt)


def load(path: Path) -> dict[str, Any]:
    """Load and validate a receipt (v1 or v2); UsageError naming the file and the first problems."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"receipt not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    errors = validation_errors(data)
    if errors:
        raise UsageError(f"{path} is not a valid parity receipt: " + "; ".join(errors[:3]))
    result: dict[str, Any] = data
    return result
