"""Implementation spec strings: `KIND[:key=value,key=value]`, e.g. `numpy:dtype=float64`, `llama:type_k=f16`.

Kinds and their options are listed in KINDS; a wrong kind, key or value is a UsageError naming it and the
choices (exit 2). `ImplSpec.label` names the lane in summaries and receipt file names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from parity.errors import UsageError

# ggml type ids of the KV cache types llama.cpp accepts (ggml.h: enum ggml_type)
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
FLASH_ATTN = {"off": 0, "on": 1, "auto": -1}
BRIDGED_OPTIONS: dict[str, str] = {
    "type_k": "KV cache K type: " + "|".join(GGML_TYPES),
    "type_v": "KV cache V type: " + "|".join(GGML_TYPES),
    "flash_attn": "on|off|auto",
    "threads": "a positive integer",
    "n_batch": "a positive integer",
    "n_ubatch": "a positive integer",
    "eval_shape": "batch|stepwise",
    "source": "a source tree of that engine to build and use instead of the pinned one (e.g. a patched llama.cpp)",
    "model": "a GGUF file this side loads instead of the run's model (parity suite: e.g. llama:model=q4_0.gguf)",
}
KINDS: dict[str, dict[str, str]] = {
    "numpy": {"dtype": "float32|float64", "model": BRIDGED_OPTIONS["model"]},
    "llama": BRIDGED_OPTIONS,
    "bitnet": BRIDGED_OPTIONS,
}
BRIDGED = ("llama", "bitnet")
# Kinds whose whole value after the colon is one free-form argument (docs/PROTOCOL.md for cmd/py).
FREEFORM = {
    "cmd": ("argv", "a command speaking protocol v2, e.g. cmd:'./my-engine --threads 2'"),
    "py": ("target", "a Python factory package.module:factory, or a parity.implementations plugin name"),
    "logits": ("path", "an .npz with arrays tokens and logits"),
}


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ImplSpec:
    """A parsed spec: kind plus options in the order given."""

    kind: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        if self.kind in FREEFORM:
            return f"{self.kind}:{self.options[0][1]}"
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kind}:{opts}" if opts else self.kind

    @property
    def label(self) -> str:
        """File-name-safe lane name: `llama`, `llama-type_k-f16`, `llama-source-<dir>-<hash>` (external: the kind)."""
        if self.kind in FREEFORM:
            return self.kind
        parts = [self.kind]
        for k, v in self.options:
            if k in ("source", "model"):
                v = re.sub(r"[^A-Za-z0-9_.-]+", "_", v.rstrip("/").rsplit("/", 1)[-1]) + "-" + _short_hash(v)
            parts.append(f"{k}-{v}")
        return "-".join(parts)

    @property
    def plan_key(self) -> str:
        """Which build a bridged spec uses: its kind, or kind@source for another source tree."""
        source = self.get("source")
        return f"{self.kind}@{source}" if source else self.kind

    @property
    def bridged(self) -> bool:
        return self.kind in BRIDGED

    def get(self, key: str) -> str | None:
        return dict(self.options).get(key)

    def int_option(self, key: str) -> int | None:
        value = self.get(key)
        return None if value is None else int(value)


def _check_value(text: str, kind: str, key: str, value: str) -> None:
    ok = True
    if key in ("type_k", "type_v"):
        ok = value in GGML_TYPES
    elif key == "flash_attn":
        ok = value in FLASH_ATTN
    elif key in ("threads", "n_batch", "n_ubatch"):
        ok = value.isdigit() and int(value) > 0
    elif key == "eval_shape":
        ok = value in ("batch", "stepwise")
    elif key == "dtype":
        ok = value in ("float32", "float64")
    if not ok:
        raise UsageError(
            f"implementation spec '{text}': {key}={value!r} is not valid", fix=f"{key} takes {KINDS[kind][key]}"
        )


def parse(text: str) -> ImplSpec:
    """`KIND[:key=value,...]` -> ImplSpec; UsageError (exit 2) naming what is wrong."""
    kind, _, rest = text.strip().partition(":")
    if kind in FREEFORM:
        key, what = FREEFORM[kind]
        if not rest.strip():
            raise UsageError(f"implementation spec '{text}': {kind} needs {what}", fix=f"{kind}:VALUE")
        return ImplSpec(kind, ((key, rest.strip()),))
    if kind not in KINDS:
        kinds = ", ".join([*KINDS, *(f"{k}:..." for k in FREEFORM)])
        raise UsageError(f"unknown implementation '{text}'", fix=f"use one of: {kinds} (KIND:key=value,...)")
    options: list[tuple[str, str]] = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[a-z_]+", key) or not value:
            raise UsageError(f"implementation spec '{text}': '{item}' is not key=value", fix="e.g. llama:type_k=f16")
        if key not in KINDS[kind]:
            known = ", ".join(f"{k} ({v})" for k, v in KINDS[kind].items())
            raise UsageError(f"implementation spec '{text}': {kind} has no option '{key}'", fix=f"options: {known}")
        if any(k == key for k, _ in options):
            raise UsageError(f"implementation spec '{text}': '{key}' given twice", fix="give each option once")
        _check_value(text, kind, key, value)
        options.append((key, value))
    return ImplSpec(kind, tuple(options))
