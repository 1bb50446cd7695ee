"""`parity tokenizer export`: an HF `tokenizers` tokenizer.json built from a GGUF-embedded vocabulary.

The exported tokenizer reproduces llama.cpp's own tokenizer (src/llama-vocab.cpp), not the model's original
Python tokenizer, because llama.cpp is what parity checks against:

- `tokenizer.ggml.model == "gpt2"` (byte-level BPE): vocabulary and merge ranks from the GGUF, and the
  pre-tokenizer regexes llama.cpp picks for `tokenizer.ggml.pre` as a chain of HF `Split` (isolated) steps
  followed by `ByteLevel(use_regex=False)`, the shape of HF's own tokenizer.json files for those models.
  llama.cpp applies its regexes one after another to the pieces of the previous one, and so does a
  `Sequence` of `Split`s. The regexes (parity.tokenize.pretokenizers) are llama.cpp's, verbatim, except where
  its regex engine reads them differently from Oniguruma (see `as_llama_cpp_sees` there).
- `tokenizer.ggml.model == "llama"` (SentencePiece BPE): llama.cpp's SPM tokenizer merges the adjacent pair
  whose concatenation is the vocabulary entry with the highest score, leftmost first. An HF BPE model does
  the same when every split `(left, right)` of every entry is a merge, ranked by the entry's score
  (HF's `convert_slow_tokenizer.generate_merges` does this too); characters outside the vocabulary fall
  back to `<0xNN>` byte tokens. Spaces become "▁", with a "▁" prepended to every text fragment when
  `tokenizer.ggml.add_space_prefix` says so (llama.cpp prepends after every special token, not only at the
  start, and HF normalizes each fragment between added tokens separately, so the two agree).
- Tokens llama.cpp splits out of the text before tokenizing (control, user-defined and unknown tokens,
  after llama.cpp's own text-based corrections: parity.tokenize.gguf_vocab) become HF added tokens; only GGUF control tokens (type 3)
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.core.fs import atomic_write_text
from parity.errors import UsageError
from parity.tokenize.gguf_vocab import ATTR_LSTRIP, ATTR_PARTITIONED, ATTR_RSTRIP, CONTROL, GGUFVocab, token_attributes
from parity.tokenize.pretokenizers import PRE_TOKENIZERS, as_llama_cpp_sees

SPACE_MARKER = "\u2581"  # "▁", SentencePiece's stand-in for a space


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
