"""Exported tokenizer.json files against the real llama.cpp: its own test vectors, and the bridge on varied text.

For every vocabulary llama.cpp ships in models/ (byte-level BPE with several pre-tokenizers, and
SentencePiece), the export must reproduce llama.cpp's ids: the .inp/.out vectors (add_special=false,
parse_special=false), plus a corpus of unicode, whitespace runs, digits, code and special-token text
tokenized by the pinned llama.cpp through parity's bridge. Every supported pre-tokenizer name is checked
by swapping it into the gpt-2 vocabulary. Gemma 3 (262k SentencePiece vocabulary) needs PARITY_GEMMA_GGUF.

parse_special=false is imitated with HF's `encode_special_tokens`, which skips only `special` added tokens;
tokens llama.cpp treats as control but the GGUF does not type as control (unknown tokens, end-of-turn
markers recognised by their text) stay non-special to keep config hashes equal, so strings containing
them are left out of the parse_special=false comparison.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.backends.worker import RemoteModel, Worker
from parity.gguf.reader import open_gguf
from parity.tokenize.export import build_document, export_metadata, render
from parity.tokenize.gguf_vocab import ATTR_CONTROL, ATTR_UNKNOWN, GGUFVocab, token_attributes
from parity.tokenize.pretokenizers import PRE_TOKENIZERS, PreTokenizer
from parity.tokenize.tokenizer import HFTokenizer, gguf_config_hash
from tests.integration.conftest import locked_gemma

pytestmark = pytest.mark.compile

# One vocabulary per distinct llama.cpp code path: GPT-2 regex, llama3/qwen2/qwen35 hand-written splitters,
# std::regex chains (deepseek, falcon, starcoder), SentencePiece with and without name-based strip rules.
VOCABS = [
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "starcoder",
    "llama-spm",
    "phi-3",
]
SEPARATOR = "\n__ggml_vocab_test__\n"
FIXED = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    " \t \n",
    "Hello world",
    " Hello world",
    "Hello  world  ",
    "What is 2+2?",
    "1234567890 12 123 1234 12345 3.14159 1,000,000 0x1F",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }\r\n",
    "I'm can't won't they'll we've she'd it's DON'T I'M",
    "h\u00e9llo w\u00f6rld caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u00f1and\u00fa",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
    "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c\u3001\u30ab\u30bf\u30ab\u30ca",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u8fd9\u662f\u4e2d\u6587\u3002",
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7 \u2728",
    "zero\u200bwidth\u200djoiner",
    "nbsp\u00a0here\u3000ideographic",
    "combining e\u0301 a\u0308 o\u0303",
    "tabs\tand\vvertical\ffeed\rreturn",
    "\u2028line\u2029para",
    "\ufb01 ligature \uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \uff11\uff12\uff13",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "<s>hello</s>",
    " <s> x </s> ",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<unk>",
    "<pad><mask>",
    "[multimodal] <table><tr><td>x</td></tr></table>",
    "<|system|>\nsys<|end|>\n<|user|>\nq<|end|>\n<|assistant|>",
    "   leading and trailing   ",
    "a\n\nb\n\n\nc",
    "a" * 44,
    "        x",
    "\n \n \n",
    "x \n y",
    "$100 + 5% = ^^ ~~ || `code` <= >=",
    "!!!???...,,,;;;:::",
    "'s 's 'S 'Re 'LL",
    "\u2581 already \u2581\u2581 marked",
    "https://example.com/path?q=1&r=2#frag",
    "C:\\Users\\name\\file.txt",
    "\u0661\u0662\u0663 \u0966\u0967\u0968 \u0e51\u0e52\u0e53 \u216b \u00bd \u00b2",
]
_POOL = [
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    *" \t\n\r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    *"\u00e9\u00fc\u00f1\u00e7\u00f8\u00e5\u00df\u0416\u0436\u03a9\u03bb\u4e2d\u6587\u65e5\u672c\ud55c\uad6d\uc5b4",
    *"\u0626\u0627\u0905\u0906\U0001f642\U0001f680\u200d\u0301\u00a0\u3000\u2003\u2028\x85\u3001",
    *("  ", "   ", "\n\n", "<s>", "</s>", "<|endoftext|>", "<start_of_turn>", "'s", "'ll", "123", "\u2581"),
]


def corpus(extra: list[str], n_random: int, seed: int) -> list[str]:
    """Fixed hard cases, the given strings, and seeded random mixtures of scripts, spaces and markup."""
    rng = random.Random(seed)
    randoms = ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 40))) for _ in range(n_random)]
    return [*FIXED, *extra, *randoms]


def read_vectors(models: Path, vocab: str) -> tuple[list[str], list[list[int]]]:
    """llama.cpp's .inp/.out test vectors, parsed as tests/test-tokenizer-0.cpp does."""
    raw = (models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8")
    inputs = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):
        inputs.pop()
    lines = (models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(lines), f"{vocab}: {len(inputs)} inputs but {len(lines)} output lines"
    return inputs, [[int(t) for t in line.split()] for line in lines]


class Exported:
    """A GGUF vocabulary exported to tokenizer.json and loaded through parity's own HFTokenizer."""

    def __init__(self, gguf_path: Path, out_dir: Path) -> None:
        self.gguf_path = gguf_path
        self.metadata = open_gguf(gguf_path).metadata
        self.vocab = GGUFVocab.from_metadata(self.metadata, str(gguf_path))
        self.document = build_document(self.vocab)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = out_dir / f"{gguf_path.stem}.tokenizer.json"
        self.json_path.write_text(render(self.document), encoding="utf-8")
        self.hf = HFTokenizer.load(self.json_path)
        attrs = token_attributes(self.vocab)
        added = self.document["added_tokens"]
        # Split out by HF even when special tokens are not parsed (see the module docstring).
        self.unskippable = [
            a["content"] for a in added if not a["special"] and attrs[a["id"]] & (ATTR_CONTROL | ATTR_UNKNOWN)
        ]
        # llama.cpp strips only ASCII whitespace next to an lstrip/rstrip token, HF all Unicode whitespace.
        self.strip_hazards = [
            re.compile(re.escape(a["content"]) + r"[\t\n\v\f\r ]*[^\S\t\n\v\f\r ]") for a in added if a["rstrip"]
        ] + [re.compile(r"[^\S\t\n\v\f\r ][\t\n\v\f\r ]*" + re.escape(a["content"])) for a in added if a["lstrip"]]

    def encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self.hf.tok.encode_special_tokens = not parse_special
        return self.hf.encode(text, add_special)

    def comparable(self, text: str, parse_special: bool) -> bool:
        """False for the documented cases where HF tokenizers cannot express llama.cpp's behaviour."""
        if any(p.search(text) for p in self.strip_hazards):
            return False
        return parse_special or not any(t in text for t in self.unskippable)


@pytest.fixture(scope="module")
def models(llama_plan: build.BuildPlan) -> Path:
    d = Path(build.read_receipt(llama_plan)["source"]["path"]) / "models"
    assert d.is_dir(), f"{d} missing: the pinned llama.cpp source ships models/ggml-vocab-*.gguf"
    return d


@pytest.fixture(scope="module")
def worker(llama_plan: build.BuildPlan) -> Iterator[Worker]:
    with Worker("llama", llama_plan.bridge_path) as w:
        yield w


@pytest.fixture(scope="module")
def exported(models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Exports made on first use and shared by the tests of this module (reading a GGUF vocabulary is slow)."""

    class Cache(dict[str, Exported]):
        def __missing__(self, vocab: str) -> Exported:
            self[vocab] = Exported(models / f"ggml-vocab-{vocab}.gguf", tmp_path_factory.mktemp("export"))
            return self[vocab]

    return Cache()


def compare_with_llama(worker: Worker, ex: Exported, strings: list[str]) -> dict[tuple[bool, bool], list[str]]:
    """Tokenize every comparable string both ways for all four add_special/parse_special combinations."""
    model = RemoteModel(worker, str(ex.gguf_path), BackendParams(vocab_only=1))
    failures: dict[tuple[bool, bool], list[str]] = {}
    try:
        for add_special in (True, False):
            for parse_special in (True, False):
                bad = failures.setdefault((add_special, parse_special), [])
                for text in strings:
                    if not ex.comparable(text, parse_special):
                        continue
                    ours = ex.encode(text, add_special, parse_special)
                    theirs = model.tokenize(text, add_special, parse_special)
                    if ours != theirs:
                        bad.append(f"{text!r}: tokenizer.json {ours[:16]} vs llama.cpp {theirs[:16]}")
    finally:
        model.close()
    return failures


@pytest.mark.parametrize("vocab", VOCABS)
def test_llama_cpp_test_vectors(models: Path, exported: dict[str, Exported], vocab: str) -> None:
    inputs, outputs = read_vectors(models, vocab)
    ex = exported[vocab]
    wrong = [
        f"{text!r}: {ex.encode(text, False, False)} != {want}"
        for text, want in zip(inputs, outputs, strict=True)
        if ex.encode(text, False, False) != want
    ]
    assert not wrong, f"{len(wrong)}/{len(inputs)} vectors differ:\n" + "\n".join(wrong[:10])


@pytest.mark.parametrize("vocab", VOCABS)
def test_config_hash_proves_the_source(exported: dict[str, Exported], vocab: str) -> None:
    ex = exported[vocab]
    embedded = gguf_config_hash(ex.metadata)
    # SentencePiece GGUFs store scores, not merges: their derived merges are left out of the hash on both sides.
    assert ex.hf.config_hash == embedded
    if ex.vocab.is_spm:
        assert ex.document["model"]["byte_fallback"] and ex.document["model"]["merges"]


@pytest.mark.parametrize("vocab", VOCABS)
def test_agrees_with_llama_cpp_on_varied_text(
    models: Path, exported: dict[str, Exported], worker: Worker, vocab: str
) -> None:
    inputs, _ = read_vectors(models, vocab)
    strings = corpus(inputs, 300, seed=sum(map(ord, vocab)))
    failures = compare_with_llama(worker, exported[vocab], strings)
    report = {k: v for k, v in failures.items() if v}
    assert not report, "\n".join(
        f"add_special={a} parse_special={p}: {len(v)} differ, e.g.\n  " + "\n  ".join(v[:5])
        for (a, p), v in report.items()
    )


def _write_vocab_only(path: Path, metadata: dict[str, Any], pre: str) -> None:
    """A vocabulary-only GGUF (gpt2 architecture) with `metadata`'s vocabulary and another pre-tokenizer name."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count"):
        w.add_uint32(f"gpt2.{key}", 64)
    w.add_float32("gpt2.attention.layer_norm_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(metadata["tokenizer.ggml.tokens"])
    w.add_token_types(metadata["tokenizer.ggml.token_type"])
    w.add_token_merges(metadata["tokenizer.ggml.merges"])
    w.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_supported_pre_tokenizer(
    models: Path, exported: dict[str, Exported], worker: Worker, tmp_path: Path
) -> None:
    """Each pre-tokenizer name the exporter accepts, swapped into the gpt-2 vocabulary, matches llama.cpp."""
    metadata = exported["gpt-2"].metadata
    inputs = read_vectors(models, "qwen2")[0] + read_vectors(models, "deepseek-llm")[0]
    strings = corpus(inputs, 150, seed=5)
    groups: dict[PreTokenizer, list[str]] = {}  # names with identical llama.cpp behaviour are checked once
    for name, settings in PRE_TOKENIZERS.items():
        groups.setdefault(settings, []).append(name)
    problems = []
    for names in groups.values():
        pre = names[0]
        path = tmp_path / f"vocab-{pre}.gguf"
        _write_vocab_only(path, metadata, pre)
        json_path = tmp_path / f"{pre}.tokenizer.json"
        json_path.write_text(export_metadata(dict(metadata, **{"tokenizer.ggml.pre": pre})), encoding="utf-8")
        tok = HFTokenizer.load(json_path)
        model = RemoteModel(worker, str(path), BackendParams(vocab_only=1))
        try:
            bad = [t for t in strings if tok.encode(t, True) != model.tokenize(t, True, True)]
        finally:
            model.close()
        if bad:
            problems.append(f"{pre} (also {', '.join(names[1:]) or '-'}): {len(bad)} differ, e.g. {bad[:3]!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.model
def test_gemma3_270m(worker: Worker, models: Path, tmp_path: Path) -> None:
    """Gemma 3's 262k SentencePiece vocabulary: no space prefix, thousands of control and user-defined tokens."""
    path = locked_gemma()
    ex = Exported(Path(path), tmp_path)
    assert ex.vocab.is_spm and not ex.vocab.add_space_prefix() and len(ex.vocab.tokens) == 262144
    inputs = [s for v in ("llama-spm", "qwen2", "deepseek-llm", "llama-bpe") for s in read_vectors(models, v)[0]]
    failures = compare_with_llama(worker, ex, corpus(inputs, 400, seed=3))
    report = {k: v for k, v in failures.items() if v}
    assert not report, "\n".join(f"{k}: {len(v)} differ, e.g.\n  " + "\n  ".join(v[:5]) for k, v in report.items())
