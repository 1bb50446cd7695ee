"""`parity tokenizer export`: an HF `tokenizers` tokenizer.json built from a GGUF-embedded vocabulary.

The exported tokenizer reproduces llama.cpp's own tokenizer (src/llama-vocab.cpp), not the model's original
Python tokenizer, because llama.cpp is what parity checks against:

- `tokenizer.ggml.model == "gpt2"` (byte-level BPE): vocabulary and merge ranks from the GGUF, and the
  pre-tokenizer regexes llama.cpp picks for `tokenizer.ggml.pre` as a chain of HF `Split` (isolated) steps
  followed by `ByteLevel(use_regex=False)`, the shape of HF's own tokenizer.json files for those models.
  llama.cpp applies its regexes one after another to the pieces of the previous one, and so does a
  `Sequence` of `Split`s. The regexes are llama.cpp's, verbatim, except where its regex engine reads them
  differently from Oniguruma (see `as_llama_cpp_sees`).
- `tokenizer.ggml.model == "llama"` (SentencePiece BPE): llama.cpp's SPM tokenizer merges the adjacent pair
  whose concatenation is the vocabulary entry with the highest score, leftmost first. An HF BPE model does
  the same when every split `(left, right)` of every entry is a merge, ranked by the entry's score
  (HF's `convert_slow_tokenizer.generate_merges` does this too); characters outside the vocabulary fall
  back to `<0xNN>` byte tokens. Spaces become "▁", with a "▁" prepended to every text fragment when
  `tokenizer.ggml.add_space_prefix` says so (llama.cpp prepends after every special token, not only at the
  start, and HF normalizes each fragment between added tokens separately, so the two agree).
- Tokens llama.cpp splits out of the text before tokenizing (control, user-defined and unknown tokens,
  after llama.cpp's own text-based corrections) become HF added tokens; only GGUF control tokens (type 3)
  are `special`, which keeps `parity.tokenize.tokenizer` config hashes of the export and the GGUF equal.
- BOS/EOS come from a `TemplateProcessing` post-processor following llama.cpp's add_bos/add_eos defaults
  and the `tokenizer.ggml.add_bos_token`/`add_eos_token` keys.

Every other tokenizer model (bert, t5, rwkv, gemma4, ...) is refused with a UsageError.

What HF tokenizers cannot express, so the export differs from llama.cpp there (rare, and all found by the
integration tests' corpus): with parse_special=false llama.cpp also leaves unknown tokens and text-promoted
control tokens (e.g. a user-defined "</s>") in the text, while HF always splits out non-special added
tokens; tokens with strip flags (phi-3) strip only ASCII whitespace in llama.cpp but all Unicode whitespace
in HF; and in SentencePiece vocabularies, two overlapping pairs that form the same best-scoring token are
merged leftmost-first by llama.cpp but in merge-rank order by HF.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_text
from parity.errors import UsageError

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

SPACE_MARKER = "\u2581"  # "▁", SentencePiece's stand-in for a space

# --- pre-tokenizer regexes, copied verbatim from llm_tokenizer_bpe's constructor in src/llama-vocab.cpp ---
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)"
    r"|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_DEEPSEEK3_MAIN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)
_SPARK_MAIN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+"
)
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_DEEPSEEK_HAN_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_CASED = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_CASED2 = r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TEKKEN = _CASED + _CASED2 + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (
    _CASED
    + _CONTRACTIONS
    + "?"
    + _CASED2
    + _CONTRACTIONS
    + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GRANITE_EMB_MULTI = _GPT4O.replace(r"(?=[\p{L}])", r"(?=[\p{L}\p{M}])")
_YOUTU_CJK = (
    "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
    "\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
)
_YOUTU_MAIN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_EXAONE_MOE = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5_MAIN = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one `tokenizer.ggml.pre` value: its regex chain and its vocab flags."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is emitted whole (llama3, tekken, ...)
    add_bos: bool = False  # llama.cpp's add_bos default for this pre type (the GGUF key overrides it)


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_STARCODER = PreTokenizer((r"\p{N}", _GPT2))
_GPT2_PRE = PreTokenizer((_GPT2,))
_QWEN2_PRE = PreTokenizer((_QWEN2,))
_DEEPSEEK3 = PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3_MAIN))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_BLOOM_PRE = PreTokenizer((_BLOOM,))
_GPT4O_PRE = PreTokenizer((_GPT4O,))

# `tokenizer.ggml.pre` value -> llama.cpp's behaviour, as in llama_vocab::impl::load. Pre types that rely
# on llama.cpp-only code paths (kimi-k2, afmoe, tiny_aya, superbpe, chameleon, gemma4, sarvam-moe,
# whitespace) are left out and refused.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3_PRE,
    ),
    "deepseek-llm": PreTokenizer(
        ("[\r\n]", _DEEPSEEK_LLM_LETTERS, _DEEPSEEK_LLM_PUNCT, r"\s+$", _DEEPSEEK_HAN_HANGUL, r"\p{N}+")
    ),
    "deepseek-coder": PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_HAN_HANGUL, r"\p{N}")),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _DEEPSEEK3),
    "spark2_5": PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, _SPARK_MAIN, r"\p{N}")),
    "youtu": PreTokenizer((_YOUTU_CJK, _YOUTU_MAIN), ignore_merges=True),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"), _STARCODER
    ),
    **dict.fromkeys(
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ),
        _GPT2_PRE,
    ),
    "jais-2": PreTokenizer((_JAIS2,)),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"), _QWEN2_PRE
    ),
    "qwen35": PreTokenizer((_QWEN35,)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _BLOOM_PRE),
    "chatglm-bpe": PreTokenizer((_LLAMA3,)),
    **dict.fromkeys(("glm4", "glm5"), PreTokenizer((_LLAMA3,), ignore_merges=True)),
    "viking": PreTokenizer((_BLOOM, r"\p{N}")),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_PRE),
    "granite-embed-multi-97m": PreTokenizer((_GRANITE_EMB_MULTI,), ignore_merges=True),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), PreTokenizer((_BAILINGMOE,))),
    "seed-coder": PreTokenizer((_SEED_CODER,)),
    "ufakzeka": PreTokenizer((_UFAKZEKA,)),
    "grok-2": _QWEN2_PRE,
    "laguna": PreTokenizer((r"[^\n]+|[\n]+", _QWEN2)),
    "exaone-moe": PreTokenizer((_EXAONE_MOE,)),
    "minicpm5": PreTokenizer((r"\p{N}{1,3}", _MINICPM5_MAIN), ignore_merges=True),
}

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
    tokens: list[str]
    types: list[int]
    scores: list[float]
    merges: list[str]
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
        tokens: list[str] = md.get_array("tokenizer.ggml.tokens", str, [])
        if not tokens:
            raise UsageError(f"{source}: tokenizer.ggml.tokens is missing or empty", fix="re-convert the model")
        n = len(tokens)
        types: list[int] = md.get_array("tokenizer.ggml.token_type", int, [NORMAL] * n)
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
        merges: list[str] = md.get_array("tokenizer.ggml.merges", str, [])
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


def _added_tokens(vocab: GGUFVocab, vocab_ids: dict[str, int]) -> list[dict[str, Any]]:
    attrs = token_attributes(vocab)
    added = []
    for i, text in enumerate(vocab.tokens):
        if not attrs[i] & ATTR_PARTITIONED or vocab_ids.get(text) != i:
            continue
        added.append(
            {
                "id": i,
                "content": text,
                "single_word": False,
                "lstrip": bool(attrs[i] & ATTR_LSTRIP),
                "rstrip": bool(attrs[i] & ATTR_RSTRIP),
                "normalized": False,
                # Only GGUF control tokens are "special": parity's config hash counts exactly those.
                "special": vocab.types[i] == CONTROL,
            }
        )
    return added


def _template(vocab: GGUFVocab) -> dict[str, Any] | None:
    """TemplateProcessing adding BOS/EOS exactly when llama.cpp's add_special would (None: it adds nothing)."""
    ends: list[tuple[str, str, int]] = []
    # llama.cpp's default ids before the GGUF keys: 1/2 for SentencePiece vocabularies, 11/11 for BPE ones.
    for name, enabled, default in (
        ("bos", vocab.add_bos(), 1 if vocab.is_spm else 11),
        ("eos", vocab.add_eos(), 2 if vocab.is_spm else 11),
    ):
        if not enabled:
            continue
        token_id = vocab.special_id(name, default)
        if token_id is None:
            raise UsageError(
                f"tokenizer.ggml.add_{name}_token is set but the GGUF has no valid {name.upper()} token id",
                fix=f"set tokenizer.ggml.{name}_token_id, or add_{name}_token=false, in the GGUF",
            )
        ends.append((name, vocab.tokens[token_id], token_id))
    if not ends:
        return None

    def part(sequence: str, type_id: int) -> list[dict[str, Any]]:
        head = [{"SpecialToken": {"id": text, "type_id": type_id}} for name, text, _ in ends if name == "bos"]
        tail = [{"SpecialToken": {"id": text, "type_id": type_id}} for name, text, _ in ends if name == "eos"]
        return [*head, {"Sequence": {"id": sequence, "type_id": type_id}}, *tail]

    specials = {text: {"id": text, "ids": [token_id], "tokens": [text]} for _, text, token_id in ends}
    return {
        "type": "TemplateProcessing",
        "single": part("A", 0),
        "pair": part("A", 0) + part("B", 1),
        "special_tokens": dict(sorted(specials.items())),
    }


def _split_merge(merge: str, index: int) -> tuple[str, str]:
    # llama.cpp splits at the first space after the first character (a merge may start with a space).
    pos = merge.find(" ", 1)
    if pos < 0:
        raise UsageError(
            f"tokenizer.ggml.merges[{index}] = {merge!r} has no space separating its two parts",
            fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py",
        )
    return merge[:pos], merge[pos + 1 :]


def _bpe_merges(vocab: GGUFVocab, vocab_ids: dict[str, int]) -> list[tuple[str, str]]:
    """GGUF merges in rank order, checked the way HF tokenizers will check them when loading."""
    merges = []
    seen: set[tuple[str, str]] = set()
    for index, merge in enumerate(vocab.merges):
        left, right = _split_merge(merge, index)
        for part in (left, right, left + right):
            if part not in vocab_ids:
                raise UsageError(
                    f"tokenizer.ggml.merges[{index}] = {merge!r} uses {part!r}, which is not in the vocabulary",
                    fix="re-convert the model; HF tokenizers cannot load such a merge",
                )
        if (left, right) in seen:
            # llama.cpp keeps the first rank of a repeated merge, HF the last: identical only without repeats.
            raise UsageError(
                f"tokenizer.ggml.merges[{index}] = {merge!r} repeats an earlier merge",
                fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py",
            )
        seen.add((left, right))
        merges.append((left, right))
    return merges


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split (left, right) of every token whose halves are tokens, highest score of the whole first.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the token with the
    highest score; with these merges, HF BPE picks the same pair. Ties (equal scores) go to the lower token
    id, then the shorter left half, so the order is fully determined.
    """
    ids: dict[str, int] = {}
    for i, text in enumerate(tokens):
        ids[text] = i
    ranked = []
    for i, text in enumerate(tokens):
        if ids[text] != i:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, cut))
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


# Non-ASCII code points llama.cpp counts as whitespace (unicode_set_whitespace in src/unicode-data.cpp).
_UNICODE_SPACES = "".join(
    map(chr, (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000))
)


def as_llama_cpp_sees(pattern: str) -> str:
    r"""Rewrite one of llama.cpp's regexes so that Oniguruma (HF) matches what llama.cpp's engine matches.

    unicode_regex_split runs std::regex on a transformed text: every non-ASCII whitespace code point is
    replaced by U+000B before matching (so it matches \s but no literal range such as [\u3000-\u3002] or
    [\u0800-\u4e00]), and \p{..} classes are matched against a single category per code point with one
    "letter" category (so \p{Lu}, \p{Ll}, \p{Lt}, \p{Lm} and \p{Lo} all mean \p{L}).
    """
    pattern = re.sub(r"\\p\{L[ultmo]\}", r"\\p{L}", pattern)
    out: list[str] = []
    start = -1  # index in `out` where the current bracket class's content begins
    escaped = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "[" and start < 0:
            start = len(out) + 1
        elif ch == "]" and start >= 0:
            content = "".join(out[start:])
            literal = not content.startswith("^") and any(ord(c) > 0x7F for c in content)
            if literal and re.search(f"[{content}]", _UNICODE_SPACES):
                out.append(f"&&[^{_UNICODE_SPACES}]")  # Oniguruma's class intersection
            start = -1
        out.append(ch)
    return "".join(out)


def _split(pattern: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": as_llama_cpp_sees(pattern)}, "behavior": "Isolated", "invert": False}


def build_document(vocab: GGUFVocab) -> dict[str, Any]:
    """The tokenizer.json document (a dict in the field order HF tokenizers writes)."""
    vocab_ids: dict[str, int] = {}
    for i, text in enumerate(vocab.tokens):
        vocab_ids[text] = i  # a repeated string keeps its last id, as llama.cpp's token_to_id does
    template = _template(vocab)
    if vocab.is_spm:
        replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARKER}
        steps = [{"type": "Prepend", "prepend": SPACE_MARKER}] if vocab.add_space_prefix() else []
        normalizer: dict[str, Any] | None = {"type": "Sequence", "normalizers": [*steps, replace_space]}
        pre_tokenizer: dict[str, Any] | None = None
        post_processor = template
        decoders: list[dict[str, Any]] = [
            {"type": "Replace", "pattern": {"String": SPACE_MARKER}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]
        if vocab.add_space_prefix():
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        decoder: dict[str, Any] = {"type": "Sequence", "decoders": decoders}
        unk_id = vocab.special_id("unknown", 0)
        merges = spm_merges(vocab.tokens, vocab.scores)
        ignore_merges = False
    else:
        pre = PRE_TOKENIZERS[vocab.pre]
        byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        normalizer = None
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [*(_split(r) for r in pre.regexes), {"type": "ByteLevel", **byte_level}],
        }
        trim = {"type": "ByteLevel", **byte_level}
        post_processor = trim if template is None else {"type": "Sequence", "processors": [trim, template]}
        decoder = {"type": "ByteLevel", **byte_level}
        unk_id = None
        merges = _bpe_merges(vocab, vocab_ids)
        ignore_merges = pre.ignore_merges
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(vocab, vocab_ids),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None if unk_id is None else vocab.tokens[unk_id],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": vocab.is_spm,
            "byte_fallback": vocab.is_spm,
            "ignore_merges": ignore_merges,
            "vocab": vocab_ids,
            "merges": merges,
        },
    }


def render(document: dict[str, Any]) -> str:
    """Serialize deterministically: 2-space indent, but one line per vocabulary entry and per merge.

    A fully indented file would spend four lines on every merge (tens of MB for a 262k vocabulary).
    """
    model = document["model"]
    marker = "\x00parity-{}\x00"
    body = dict(document, model=dict(model, vocab=marker.format("vocab"), merges=marker.format("merges")))
    text = json.dumps(body, indent=2, ensure_ascii=False)
    enc = json.JSONEncoder(ensure_ascii=False).encode
    vocab_lines = ",\n".join(f"      {enc(k)}: {v}" for k, v in sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merge_lines = ",\n".join(f"      [{enc(left)}, {enc(right)}]" for left, right in model["merges"])
    for name, lines in (("vocab", vocab_lines), ("merges", merge_lines)):
        opening, closing = ("{", "}") if name == "vocab" else ("[", "]")
        block = f"{opening}\n{lines}\n    {closing}" if lines else f"{opening}{closing}"
        text = text.replace(json.dumps(marker.format(name)), block, 1)
    return text + "\n"


def export_metadata(metadata: dict[str, Any], source: str = "GGUF") -> str:
    """tokenizer.json text for already-read GGUF metadata; `source` names the file in error messages."""
    return render(build_document(GGUFVocab.from_metadata(metadata, source)))


def export_from_gguf(gguf_path: Path) -> str:
    """tokenizer.json text (deterministic bytes) reproducing llama.cpp's tokenizer for `gguf_path`."""
    from parity.gguf.reader import open_gguf

    return export_metadata(open_gguf(gguf_path).metadata, str(gguf_path))


@dataclass(frozen=True)
class ExportResult:
    """What `write_tokenizer` wrote, and whether its config hash proves it came from the GGUF."""

    path: Path
    sha256: str
    vocab: GGUFVocab
    config_hash: str  # parity.tokenize.tokenizer's hash of the written tokenizer.json
    gguf_config_hash: str  # the same hash of the GGUF's embedded vocabulary

    @property
    def hashes_match(self) -> bool:
        """True when the written tokenizer.json provably carries the GGUF's vocabulary."""
        return self.config_hash == self.gguf_config_hash


def write_tokenizer(gguf_path: Path, out_path: Path) -> ExportResult:
    """Export the tokenizer embedded in `gguf_path` to `out_path` (atomically: readers never see half a file)."""
    from parity.gguf.reader import open_gguf
    from parity.tokenize.tokenizer import _hf_config_hash, gguf_config_hash

    if out_path.is_dir():
        raise UsageError(f"output path {out_path} is a directory", fix="pass a file name such as tokenizer.json")
    metadata = open_gguf(gguf_path).metadata
    vocab = GGUFVocab.from_metadata(metadata, str(gguf_path))
    document = build_document(vocab)
    text = render(document)
    atomic_write_text(out_path, text)
    return ExportResult(
        path=out_path,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        vocab=vocab,
        config_hash=_hf_config_hash(document),
        gguf_config_hash=gguf_config_hash(metadata),
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add `tokenizer export --from-gguf MODEL -o OUT` to the `parity` command's subparsers."""
    p_tok = subparsers.add_parser("tokenizer", help="tokenizer tools")
    tsub = p_tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p_export = tsub.add_parser(
        "export", help="write a tokenizer.json that tokenizes like llama.cpp does with a GGUF's own vocabulary"
    )
    p_export.add_argument("--from-gguf", required=True, metavar="MODEL", help="GGUF model whose vocabulary to export")
    p_export.add_argument("-o", "--output", required=True, metavar="OUT", help="tokenizer.json to write")
    return p_tok


def run(args: argparse.Namespace) -> int:
    """Run a `parity tokenizer ...` action; returns the exit code."""
    if args.tokenizer_command != "export":
        raise UsageError(f"unknown tokenizer action '{args.tokenizer_command}'", fix="use: parity tokenizer export")
    result = write_tokenizer(Path(args.from_gguf), Path(args.output))
    vocab = result.vocab
    kind = "llama (SentencePiece BPE)" if vocab.is_spm else f"gpt2 (byte-level BPE), pre-tokenizer {vocab.pre}"
    print(f"{result.path}  sha256 {result.sha256}  ({len(vocab.tokens)} tokens, {kind})")
    if result.hashes_match:
        print(f"config hash {result.config_hash} (equal to the GGUF vocabulary's)")
    else:
        why = (
            "its merges are derived from the SentencePiece scores, and the GGUF stores none"
            if vocab.is_spm
            else "the GGUF repeats a token string, and tokenizer.json maps each string to one id"
        )
        print(f"config hash {result.config_hash} differs from the GGUF vocabulary's {result.gguf_config_hash}: {why}")
    return 0
