"""A small deterministic byte-level BPE trainer and a `tokenizer.json` writer.

The default synthetic model needs a vocabulary whose bytes never change, so it cannot depend on the
training code of `tokenizers` (which is multi-threaded and may change between releases). This trainer is
single-threaded, has no randomness, and breaks ties between equally frequent pairs by the pair's strings.

Pre-tokenization is delegated to `tokenizers.pre_tokenizers.ByteLevel` (GPT-2 regex + byte-to-unicode
mapping), which is exactly what the emitted `tokenizer.json` uses at encode time, so training words and
encoding words are split identically.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass

from tokenizers import pre_tokenizers

BOS = "<|bos|>"
# GPT-2's name for end of text: llama.cpp recognises it as end-of-generation by name and would warn
# ("special_eos_id is not in special_eog_ids") about an EOS spelled any other way.
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)


def bytes_to_unicode() -> list[str]:
    """Return GPT-2's byte-to-unicode alphabet: element `b` is the printable character standing for byte `b`."""
    # Printable Latin-1 bytes map to themselves; the rest (controls, space, 0x7f-0xa0, 0xad) are moved to
    # U+0100 upwards in byte order. This is the table every GPT-2-style BPE (and llama.cpp) agrees on.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: list[str] = []
    shifted = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + shifted))
            shifted += 1
    return table


@dataclass(frozen=True)
class BpeVocab:
    """A trained vocabulary: `tokens[i]` is the string of id `i`; `merges` are in rank order."""

    tokens: tuple[str, ...]
    merges: tuple[tuple[str, str], ...]
    special_tokens: tuple[str, ...]

    def token_id(self, token: str) -> int:
        """Return the id of `token` (raises ValueError if absent)."""
        return self.tokens.index(token)

    @property
    def merge_strings(self) -> list[str]:
        """Merges in the `"left right"` form GGUF stores (byte-level symbols never contain a space)."""
        return [f"{left} {right}" for left, right in self.merges]


def pre_tokenize(text: str) -> list[str]:
    """Split `text` into byte-level words exactly as the emitted tokenizer.json's pre-tokenizer does."""
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [word for word, _ in splitter.pre_tokenize_str(text)]


def _pairs(symbols: tuple[str, ...]) -> Counter[tuple[str, str]]:
    return Counter(itertools.pairwise(symbols))


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    # Left-to-right, non-overlapping: the same order in which an encoder applying this merge at a single
    # rank resolves overlaps such as "aaa".
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train(text: str, vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> BpeVocab:
    """Train a byte-level BPE on `text` until the vocabulary (bytes + merges + specials) has `vocab_size` ids.

    Ids 0-255 are the byte symbols in byte order, merges follow in rank order, special tokens come last.
    Stops early if no pair occurs any more. Ties between equally frequent pairs go to the pair that sorts
    first as a (left, right) string tuple, which makes the result independent of dict and hash order.
    """
    n_learned = vocab_size - 256 - len(special_tokens)
    if n_learned < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 byte symbols + {len(special_tokens)} specials")
    word_counts = Counter(pre_tokenize(text))
    # Sorted so that every later iteration visits words in a fixed order.
    words: list[tuple[str, ...]] = [tuple(word) for word in sorted(word_counts)]
    freqs: list[int] = [word_counts[word] for word in sorted(word_counts)]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for index, symbols in enumerate(words):
        for pair, n in _pairs(symbols).items():
            pair_counts[pair] += n * freqs[index]
            where.setdefault(pair, set()).add(index)

    tokens = list(bytes_to_unicode())
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    while len(tokens) < 256 + n_learned:
        live = [(count, pair) for pair, count in pair_counts.items() if count > 0]
        if not live:
            break
        best_count = max(count for count, _ in live)
        best = min(pair for count, pair in live if count == best_count)
        merges.append(best)
        # Two different merges can spell the same string ("a"+"bc", "ab"+"c"): keep both merges, since the
        # encoder needs them, but give the string a single id.
        if best[0] + best[1] not in known:
            tokens.append(best[0] + best[1])
            known.add(best[0] + best[1])
        for index in sorted(where.pop(best, set())):
            old = words[index]
            new = _merge_word(old, best)
            if new == old:
                continue
            for pair, n in _pairs(old).items():
                pair_counts[pair] -= n * freqs[index]
            for pair, n in _pairs(new).items():
                pair_counts[pair] += n * freqs[index]
                where.setdefault(pair, set()).add(index)
            words[index] = new
        pair_counts.pop(best, None)
    clashes = known.intersection(special_tokens)
    if clashes:
        raise ValueError(f"special tokens {sorted(clashes)} were also learned from the text")
    tokens.extend(special_tokens)
    return BpeVocab(tokens=tuple(tokens), merges=tuple(merges), special_tokens=special_tokens)


def segment(vocab: BpeVocab, word: str) -> list[str]:
    """Split one byte-level word by applying merges lowest rank first (the encoder's algorithm)."""
    ranks = {pair: rank for rank, pair in enumerate(vocab.merges)}
    symbols = list(word)
    while len(symbols) > 1:
        candidates = [(ranks[pair], i) for i, pair in enumerate(itertools.pairwise(symbols)) if pair in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def tokenizer_json(vocab: BpeVocab, bos: str = BOS) -> str:
    """Return `tokenizer.json` text for `vocab`: BPE model, ByteLevel pre-tokenizer/decoder, BOS template.

    The document is built field by field in the order `tokenizers` itself writes them, and dumped with a
    fixed indent and separators, so equal vocabularies give byte-identical files.
    """
    special_ids = {token: vocab.token_id(token) for token in vocab.special_tokens}
    bos_id = special_ids[bos]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": special_ids[token],
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token in vocab.special_tokens
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "Sequence",
            "processors": [
                # ByteLevel here only trims offsets; TemplateProcessing adds BOS like llama.cpp's add_special.
                {"type": "ByteLevel", **byte_level},
                {
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                    "pair": [
                        {"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
                },
            ],
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(vocab.tokens) if token not in special_ids},
            "merges": [[left, right] for left, right in vocab.merges],
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
