"""Receipts: one JSON file per lane, validated against the JSON Schema shipped in parity/schema/."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from parity.core import paths
from parity.core.fs import atomic_write_text
from parity.errors import UsageError

RECEIPT_VERSION = 3
SCHEMA_PATH = paths.schema_path("receipt.schema.json")


@cache
def schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """A JSON Schema shipped in parity/schema/ (default: the lane receipt's)."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@cache
def _validator(schema_path: Path) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(schema_path))


def validation_errors(receipt: Any, schema_path: Path = SCHEMA_PATH) -> list[str]:
    """Human-readable schema violations (empty when valid)."""
    v = _validator(schema_path)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in v.iter_errors(receipt)]


# (SHA-256 of a receipt's JSON text, schema) this process validated and wrote: `load` of those exact bytes
# (report.html reads back the receipts just written) skips a second validation (0.1-0.2 s per receipt).
_WRITTEN: set[tuple[bytes, Path]] = set()


def _text(receipt: dict[str, Any]) -> str:
    return json.dumps(receipt, indent=2, ensure_ascii=False) + "\n"  # as core/fs.atomic_write_json writes it


def write(path: Path, receipt: dict[str, Any], schema_path: Path = SCHEMA_PATH) -> None:
    """Validate, then write atomically. A receipt that does not match its schema is a bug: never written."""
    errors = validation_errors(receipt, schema_path)
    if errors:
        raise AssertionError(
            f"internal error: receipt {path.name} violates the schema {schema_path.name}: {errors[:3]}"
        )
    text = _text(receipt)
    atomic_write_text(path, text)
    _WRITTEN.add((hashlib.sha256(text.encode("utf-8")).digest(), schema_path))


def load(path: Path) -> dict[str, Any]:
    """Load and validate a receipt (v1 or v2); UsageError naming the file and the first problems."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except FileNotFoundError as exc:
        raise UsageError(f"receipt not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    if (hashlib.sha256(text.encode("utf-8")).digest(), SCHEMA_PATH) in _WRITTEN:
        return dict(data)  # exactly the bytes write() validated in this process
    errors = validation_errors(data)
    if errors:
        raise UsageError(f"{path} is not a valid parity receipt: " + "; ".join(errors[:3]))
    result: dict[str, Any] = data
    return result
