"""The deterministic byte-level BPE trainer and the tokenizer.json it emits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from parity.tokenize import bpe

CORPUS = Path(__file__).resolve().parents[2] / "parity" / "data" / "corpus.txt"


@pytest.fixture(scope="module")
def corpus() -> str:
    return CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def vocab(corpus: str) -> bpe.BpeVocab:
    return bpe.train(corpus, 512)


def test_byte_alphabet_is_gpt2s() -> None:
    table = bpe.bytes_to_unicode()
    assert len(table) == 256 and len(set(table)) == 256
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord("A")] == "A" and table[ord("~")] == "~" and table[0xE9] == "é"
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("\t")] == "ĉ"
    assert table[0] == "Ā"


def test_pre_tokenize_maps_bytes_like_the_alphabet() -> None:
    table = bpe.bytes_to_unicode()
    text = "héllo  wörld\n\t12345 it's"
    words = bpe.pre_tokenize(text)
    assert "".join(words) == "".join(table[b] for b in text.encode("utf-8"))
    assert words[:2] == ["h" + table[0xC3] + table[0xA9] + "llo", "Ġ"]


def test_training_is_deterministic(corpus: str, vocab: bpe.BpeVocab) -> None:
    again = bpe.train(corpus, 512)
    assert again == vocab
    assert bpe.tokenizer_json(again) == bpe.tokenizer_json(vocab)


def test_vocab_layout(vocab: bpe.BpeVocab) -> None:
    assert len(vocab.tokens) == 512
    assert len(set(vocab.tokens)) == len(vocab.tokens)
    assert list(vocab.tokens[:256]) == bpe.bytes_to_unicode()
    assert vocab.tokens[-3:] == bpe.SPECIAL_TOKENS == vocab.special_tokens
    learned = set(vocab.tokens[256:-3])
    assert {left + right for left, right in vocab.merges} == learned
    # The most frequent pair of English text with GPT-2 pre-tokenization: a leading space and "t".
    assert vocab.merges[0] == ("Ġ", "t")
    assert all(" " not in left + right for left, right in vocab.merges)
    assert vocab.merge_strings[0] == "Ġ t"


def test_ties_go_to_the_smaller_pair() -> None:
    # "ab" and "cd" occur equally often; ("a", "b") sorts first, so it is merge 0.
    trained = bpe.train("cd ab cd ab", 256 + 1 + 3)
    assert trained.merges == (("a", "b"),)
    trained = bpe.train("ab cd cd ab", 256 + 1 + 3)
    assert trained.merges == (("a", "b"),)


def test_most_frequent_pair_wins() -> None:
    trained = bpe.train("xy xy xy ab", 256 + 1 + 3)
    assert trained.merges == (("x", "y"),)


def test_stops_when_no_pairs_remain() -> None:
    # Words "a", "Ġb", "Ġc": two pairs, each seen once, merged in string order; then nothing is left.
    trained = bpe.train("a b c", 1000)
    assert trained.merges == (("Ġ", "b"), ("Ġ", "c"))
    assert len(trained.tokens) == 256 + 2 + 3


def test_too_small_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="smaller than 256"):
        bpe.train("abc", 100)


def test_specials_must_not_be_learned() -> None:
    with pytest.raises(ValueError, match="learned from the text"):
        bpe.train("ab ab ab", 256 + 1 + 1, special_tokens=("ab",))


def test_merges_reproduce_training_segmentation(corpus: str, vocab: bpe.BpeVocab) -> None:
    # The trainer applies each merge everywhere in order; the encoder applies merges lowest rank first.
    # Both must give the same pieces for every training word, or llama.cpp and HF would tokenize the
    # corpus differently from what training saw.
    for word in sorted(set(bpe.pre_tokenize(corpus))):
        symbols = tuple(word)
        for pair in vocab.merges:
            symbols = bpe._merge_word(symbols, pair)
        assert list(symbols) == bpe.segment(vocab, word), word


def test_tokenizer_json_is_canonical(vocab: bpe.BpeVocab) -> None:
    text = bpe.tokenizer_json(vocab)
    assert text.endswith("}\n")
    # tokenizers reads every field we wrote and writes back the same document: nothing ignored or added.
    assert json.loads(Tokenizer.from_str(text).to_str()) == json.loads(text)


def test_hf_encoding_matches_merges_and_round_trips(corpus: str, vocab: bpe.BpeVocab) -> None:
    tok = Tokenizer.from_str(bpe.tokenizer_json(vocab))
    bos = vocab.token_id(bpe.BOS)
    encoding = tok.encode(corpus)
    expected = [vocab.token_id(piece) for word in bpe.pre_tokenize(corpus) for piece in bpe.segment(vocab, word)]
    assert encoding.ids == [bos, *expected]
    assert tok.decode(encoding.ids) == corpus
    assert tok.encode(corpus, add_special_tokens=False).ids == expected
    # The corpus compresses: merges are actually used.
    assert len(expected) < len(corpus.encode("utf-8")) / 2
