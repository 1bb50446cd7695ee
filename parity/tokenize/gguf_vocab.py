"""The tokenizer part of a GGUF file as llama.cpp loads it (src/llama-vocab.cpp): the `tokenizer.ggml.*` keys
with llama.cpp's defaults (`GGUFVocab`) and the per-token attributes that decide which strings llama.cpp
splits out of a text before tokenizing (`token_attributes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parity.errors import UsageError
from parity.tokenize.pretokenizers import PRE_TOKENIZERS

SUPPORTED_MODELS = ("gpt2", "llama")

# GGUF token types (gguf-py's TokenType; llama.h's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.h's llama_token_attr bits (the ones that decide how llama.cpp partitions text around a token).
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
TYPE_ATTR = {
    UNKNOWN: ATTR_UNKNOWN,
    UNUSED: ATTR_UNUSED,
    NORMAL: ATTR_NORMAL,
    CONTROL: ATTR_CONTROL,
    USER_DEFINED: ATTR_USER_DEFINED,
    BYTE: ATTR_BYTE,
}
# llama.cpp's cache_special_tokens: what tokenizer_st_partition splits out before tokenizing.
ATTR_PARTITIONED = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
# Tokens llama.cpp turns into control tokens by their text (end of generation / turn markers, FIM markers).
_EOG_TEXTS = frozenset(
    (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "[e~[",
    )
)
_FIM_TEXTS: dict[tuple[str, ...], frozenset[str]] = {
    ("fim_pre", "prefix"): frozenset(
        (
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<\uff5cfim\u2581begin\uff5c>",
            "<PRE>",
            "\u2581<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        )
    ),
    ("fim_suf", "suffix"): frozenset(
        (
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<\uff5cfim\u2581hole\uff5c>",
            "<SUF>",
            "\u2581<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        )
    ),
    ("fim_mid", "middle"): frozenset(
        (
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<\uff5cfim\u2581end\uff5c>",
            "<MID>",
            "\u2581<MID>",
            "<|code_middle|>",
            "<|middle|>",
        )
    ),
    ("fim_pad",): frozenset(("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    ("fim_rep",): frozenset(("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    ("fim_sep",): frozenset(("<|file_sep|>",)),
}


@dataclass
class GGUFVocab:
    """The tokenizer part of a GGUF file's metadata, with llama.cpp's defaults applied."""

    model: str
    pre: str
    tokens: Sequence[str]
    types: Sequence[int]
    scores: list[float]
    merges: Sequence[str]
    metadata: dict[str, Any] = field(repr=False)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str) -> GGUFVocab:
        """Read and check the `tokenizer.ggml.*` keys; `source` names the file in error messages."""
        from parity.gguf.metadata import Metadata  # lazily: `parity --help` need not import numpy/gguf

        md = Metadata.wrap(metadata, source)
        if "tokenizer.ggml.model" not in md:
            raise UsageError(
                f"{source} has no embedded tokenizer (tokenizer.ggml.model is missing)",
                fix="pass --tokenizer with the model's tokenizer.json, or convert the model with its vocabulary",
            )
        # Values of the wrong type are a malformed file (ModelFormatError), not an unsupported vocabulary.
        model = md.get_str("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            raise UsageError(
                f"{source}: tokenizer model '{model}' cannot be exported; supported: {', '.join(SUPPORTED_MODELS)}",
                fix="use the model's original tokenizer.json with --tokenizer",
            )
        # the exporter visits every token many times: one str per token here (GGUF reading keeps none)
        tokens: Sequence[str] = list(md.get_array("tokenizer.ggml.tokens", str, []))
        if not tokens:
            raise UsageError(f"{source}: tokenizer.ggml.tokens is missing or empty", fix="re-convert the model")
        n = len(tokens)
        types: Sequence[int] = md.get_array("tokenizer.ggml.token_type", int, [NORMAL] * n)
        scores: list[float] = [float(v) for v in md.get_array("tokenizer.ggml.scores", float, [0.0] * n)]
        for key, values in (("token_type", types), ("scores", scores)):
            if len(values) < n:
                raise UsageError(
                    f"{source}: tokenizer.ggml.{key} has {len(values)} entries for {n} tokens",
                    fix="re-convert the model; llama.cpp refuses this file too",
                )
        for name in ("bos", "eos", "unknown", "padding"):
            key = f"tokenizer.ggml.{name}_token_id"
            if key in md:
                md.get_int(key, min=0, gguf_types=("uint32",))
        for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"):
            md.get_bool(key, False)
        pre = md.get_str("tokenizer.ggml.pre", "default") or "default"
        merges: Sequence[str] = list(md.get_array("tokenizer.ggml.merges", str, []))
        if model == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise UsageError(
                    f"{source}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported by the exporter",
                    fix=f"use the model's original tokenizer.json; supported: {', '.join(sorted(PRE_TOKENIZERS))}",
                )
            if not merges:
                raise UsageError(f"{source}: BPE vocabulary without tokenizer.ggml.merges", fix="re-convert the model")
        return cls(model, pre, tokens, types[:n], scores[:n], merges, md)

    def key(self, name: str, default: Any = None) -> Any:
        """A `tokenizer.ggml.<name>` value."""
        return self.metadata.get(f"tokenizer.ggml.{name}", default)

    def special_id(self, name: str, default: int | None) -> int | None:
        """A special token id as llama.cpp resolves it: the GGUF key if in range, else the default if in range."""
        n = len(self.tokens)
        value = self.key(f"{name}_token_id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
            return value
        return default if default is not None and 0 <= default < n else None

    @property
    def is_spm(self) -> bool:
        """True for SentencePiece vocabularies (tokenizer model "llama"), False for byte-level BPE ("gpt2")."""
        return self.model == "llama"

    def add_bos(self) -> bool:
        """Whether llama.cpp's add_special prepends BOS: its per-type default, unless the GGUF key says otherwise."""
        default = True if self.is_spm else PRE_TOKENIZERS[self.pre].add_bos
        return bool(self.key("add_bos_token", default))

    def add_eos(self) -> bool:
        """Whether llama.cpp's add_special appends EOS (off unless the GGUF key turns it on)."""
        return bool(self.key("add_eos_token", False))

    def add_space_prefix(self) -> bool:
        """Whether llama.cpp prepends a space to each text fragment (SentencePiece only; default on)."""
        return self.is_spm and bool(self.key("add_space_prefix", True))


def token_attributes(vocab: GGUFVocab) -> list[int]:
    """Per-token llama_token_attr bits as llama.cpp computes them when it loads the vocabulary.

    Besides the GGUF token types, llama.cpp marks end-of-generation and FIM tokens as control tokens by
    their text, forces a few gpt-oss tokens to user-defined, and sets strip flags by model name; those
    rules decide which strings are split out of the prompt before tokenizing, so they are repeated here.
    """
    attrs = [TYPE_ATTR.get(t, 0) for t in vocab.types]
    ids = {text: i for i, text in enumerate(vocab.tokens)}  # later duplicates win, as in llama.cpp
    for keys, texts in _FIM_TEXTS.items():
        if any(vocab.key(f"{k}_token_id") is not None for k in keys):
            continue
        for text in sorted(texts & ids.keys()):
            attrs[ids[text]] |= ATTR_CONTROL
    eog = {ids[text] for text in _EOG_TEXTS & ids.keys()}
    for i in eog:
        attrs[i] |= ATTR_CONTROL
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if text in ids:
            attrs[ids[text]] = ATTR_USER_DEFINED
    present = {vocab.tokens[i] for i in eog}
    if "<|end|>" in present and ({"<|return|>", "<|call|>"} <= present or {"<|calls|>", "<|flush|>"} <= present):
        attrs[ids["<|end|>"]] = ATTR_USER_DEFINED
    if "</s>" in present and present & {"<|tool_response>", "<|plamo:eos|>"}:
        attrs[ids["</s>"]] = ATTR_NORMAL
    name = str(vocab.metadata.get("general.name") or "").lower()
    arch = str(vocab.metadata.get("general.architecture") or "")
    if any(s in vocab.pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in ids:
            attrs[ids["<mask>"]] |= ATTR_LSTRIP
    elif "phi-3" in name or "phi3" in name:
        for i, a in enumerate(attrs):
            if a & ATTR_PARTITIONED:
                attrs[i] |= ATTR_RSTRIP
        if "</s>" in ids:
            attrs[ids["</s>"]] |= ATTR_RSTRIP
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            if text in ids:
                attrs[ids[text]] &= ~ATTR_RSTRIP
    elif "modern-bert" in name and "[MASK]" in ids:
        attrs[ids["[MASK]"]] |= ATTR_LSTRIP
    return attrs
