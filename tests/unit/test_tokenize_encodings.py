"""Remembered encodings (tokenize/encodings.py): a repeated prompt is never tokenized by a rebuilt tokenizer,
and a bad entry is never trusted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parity.tokenize import encodings
from parity.tokenize.tokenizer import HFTokenizer

_TOKENIZER: dict[str, Any] = {
    "version": "1.0",
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "model": {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3},
        "merges": ["a b"],
    },
}


def _write(path: Path, vocab: dict[str, int] | None = None) -> Path:
    data = json.loads(json.dumps(_TOKENIZER))
    if vocab is not None:
        data["model"]["vocab"] = vocab
    path.write_text(json.dumps(data))
    return path


def test_the_same_question_is_answered_once(tmp_path: Path) -> None:
    calls: list[str] = []

    def compute(ids: list[int]) -> list[int]:
        calls.append("x")
        return ids

    root = tmp_path / "enc"
    assert encodings.remembered("h" * 64, "abc", True, lambda: compute([2, 3]), root) == [2, 3]
    assert encodings.remembered("h" * 64, "abc", True, lambda: compute([9]), root) == [2, 3]
    assert len(calls) == 1
    # another text, add_special or tokenizer content is another question
    assert encodings.remembered("h" * 64, "abcc", True, lambda: compute([2, 3, 3]), root) == [2, 3, 3]
    assert encodings.remembered("h" * 64, "abc", False, lambda: compute([7]), root) == [7]
    assert encodings.remembered("g" * 64, "abc", True, lambda: compute([8]), root) == [8]
    assert len(calls) == 4


def test_a_bad_entry_is_recomputed_and_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "enc"
    encodings.remembered("h" * 64, "abc", True, lambda: [2, 3], root)
    (entry,) = root.iterdir()
    good = json.loads(entry.read_text())
    for bad in (
        "{not json",
        json.dumps({"key": good["key"], "ids": [2, -1]}),
        json.dumps({"key": good["key"], "ids": [2, "3"]}),
        json.dumps({"key": good["key"], "ids": [True]}),
        json.dumps({"key": {**good["key"], "text": "abd"}, "ids": [5]}),  # a colliding name for another key
        json.dumps([2, 3]),
    ):
        entry.write_text(bad)
        assert encodings.remembered("h" * 64, "abc", True, lambda: [2, 3], root) == [2, 3], bad
        assert json.loads(entry.read_text()) == good


def test_an_exported_tokenizer_is_not_built_for_a_repeated_prompt(tmp_path: Path) -> None:
    tok = _write(tmp_path / "tokenizer.json")
    cold = HFTokenizer.from_export(tok, None, "cfg", path=tmp_path / "m.gguf", file_hash="f")
    ids = cold.encode("abcab")
    assert ids == [2, 3, 2]
    assert cold._tok is not None  # it had to be built once
    warm = HFTokenizer.from_export(tok, None, "cfg", path=tmp_path / "m.gguf", file_hash="f")
    assert warm.encode("abcab") == ids
    assert warm._tok is None  # answered from the remembered encoding
    assert warm.encode("cab") == [3, 2] and warm._tok is not None  # a new prompt builds it
    assert warm.token_str(2) == "ab"


def test_changed_tokenizer_content_is_tokenized_again(tmp_path: Path) -> None:
    tok = _write(tmp_path / "tokenizer.json")
    assert HFTokenizer.from_export(tok, None, "cfg", path=tok, file_hash="f").encode("ab") == [2]
    _write(tok, {"a": 0, "b": 1, "ab": 3, "c": 2})  # same text, another vocabulary
    assert HFTokenizer.from_export(tok, None, "cfg", path=tok, file_hash="f").encode("ab") == [3]
    text = tok.read_text()
    assert HFTokenizer.from_export(None, text, "cfg", path=tok, file_hash="f").encode("ab") == [3]


def test_touching_the_tokenizer_object_stops_remembering(tmp_path: Path) -> None:
    tok = _write(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_export(tok, None, "cfg", path=tok, file_hash="f")
    assert hf.content_sha256 is not None
    hf.tok.no_padding()  # a caller holding the object may change how it encodes
    assert hf.content_sha256 is None
    before = set(encodings.cache_dir().glob("*.json"))
    assert hf.encode("abab") == [2, 2]
    assert set(encodings.cache_dir().glob("*.json")) == before
