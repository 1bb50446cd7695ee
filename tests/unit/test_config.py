from __future__ import annotations

from pathlib import Path

import pytest

from parity import options
from parity.errors import UsageError


def _pyproject(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "pyproject.toml"
    p.write_text(body)
    return p


def test_precedence_defaults_pyproject_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pp = _pyproject(tmp_path, "[tool.parity]\nthreads = 3\ncos_tol = 0.9\nmax_tokens = 7\n")
    monkeypatch.setenv("PARITY_COS_TOL", "0.95")
    monkeypatch.delenv("PARITY_THREADS", raising=False)
    opts = options.resolve({"max_tokens": 2, "prompt": None}, pyproject=pp)
    assert opts.threads == 3  # pyproject beats the default
    assert opts.cos_tol == 0.95  # env beats pyproject
    assert opts.max_tokens == 2  # CLI beats everything
    assert opts.prompt == "What is 2+2?"  # None means "not given"


def test_unknown_pyproject_key_suggests(tmp_path: Path) -> None:
    pp = _pyproject(tmp_path, "[tool.parity]\ncos_tool = 0.9\n")
    with pytest.raises(UsageError, match="did you mean 'cos_tol'"):
        options.resolve({}, pyproject=pp)


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_THREADS", "many")
    with pytest.raises(UsageError, match="PARITY_THREADS"):
        options.resolve({}, pyproject=tmp_path / "none.toml")


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"cos_tol": 1.5}, "--cos-tol must be in"),
        ({"cos_tol": 0.0}, "--cos-tol must be in"),
        ({"prompt": ""}, "prompt is empty"),
        ({"max_tokens": -1}, "--max-tokens"),
        ({"threads": 0}, "--threads"),
    ],
)
def test_validation(tmp_path: Path, cli: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        options.resolve(cli, pyproject=tmp_path / "none.toml")


def test_repair_off_when_ci_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CI", "true")
    assert options.resolve({}, pyproject=tmp_path / "none.toml").repair is False
    monkeypatch.delenv("CI")
    assert options.resolve({}, pyproject=tmp_path / "none.toml").repair is True


def test_bool_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PARITY_VERBOSE", "yes")
    assert options.resolve({}, pyproject=tmp_path / "none.toml").verbose is True


def test_every_parity_environment_variable_is_listed_in_options() -> None:
    """A PARITY_* variable a module reads must be an option's (PARITY_<FIELD>) or listed in options.ENVIRONMENT
    (or be one parity sets for its children, options.CHILD_ENVIRONMENT): one place says what each one does."""
    import re

    root = Path(options.__file__).resolve().parent
    found: dict[str, str] = {}
    for path in [*root.rglob("*.py"), root.parent / "lock" / "backends.toml"]:
        for name in re.findall(r"PARITY_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
            found.setdefault(name, str(path))
    fields = {f"PARITY_{f.upper()}" for f in options.RunOptions.__dataclass_fields__}
    cmake = {"PARITY_BACKEND", "PARITY_LLAMA_PREFIX"}  # CMake cache variables of the bridge build, not environment
    known = fields | set(options.ENVIRONMENT) | set(options.CHILD_ENVIRONMENT) | cmake
    unlisted = {n: p for n, p in found.items() if n not in known and not n.startswith("PARITY_WINDOW")}
    assert not unlisted, f"PARITY_* variables not listed in parity/options.py: {unlisted}"
    assert not set(options.ENVIRONMENT) - set(found), "listed but read nowhere"
