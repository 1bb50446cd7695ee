from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity.errors import TokenizerMismatch, UsageError
from parity.tokenize.tokenizer import (
    HFTokenizer,
    canonical_hash,
    check_token_parity,
    format_prompt,
    gguf_config_hash,
    resolve_template,
)


def test_first_difference_names_position_ids_and_strings() -> None:
    with pytest.raises(TokenizerMismatch) as e:
        check_token_parity(
            [1, 1, 5], [1, 5, 6], backend="llama", ours_str=lambda t: f"s{t}", theirs_str=lambda t: f"t{t}"
        )
    msg = str(e.value)
    assert "position 1" in msg and "gives 1 ('s1')" in msg and "gives 5 ('t5')" in msg
    assert e.value.exit_code == 2


def test_length_difference_is_a_mismatch() -> None:
    with pytest.raises(TokenizerMismatch, match="token count mismatch"):
        check_token_parity([1, 2], [1, 2, 3], backend="llama", ours_str=str, theirs_str=str)


def test_equal_sequences_pass() -> None:
    check_token_parity([1, 2, 3], [1, 2, 3], backend="llama", ours_str=str, theirs_str=str)


@pytest.mark.parametrize(
    ("chat_template", "path", "expected"),
    [
        ("{{ '<|start_header_id|>' }}", "m.gguf", "gguf-chat-template"),  # the model's own template wins
        ("[INST] {{ x }} [/INST]", "Meta-Llama-3-8B.gguf", "gguf-chat-template"),
        ("  ", "Meta-Llama-3-8B.gguf", "llama3-chat"),
        (None, "Meta-Llama-3-8B.gguf", "llama3-chat"),
        (None, "something.gguf", "instruct"),
    ],
)
def test_auto_template(chat_template: str | None, path: str, expected: str) -> None:
    assert resolve_template("auto", chat_template, Path(path)) == expected


def test_explicit_template_wins_and_unknown_rejected() -> None:
    assert resolve_template("raw", "<|start_header_id|>", Path("x")) == "raw"
    with pytest.raises(UsageError, match="unknown prompt template"):
        resolve_template("vicuna", None, Path("x"))


@pytest.mark.parametrize(
    ("vocab", "chat_template", "expected"),
    [
        (["<bos>", "<start_of_turn>", "<end_of_turn>", "a"], None, "gemma"),  # a Gemma base GGUF: no template
        (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None, "llama3-chat"),
        (["<|im_start|>", "<|im_end|>", "x"], None, "chatml"),
        (["<|im_start|>", "x"], None, "instruct"),  # one marker alone names no format
        (["<start_of_turn>", "<end_of_turn>"], "{{ messages }}", "gguf-chat-template"),  # its own template wins
    ],
)
def test_auto_template_from_vocabulary_markers(vocab: list[str], chat_template: str | None, expected: str) -> None:
    assert resolve_template("auto", chat_template, Path("m.gguf"), vocab) == expected


def test_format_prompt() -> None:
    assert format_prompt("raw", "hi") == "hi"
    assert format_prompt("instruct", "hi") == "### Instruction:\nhi\n\n### Response:\n"
    assert format_prompt("instruct", "hi", "be brief").startswith("be brief\n\n### Instruction:")
    llama3 = format_prompt("llama3-chat", "hi", "sys")
    assert llama3.startswith("<|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>")
    assert llama3.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def _tokenizer_json(path: Path) -> Path:
    data = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": 4,
                "content": "<s>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
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
    path.write_text(json.dumps(data))
    return path


def test_config_hash_equal_for_hf_and_gguf_forms(tmp_path: Path) -> None:
    hf = HFTokenizer.load(_tokenizer_json(tmp_path / "tokenizer.json"))
    meta = {
        "tokenizer.ggml.tokens": ["a", "b", "ab", "c", "<s>"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
    }
    assert hf.config_hash == gguf_config_hash(meta)
    meta["tokenizer.ggml.merges"] = []
    assert hf.config_hash != gguf_config_hash(meta)
    assert len(hf.file_hash) == 64


def test_canonical_hash_depends_on_special_ids() -> None:
    assert canonical_hash(["a"], [], [0]) != canonical_hash(["a"], [], [])


def test_missing_and_invalid_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="tokenizer file not found"):
        HFTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not a valid HF tokenizer.json"):
        HFTokenizer.load(bad)
