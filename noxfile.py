"""parity's nox sessions: `nox -l` is the menu. Logic lives in parity/; each session is one job."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).resolve().parent
PYTHON = "3.11"
BUILD_DEPS = ["scikit-build-core>=0.10", "cmake>=3.21", "ninja>=1.11"]
CI_DESELECT = "not bitnet_cpp and not network"


def _install_once(session: nox.Session, *args: str) -> None:
    """pip install into the session venv only when pyproject.toml or the request changed.

    Keeps a repeat `nox -s setup_cpp` a no-op in well under 3 s (pip alone takes longer than that).
    """
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + repr(args).encode()).hexdigest()
    venv = getattr(session.virtualenv, "location", None)
    stamp = Path(venv) / ".parity-install-stamp" if venv else None
    if stamp is not None and stamp.is_file() and stamp.read_text() == key:
        return
    session.install(*args)
    if stamp is not None:
        stamp.write_text(key)


@nox.session(python=PYTHON)
def setup_cpp(session: nox.Session) -> None:
    """Fetch the pinned llama.cpp (and bitnet.cpp with --backend bitnet), build it and parity's bridge."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "setup-cpp", *session.posargs)


@nox.session(python=PYTHON, requires=["setup_cpp"])
def parity(session: nox.Session) -> None:
    """The main job: numpy engine vs llama.cpp on the embedded default model (flags: `parity run --help`)."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "run", *session.posargs)


@nox.session(python=PYTHON, requires=["setup_cpp"])
def parity_both(session: nox.Session) -> None:
    """numpy engine vs bitnet.cpp and llama.cpp, two lanes (PARITY_BITNET_SRC=checkout; `parity parity-both --help`)."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "parity-both", *session.posargs)


@nox.session(python=PYTHON, requires=["setup_cpp"])
def parity_windows(session: nox.Session) -> None:
    """Stepwise parity in windows: llama.cpp vs numpy vs an external command, 120 steps (`parity windows --help`)."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "windows", *(session.posargs or ["resume", "--config", "examples/windows/llm.toml"]))


@nox.session(python=PYTHON)
def fetch_models(session: nox.Session) -> None:
    """Fetch the models pinned in lock/models.lock.json into ~/.cache/parity/models (`parity fetch-models --help`)."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "fetch-models", *session.posargs)


@nox.session(python=PYTHON, requires=["setup_cpp"], default=False)
def bench(session: nox.Session) -> None:
    """Throughput of numpy / llama.cpp (/ bitnet.cpp), cross-checked with llama-bench, gated on baselines/."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "bench", *session.posargs)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (builds llama.cpp once into cache/; bitnet.cpp/network tests deselected in CI)."""
    _install_once(session, *BUILD_DEPS, "-e", ".[test]")
    args = list(session.posargs)
    if os.environ.get("CI") and not any(a == "-m" for a in args):
        session.log(
            f"CI: deselecting tests marked bitnet_cpp or network (-m '{CI_DESELECT}'): no bitnet.cpp "
            "source and no internet here; pytest reports how many were deselected"
        )
        args = ["-m", CI_DESELECT, *args]
    session.run("pytest", *args)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict, configured in pyproject.toml."""
    _install_once(session, "-e", ".[lint,test]", "nox")
    session.run("ruff", "check", "parity", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "parity", "tests", "noxfile.py")
    session.run("mypy")
