"""Decoded GGUF metadata with typed accessors that name the key, what was expected and what the file holds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from parity.errors import ModelFormatError
from parity.gguf.strings import StringArray

RECONVERT = "re-convert the model with a current llama.cpp convert script"
INT_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")


def python_type_name(value: Any) -> str:
    """The GGUF-like type name of an already-decoded value (metadata built in Python has no GGUF types)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | StringArray):
        return "array of " + (python_type_name(value[0]) if value else "nothing")
    return type(value).__name__


def show(value: Any) -> str:
    """A value for an error message, cut short (a vocabulary array can have 256k entries)."""
    if isinstance(value, list | StringArray):
        head = ", ".join(show(v) for v in value[:3])
        return f"[{head}{', ...' if len(value) > 3 else ''}] ({len(value)} entries)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Metadata(dict[str, Any]):
    """Decoded GGUF metadata (key -> plain Python value) that knows each key's GGUF value type.

    The typed accessors are how every hyperparameter reader and the tokenizer export read metadata: a
    value of the wrong type, out of range or missing raises ModelFormatError naming the key, what was
    expected and what the file holds, never a ValueError/TypeError from `int()` or `float()`. Metadata
    built in Python (tests, plain dicts) has no GGUF types; then the Python type is checked instead.
    """

    def __init__(
        self, values: Mapping[str, Any] | None = None, *, types: Mapping[str, str] | None = None, source: str = "GGUF"
    ) -> None:
        super().__init__(values or {})
        self.types: dict[str, str] = dict(types or {})
        self.source = source

    @classmethod
    def wrap(cls, metadata: Mapping[str, Any], source: str) -> Metadata:
        """`metadata` itself when it already is a Metadata, else a typeless Metadata over a copy of it."""
        return metadata if isinstance(metadata, Metadata) else cls(metadata, source=source)

    def type_of(self, key: str) -> str:
        """The key's GGUF value type ("uint32", "array of string", ...), or its Python type without one."""
        return self.types.get(key) or python_type_name(self.get(key))

    def error(self, key: str, expected: str, fix: str = RECONVERT) -> ModelFormatError:
        """ModelFormatError: key X: expected <expected>, got <value> (<type>)."""
        return ModelFormatError(
            f"{self.source}: metadata key '{key}': expected {expected}, got {show(self.get(key))} ({self.type_of(key)})",
            fix=fix,
        )

    def missing(self, key: str) -> ModelFormatError:
        return ModelFormatError(
            f"{self.source}: required metadata key '{key}' is missing",
            fix="convert the model with a current llama.cpp convert script, which writes this key",
        )

    def _typed(self, key: str, allowed: Iterable[str] | None) -> bool:
        """Whether the key's GGUF type (when known) is one of `allowed` (None: any)."""
        gtype = self.types.get(key)
        return gtype is None or allowed is None or gtype in tuple(allowed)

    def get_int(
        self,
        key: str,
        default: int | None = None,
        *,
        min: int | None = None,
        max: int | None = None,
        gguf_types: Iterable[str] | None = INT_TYPES,
        per_layer: bool = False,
    ) -> int:
        """An integer value (`default` when absent, required when `default` is None).

        `gguf_types` are the GGUF types accepted (llama.cpp reads its hyperparameters as exactly uint32);
        `per_layer` also accepts an array whose entries are all equal (llama.cpp's get_key_or_arr).
        """
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        expected = "an integer" if min is None else ("a positive integer" if min == 1 else f"an integer >= {min}")
        if max is not None:
            expected += f" <= {max}"
        allowed = tuple(gguf_types) if gguf_types is not None else None
        if allowed is not None and len(allowed) == 1:
            expected = f"{expected} of type {allowed[0]}"
        if isinstance(value, list) and per_layer:
            if self.types.get(key) not in (None, "array of int32", "array of uint32"):
                raise self.error(key, expected + " (or a per-layer array of uint32/int32)")
            if not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise self.error(key, expected + " (or a non-empty per-layer array of integers)")
            if any(v != value[0] for v in value):
                raise ModelFormatError(
                    f"{self.source}: '{key}' varies per layer ({show(value)}), which the numpy engine does not support",
                    fix="use a model with the same value in every layer",
                )
            value = value[0]
        elif isinstance(value, bool) or not isinstance(value, int) or not self._typed(key, allowed):
            raise self.error(key, expected)
        if (min is not None and value < min) or (max is not None and value > max):
            raise self.error(key, expected)
        return int(value)

    def get_float(
        self,
        key: str,
        default: float | None = None,
        *,
        min: float | None = None,
        gguf_types: Iterable[str] | None = ("float32",),
    ) -> float:
        """A finite float value (`default` when absent, required when `default` is None)."""
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        allowed = tuple(gguf_types) if gguf_types is not None else None
        expected = "a finite number" if min is None else f"a finite number >= {min:g}"
        if allowed is not None and len(allowed) == 1:
            expected = f"{expected} of type {allowed[0]}"
        ok_python = isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))
        if not ok_python or not self._typed(key, allowed) or not math.isfinite(value):
            raise self.error(key, expected)
        if min is not None and value < min:
            raise self.error(key, expected)
        return float(value)

    def get_str(self, key: str, default: str | None = None) -> str:
        """A string value (`default` when absent, required when `default` is None)."""
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        if not isinstance(value, str):
            raise self.error(key, "a string")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        """A bool value, `default` when absent."""
        if key not in self:
            return default
        value = self[key]
        if not isinstance(value, bool):
            raise self.error(key, "a bool")
        return value

    def get_array(self, key: str, elem: type, default: list[Any] | None = None) -> Sequence[Any]:
        """An array whose entries are all `elem` (int, float or str; float also accepts ints; bool is not int)."""
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        what = {int: "integers", float: "numbers", str: "strings"}.get(elem, elem.__name__)
        if isinstance(value, StringArray):  # an array of strings read from a file: validated UTF-8 when read
            if elem is not str:
                raise self.error(key, f"an array of {what}")
            return value  # a read-only Sequence[str]
        if not isinstance(value, list):
            raise self.error(key, f"an array of {what}")
        if elem is float:
            ok = all(isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        elif elem is int:
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = all(isinstance(v, elem) for v in value)
        if not ok:
            raise self.error(key, f"an array of {'finite ' if elem is float else ''}{what}")
        return value
