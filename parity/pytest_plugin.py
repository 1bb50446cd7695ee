"""pytest plugin (entry point `pytest11: parity`): parity checks inside an engine project's own test suite.

Fixtures:
- `parity_references` (session): builds (or finds) the pinned llama.cpp once per test session and returns
  the reference specs to compare with (`["llama"]`; `--parity-reference SPEC` on the pytest command line
  replaces them).
- `parity_check` (function): `parity_check(impl=..., **settings)` is parity.api.check with the session's
  references and receipts under the test's tmp_path; it returns the CheckResult.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from parity import api, options
from parity.check import inputs


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity")
    group.addoption(
        "--parity-reference",
        action="append",
        default=None,
        metavar="SPEC",
        help="reference lane for parity_check (repeatable; default llama)",
    )


@pytest.fixture(scope="session")
def parity_references(pytestconfig: pytest.Config) -> list[str]:
    """The reference specs, each backend built once per session (repair allowed unless CI is set)."""
    refs: list[str] = pytestconfig.getoption("--parity-reference") or ["llama"]
    opts = options.resolve({})
    for r in {r.plan_key: r for r in inputs.reference_specs(refs)}.values():  # as parity.check.job does
        inputs.preflight(r.kind, opts, r.get("source"))
    return refs


@pytest.fixture
def parity_check(parity_references: list[str], tmp_path: Path) -> Callable[..., api.CheckResult]:
    """parity.api.check bound to the session's references, receipts in this test's tmp_path."""

    def run(**settings: Any) -> api.CheckResult:
        settings.setdefault("out_dir", str(tmp_path / "parity"))
        settings.setdefault("reference", parity_references)
        return api.check(**settings)

    return run
