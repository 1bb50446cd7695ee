"""The GGUF vocabulary's tokenizer facts, cached per model SHA-256 (a warm run exports nothing).

Exporting a 262,144-token SentencePiece vocabulary to tokenizer.json (parity.tokenize.export) and hashing
it take seconds; both depend only on the model file and on the exporter's code. So an entry is keyed by the
model's SHA-256 and by a hash of the modules that compute them, and holds the exported tokenizer.json and
both config hashes. It lives in the per-user cache (core/paths.user_cache_dir()/tokenizers), written
atomically; a missing, unreadable or half-written entry is recomputed, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_json, atomic_write_text
from parity.core.paths import user_cache_dir
from parity.errors import ParityError

# Everything that decides the exported tokenizer.json and the config hashes.
_CODE = ("export.py", "gguf_vocab.py", "pretokenizers.py", "bpe.py", "tokenizer.py", "cache.py")


@functools.cache
def code_key() -> str:
    """A hash of the exporter's source: a new parity that exports differently never reads an old entry."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()[:16]


def entry_dir(model_sha256: str, root: Path | None = None) -> Path:
    """Where the facts of the model with this SHA-256 are kept."""
    return (root or user_cache_dir() / "tokenizers") / f"{model_sha256}-{code_key()}"


@dataclass(frozen=True)
class VocabFacts:
    """The GGUF vocabulary's config hash and, when it can be exported, its tokenizer.json and that one's hash."""

    gguf_config_hash: str
    tokenizer_json: Path | None  # the cached export
    hf_config_hash: str | None
    cached: bool  # read from the cache rather than computed in this run
    tokenizer_text: str | None = None  # the export itself when the cache could not be written
    export_error: str | None = None  # why the vocabulary cannot be exported (then llama.cpp's ids are the authority)

    @property
    def exported(self) -> bool:
        return self.hf_config_hash is not None


def _read(d: Path) -> VocabFacts | None:
    try:
        meta = json.loads((d / "facts.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("gguf_config_hash"), str):
        return None
    tok = d / "tokenizer.json"
    hf = meta.get("hf_config_hash")
    if hf is not None and (not isinstance(hf, str) or not tok.is_file()):
        return None
    error = meta.get("export_error")
    return VocabFacts(
        meta["gguf_config_hash"],
        tok if hf is not None else None,
        hf,
        cached=True,
        export_error=error if isinstance(error, str) else None,
    )


def vocab_facts(
    metadata: dict[str, Any], model_path: Path, model_sha256: str, *, export: bool, root: Path | None = None
) -> VocabFacts:
    """The config hash of the GGUF vocabulary and (with `export`) its exported tokenizer.json, cached.

    A malformed vocabulary raises ModelFormatError (exit 2) exactly as the uncached computation does; a
    vocabulary type the exporter does not support gives tokenizer_json None (llama.cpp's ids are the
    authority then) and is remembered too.
    """
    from parity.errors import ModelFormatError, UsageError
    from parity.tokenize.export import export_metadata
    from parity.tokenize.tokenizer import _hf_config_hash, gguf_config_hash

    d = entry_dir(model_sha256, root)
    found = _read(d)
    if found is not None and (found.exported or found.export_error or not export):
        return found
    gguf_hash = found.gguf_config_hash if found else gguf_config_hash(metadata)  # malformed -> exit 2 here
    text: str | None = None
    hf_hash: str | None = None
    error: str | None = None
    if export:
        try:
            text = export_metadata(metadata, str(model_path))
        except ModelFormatError:
            raise  # a malformed vocabulary (a value of the wrong type) is bad input, not an unsupported one
        except UsageError as exc:
            error = str(exc)
        if text is not None:
            hf_hash = _hf_config_hash(json.loads(text))
    tok: Path | None = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        if text is not None:
            tok = d / "tokenizer.json"
            atomic_write_text(tok, text, fsync=False)
        # facts.json last: an entry without it is never read
        atomic_write_json(
            d / "facts.json",
            {"gguf_config_hash": gguf_hash, "hf_config_hash": hf_hash, "export_error": error},
        )
    except (OSError, ParityError):  # an unwritable cache: this run uses the export it made
        return VocabFacts(gguf_hash, None, hf_hash, cached=False, tokenizer_text=text, export_error=error)
    return VocabFacts(gguf_hash, tok, hf_hash, cached=False, export_error=error)
