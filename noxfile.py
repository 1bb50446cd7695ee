"""parity's nox sessions: `nox -l` is the menu. Logic lives in parity/; each session is one job."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).resolve().parent
PYTHON = "3.11"
BUILD_DEPS = ["scikit-build-core>=0.10", "cmake>=3.21", "ninja>=1.11"]
CI_DESELECT = "not bitnet_cpp"
WINDOWS_EXAMPLE = "examples/windows/llm.toml"
SUITE_EXAMPLE = "examples/suite/prompts.jsonl"
# Headless Chromium renders the HTML pages in the integration tests (tests/integration/test_windows_html.py).
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FIX = "apt-get update && apt-get install -y chromium"


def _install_once(session: nox.Session, *args: str) -> None:
    """pip install into the session venv only when pyproject.toml or the request changed.

    Keeps a repeat `nox -s setup_cpp` a no-op in well under 3 s (pip alone takes longer than that).
    """
    # The editable install maps module names to files, so the package layout is part of the key too.
    layout = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "parity").rglob("*.py"))
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + repr((args, layout)).encode()).hexdigest()
    venv = getattr(session.virtualenv, "location", None)
    stamp = Path(venv) / ".parity-install-stamp" if venv else None
    if stamp is not None and stamp.is_file() and stamp.read_text() == key:
        return
    session.install(*args)
    if stamp is not None:
        stamp.write_text(key)


def _ensure_llama(session: nox.Session, *extra: str) -> None:
    """Install parity and make sure the pinned llama.cpp is built (a no-op in about a second once it is).

    Sessions call this instead of `requires=["setup_cpp"]`: nox hands a session's posargs to the sessions it
    requires as well, so `nox -s parity -- --format json` would pass `--format json` to `parity setup-cpp`.
    """
    _install_once(session, *BUILD_DEPS, "-e", ".", *extra)
    # to stderr, so that stdout carries only the session's own command (`-- --format json | jq` works)
    session.run("parity", "setup-cpp", stdout=sys.stderr, stderr=sys.stderr)


@nox.session(python=PYTHON)
def setup_cpp(session: nox.Session) -> None:
    """Fetch the pinned llama.cpp (and bitnet.cpp with --backend bitnet), build it and parity's bridge."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "setup-cpp", *session.posargs)


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """The main job: numpy engine vs llama.cpp on the embedded default model (flags: `parity run --help`)."""
    _ensure_llama(session)
    session.run("parity", "run", *session.posargs)


@nox.session(python=PYTHON)
def parity_both(session: nox.Session) -> None:
    """numpy engine vs bitnet.cpp and llama.cpp, two lanes (PARITY_BITNET_SRC=checkout; `parity parity-both --help`)."""
    _ensure_llama(session)
    session.run("parity", "parity-both", *session.posargs)


@nox.session(python=PYTHON)
def parity_windows(session: nox.Session) -> None:
    """Stepwise parity in windows (default: resume the 120-step example; `-- status`, `-- report`, `parity windows -h`)."""
    _ensure_llama(session)
    args = list(session.posargs or ["resume"])
    if not any(a.split("=")[0] in ("--config", "--run-dir", "-h", "--help") for a in args):
        args += ["--config", WINDOWS_EXAMPLE]  # `nox -s parity_windows -- status` is the example run's status
    session.run("parity", "windows", *args)


@nox.session(python=PYTHON)
def fetch_models(session: nox.Session) -> None:
    """Fetch the models pinned in lock/models.lock.json into ~/.cache/parity/models (`parity fetch-models --help`)."""
    _install_once(session, *BUILD_DEPS, "-e", ".")
    session.run("parity", "fetch-models", *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Throughput of numpy / llama.cpp (/ bitnet.cpp), cross-checked with llama-bench, gated on baselines/."""
    _ensure_llama(session)
    session.run("parity", "bench", *session.posargs)


@nox.session(python=PYTHON, default=False)
def suite(session: nox.Session) -> None:
    """An implementation vs a reference over many prompts or a text: KLD statistics, shards, Ray (`parity suite --help`)."""
    args = list(session.posargs)
    # the example suite unless the flags name the items (like parity_windows' example config), so that
    # `nox -s suite -- --impl numpy:dtype=float64` works as `nox -s parity -- --impl ...` does
    items = any(a.split("=")[0] in ("--prompts", "--text") for a in args)
    if not items and (not args or args[0] != "merge"):
        args = ["--prompts", SUITE_EXAMPLE, *args]
    ray = "ray" in args or "--executor=ray" in args  # --executor ray needs the ray package in this venv
    _ensure_llama(session, *(["ray>=2.9"] if ray else []))
    session.run("parity", "suite", *args)


def _ensure_browser(session: nox.Session) -> None:
    """Find headless Chromium, or install Debian's package when root with apt-get; else stop now with the fix.

    Done first, so a machine without a browser learns it in seconds rather than after the whole suite.
    """
    if any(shutil.which(b) for b in BROWSERS):
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        session.log("chromium is not installed; installing Debian's chromium package (the HTML page tests need it)")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-qq", external=True, env=env)
        session.run("apt-get", "install", "-y", "-qq", "chromium", external=True, env=env)
        if any(shutil.which(b) for b in BROWSERS):
            return
    session.error(f"chromium is not installed and cannot be installed from here (fix, as root: {CHROMIUM_FIX})")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (builds llama.cpp once; installs chromium if root; bitnet.cpp tests off in CI)."""
    args = list(session.posargs)
    paths = [a for a in args if a.startswith("tests")]
    if not paths or any("integration" in a for a in paths):
        _ensure_browser(session)
    _install_once(session, *BUILD_DEPS, "-e", ".[test]")
    if os.environ.get("CI") and not any(a == "-m" for a in args):
        session.log(
            f"CI: deselecting tests marked bitnet_cpp (-m '{CI_DESELECT}'): no bitnet.cpp source here; "
            "pytest reports how many were deselected"
        )
        args = ["-m", CI_DESELECT, *args]
    session.run("pytest", *args)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint + format check), mypy --strict and the import layers (import-linter), all in pyproject.toml."""
    _install_once(session, "-e", ".[lint,test]", "nox")
    session.run("ruff", "check", "parity", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "parity", "tests", "noxfile.py")
    session.run("mypy")
    session.run("lint-imports")  # layers go one way, no cycles (docs/ARCHITECTURE.md)
