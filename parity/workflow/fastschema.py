"""A compiled validity check for the windows state schema: the same verdict as jsonschema, 10x+ faster.

jsonschema walks a long run's state (10,000 windows, each with attempts and participants) in seconds,
which made `resume` slow to start. `compile_schema` turns the subset of JSON Schema 2020-12 the state
schema uses (type, const, enum, properties, required, additionalProperties, items, minItems, minimum,
pattern, oneOf, local $ref) into nested Python closures that only answer valid / invalid; when a document
is invalid the caller asks jsonschema for the readable messages. An unsupported keyword is an error at
compile time, never a silently skipped rule (tests compare the verdicts on damaged states).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], bool]
ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}


def _is_type(name: str) -> Check:
    if name == "integer":
        return lambda v: (type(v) is int) or (type(v) is float and v.is_integer())
    if name == "number":
        return lambda v: type(v) in (int, float)
    table = {"string": str, "object": dict, "array": list, "boolean": bool, "null": type(None)}
    t = table[name]
    return lambda v: type(v) is t


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def compile_schema(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Check:
    """A function telling whether a document is valid against `schema` (refs resolve against `root`)."""
    root = schema if root is None else root
    cache: dict[str, Check] = {}

    def ref(pointer: str) -> Check:
        if pointer not in cache:
            if not pointer.startswith("#/"):
                raise ValueError(f"unsupported $ref {pointer!r}")
            node: Any = root
            for part in pointer[2:].split("/"):
                node = node[part]
            slot: list[Check] = []
            cache[pointer] = lambda v: slot[0](v)  # a recursive reference resolves through the slot
            slot.append(build(node))
            cache[pointer] = slot[0]
        return cache[pointer]

    def build(s: Mapping[str, Any]) -> Check:
        checks: list[Check] = []
        unknown = (
            set(s)
            - ANNOTATIONS
            - {
                "$ref",
                "type",
                "const",
                "enum",
                "properties",
                "required",
                "additionalProperties",
                "items",
                "minItems",
                "minimum",
                "pattern",
                "oneOf",
            }
        )
        if unknown:
            raise ValueError(f"unsupported schema keyword(s) {sorted(unknown)}")
        if "$ref" in s:
            checks.append(ref(s["$ref"]))
        names = s.get("type")
        is_object = names == "object" or ("type" not in s and ("properties" in s or "required" in s))
        if names is not None and names != "object":
            names = names if isinstance(names, list) else [names]
            if len(names) == 1:
                checks.append(_is_type(names[0]))
            else:
                types = [_is_type(n) for n in names]
                checks.append(lambda v: any(t(v) for t in types))
        if "const" in s:
            const = s["const"]
            checks.append(lambda v: _json_equal(v, const))
        if "enum" in s:
            options = list(s["enum"])
            if all(isinstance(o, str) for o in options):
                allowed = frozenset(options)
                checks.append(lambda v: type(v) is str and v in allowed)
            else:
                checks.append(lambda v: any(_json_equal(v, o) for o in options))
        if "minimum" in s:
            low = s["minimum"]
            checks.append(lambda v: type(v) not in (int, float) or v >= low)
        if "pattern" in s:
            rx = re.compile(s["pattern"])
            checks.append(lambda v: type(v) is not str or rx.search(v) is not None)
        if "minItems" in s:
            n = int(s["minItems"])
            checks.append(lambda v: type(v) is not list or len(v) >= n)
        if "items" in s:
            item = build(s["items"])
            checks.append(lambda v: type(v) is not list or all(item(x) for x in v))
        if "oneOf" in s:
            alts = [build(a) for a in s["oneOf"]]
            checks.append(lambda v: sum(1 for a in alts if a(v)) == 1)
        if is_object or "additionalProperties" in s:
            required = tuple(s.get("required", ()))
            props = {k: build(v) for k, v in s.get("properties", {}).items()}
            extra = s.get("additionalProperties", True)
            extra_check: Check | None = None
            if isinstance(extra, Mapping):
                extra_check = build(extra)
            closed = extra is False

            strict = names == "object"

            def obj(v: Any) -> bool:
                if type(v) is not dict:
                    return not strict
                for k in required:
                    if k not in v:
                        return False
                for k, x in v.items():
                    p = props.get(k)
                    if p is not None:
                        if not p(x):
                            return False
                    elif closed or (extra_check is not None and not extra_check(x)):
                        return False
                return True

            checks.append(obj)
        if not checks:
            return lambda v: True
        if len(checks) == 1:
            return checks[0]
        if len(checks) == 2:
            a, b = checks
            return lambda v: a(v) and b(v)
        return lambda v: all(c(v) for c in checks)

    return build(schema)
