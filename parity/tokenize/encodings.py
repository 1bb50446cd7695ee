"""Remembered encodings: the ids an HF tokenizer gave for a text, kept per user and keyed by content.

Building an HF `tokenizers` Tokenizer from a 262,144-token tokenizer.json with 515k merges (Gemma 3's exported
vocabulary) takes 1-2 s of CPU, and the library holds the GIL while it parses; encoding the prompt then takes
a fraction of a millisecond. The ids of a text depend only on the tokenizer.json's bytes, the `tokenizers`
version, the text and add_special, so `parity run` on a prompt it has tokenized before reads the ids back and
never builds the tokenizer (tokenize/tokenizer.py: HFTokenizer.encode). Nothing is checked less: these are the
tokenizer authority's ids, compared with every backend's own ids on every run exactly as before.

An entry is one small JSON file in `core/paths.user_cache_dir()/tokenizers/encodings`, named by the SHA-256 of
its key and holding the key's parts, written atomically. An entry that is unreadable, malformed or whose key
does not match is recomputed and rewritten, never trusted; a cache that cannot be written costs only speed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from parity.core.fs import atomic_write_json
from parity.core.paths import user_cache_dir
from parity.errors import ParityError

# Bump when what HFTokenizer.encode computes changes in a way the key does not see.
FORMAT = 1


def cache_dir() -> Path:
    return user_cache_dir() / "tokenizers" / "encodings"


def _library_version() -> str:
    import tokenizers

    return str(tokenizers.__version__)


def key(content_sha256: str, text: str, add_special: bool) -> dict[str, object]:
    """Everything the ids depend on (the entry's name is the SHA-256 of this)."""
    return {
        "format": FORMAT,
        "tokenizer_sha256": content_sha256,
        "tokenizers": _library_version(),
        "add_special": add_special,
        "text": text,
    }


def _entry(k: dict[str, object], root: Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(k, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
    return (root or cache_dir()) / f"{digest}.json"


def remembered(
    content_sha256: str,
    text: str,
    add_special: bool,
    compute: Callable[[], list[int]],
    root: Path | None = None,
) -> list[int]:
    """The ids `compute()` gives for `text`, from the cache when this exact question was answered before."""
    k = key(content_sha256, text, add_special)
    path = _entry(k, root)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ids = record.get("ids") if isinstance(record, dict) and record.get("key") == k else None
        if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            return ids
    except (OSError, ValueError):
        pass
    ids = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": k, "ids": ids})
    except (OSError, ParityError):
        pass
    return ids
