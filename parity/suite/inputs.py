"""The suite's items: a prompts JSONL file or a text cut into chunks, as token ids (parity suite --prompts/--text).

`--prompts FILE.jsonl`: one JSON object per line, `{"text": "..."}` or `{"tokens": [1, 2, ...]}`, with an
optional `"template"` (raw, instruct, gemma, chatml, llama3-chat, auto: parity.tokenize's templates; default
raw, the text as it is), an optional `"system"` (for templates that have one) and an optional `"id"` (default
`line-N`). Blank lines and lines starting with `//` are skipped. Every line is checked before anything runs:
a bad one is exit 2 naming the line, the field and the fix.

`--text FILE --ctx N`: llama-perplexity's chunking (tools/perplexity/perplexity.cpp, perplexity()): the whole
text tokenized once (add_special on, parse_special off, as common_tokenize there), cut into len // N chunks of
N tokens (the tail dropped), the first token of each chunk replaced by BOS when the vocabulary adds one.
`--chunks K` keeps the first K chunks (its --chunks).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.errors import UsageError

TEMPLATES = ("raw", "instruct", "gemma", "chatml", "llama3-chat", "auto")
FIELDS = ("text", "tokens", "template", "system", "id")


@dataclass(frozen=True)
class Raw:
    """One item as the input gives it: text (with a template) or token ids."""

    index: int
    id: str
    where: str  # "FILE:LINE" for messages
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    template: str = "raw"
    system: str | None = None


@dataclass(frozen=True)
class Item:
    """One unit of work: its canonical index, its id and the token ids both sides evaluate."""

    index: int
    id: str
    tokens: tuple[int, ...]


def _bad(where: str, what: str, fix: str) -> UsageError:
    return UsageError(f"{where}: {what}", fix=fix)


def read_text(path: Path, what: str) -> str:
    """The file's text (UTF-8); exit 2 naming it when it is missing, unreadable or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file", fix="pass an existing file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path}: is a directory", fix="pass a file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} {path}: not UTF-8 text (byte {exc.start})", fix="convert the file to UTF-8 (iconv -t UTF-8)"
        ) from None
    except PermissionError:
        raise UsageError(f"{what} {path}: permission denied", fix="make the file readable") from None


def parse_prompts(path: Path) -> list[Raw]:
    """Every item of a prompts JSONL file, checked; UsageError (exit 2) naming the first bad line and field."""
    name = path.name
    out: list[Raw] = []
    ids: dict[str, int] = {}
    for n, line in enumerate(read_text(path, "--prompts").splitlines(), start=1):
        where = f"{name}:{n}"
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(
                where, f"not JSON ({exc.msg}, column {exc.colno})", 'one JSON object per line: {"text": "..."}'
            ) from None
        if not isinstance(obj, dict):
            raise _bad(
                where, f"a JSON {type(obj).__name__}, not an object", 'write {"text": "..."} or {"tokens": [...]}'
            )
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise _bad(where, f"unknown field {unknown[0]!r}", f"fields are {', '.join(FIELDS)}")
        out.append(_parse_item(obj, len(out), n, where, ids))
    if not out:
        raise UsageError(f"--prompts {path}: no items", fix='add one JSON object per line: {"text": "..."}')
    return out


def _parse_item(obj: dict[str, Any], index: int, line: int, where: str, ids: dict[str, int]) -> Raw:
    text, tokens = obj.get("text"), obj.get("tokens")
    if (text is None) == (tokens is None):
        raise _bad(where, "needs exactly one of 'text' and 'tokens'", 'write {"text": "..."} or {"tokens": [1, 2, 3]}')
    if text is not None and (not isinstance(text, str) or not text):
        raise _bad(where, "field 'text' must be a non-empty string", 'e.g. {"text": "The capital of France is"}')
    ids_t: tuple[int, ...] | None = None
    if tokens is not None:
        if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
            raise _bad(
                where, "field 'tokens' must be a list of non-negative integers", 'e.g. {"tokens": [2, 651, 6037]}'
            )
        if len(tokens) < 2:
            raise _bad(
                where, f"field 'tokens' has {len(tokens)} token(s); scoring needs at least 2", "give 2 or more ids"
            )
        ids_t = tuple(tokens)
    template = obj.get("template", "raw")
    if template not in TEMPLATES:
        raise _bad(where, f"field 'template' is {template!r}", f"use one of {', '.join(TEMPLATES)}")
    if tokens is not None and "template" in obj:
        raise _bad(where, "field 'template' applies to 'text' only", "drop 'template' (token ids are used as given)")
    system = obj.get("system")
    if system is not None and (not isinstance(system, str) or text is None):
        raise _bad(where, "field 'system' must be a string, with 'text'", 'e.g. {"text": "...", "system": "..."}')
    item_id = obj.get("id", f"line-{line}")
    if not isinstance(item_id, str) or not item_id:
        raise _bad(where, "field 'id' must be a non-empty string", 'e.g. "id": "capital-fr"')
    if item_id in ids:
        raise _bad(where, f"id {item_id!r} repeats line {ids[item_id]}", "give every item its own id")
    ids[item_id] = line
    return Raw(index, item_id, where, text, ids_t, template, system)


# A tokenizer: (text, parse_special) -> ids, with the vocabulary's BOS rule applied (add_special on).
Tokenize = Callable[[str, bool], list[int]]
# A template: (name, text, system) -> formatted text (parity.tokenize.tokenizer.apply_template)
Format = Callable[[str, str, str | None], str]


def tokenize_prompts(raws: Sequence[Raw], tokenize: Tokenize, fmt: Format, n_vocab: int, n_ctx: int) -> list[Item]:
    """Token ids of every item: ids as given, or the text (in its template) tokenized; exit 2 naming the line
    of an id outside the vocabulary, or an item longer than the model's context."""
    items = []
    for r in raws:
        if r.tokens is not None:
            ids = list(r.tokens)
        else:
            assert r.text is not None
            templated = r.template != "raw"
            ids = tokenize(fmt(r.template, r.text, r.system) if templated else r.text, templated)
            if len(ids) < 2:
                raise _bad(r.where, f"the text tokenizes to {len(ids)} token(s); scoring needs 2", "use a longer text")
        check_ids(r.where, ids, n_vocab, n_ctx)
        items.append(Item(r.index, r.id, tuple(ids)))
    return items


def check_ids(where: str, ids: Sequence[int], n_vocab: int, n_ctx: int) -> None:
    bad = next((t for t in ids if t >= n_vocab), None)
    if bad is not None:
        raise _bad(where, f"token id {bad} is outside the vocabulary (n_vocab {n_vocab})", f"ids are 0..{n_vocab - 1}")
    if len(ids) > n_ctx:
        raise _bad(where, f"{len(ids)} tokens exceed the model's context of {n_ctx}", "split the item")


def chunk_text(ids: Sequence[int], ctx: int, bos: int | None, chunks: int | None) -> list[Item]:
    """llama-perplexity's chunks of `ids` (the text tokenized once; parity.suite.stats.perplexity_chunks, which
    also needs 2 x ctx tokens as llama-perplexity does), the first `chunks` of them when given."""
    from parity.suite.stats import perplexity_chunks

    cut = perplexity_chunks(ids, ctx, bos)
    return [Item(i, f"chunk-{i}", tuple(c)) for i, c in enumerate(cut[:chunks] if chunks else cut)]
