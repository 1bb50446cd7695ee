"""`parity tokenizer export`: tokenizer.json from small GGUF vocabularies written with gguf-py.

SentencePiece vocabularies are checked against a line-by-line Python transcription of llama.cpp's
llm_tokenizer_spm_session; byte-level vocabularies against the independent tokenizer.json writer in
parity.tokenize.bpe. The real llama.cpp comparisons live in tests/integration/test_tokenizer_export_llama.py.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Tokenizer

from parity.errors import ModelFormatError, UsageError
from parity.gguf.reader import open_gguf
from parity.tokenize import bpe
from parity.tokenize.export import add_parser, export_from_gguf, export_metadata, run, spm_merges, write_tokenizer
from parity.tokenize.pretokenizers import PRE_TOKENIZERS, as_llama_cpp_sees
from parity.tokenize.tokenizer import _hf_config_hash, gguf_config_hash

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock; they'll see.\n"
    "def add(a, b):\n    return a + b  # 42\n\nnumbers 3.14159 and 1,000,000 \t tabs\n" * 3
)


def write_vocab(path: Path, keys: dict[str, Any]) -> Path:
    """A vocabulary-only GGUF holding `keys` (tokenizer.ggml.* and general.*), like llama.cpp's ggml-vocab files."""
    writer = gguf.GGUFWriter(str(path), str(keys.get("general.architecture", "llama")))
    for key, value in keys.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key == "tokenizer.ggml.scores":
            writer.add_array(key, [float(v) for v in value])
        elif key == "tokenizer.ggml.token_type":
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
        else:
            writer.add_array(key, list(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def byte_level_keys(pre: str = "gpt-2", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A byte-level BPE vocabulary trained by parity.tokenize.bpe, plus two control tokens and one user-defined token."""
    vocab = bpe.train(CORPUS, 400, special_tokens=("<|endoftext|>", "<|im_end|>", "<|user|>"))
    types = [NORMAL] * (len(vocab.tokens) - 3) + [CONTROL, NORMAL, USER_DEFINED]
    keys: dict[str, Any] = {
        "general.name": "tiny",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": list(vocab.tokens),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": vocab.merge_strings,
        "tokenizer.ggml.bos_token_id": vocab.token_id("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": vocab.token_id("<|endoftext|>"),
    }
    keys.update(overrides or {})
    return keys


def spm_keys(
    pieces: dict[str, float], extra_tokens: Sequence[tuple[str, int]] = (), overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, then `pieces` with their scores."""
    tokens = ["<unk>", "<s>", "</s>", *BYTE_TOKENS, *pieces, *(t for t, _ in extra_tokens)]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, *[NORMAL] * len(pieces), *(ty for _, ty in extra_tokens)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *pieces.values(), *[-1000.0] * len(extra_tokens)]
    keys: dict[str, Any] = {
        "general.name": "tiny-spm",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    keys.update(overrides or {})
    return keys


def load(text: str) -> Any:
    return Tokenizer.from_str(text)


def llama_cpp_spm(text: str, tokens: Sequence[str], scores: Sequence[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's llm_tokenizer_spm_session.tokenize for one text fragment, transcribed to Python."""
    ids: dict[str, int] = {t: i for i, t in enumerate(tokens)}
    if add_space_prefix:
        text = " " + text
    text = text.replace(" ", "\u2581")
    sym = list(text)  # symbol text ("" once merged into its left neighbour)
    prev = list(range(-1, len(text) - 1))
    nxt = [i + 1 if i + 1 < len(text) else -1 for i in range(len(text))]
    queue: list[tuple[float, int, int, int]] = []  # (-score, left, right, size): best score, then leftmost

    def try_add(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        joined = sym[left] + sym[right]
        if joined in ids:
            heapq.heappush(queue, (-scores[ids[joined]], left, right, len(joined)))

    for i in range(1, len(sym)):
        try_add(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
            continue  # one side was merged elsewhere since this pair was queued
        sym[left] += sym[right]
        sym[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add(prev[left], left)
        try_add(left, nxt[left])
    out: list[int] = []
    i = 0 if sym else -1
    while i != -1:
        if sym[i] in ids:
            out.append(ids[sym[i]])
        else:  # resegment(): a symbol that is no token is emitted as its UTF-8 bytes
            out.extend(ids[f"<0x{b:02X}>"] for b in sym[i].encode("utf-8"))
        i = nxt[i]
    return out


# --- byte-level BPE -------------------------------------------------------------------------------------


def test_byte_level_export_agrees_with_the_independent_writer(tmp_path: Path) -> None:
    keys = byte_level_keys("gpt-2")
    exported = load(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))
    reference_vocab = bpe.train(CORPUS, 400, special_tokens=("<|endoftext|>", "<|im_end|>", "<|user|>"))
    reference = load(bpe.tokenizer_json(reference_vocab, bos="<|endoftext|>"))
    rng = random.Random(7)
    words = [*CORPUS.split(" "), "  ", "\n\n", "caf\u00e9", "\u4e2d\u6587", "\U0001f600", "'S", "x'll"]
    for _ in range(200):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n", "\t"]) for _ in range(rng.randint(1, 12)))
        assert (
            exported.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False).ids
        ), repr(text)


def test_byte_level_config_hash_equals_the_gguf_vocabulary_hash(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "v.gguf", byte_level_keys("llama-bpe"))
    text = export_from_gguf(path)
    assert _hf_config_hash(json.loads(text)) == gguf_config_hash(open_gguf(path).metadata)


def test_export_is_deterministic_and_write_matches(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "v.gguf", byte_level_keys("qwen2"))
    first, second = export_from_gguf(path), export_from_gguf(path)
    assert first == second
    result = write_tokenizer(path, tmp_path / "out" / "tokenizer.json")
    assert (tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8") == first
    assert result.hashes_match and len(result.sha256) == 64
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the atomic write left no temp file behind


def test_special_and_user_defined_tokens(tmp_path: Path) -> None:
    doc = json.loads(export_from_gguf(write_vocab(tmp_path / "v.gguf", byte_level_keys())))
    added = {a["content"]: a for a in doc["added_tokens"]}
    # control -> special; user-defined -> split out but not special; a NORMAL "<|im_end|>" is split out
    # too, because llama.cpp promotes end-of-turn markers to control tokens by their text.
    assert added["<|endoftext|>"]["special"] is True
    assert added["<|user|>"]["special"] is False
    assert added["<|im_end|>"]["special"] is False
    assert all(a["normalized"] is False for a in added.values())
    tok = load(json.dumps(doc))
    ids = tok.encode("hi<|user|>x<|im_end|>", add_special_tokens=False).ids
    assert doc["model"]["vocab"]["<|user|>"] in ids and doc["model"]["vocab"]["<|im_end|>"] in ids


@pytest.mark.parametrize(
    ("pre", "add_bos", "expect_bos"),
    [("gpt-2", None, False), ("llama-bpe", None, True), ("llama-bpe", False, False), ("gpt-2", True, True)],
)
def test_bos_follows_llama_cpp_defaults_and_the_gguf_key(
    tmp_path: Path, pre: str, add_bos: bool | None, expect_bos: bool
) -> None:
    extra = {} if add_bos is None else {"tokenizer.ggml.add_bos_token": add_bos}
    keys = byte_level_keys(pre, extra)
    tok = load(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))
    bos = keys["tokenizer.ggml.bos_token_id"]
    with_special = tok.encode("hello world", add_special_tokens=True).ids
    without = tok.encode("hello world", add_special_tokens=False).ids
    assert with_special == ([bos, *without] if expect_bos else without)


def test_add_eos(tmp_path: Path) -> None:
    keys = byte_level_keys("gpt-2", {"tokenizer.ggml.add_eos_token": True})
    tok = load(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))
    assert tok.encode("hello", add_special_tokens=True).ids[-1] == keys["tokenizer.ggml.eos_token_id"]


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt-2", ["12345", " abc", "'s", "   "]),
        ("llama-bpe", ["123", "45", " abc", "'s", "   "]),
        ("qwen2", ["1", "2", "3", "4", "5", " abc", "'s", "   "]),
    ],
)
def test_pre_tokenizer_splits_like_llama_cpp_regexes(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    doc = json.loads(export_from_gguf(write_vocab(tmp_path / "v.gguf", byte_level_keys(pre))))
    steps = doc["pre_tokenizer"]["pretokenizers"]
    assert [s["pattern"]["Regex"] for s in steps[:-1]] == list(PRE_TOKENIZERS[pre].regexes)
    assert steps[-1] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert doc["model"]["ignore_merges"] is PRE_TOKENIZERS[pre].ignore_merges
    split = load(json.dumps(doc)).pre_tokenizer.pre_tokenize_str("12345 abc's   ")
    assert [word.replace("\u0120", " ") for word, _ in split] == pieces  # U+0120 is the byte-level space


def test_every_supported_pre_tokenizer_compiles(tmp_path: Path) -> None:
    """Oniguruma (HF) must accept every llama.cpp regex the exporter can emit."""
    base = byte_level_keys()
    for pre in sorted(PRE_TOKENIZERS):
        tok = load(export_metadata(dict(base, **{"tokenizer.ggml.pre": pre}), pre))
        assert tok.encode("It's 2024: h\u00e9llo, \u4e16\u754c!\n\n  x", add_special_tokens=False).ids, pre


def test_regexes_are_rewritten_to_match_what_llama_cpp_matches() -> None:
    # llama.cpp has one letter category, so the case subcategories all mean \p{L} there.
    assert as_llama_cpp_sees(r"[\p{Lu}\p{Ll}]+\p{Lo}") == r"[\p{L}\p{L}]+\p{L}"
    # llama.cpp hides non-ASCII spaces from literal ranges: U+3000 is not deepseek-llm's "punctuation".
    pattern = PRE_TOKENIZERS["deepseek-llm"].regexes[2]
    assert "\u3000-\u3002" in pattern and as_llama_cpp_sees(pattern).endswith("\u3000]]+")
    assert as_llama_cpp_sees(r"[^\s\p{L}]+|\s+(?!\S)") == r"[^\s\p{L}]+|\s+(?!\S)"
    doc = json.loads(export_metadata(byte_level_keys("deepseek-llm")))
    words = [w for w, _ in load(json.dumps(doc)).pre_tokenizer.pre_tokenize_str("x   \u3000\u3001!")]
    # llama.cpp: "   " then U+3000 alone (not "punctuation", not CJK), U+3001 (CJK range), "!" (checked on the bridge)
    assert words == ["x", "\u0120\u0120\u0120", "\u00e3\u0122\u0122", "\u00e3\u0122\u0123", "!"]


# --- SentencePiece BPE ----------------------------------------------------------------------------------


def random_spm_pieces(seed: int) -> dict[str, float]:
    """Single characters (low scores) and random multi-character pieces with distinct scores."""
    rng = random.Random(seed)
    alphabet = "abcde\u2581"
    pieces: dict[str, float] = {c: -100.0 - i for i, c in enumerate(alphabet)}
    while len(pieces) < 60:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))
        pieces.setdefault(piece, -rng.uniform(0, 50))
    return pieces


@pytest.mark.parametrize("add_space_prefix", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_spm_matches_llama_cpp_algorithm(tmp_path: Path, seed: int, add_space_prefix: bool) -> None:
    keys = spm_keys(random_spm_pieces(seed), overrides={"tokenizer.ggml.add_space_prefix": add_space_prefix})
    tok = load(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice("abcde  \u00e9") for _ in range(rng.randint(1, 30)))
        want = llama_cpp_spm(text, keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.scores"], add_space_prefix)
        assert tok.encode(text, add_special_tokens=False).ids == want, repr(text)


def test_spm_byte_fallback_space_marker_and_bos(tmp_path: Path) -> None:
    keys = spm_keys({"\u2581": -1.0, "h": -2.0, "i": -3.0, "\u2581h": -0.5, "\u2581hi": -0.1})
    tok = load(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))
    ids = {t: i for i, t in enumerate(keys["tokenizer.ggml.tokens"])}
    # "hi" -> "▁hi"; "é" is not in the vocabulary -> its UTF-8 bytes
    assert tok.encode("hi\u00e9", add_special_tokens=True).ids == [1, ids["\u2581hi"], ids["<0xC3>"], ids["<0xA9>"]]
    assert tok.decode(tok.encode("hi hi").ids, skip_special_tokens=True) == "hi hi"


def test_gemma_style_spm_without_space_prefix_and_with_user_defined_tokens(tmp_path: Path) -> None:
    pieces = {"\u2581": -1.0, "a": -2.0, "b": -3.0, "ab": -0.5, "\u2581a": -0.7}
    extra = [("<start_of_turn>", CONTROL), ("\n\n", USER_DEFINED), ("  ", USER_DEFINED)]
    keys = spm_keys(pieces, extra, {"tokenizer.ggml.add_space_prefix": False})
    doc = json.loads(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))
    assert [n["type"] for n in doc["normalizer"]["normalizers"]] == ["Replace"]
    tok = load(json.dumps(doc))
    ids = {t: i for i, t in enumerate(keys["tokenizer.ggml.tokens"])}
    got = tok.encode("<start_of_turn>ab\n\n a  b", add_special_tokens=True).ids
    # No "▁" prefix; user-defined whitespace runs are split out before the merges, as llama.cpp does.
    assert got == [1, ids["<start_of_turn>"], ids["ab"], ids["\n\n"], ids["\u2581a"], ids["  "], ids["b"]]


def test_spm_merges_rank_by_score_of_the_merged_piece() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -3.0, -1.0, -2.0]
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def test_spm_hash_ignores_the_derived_merges(tmp_path: Path) -> None:
    """tokenizer.json needs merges; a SentencePiece GGUF stores scores instead: the hash leaves merges out."""
    path = write_vocab(tmp_path / "v.gguf", spm_keys({"\u2581": -1.0, "a": -2.0, "\u2581a": -0.5}))
    doc = json.loads(export_from_gguf(path))
    assert doc["model"]["merges"] == [["\u2581", "a"]]
    assert _hf_config_hash(doc) == gguf_config_hash(open_gguf(path).metadata)


def test_phi3_name_makes_special_tokens_strip_following_spaces(tmp_path: Path) -> None:
    keys = spm_keys({"\u2581": -1.0, "x": -2.0}, [("<|end|>", CONTROL)], {"general.name": "Phi3"})
    added = {
        a["content"]: a for a in json.loads(export_from_gguf(write_vocab(tmp_path / "v.gguf", keys)))["added_tokens"]
    }
    assert added["<|end|>"]["rstrip"] is True and added["</s>"]["rstrip"] is True
    assert added["<s>"]["rstrip"] is False and added["<unk>"]["rstrip"] is False


# --- errors and CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", "gemma4"])
def test_unsupported_tokenizer_models_are_refused(model: str) -> None:
    with pytest.raises(UsageError, match=rf"tokenizer model '{model}'.*supported: gpt2, llama") as e:
        export_metadata(dict(byte_level_keys(), **{"tokenizer.ggml.model": model}), "m.gguf")
    assert e.value.exit_code == 2


def test_unknown_pre_tokenizer_is_refused_by_name() -> None:
    with pytest.raises(UsageError, match="pre-tokenizer 'kimi-k2'"):
        export_metadata(byte_level_keys("kimi-k2"), "m.gguf")


def test_missing_vocabulary_and_bad_merges_are_refused() -> None:
    with pytest.raises(UsageError, match="no embedded tokenizer"):
        export_metadata({"general.architecture": "llama"}, "m.gguf")
    keys = byte_level_keys()
    with pytest.raises(UsageError, match=r"merges\[0\].*not in the vocabulary"):
        export_metadata(dict(keys, **{"tokenizer.ggml.merges": ["zz qq", *keys["tokenizer.ggml.merges"]]}))
    with pytest.raises(UsageError, match=r"merges\[0\].*no space"):
        export_metadata(dict(keys, **{"tokenizer.ggml.merges": ["ab"]}))
    with pytest.raises(UsageError, match="repeats an earlier merge"):
        merges = keys["tokenizer.ggml.merges"]
        export_metadata(dict(keys, **{"tokenizer.ggml.merges": [*merges, merges[0]]}))


def test_add_bos_without_a_valid_bos_token_is_refused() -> None:
    keys = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.bos_token_id": 5}
    with pytest.raises(UsageError, match="no valid BOS token id"):
        export_metadata(keys)


def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        export_from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf" * 10)
    with pytest.raises(ModelFormatError):
        export_from_gguf(junk)
    path = write_vocab(tmp_path / "v.gguf", byte_level_keys())
    with pytest.raises(UsageError, match="is a directory"):
        write_tokenizer(path, tmp_path)


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="parity")
    add_parser(parser.add_subparsers(dest="command"))
    path = write_vocab(tmp_path / "v.gguf", byte_level_keys())
    out = tmp_path / "tokenizer.json"
    args = parser.parse_args(["tokenizer", "export", "--from-gguf", str(path), "-o", str(out)])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "equal to the GGUF vocabulary's" in printed
    assert out.read_text(encoding="utf-8") == export_from_gguf(path)


def test_cli_reports_a_sentencepiece_hash_equal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="parity")
    add_parser(parser.add_subparsers(dest="command"))
    path = write_vocab(tmp_path / "v.gguf", spm_keys({"\u2581": -1.0, "a": -2.0, "\u2581a": -0.5}))
    args = parser.parse_args(["tokenizer", "export", "--from-gguf", str(path), "-o", str(tmp_path / "t.json")])
    assert run(args) == 0
    assert "equal to the GGUF vocabulary's" in capsys.readouterr().out
