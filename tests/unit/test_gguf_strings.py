"""GGUF string arrays read in one scan (parity/gguf/strings.py) and the per-model vocabulary cache
(parity/tokenize/cache.py), against the plain per-entry reading they replace."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.core.fs import sha256_file, sha256_file_cached
from parity.errors import ModelFormatError
from parity.gguf.reader import open_gguf
from parity.gguf.strings import StringArray, StringArrayError, scan
from parity.tokenize.cache import vocab_facts
from parity.tokenize.export import export_metadata
from parity.tokenize.tokenizer import HFTokenizer, gguf_config_hash
from tests.unit.test_tokenizer_export import byte_level_keys, write_vocab


def encode(entries: list[bytes]) -> bytes:
    return b"".join(struct.pack("<Q", len(e)) + e for e in entries)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.text(max_size=12), max_size=40), st.binary(max_size=5))
def test_scan_equals_per_entry_decode(texts: list[str], prefix: bytes) -> None:
    data = prefix + encode([t.encode() for t in texts]) + b"tail"
    array, end = scan(data, len(prefix), len(texts))
    assert list(array) == texts
    assert array.tolist() == texts
    assert len(array) == len(texts)
    assert end == len(data) - 4
    for i, t in enumerate(texts):
        assert array[i] == t
        assert array[i - len(texts)] == t
    assert array[1:3] == texts[1:3]


def test_empty_and_out_of_range() -> None:
    array, end = scan(b"", 0, 0)
    assert len(array) == 0 and end == 0 and list(array) == []
    array, _ = scan(encode([b"", b"a", b""]), 0, 3)
    assert list(array) == ["", "a", ""]
    with pytest.raises(IndexError):
        array[3]
    assert array == ["", "a", ""] and array != ["", "a"]
    assert "3 entries" in repr(array)


def test_truncated_entry_is_named() -> None:
    data = encode([b"ab", b"cdef"])[:-1]
    with pytest.raises(StringArrayError, match="entry 1 .* runs past the end") as info:
        scan(data, 0, 2)
    assert info.value.index == 1
    # a count larger than the entries present: the missing entry's length cannot be read
    with pytest.raises(StringArrayError, match="entry 2"):
        scan(encode([b"ab", b"cd"]), 0, 3)
    # a huge declared length never allocates
    with pytest.raises(StringArrayError, match="entry 0"):
        scan(struct.pack("<Q", 2**62) + b"x", 0, 1)


def test_invalid_utf8_names_the_entry() -> None:
    with pytest.raises(StringArrayError, match="entry 1 is not valid UTF-8"):
        scan(encode([b"ok", b"\xff\xfe", b"fine"]), 0, 3)
    # each half of a character is invalid on its own although the concatenation is valid
    euro = "€".encode()
    with pytest.raises(StringArrayError, match="entry 1 .*starts inside a character"):
        scan(encode([euro[:1], euro[1:]]), 0, 2)


def test_string_array_is_a_read_only_sequence() -> None:
    array, _ = scan(encode([b"x", "é".encode(), b"yz"]), 0, 3)
    assert isinstance(array, StringArray)
    assert "é" in array and array.index("yz") == 2
    with pytest.raises(TypeError):
        hash(array)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.text(alphabet="ab<>é", max_size=4), max_size=12), st.text(alphabet="ab<>é", max_size=5))
def test_contains_equals_list_membership(texts: list[str], probe: str) -> None:
    array, _ = scan(encode([t.encode() for t in texts]), 0, len(texts))
    assert (probe in array) == (probe in texts)  # a hit inside or across entries is no member
    assert all(t in array for t in texts) and 3 not in array  # type: ignore[comparison-overlap]


def test_sha256_cache_follows_the_file(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"one")
    cache = tmp_path / "sha"
    assert sha256_file_cached(f, cache) == sha256_file(f)
    assert len(list(cache.iterdir())) == 1
    f.write_bytes(b"two")  # a rewrite changes the stamp: hashed again, never the old digest
    assert sha256_file_cached(f, cache) == sha256_file(f)
    entry = next(cache.iterdir())
    entry.write_text("{not json")  # a damaged entry is recomputed
    assert sha256_file_cached(f, cache) == sha256_file(f)
    unwritable = tmp_path / "file-not-dir"
    unwritable.write_text("")
    assert sha256_file_cached(f, unwritable) == sha256_file(f)  # cache unusable: still the right digest


def test_gguf_reader_strings_equal_gguf_py(tmp_path: Path) -> None:
    import gguf

    path = write_vocab(tmp_path / "vocab.gguf", byte_level_keys())
    ours = open_gguf(path).metadata["tokenizer.ggml.tokens"]
    theirs = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert isinstance(ours, StringArray) and list(ours) == theirs


def test_vocab_facts_cached_per_model(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "vocab.gguf", byte_level_keys())
    f = open_gguf(path)
    root = tmp_path / "tok-cache"
    cold = vocab_facts(f.metadata, path, f.sha256(), export=True, root=root)
    warm = vocab_facts(f.metadata, path, f.sha256(), export=True, root=root)
    assert (cold.cached, warm.cached) == (False, True)
    assert cold.gguf_config_hash == warm.gguf_config_hash == gguf_config_hash(f.metadata)
    assert warm.tokenizer_json is not None and warm.tokenizer_json.read_text() == export_metadata(f.metadata, str(path))
    assert warm.hf_config_hash == cold.hf_config_hash
    hf = HFTokenizer.from_export(warm.tokenizer_json, None, warm.hf_config_hash or "", path=path, file_hash="")
    assert (
        hf.config_hash
        == HFTokenizer.from_text(
            export_metadata(f.metadata, str(path)), source="x", path=path, file_hash=""
        ).config_hash
    )
    # a half-written entry (no facts.json) is never read
    (warm.tokenizer_json.parent / "facts.json").unlink()
    assert vocab_facts(f.metadata, path, f.sha256(), export=True, root=root).cached is False


def test_vocab_facts_unexportable_and_malformed(tmp_path: Path) -> None:
    keys = byte_level_keys(overrides={"tokenizer.ggml.pre": "no-such-pre"})
    path = write_vocab(tmp_path / "odd.gguf", keys)
    f = open_gguf(path)
    root = tmp_path / "tok-cache"
    first = vocab_facts(f.metadata, path, f.sha256(), export=True, root=root)
    again = vocab_facts(f.metadata, path, f.sha256(), export=True, root=root)
    assert not first.exported and first.export_error and "no-such-pre" in first.export_error
    assert again.cached and again.export_error == first.export_error
    bad = dict(f.metadata, **{"tokenizer.ggml.tokens": ["a", 3]})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens"):
        vocab_facts(bad, path, "0" * 64, export=True, root=root)
    assert not (root / f"{'0' * 64}").exists() and len(list(root.iterdir())) == 1


def test_vocab_facts_unwritable_cache_still_exports(tmp_path: Path) -> None:
    path = write_vocab(tmp_path / "vocab.gguf", byte_level_keys())
    f = open_gguf(path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    facts = vocab_facts(f.metadata, path, f.sha256(), export=True, root=blocker)
    assert facts.tokenizer_json is None and facts.tokenizer_text == export_metadata(f.metadata, str(path))
    assert HFTokenizer.from_export(None, facts.tokenizer_text, "h", path=path, file_hash="").encode("hello")
