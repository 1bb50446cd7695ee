"""The text of each token a receipt names (`token_text`), for the HTML report's token strip.

Taken from the GGUF vocabulary the run already read (no backend call): the token's piece as llama.cpp's
`llama_token_to_piece` spells it with special tokens rendered, i.e. SentencePiece "▁" -> " " and `<0xNN>`
byte tokens -> that byte; byte-level BPE (gpt2) symbols -> their bytes; control and user-defined tokens ->
their text. Bytes that are not valid UTF-8 on their own (one byte of a multi-byte character) become U+FFFD.
The pieces are untrusted text: the report escapes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from parity.tokenize.bpe import bytes_to_unicode
from parity.tokenize.gguf_vocab import BYTE, CONTROL, UNKNOWN, UNUSED, USER_DEFINED

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MAX_PIECE_CHARS = 64  # a longer piece is shortened in the receipt (with "…")


@dataclass(frozen=True)
class Vocab:
    """The tokenizer part of a GGUF: its model ("llama" = SentencePiece, "gpt2" = byte-level BPE), the token
    strings and types by id (the metadata's own lists, not copies)."""

    model: str
    tokens: Sequence[str]
    types: Sequence[int]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Vocab | None:
        """None when the GGUF has no usable vocabulary (then receipts carry no token text)."""
        tokens: Any = metadata.get("tokenizer.ggml.tokens")
        if not _is_array(tokens) or not len(tokens):
            return None
        types: Any = metadata.get("tokenizer.ggml.token_type")
        return cls(
            str(metadata.get("tokenizer.ggml.model", "")),
            tokens,
            types if _is_array(types) and len(types) >= len(tokens) else [],
        )

    @cached_property
    def _byte_of(self) -> dict[str, int]:
        return {ch: b for b, ch in enumerate(bytes_to_unicode())}

    def piece(self, token: int) -> str | None:
        """The token's text, or None for an id outside the vocabulary."""
        if not 0 <= token < len(self.tokens):
            return None
        text = str(self.tokens[token])
        kind = int(self.types[token]) if token < len(self.types) else 1
        if kind in (CONTROL, USER_DEFINED, UNUSED, UNKNOWN):
            return text
        if self.model == "llama":
            m = _BYTE_TOKEN.fullmatch(text) if kind == BYTE else None
            return bytes([int(m.group(1), 16)]).decode("utf-8", "replace") if m else text.replace("\u2581", " ")
        if self.model == "gpt2":
            byte_of = self._byte_of
            if all(ch in byte_of for ch in text):
                return bytes(byte_of[ch] for ch in text).decode("utf-8", "replace")
        return text


def _is_array(x: Any) -> bool:
    """A list, or an array-like the GGUF reader returns for long arrays (a lazily decoded string array, numpy)."""
    return not isinstance(x, str | bytes) and hasattr(x, "__len__") and hasattr(x, "__getitem__")


def token_text(vocab: Vocab | None, ids: Iterable[int]) -> dict[str, str]:
    """{str(id): piece} for the distinct `ids` in the vocabulary (pieces over MAX_PIECE_CHARS shortened)."""
    if vocab is None:
        return {}
    out: dict[str, str] = {}
    for t in ids:
        key = str(int(t))
        if key in out:
            continue
        p = vocab.piece(int(t))
        if p is not None:
            out[key] = p if len(p) <= MAX_PIECE_CHARS else p[: MAX_PIECE_CHARS - 1] + "…"
    return out


def receipt_ids(sequence: Sequence[int], rows: Sequence[Mapping[str, Any]], theirs: Sequence[int]) -> list[int]:
    """The ids the report shows: the sequence, both sides' top-1 at every position, the reference's greedy."""
    ids = list(sequence)
    for r in rows:
        ids += [r["top5_ours"][0], r["top5_ref"][0]] if r["top5_ours"] and r["top5_ref"] else []
    return ids + list(theirs)
