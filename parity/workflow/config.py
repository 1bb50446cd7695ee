"""The implementations file of a windows run (TOML): [run], [input], [fields] and [[implementation]] tables.

```toml
[run]                      # geometry; CLI flags override
start = 0
steps = 120
window = 6

[input]                    # what every implementation receives; `prompt` (or `prompt_ids`) makes it an LLM run
prompt = "What is 2+2?"

[fields]                   # per-field comparison rules; fields not listed are compared exactly
top_logits = { abs = 1e-3 }

[[implementation]]
name = "llama"
role = "reference"         # exactly one reference; one or more alternates
kind = "llama"             # numpy | llama | bitnet | cmd | py | logits | command
options = { type_k = "f16", threads = 1 }
```

Unknown keys are rejected with a suggestion, like `[tool.parity]`. The options of the LLM kinds are the
options of their spec strings (parity.engines.spec): `kind = "llama"` with `options = { type_k = "f16" }`
is `--impl llama:type_k=f16`, checked by the same rules; `timeout` is the windows run's own. The external
kinds (protocol v2, docs/PROTOCOL.md) take their spec's one free-form value under its key:
`kind = "cmd"` with `options = { argv = "./my-engine --threads 2" }` is `--impl 'cmd:./my-engine --threads 2'`
(`py`: `target`, `logits`: `path`). `command` is the windows command protocol v1 (README, Stepwise parity).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.engines import spec as engine_specs
from parity.errors import UsageError

KINDS = ("numpy", "llama", "bitnet", "cmd", "py", "logits", "command")
LLM_KINDS = ("numpy", "llama", "bitnet", "cmd", "py", "logits")
EXTERNAL_KINDS = tuple(engine_specs.FREEFORM)  # protocol v2 engines and logits files: one free-form value
ROLES = ("reference", "alternate")
DEFAULT_WINDOW = 6
DEFAULT_TOP_K = 5
DEFAULT_COMMAND_TIMEOUT = 60.0

_TOP_KEYS = ("run", "input", "fields", "implementation")
_RUN_KEYS = ("start", "steps", "end", "window", "dir", "continue_on_divergence")
_IMPL_KEYS = ("name", "role", "kind", "options")
_RULE_KEYS = ("abs", "rel", "optional", "ties_within", "mode")
# Options of the LLM kinds that are the windows run's own, not the implementation spec's (parity.engines.spec).
WINDOWS_ONLY_OPTIONS: dict[str, tuple[str, ...]] = {
    "numpy": (),
    "llama": ("timeout",),
    "bitnet": ("timeout",),
    "cmd": ("timeout",),
    "py": ("timeout",),
    "logits": (),
}


def _spec_keys(kind: str) -> tuple[str, ...]:
    return (engine_specs.FREEFORM[kind][0],) if kind in engine_specs.FREEFORM else tuple(engine_specs.KINDS[kind])


# Options each kind accepts; a command's own parameters go in `params` and reach it untouched.
_OPTION_KEYS: dict[str, tuple[str, ...]] = {
    **{kind: (*_spec_keys(kind), *extra) for kind, extra in WINDOWS_ONLY_OPTIONS.items()},
    "command": ("command", "timeout", "cwd", "env", "append_args", "params"),
}
_LLM_INPUT_KEYS = ("prompt", "prompt_ids")


def _reject_unknown(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    known = list(known)
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(known)}"
            raise UsageError(f"unknown key '{key}' in {where}", fix=hint)


@dataclass(frozen=True)
class FieldRule:
    """How one field is compared: exactly, ignored, or numerically within |ref - alt| <= abs + rel * |ref|.

    `optional` fields are compared only when both records carry them (e.g. full logits, which only the
    built-in engines provide). `ties_within` names a sibling field of values (e.g. top_logits) that ranks an
    id list (e.g. top_ids): neighbours whose values are within that field's tolerance are a tie at that
    precision, so they may appear in either order.
    """

    mode: str = "exact"  # exact | ignore | tolerance
    abs: float = 0.0
    rel: float = 0.0
    optional: bool = False
    ties_within: str | None = None

    def tolerance(self, ref: float) -> float:
        """The allowed |Δ| around a reference value."""
        return self.abs + self.rel * abs(ref)

    def describe(self) -> str:
        """Human form for reports: `exact`, `ignored`, `abs 0.001`, `abs 0.001 + rel 1e-05`."""
        if self.mode == "ignore":
            return "ignored"
        if self.mode == "exact":
            text = "exact"
        else:
            parts = [f"abs {self.abs:g}"] if self.abs or not self.rel else []
            parts += [f"rel {self.rel:g}"] if self.rel else []
            text = " + ".join(parts)
        if self.ties_within:
            text += f" (ties within {self.ties_within} may swap)"
        return text + (", optional" if self.optional else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "abs": self.abs,
            "rel": self.rel,
            "optional": self.optional,
            "ties_within": self.ties_within,
        }


EXACT = FieldRule()


def parse_rule(name: str, value: Any, where: str) -> FieldRule:
    """`"exact"`, `"ignore"`, or a table {abs, rel, optional, ties_within, mode}."""
    if isinstance(value, str):
        if value in ("exact", "ignore"):
            return FieldRule(mode=value)
        raise UsageError(
            f"{where}: field rule {name} = {value!r} is not exact, ignore or a table",
            fix=f'write {name} = "exact", {name} = "ignore" or {name} = {{ abs = 1e-3 }}',
        )
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: field rule {name} must be a string or a table, got {type(value).__name__}")
    _reject_unknown(value, _RULE_KEYS, f"{where} [fields] {name}")
    tol: dict[str, float] = {}
    for key in ("abs", "rel"):
        if key in value:
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise UsageError(f"{where}: [fields] {name}.{key} must be a finite number >= 0, got {v!r}")
            tol[key] = float(v)
    mode = value.get("mode", "tolerance" if tol else "exact")
    if mode not in ("exact", "ignore", "tolerance"):
        raise UsageError(f"{where}: [fields] {name}.mode must be exact, ignore or tolerance, got {mode!r}")
    if mode == "tolerance" and not tol:
        raise UsageError(f"{where}: [fields] {name} has mode tolerance but no abs or rel", fix="add abs = 1e-3")
    ties = value.get("ties_within")
    if ties is not None and not isinstance(ties, str):
        raise UsageError(f"{where}: [fields] {name}.ties_within must name a field, got {ties!r}")
    optional = value.get("optional", False)
    if not isinstance(optional, bool):
        raise UsageError(f"{where}: [fields] {name}.optional must be true or false, got {optional!r}")
    return FieldRule(mode=mode, abs=tol.get("abs", 0.0), rel=tol.get("rel", 0.0), optional=optional, ties_within=ties)


@dataclass(frozen=True)
class ImplSpec:
    """One implementation: its name, role (reference | alternate), kind and kind-specific options."""

    name: str
    role: str
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "kind": self.kind, "options": dict(self.options)}

    @property
    def engine(self) -> engine_specs.ImplSpec:
        """The implementation spec of an LLM kind (what parity.engines.registry opens); not for `command`.

        External kinds keep `{python}` / `{config_dir}` unsubstituted here (ExternalImpl resolves them)."""
        return engine_spec(self.kind, self.options, f"implementation '{self.name}'")


def engine_spec(kind: str, options: Mapping[str, Any], where: str) -> engine_specs.ImplSpec:
    """The spec string an LLM kind's options stand for, validated by parity.engines.spec (UsageError naming
    the option). TOML integers stand for their digits; windows-only options (`timeout`) are left out.

    An external kind's value is taken as written (`{python}` and `{config_dir}` are substituted when the
    engine is opened, parity.workflow.impls.ExternalImpl)."""
    _reject_unknown(options, _OPTION_KEYS[kind], f"{where} options (kind {kind})")
    if kind in engine_specs.FREEFORM:
        key, what = engine_specs.FREEFORM[kind]
        value = options.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{where} (kind {kind}) needs options.{key}: {what}", fix=f'options = {{ {key} = "..." }}')
        if kind == "cmd":
            try:
                shlex.split(value)
            except ValueError as exc:
                raise UsageError(f"{where}: options.argv = {value!r}: {exc}", fix="quote it as a shell would") from exc
        return engine_specs.ImplSpec(kind, ((key, value.strip()),))
    items: list[str] = []
    for key, value in options.items():
        if key in WINDOWS_ONLY_OPTIONS[kind]:
            continue
        text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
        if not text or any(c in text for c in ",=:"):  # not one spec value
            raise UsageError(
                f"{where}: options.{key} = {value!r} is not valid", fix=f"{key} takes {engine_specs.KINDS[kind][key]}"
            )
        items.append(f"{key}={text}")
    try:
        return engine_specs.parse(f"{kind}:{','.join(items)}" if items else kind)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}", fix=exc.fix) from exc


@dataclass(frozen=True)
class RunSettings:
    """Geometry of a run: steps [start, end) in windows of `window` steps."""

    start: int = 0
    end: int | None = None
    window: int = DEFAULT_WINDOW
    dir: str | None = None
    continue_on_divergence: bool = False


@dataclass(frozen=True)
class WindowsConfig:
    """A parsed, validated implementations file."""

    path: Path
    text: str
    run: RunSettings
    input: Mapping[str, Any]
    fields: Mapping[str, FieldRule]
    implementations: tuple[ImplSpec, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def reference(self) -> ImplSpec:
        return next(i for i in self.implementations if i.role == "reference")

    @property
    def alternates(self) -> tuple[ImplSpec, ...]:
        return tuple(i for i in self.implementations if i.role == "alternate")

    @property
    def llm(self) -> bool:
        """An LLM run: alternates are teacher-forced on the reference's tokens."""
        return any(k in self.input for k in _LLM_INPUT_KEYS)

    def rule(self, path: str) -> FieldRule:
        """The rule for a dotted field path: the most specific listed prefix wins, else exact.

        List indices do not name fields: `stack[3].tag` is governed by `stack.tag`, then `stack`.
        """
        probe = re.sub(r"\[\d+\]", "", path)
        while True:
            if probe in self.fields:
                return self.fields[probe]
            if "." not in probe:
                return EXACT
            probe = probe.rsplit(".", 1)[0]


def _int(value: Any, what: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{where}: {what} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_run(table: Mapping[str, Any], where: str) -> RunSettings:
    _reject_unknown(table, _RUN_KEYS, f"{where} [run]")
    start = _int(table.get("start", 0), "[run] start", where, 0)
    window = _int(table.get("window", DEFAULT_WINDOW), "[run] window", where, 1)
    end: int | None = None
    if "steps" in table and "end" in table:
        raise UsageError(f"{where}: [run] sets both steps and end", fix="keep one of them")
    if "steps" in table:
        end = start + _int(table["steps"], "[run] steps", where, 1)
    elif "end" in table:
        end = _int(table["end"], "[run] end", where, start + 1)
    cont = table.get("continue_on_divergence", False)
    if not isinstance(cont, bool):
        raise UsageError(f"{where}: [run] continue_on_divergence must be true or false, got {cont!r}")
    run_dir = table.get("dir")
    if run_dir is not None and not isinstance(run_dir, str):
        raise UsageError(f"{where}: [run] dir must be a path string, got {run_dir!r}")
    return RunSettings(start=start, end=end, window=window, dir=run_dir, continue_on_divergence=cont)


def _parse_options(kind: str, name: str, options: Any, where: str) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise UsageError(f"{where}: options of implementation '{name}' must be a table")
    _reject_unknown(options, _OPTION_KEYS[kind], f"{where} options of '{name}' (kind {kind})")
    out = dict(options)
    if kind == "command":
        cmd = out.get("command")
        if isinstance(cmd, str):
            out["command"] = shlex.split(cmd)
        elif not (isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd)):
            raise UsageError(
                f"{where}: implementation '{name}' (kind command) needs options.command",
                fix='e.g. options = { command = ["{python}", "my_engine.py"] }',
            )
        if "env" in out and not (
            isinstance(out["env"], Mapping) and all(isinstance(v, str) for v in out["env"].values())
        ):
            raise UsageError(f"{where}: options.env of '{name}' must be a table of strings")
        if "params" in out and not isinstance(out["params"], Mapping):
            raise UsageError(f"{where}: options.params of '{name}' must be a table")
    if "timeout" in out:
        t = out["timeout"]
        if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
            raise UsageError(f"{where}: options.timeout of '{name}' must be a number of seconds > 0, got {t!r}")
    if kind in WINDOWS_ONLY_OPTIONS:
        engine_spec(kind, out, f"{where}: implementation '{name}'")
    return out


def _parse_impls(items: Any, where: str) -> tuple[ImplSpec, ...]:
    if not isinstance(items, list) or not items:
        raise UsageError(
            f"{where} declares no implementations", fix="add [[implementation]] tables (one reference, >= 1 alternate)"
        )
    specs: list[ImplSpec] = []
    for i, item in enumerate(items):
        here = f"{where} [[implementation]] #{i + 1}"
        if not isinstance(item, Mapping):
            raise UsageError(f"{here} is not a table")
        _reject_unknown(item, _IMPL_KEYS, here)
        name = item.get("name")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
            raise UsageError(f"{here}: name must be a non-empty string of letters, digits, '-', '_', '.'; got {name!r}")
        role = item.get("role")
        if role not in ROLES:
            raise UsageError(f"{here} ('{name}'): role must be reference or alternate, got {role!r}")
        kind = item.get("kind")
        if kind not in KINDS:
            near = difflib.get_close_matches(str(kind), KINDS, n=1)
            raise UsageError(
                f"{here} ('{name}'): unknown kind {kind!r}",
                fix=f"did you mean '{near[0]}'?" if near else f"use one of {', '.join(KINDS)}",
            )
        specs.append(ImplSpec(name, role, kind, _parse_options(kind, name, item.get("options", {}), where)))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"{where}: implementation names must be unique; repeated: {', '.join(dupes)}")
    refs = [s.name for s in specs if s.role == "reference"]
    if len(refs) != 1:
        raise UsageError(
            f"{where} declares {len(refs)} reference implementations ({', '.join(refs) or 'none'})",
            fix='mark exactly one [[implementation]] with role = "reference"',
        )
    if len(specs) < 2:
        raise UsageError(f"{where} declares no alternate", fix='add an [[implementation]] with role = "alternate"')
    return tuple(specs)


def _check_input(inp: Mapping[str, Any], impls: tuple[ImplSpec, ...], where: str) -> None:
    llm = any(k in inp for k in _LLM_INPUT_KEYS)
    needs = [s.name for s in impls if s.kind in LLM_KINDS]
    if needs and not llm:
        raise UsageError(
            f"{where}: {', '.join(needs)} are LLM engines but [input] has no prompt",
            fix='add prompt = "..." (or prompt_ids = [...]) to [input]',
        )
    if "prompt" in inp and not (isinstance(inp["prompt"], str) and inp["prompt"]):
        raise UsageError(f"{where}: [input] prompt must be a non-empty string")
    ids = inp.get("prompt_ids")
    if ids is not None and not (
        isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise UsageError(f"{where}: [input] prompt_ids must be a non-empty list of integers")
    if "top_k" in inp:
        _int(inp["top_k"], "[input] top_k", where, 1)


def parse(text: str, path: Path) -> WindowsConfig:
    """Parse and validate an implementations file's text (path is used for messages and relative paths)."""
    where = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(
            f"{where} is not valid TOML: {exc}", fix="fix the syntax (see README.md, section Stepwise parity)"
        ) from exc
    _reject_unknown(data, _TOP_KEYS, where)
    run = _parse_run(data.get("run", {}), where)
    inp = data.get("input", {})
    if not isinstance(inp, Mapping):
        raise UsageError(f"{where}: [input] must be a table")
    fields_table = data.get("fields", {})
    if not isinstance(fields_table, Mapping):
        raise UsageError(f"{where}: [fields] must be a table")
    rules = {name: parse_rule(name, value, where) for name, value in fields_table.items()}
    for name, rule in rules.items():
        if rule.ties_within is not None and rule.ties_within not in rules:
            raise UsageError(
                f"{where}: [fields] {name}.ties_within names '{rule.ties_within}', which has no rule",
                fix=f"add a tolerance rule for {rule.ties_within}",
            )
    impls = _parse_impls(data.get("implementation"), where)
    _check_input(inp, impls, where)
    return WindowsConfig(path.resolve(), text, run, dict(inp), rules, impls)


def load(path: Path) -> WindowsConfig:
    """Read and parse an implementations file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError(f"implementations file not found: {path}", fix="pass --config PATH to a TOML file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read implementations file {path}: {exc.strerror}") from exc
    return parse(text, path)
