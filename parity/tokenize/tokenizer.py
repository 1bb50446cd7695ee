"""Tokenizer authority, prompt templates and the token parity check.

The external tokenizer (HF `tokenizers`, a tokenizer.json) and each C++ backend must turn the formatted
prompt into the same ids; the first difference stops the run (exit 2) before any logits are computed.
A tokenizer's config hash is the SHA-256 of a canonical form (tokens by id, merges, special ids), so the
same vocabulary hashes equal whether it comes from tokenizer.json or from a GGUF.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.core.fs import sha256_file
from parity.errors import TokenizerMismatch, UsageError
from parity.tokenize import chat_template
from parity.tokenize.chat_template import GGUF_TEMPLATE

TEMPLATES = ("auto", "raw", "instruct", "llama3-chat", "gemma", "chatml")
# `auto` for a model without a chat template: the turn markers its vocabulary defines name its format (the
# named templates below equal llama.cpp's built-in formatters of the same name; tests/integration compares).
VOCAB_MARKERS = (
    (("<start_of_turn>", "<end_of_turn>"), "gemma"),
    (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama3-chat"),
    (("<|im_start|>", "<|im_end|>"), "chatml"),
)


def canonical_hash(tokens: Sequence[str], merges: Sequence[str], special_ids: Sequence[int]) -> str:
    """SHA-256 of the canonical tokenizer description."""
    body = json.dumps(
        {"tokens": list(tokens), "merges": list(merges), "special": sorted(special_ids)}, ensure_ascii=False
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class HFTokenizer:
    """An HF tokenizers tokenizer from tokenizer.json, with its authority record.

    The Tokenizer itself is built on first use, because building one from a 262k vocabulary takes
    seconds (`built`). While `content_sha256` (the tokenizer.json text's SHA-256) is set, `encode` answers from the
    remembered encodings (tokenize/encodings.py) when it can, so a repeated prompt never builds it."""

    path: Path
    loader: Callable[[], Any]  # builds the HF Tokenizer; called at most once
    config_hash: str
    file_hash: str
    source: str = "external"  # external | auto_discovered | gguf_embedded
    content_sha256: str | None = None  # the key of remembered encodings; None: none are used
    _tok: Any = field(default=None, repr=False)

    def built(self) -> Any:
        """The HF Tokenizer, built now if it was not yet."""
        if self._tok is None:
            self._tok = self.loader()
        return self._tok

    @property
    def tok(self) -> Any:
        """The HF Tokenizer. A caller may change its settings, so from then on no encoding is remembered."""
        self.content_sha256 = None
        return self.built()

    @classmethod
    def from_text(cls, text: str, *, source: str, path: Path, file_hash: str) -> HFTokenizer:
        """A tokenizer from tokenizer.json text (e.g. exported from a GGUF); `path`/`file_hash` name its origin."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(text)
        return cls(path, lambda: tok, _hf_config_hash(json.loads(text)), file_hash, source, _tok=tok)

    @classmethod
    def from_export(
        cls, tokenizer_json: Path | None, text: str | None, config_hash: str, *, path: Path, file_hash: str
    ) -> HFTokenizer:
        """The GGUF vocabulary exported to tokenizer.json (a cached file, else its text), as the authority.

        Built on first use; encodings are remembered under the export's content hash."""
        from parity.core.fs import sha256_file_cached
        from parity.core.paths import user_cache_dir

        def build() -> Any:
            from tokenizers import Tokenizer

            return (
                Tokenizer.from_file(str(tokenizer_json))
                if tokenizer_json is not None
                else Tokenizer.from_str(text or "")
            )

        if tokenizer_json is not None:
            content = sha256_file_cached(tokenizer_json, user_cache_dir() / "sha256")
        else:
            content = hashlib.sha256((text or "").encode("utf-8")).hexdigest()
        return cls(path, build, config_hash, file_hash, "gguf_embedded", content_sha256=content)

    @classmethod
    def load(cls, path: Path, source: str = "external") -> HFTokenizer:
        from tokenizers import Tokenizer

        if not path.is_file():
            raise UsageError(f"tokenizer file not found: {path}", fix="pass --tokenizer PATH to a tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
            data = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:
            raise UsageError(
                f"{path} is not a valid HF tokenizer.json: {exc}", fix="export one with the model's tokenizer"
            ) from exc
        return cls(path, lambda: tok, _hf_config_hash(data), sha256_file(path), source, _tok=tok)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        def compute() -> list[int]:
            return list(self.built().encode(text, add_special_tokens=add_special).ids)

        if self.content_sha256 is None:
            return compute()
        from parity.tokenize import encodings

        return encodings.remembered(self.content_sha256, text, add_special, compute)

    def token_str(self, token_id: int) -> str:
        s = self.built().id_to_token(token_id)
        return "<none>" if s is None else str(s)

    def authority(self, token_count: int) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": str(self.path),
            "file_hash": self.file_hash,
            "config_hash": self.config_hash,
            "token_count": token_count,
        }


def _hf_config_hash(data: dict[str, Any]) -> str:
    model = data.get("model", {})
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    # A SentencePiece vocabulary (byte_fallback BPE in HF) has no merges in its GGUF: HF's are derived from the
    # scores, so they are left out on both sides and the hash covers tokens and special ids.
    merges = (
        []
        if model.get("byte_fallback")
        else [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    )
    special = [a["id"] for a in data.get("added_tokens", []) if a.get("special")]
    return canonical_hash(tokens, merges, special)


def gguf_config_hash(metadata: dict[str, Any]) -> str:
    """Config hash of a GGUF-embedded vocabulary (control tokens count as special)."""
    from parity.gguf.metadata import Metadata  # a value of the wrong type is a ModelFormatError naming the key

    md = Metadata.wrap(metadata, "GGUF")
    tokens = md.get_array("tokenizer.ggml.tokens", str, [])
    merges = md.get_array("tokenizer.ggml.merges", str, [])
    types = md.get_array("tokenizer.ggml.token_type", int, [])
    special = [i for i, t in enumerate(types) if t == 3]
    return canonical_hash(tokens, merges, special)


def resolve_template(name: str, chat_template: str | None, model_path: Path, vocab: Sequence[str] | None = None) -> str:
    """Pick the concrete template for `auto`: the model's own chat template (GGUF_TEMPLATE) when it has
    one, else the format whose turn markers its vocabulary defines (VOCAB_MARKERS), else path hints, else
    instruct."""
    if name not in TEMPLATES:
        raise UsageError(f"unknown prompt template '{name}'", fix=f"use one of: {', '.join(TEMPLATES)}")
    if name != "auto":
        return name
    if chat_template and chat_template.strip():
        return GGUF_TEMPLATE
    if vocab is not None:  # `in` on the GGUF's StringArray finds a token without an object per entry
        for markers, template in VOCAB_MARKERS:
            if all(m in vocab for m in markers):
                return template
    lowered = model_path.name.lower()
    if "llama-3" in lowered or "llama3" in lowered:
        return "llama3-chat"
    return "instruct"


def apply_template(
    name: str, prompt: str, system: str | None, metadata: Mapping[str, Any], model_path: Path, *, add_bos: bool
) -> tuple[str, str, dict[str, Any] | None]:
    """(template name, formatted prompt, receipt record of the chat template or None) for `--prompt-template`.

    `auto` renders the GGUF's own chat template in the sandbox (parity.tokenize.chat_template); `add_bos` says whether
    the tokenizer adds a BOS itself, and then a leading BOS text is stripped from the render (llama.cpp's rule).
    """
    raw = metadata.get(chat_template.GGUF_KEY)
    tokens = metadata.get("tokenizer.ggml.tokens")  # only `auto` without a chat template looks
    template = resolve_template(
        name,
        raw if isinstance(raw, str) else None,
        model_path,
        tokens if isinstance(tokens, Sequence) and not isinstance(tokens, str) else None,
    )
    chat = chat_template.from_gguf(metadata) if template == GGUF_TEMPLATE else None
    if chat is None:
        return template, format_prompt(template, prompt, system), None
    text, stripped = chat_template.strip_bos(
        chat.render(chat_template.messages_for(prompt, system)), chat.bos_token, add_bos
    )
    return template, text, chat.record(bos_stripped=stripped)


def format_prompt(template: str, prompt: str, system: str | None = None) -> str:
    """Apply a concrete template (never 'auto') to the user prompt."""
    if template == "raw":
        return prompt if not system else f"{system}\n\n{prompt}"
    if template == "instruct":
        head = f"{system}\n\n" if system else ""
        return f"{head}### Instruction:\n{prompt}\n\n### Response:\n"
    if template == "llama3-chat":
        sys_part = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        return (
            f"{sys_part}<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    if template == "gemma":  # llama.cpp's LLM_CHAT_TEMPLATE_GEMMA: the system text opens the first user turn
        head = f"{system}\n\n" if system else ""
        return f"<start_of_turn>user\n{head}{prompt}<end_of_turn>\n<start_of_turn>model\n"
    if template == "chatml":
        sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_part}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    if template == GGUF_TEMPLATE:
        raise UsageError("the model has no chat template", fix="use --prompt-template instruct|raw")
    raise UsageError(f"unknown prompt template '{template}'", fix=f"use one of: {', '.join(TEMPLATES)}")


def check_token_parity(
    ours: Sequence[int],
    theirs: Sequence[int],
    *,
    backend: str,
    ours_str: Callable[[int], str],
    theirs_str: Callable[[int], str],
) -> None:
    """Raise TokenizerMismatch naming the first differing position, both ids and their strings."""
    for pos, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            raise TokenizerMismatch(
                f"token mismatch with {backend} at position {pos}: tokenizer.json gives {a} ({ours_str(a)!r}), "
                f"{backend} gives {b} ({theirs_str(b)!r}); {len(ours)} vs {len(theirs)} tokens",
                fix="use the tokenizer.json that belongs to this model (a duplicated BOS means the template or the "
                "tokenizer already adds one)",
            )
    if len(ours) != len(theirs):
        pos = min(len(ours), len(theirs))
        extra = ours[pos:] or theirs[pos:]
        raise TokenizerMismatch(
            f"token count mismatch with {backend}: tokenizer.json gives {len(ours)} tokens, {backend} gives "
            f"{len(theirs)}; first extra id {extra[0]} at position {pos}",
            fix="use the tokenizer.json that belongs to this model",
        )
