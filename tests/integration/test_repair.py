"""Preflight and auto-repair decisions, with an empty build cache (no backend is built there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import options
from parity.check import inputs
from parity.errors import BackendUnavailable, RepairRecursion, UsageError

from .conftest import run_cli


@pytest.fixture()
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PARITY_BITNET_SRC", raising=False)
    return tmp_path


def test_no_repair_names_the_fix(empty_cache: Path) -> None:
    opts = options.resolve({"repair": False}, pyproject=empty_cache / "none.toml")
    with pytest.raises(BackendUnavailable) as e:
        inputs.preflight("llama", opts)
    assert "nox -s setup_cpp -- --backend llama" in str(e.value) and e.value.exit_code == 2


def test_repair_that_reenters_itself_is_exit_6(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(inputs.REPAIR_GUARD_ENV, "llama")
    opts = options.resolve({"repair": True}, pyproject=empty_cache / "none.toml")
    with pytest.raises(RepairRecursion) as e:
        inputs.preflight("llama", opts)
    assert e.value.exit_code == 6


def test_bitnet_source_override_that_does_not_exist(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_BITNET_SRC", str(empty_cache / "no-such-checkout"))
    opts = options.resolve({"repair": True}, pyproject=empty_cache / "none.toml")
    with pytest.raises(UsageError, match="PARITY_BITNET_SRC"):
        inputs.preflight("bitnet", opts)


def test_parity_both_without_bitnet_source_exits_2_and_writes_nothing(empty_cache: Path) -> None:
    """What CI sees: no bitnet.cpp source, repair off -> exit 2, the fixing command, no partial receipts."""
    out = empty_cache / "out"
    for env in ({"CI": "true"}, {"PARITY_BITNET_SRC": str(empty_cache / "missing")}):
        proc = run_cli("parity-both", "--out-dir", str(out), env={"PARITY_CACHE": str(empty_cache / "cache"), **env})
        assert proc.returncode == 2, proc.stderr
        assert "bitnet" in proc.stderr and "Traceback" not in proc.stderr
        assert not list(out.glob("receipt_*.json"))
    proc = run_cli(
        "parity-both", "--no-repair", "--out-dir", str(out), env={"PARITY_CACHE": str(empty_cache / "cache")}
    )
    assert proc.returncode == 2
    assert "nox -s setup_cpp -- --backend bitnet" in proc.stderr and "PARITY_BITNET_SRC" in proc.stderr
