from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from parity.compare import receipts
from parity.errors import UsageError

H = "a" * 64


def v1() -> dict[str, Any]:
    return {
        "version": 1,
        "timestamp": "2026-01-01T00:00:00Z",
        "model": "m.gguf",
        "backend": "llama",
        "prompt": "hi",
        "positions": 1,
        "thresholds": {"cos_tol": 0.999},
        "rows": [
            {"pos": 0, "mse": 0.0, "max_abs": 0.0, "kl": 0.0, "topk_agree": 1.0, "top5_ours": [1], "top5_ref": [1]}
        ],
        "summary": {"all_passed": True, "first_divergence": None, "mean_mse": 0.0, "mean_kl": 0.0},
    }


def v2() -> dict[str, Any]:
    r = v1()
    r.update(
        version=2,
        model={"path": "m.gguf", "sha256": H},
        status="pass",
        error=None,
        tokenizer_authority={
            "source": "external",
            "path": "t.json",
            "file_hash": H,
            "config_hash": H,
            "token_count": 3,
        },
        prompt_template="instruct",
        formatted_prompt="### Instruction:\nhi",
        determinism_seed=0,
        model_sha256=H,
        backend_info={"name": "llama", "commit": "abc"},
        run_config={
            "threads": 2,
            "n_ctx": 64,
            "n_batch": 64,
            "n_ubatch": 64,
            "type_k": 0,
            "type_v": 0,
            "flash_attn": 0,
            "eval_shape": "batch",
        },
        token_ids=[1, 2, 3],
    )
    return r


def test_v1_and_v2_validate() -> None:
    assert receipts.validation_errors(v1()) == []
    assert receipts.validation_errors(v2()) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.pop("tokenizer_authority"),
        lambda r: r["tokenizer_authority"].update(source="guessed"),
        lambda r: r.update(model_sha256="xyz"),
        lambda r: r["rows"][0].update(mse=-1.0),
        lambda r: r.update(version=4),
        lambda r: r["summary"].pop("all_passed"),
    ],
)
def test_invalid_receipts_rejected(mutate: Any) -> None:
    r = copy.deepcopy(v2())
    mutate(r)
    assert receipts.validation_errors(r)


def test_write_refuses_invalid_and_load_roundtrips(tmp_path: Path) -> None:
    bad = v2()
    del bad["rows"]
    with pytest.raises(AssertionError):
        receipts.write(tmp_path / "r.json", bad)
    assert not (tmp_path / "r.json").exists()
    receipts.write(tmp_path / "r.json", v2())
    assert receipts.load(tmp_path / "r.json")["status"] == "pass"


def test_load_trusts_only_the_exact_bytes_this_process_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "r.json"
    receipts.write(p, v2())
    real = receipts.validation_errors
    calls: list[Any] = []

    def counting(data: Any, schema_path: Path = receipts.SCHEMA_PATH) -> list[str]:
        calls.append(data)
        return real(data, schema_path)

    monkeypatch.setattr(receipts, "validation_errors", counting)
    assert receipts.load(p) == v2() and calls == []  # validated when written
    r = json.loads(p.read_text())
    del r["rows"]
    p.write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")  # changed on disk since
    with pytest.raises(UsageError, match="not a valid parity receipt"):
        receipts.load(p)
    assert len(calls) == 1


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    p.write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        receipts.load(p)
    p.write_text(json.dumps({"version": 2}))
    with pytest.raises(UsageError, match="not a valid parity receipt"):
        receipts.load(p)
