"""The example an engine project copies: parity checks in its own pytest suite, through the `parity` pytest
plugin (installed with parity: entry point pytest11) and the Python API (parity.api.check).

`parity_check(impl=..., **settings)` compares the implementation with the session's references (llama.cpp,
built once per session; `pytest --parity-reference SPEC` changes them) and returns a CheckResult.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from parity.api import CheckResult, check

pytestmark = [pytest.mark.compile, pytest.mark.model]

ENGINE = Path(__file__).resolve().parents[2] / "examples" / "protocol_v2" / "echo_numpy.py"


def test_my_engine_matches_llama_cpp(parity_check: Callable[..., CheckResult]) -> None:
    result = parity_check(impl=f"cmd:{sys.executable} {ENGINE}", max_tokens=4)
    assert result.passed, result.text()
    assert result.summary()["lanes"]["llama"]["status"] == "pass" and len(result.receipts) == 1


def test_a_failing_engine_is_a_result_not_an_exception(parity_check: Callable[..., CheckResult]) -> None:
    result = parity_check(impl=f"cmd:{sys.executable} -c 'raise SystemExit(3)'")
    assert not result.passed and result.exit_code == 1
    assert "exited with status 3" in (result.lanes[0].error or "")


def test_bad_input_raises_with_the_cli_exit_code(tmp_path: Path) -> None:
    from parity.errors import UsageError

    with pytest.raises(UsageError) as info:
        check(impl="no-such-kind", out_dir=str(tmp_path))
    assert info.value.exit_code == 2


def test_settings_are_the_cli_options(parity_check: Callable[..., CheckResult]) -> None:
    settings: dict[str, Any] = {"impl": "numpy:dtype=float64", "max_tokens": 2, "cos_tol": 0.9999}
    result = parity_check(**settings)
    assert result.passed, result.text()
    assert result.shared.implementation["dtype"] == "float64" and len(result.shared.generated) == 2
