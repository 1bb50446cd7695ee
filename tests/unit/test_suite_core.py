"""parity suite without processes: input checks, chunking, shards, the out directory, verdicts, merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parity.errors import UsageError
from parity.suite import inputs, receipt, stats, store, verdicts
from parity.suite.store import Store


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("not json", ["items.jsonl:2", "not JSON"]),
        ("[1, 2]", ["items.jsonl:2", "not an object"]),
        ('{"txt": "a"}', ["items.jsonl:2", "unknown field 'txt'"]),
        ('{"text": "a", "tokens": [1, 2]}', ["items.jsonl:2", "exactly one of"]),
        ('{"text": ""}', ["items.jsonl:2", "'text'"]),
        ('{"tokens": [1, -2]}', ["items.jsonl:2", "'tokens'", "non-negative"]),
        ('{"tokens": [1]}', ["items.jsonl:2", "at least 2"]),
        ('{"text": "a", "template": "alpaca"}', ["items.jsonl:2", "'template'", "chatml"]),
        ('{"tokens": [1, 2], "template": "raw"}', ["items.jsonl:2", "'template' applies to 'text'"]),
        ('{"text": "a", "id": "x"}', ["items.jsonl:2", "repeats line 1"]),
        ('{"text": "a", "id": 3}', ["items.jsonl:2", "'id'"]),
    ],
)
def test_bad_prompt_lines_name_line_field_and_fix(tmp_path: Path, line: str, words: list[str]) -> None:
    path = _write(tmp_path, ['{"text": "first", "id": "x"}', line])
    with pytest.raises(UsageError) as err:
        inputs.parse_prompts(path)
    assert err.value.exit_code == 2
    for w in words:
        assert w in str(err.value)
    assert err.value.fix


def test_prompts_parse_ids_templates_and_comments(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        ["// a comment", "", '{"text": "hi", "template": "chatml", "system": "s"}', '{"tokens": [3, 4], "id": "t"}'],
    )
    raws = inputs.parse_prompts(path)
    assert [(r.index, r.id, r.template) for r in raws] == [(0, "line-3", "chatml"), (1, "t", "raw")]
    seen: list[tuple[str, bool]] = []

    def tok(text: str, special: bool) -> list[int]:
        seen.append((text, special))
        return [1, 2]

    items = inputs.tokenize_prompts(raws, tok, lambda t, x, s: f"<{t}|{s}|{x}>", n_vocab=100, n_ctx=64)
    assert seen == [("<chatml|s|hi>", True)]  # a template's markers are parsed as special tokens
    assert items[1].tokens == (3, 4)
    with pytest.raises(UsageError, match=r"items.jsonl:4: token id 4 is outside the vocabulary"):
        inputs.tokenize_prompts(raws, tok, lambda t, x, s: x, n_vocab=4, n_ctx=64)
    with pytest.raises(UsageError, match="exceed the model's context of 1"):
        inputs.tokenize_prompts(raws, tok, lambda t, x, s: x, n_vocab=100, n_ctx=1)


def test_empty_or_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no items"):
        inputs.parse_prompts(_write(tmp_path, ["// nothing"]))
    with pytest.raises(UsageError, match="no such file"):
        inputs.parse_prompts(tmp_path / "absent.jsonl")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        inputs.parse_prompts(bad)


def test_text_chunks_are_llama_perplexity_chunks() -> None:
    ids = list(range(100, 125))  # 25 tokens, ctx 8: 3 chunks, the tail of 1 dropped
    items = inputs.chunk_text(ids, 8, bos=1, chunks=None)
    assert [it.id for it in items] == ["chunk-0", "chunk-1", "chunk-2"]
    assert items[1].tokens == (1, *range(109, 116))  # first token replaced by BOS
    assert [it.tokens for it in inputs.chunk_text(ids, 8, None, chunks=2)] == [
        tuple(range(100, 108)),
        tuple(range(108, 116)),
    ]


def test_shards_partition_the_items() -> None:
    shards = [[i for i in range(10) if store.in_shard(i, (k, 3))] for k in (1, 2, 3)]
    assert sorted(i for s in shards for i in s) == list(range(10)) and shards[0] == [0, 3, 6, 9]


def _values(index: int, n: int, seed: int, scale: float = 0.01) -> stats.PositionStats:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 32))
    tokens = rng.integers(0, 32, size=n)
    return stats.compute(ref, ref + scale * rng.normal(size=ref.shape), tokens, item=index)


def _manifest(n_items: int, shard: list[int] | None = None) -> dict[str, object]:
    side = {"spec": "numpy", "label": "numpy", "model": {"path": "/m.gguf", "sha256": "0" * 64}}
    return {
        "kind": store.MANIFEST_KIND,
        "suite_key": "a" * 64,
        "mode": "all",
        "shard": shard,
        "input": {
            "mode": "prompts",
            "path": "/x.jsonl",
            "sha256": "b" * 64,
            "ctx": None,
            "n_items": n_items,
            "n_tokens": 9 * n_items,
        },
        "sides": {"implementation": side, "reference": {**side, "spec": "llama", "label": "llama"}},
        "items": [[f"i{i}", 9] for i in range(n_items)],
    }


def test_store_resume_rules_and_merge_equals_one_run(tmp_path: Path) -> None:
    th = verdicts.Thresholds(max_mean_kld=1.0)
    whole = Store.open_write(tmp_path / "whole", _manifest(7), resume=False)
    for i in range(7):
        whole.save(i, f"i{i}", 9, _values(i, 9, seed=i), 0.1)
    # a directory with finished items needs --resume; another suite or shard is refused
    with pytest.raises(UsageError, match="--resume"):
        Store.open_write(tmp_path / "whole", _manifest(7), resume=False)
    other = {**_manifest(7), "suite_key": "c" * 64}
    with pytest.raises(UsageError, match="another suite"):
        Store.open_write(tmp_path / "whole", other, resume=True)
    assert sorted(Store.open_write(tmp_path / "whole", _manifest(7), resume=True).done()) == list(range(7))
    # an item whose record is missing (killed between the two writes) is not done
    (tmp_path / "whole" / "items" / "000003.json").unlink()
    assert 3 not in whole.done()
    whole.save(3, "i3", 9, _values(3, 9, seed=3), 0.1)

    shards = []
    for k in (1, 2, 3):
        st = Store.open_write(tmp_path / f"s{k}", _manifest(7, [k, 3]), resume=False)
        for i in reversed(range(7)):  # finished in another order than the canonical one
            if store.in_shard(i, (k, 3)):
                st.save(i, f"i{i}", 9, _values(i, 9, seed=i), 0.2)
        shards.append(st)
    one = receipt.build([whole], th, {"kind": "local", "workers": 1})
    merged = receipt.build(shards, th, {"kind": "merge", "workers": 0}, merged=True)
    assert one["statistics"] == merged["statistics"] and one["statistics_text"] == merged["statistics_text"]
    assert [r["mean_kld"] for r in one["items"]] == [r["mean_kld"] for r in merged["items"]]
    assert merged["complete"] and merged["n_done"] == 7
    for rec in (one, merged):
        assert not receipt.receipts.validation_errors(rec, receipt.SCHEMA_PATH)
    partial = receipt.build(shards[:2], th, {"kind": "merge", "workers": 0}, merged=True)
    assert partial["status"] == "incomplete" and partial["exit_code"] == 2
    assert partial["missing"] == [i for i in range(7) if store.in_shard(i, (3, 3))]
    assert (
        sum(partial["histogram"]["counts"]) + partial["histogram"]["below"] + partial["histogram"]["above"]
        == partial["scoring"]["n_positions"]
    )


def test_verdicts_fixed_thresholds_worst_first() -> None:
    th = verdicts.Thresholds(max_mean_kld=1e-3, min_same_top=0.9)
    small, big = _values(0, 40, 1, scale=1e-4), _values(1, 40, 2, scale=1.0)
    rows = [
        verdicts.item_row(0, "a", 40, small, None, th),
        verdicts.item_row(1, "b", 40, big, None, th),
        verdicts.item_row(2, "c", 40, None, "WorkerError: crashed", th),
        verdicts.item_row(3, "d", 40, None, None, th),
    ]
    assert [r["status"] for r in rows] == ["pass", "fail", "error", "missing"]
    assert "mean KLD" in rows[1]["reason"] and rows[2]["reason"] == "WorkerError: crashed"
    assert verdicts.worst(rows) == [2, 1, 0]
    v = verdicts.overall(rows, th)
    assert (v["status"], v["n_pass"], v["n_fail"], v["n_error"]) == ("error", 1, 1, 1)
    assert verdicts.overall(rows[:2], th)["status"] == "fail"
    assert verdicts.overall(rows[:1], th)["status"] == "pass"
    assert verdicts.EXIT_CODES["fail"] == 1 and verdicts.EXIT_CODES["pass"] == 0


def test_progress_log_skips_a_torn_line(tmp_path: Path) -> None:
    st = Store.open_write(tmp_path, _manifest(2), resume=False)
    st.progress("start", item=0)
    with open(tmp_path / store.PROGRESS, "a", encoding="utf-8") as f:
        f.write('{"event": "do')
    assert [e["event"] for e in store.read_progress(tmp_path)] == ["start"]
    assert json.loads((tmp_path / store.MANIFEST).read_text())["suite_key"] == "a" * 64


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "needs its items"),
        (["--text", "t.txt"], "--text needs --ctx"),
        (["--prompts", "p.jsonl", "--ctx", "8"], "--ctx and --chunks apply to --text"),
        (["--prompts", "p.jsonl", "--shard", "4/3"], "--shard 4/3"),
        (["--prompts", "p.jsonl", "--workers", "0"], "--workers 0"),
        (["--prompts", "p.jsonl", "--ray-address", "127.0.0.1:1"], "applies to --executor ray"),
        (["--prompts", "p.jsonl", "--min-same-top", "2"], "--min-same-top 2"),
        (["--prompts", "p.jsonl", "--impl", "logits:x.npz"], "a suite evaluates many"),
        (["--prompts", "p.jsonl", "--impl", "llama:modle=x"], "no option 'modle'"),
        (["--prompts", "p.jsonl"], "p.jsonl:2: field 'tokens'"),
    ],
)
def test_cli_bad_input_is_exit_2_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    from parity import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"text": "fine"}\n{"tokens": "1 2 3"}\n', encoding="utf-8")
    assert cli.main(["suite", *args, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and "fix" in err, err
    assert not (tmp_path / "out" / "suite.json").exists()


def test_merge_refuses_other_suites_and_its_own_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from parity import cli

    Store.open_write(tmp_path / "a", _manifest(3, [1, 2]), resume=False)
    Store.open_write(tmp_path / "b", {**_manifest(3, [2, 2]), "suite_key": "d" * 64}, resume=False)
    assert cli.main(["suite", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(tmp_path / "m")]) == 2
    assert "different suites" in capsys.readouterr().err
    assert cli.main(["suite", "merge", str(tmp_path / "a"), "--out-dir", str(tmp_path / "a")]) == 2
    assert "one of the merged directories" in capsys.readouterr().err
    assert cli.main(["suite", "merge", str(tmp_path / "none"), "--out-dir", str(tmp_path / "m")]) == 2
    assert "not a parity suite out directory" in capsys.readouterr().err
