"""The embedded default model: a tiny deterministic llama GGUF plus its matching HF `tokenizer.json`.

`generate()` writes the same bytes on every run and every machine, so the files can be pinned by SHA-256
in `lock/models.lock.json` and rebuilt on demand instead of being downloaded. `materialize()` is what the
rest of parity calls: it reuses files that match the lock and regenerates them otherwise.

Reproducibility rules followed here:
- Random numbers come from PCG64's raw 64-bit stream, which numpy guarantees never to change, and are
  turned into weights with additions and multiplications only (no log/cos, whose results vary with the
  SIMD library), so the float32 weights are bit-identical everywhere.
- The tokenizer is trained by our own single-threaded BPE trainer (parity.tokenize.bpe) on a corpus shipped in the
  package; no dict or hash order reaches the output.
- gguf.GGUFWriter writes metadata and tensors in call order, and no timestamps or paths go into the files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

from parity.core import paths
from parity.core.fs import atomic_write_bytes, atomic_write_file, sha256_file, sha256_if_readable
from parity.errors import ModelFormatError, UsageError
from parity.tokenize import bpe

VARIANTS: tuple[str, ...] = ("f32", "f16", "q8_0")
GGUF_NAME = "model.gguf"
TOKENIZER_NAME = "tokenizer.json"
LOCK_ENV = "PARITY_MODELS_LOCK"

# Architecture of the default model. Every row length (64, 128) is a multiple of 32 so Q8_0 applies.
VOCAB_SIZE = 512
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX = 256
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
HEAD_DIM = N_EMBD // N_HEAD
BASE_SEED = 20240611

# llama.cpp maps "gpt-2" to LLAMA_VOCAB_PRE_TYPE_GPT2, whose single regex is the GPT-2 pattern that
# tokenizers' ByteLevel(use_regex=True) applies, and it neither ignores merges nor forces BOS.
TOKENIZER_PRE = "gpt-2"

_FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class GeneratedModel:
    """Paths and SHA-256 digests of one generated model variant."""

    variant: str
    gguf_path: Path
    tokenizer_path: Path
    gguf_sha256: str
    tokenizer_sha256: str


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UsageError(
            f"unknown default-model variant {variant!r}",
            fix=f"choose one of {', '.join(VARIANTS)}",
        )


@functools.cache
def trained_vocab() -> bpe.BpeVocab:
    """Return the BPE vocabulary trained on the packaged corpus (cached: training is deterministic)."""
    raw = resources.files("parity").joinpath("data/corpus.txt").read_bytes()
    # A checkout with CRLF conversion must not change the vocabulary, hence the model hashes.
    text = raw.decode("utf-8").replace("\r\n", "\n")
    return bpe.train(text, VOCAB_SIZE)


def _seed_for(name: str) -> np.random.SeedSequence:
    # Per-tensor streams keyed by name, so adding a tensor later never shifts the others' values.
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([BASE_SEED, digest])


def _random_normal(name: str, shape: tuple[int, ...], std: float) -> Float32Array:
    """Approximately normal float32 values: Irwin-Hall sum of four exact 53-bit uniforms, rescaled."""
    count = math.prod(shape)
    raw = np.random.PCG64(_seed_for(name)).random_raw(4 * count).reshape(4, count)
    uniform = (raw >> np.uint64(11)).astype(np.float64) * (2.0**-53)  # exact: 53-bit ints fit a double
    total = uniform[0] + uniform[1] + uniform[2] + uniform[3]  # mean 2, variance 4/12
    values = (total - 2.0) * (math.sqrt(3.0) * std)  # unit variance scaled to std; IEEE ops only
    result: Float32Array = values.astype(np.float32).reshape(shape)
    return result


def build_weights() -> dict[str, Float32Array]:
    """Return the float32 weights in GGUF tensor order, numpy layout `(out, in)`."""
    n_vocab = len(trained_vocab().tokens)
    n_kv = N_HEAD_KV * HEAD_DIM
    weights: dict[str, Float32Array] = {}

    def add(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        weights[name] = (_random_normal(name, shape, std) + np.float32(mean)).astype(np.float32)

    add("token_embd.weight", (n_vocab, N_EMBD), 1.0)
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        # Norm gains scatter around 1 so that an engine which ignores them shows up as a divergence.
        add(f"{prefix}.attn_norm.weight", (N_EMBD,), 0.1, mean=1.0)
        add(f"{prefix}.attn_q.weight", (N_HEAD * HEAD_DIM, N_EMBD), 1.0 / math.sqrt(N_EMBD))
        add(f"{prefix}.attn_k.weight", (n_kv, N_EMBD), 1.0 / math.sqrt(N_EMBD))
        add(f"{prefix}.attn_v.weight", (n_kv, N_EMBD), 1.0 / math.sqrt(N_EMBD))
        add(f"{prefix}.attn_output.weight", (N_EMBD, N_HEAD * HEAD_DIM), 0.5 / math.sqrt(N_EMBD))
        add(f"{prefix}.ffn_norm.weight", (N_EMBD,), 0.1, mean=1.0)
        add(f"{prefix}.ffn_gate.weight", (N_FF, N_EMBD), 1.0 / math.sqrt(N_EMBD))
        add(f"{prefix}.ffn_up.weight", (N_FF, N_EMBD), 1.0 / math.sqrt(N_EMBD))
        add(f"{prefix}.ffn_down.weight", (N_EMBD, N_FF), 0.5 / math.sqrt(N_FF))
    add("output_norm.weight", (N_EMBD,), 0.1, mean=1.0)
    # The RMS-normed final state has unit scale, so logit std ~= std * sqrt(n_embd) = 3: a real model's
    # spread, with most top-1s ahead of the runner-up by >= 0.05 (`nox -s parity` counts these "decisive positions").
    add("output.weight", (n_vocab, N_EMBD), 3.0 / math.sqrt(N_EMBD))
    return weights


def _add_metadata(writer: gguf.GGUFWriter, variant: str, vocab: bpe.BpeVocab) -> None:
    n_vocab = len(vocab.tokens)
    writer.add_name(f"parity-default-{variant}")
    writer.add_file_type(int(_FILE_TYPES[variant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    add_shape_and_vocab(
        writer,
        vocab,
        n_ctx=N_CTX,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_ff=N_FF,
        n_head=N_HEAD,
        n_head_kv=N_HEAD_KV,
        rms_eps=RMS_EPS,
        head_dim=HEAD_DIM,
        rope_base=ROPE_FREQ_BASE,
    )


def add_shape_and_vocab(
    writer: gguf.GGUFWriter,
    vocab: bpe.BpeVocab,
    *,
    n_ctx: int,
    n_embd: int,
    n_layer: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    rms_eps: float,
    head_dim: int,
    rope_base: float,
) -> None:
    """The hyperparameters and the byte-level BPE vocabulary of parity's generated models, in a fixed order
    (the files are byte-identical on every run; their hashes are in the lock)."""
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_base)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(list(vocab.tokens))
    special = set(vocab.special_tokens)
    writer.add_token_types(
        [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in vocab.tokens]
    )
    writer.add_token_merges(vocab.merge_strings)
    writer.add_bos_token_id(vocab.token_id(bpe.BOS))
    writer.add_eos_token_id(vocab.token_id(bpe.EOS))
    writer.add_pad_token_id(vocab.token_id(bpe.PAD))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _add_tensor(writer: gguf.GGUFWriter, variant: str, name: str, data: Float32Array) -> None:
    # 1-D tensors (norm gains) stay F32 in every variant, as llama.cpp's converter and quantizer keep them.
    if data.ndim == 1 or variant == "f32":
        writer.add_tensor(name, data)
    elif variant == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _write_gguf(path: Path, variant: str) -> None:
    vocab = trained_vocab()
    writer = gguf.GGUFWriter(path, "llama")
    _add_metadata(writer, variant, vocab)
    for name, data in build_weights().items():
        _add_tensor(writer, variant, name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def generate(variant: str, out_dir: Path) -> GeneratedModel:
    """Write `model.gguf` and `tokenizer.json` for `variant` ("f32", "f16" or "q8_0") into `out_dir`.

    The output is byte-identical on every run and machine. Raises UsageError for an unknown variant.
    """
    _check_variant(variant)
    out_dir = Path(out_dir)
    gguf_path = out_dir / GGUF_NAME
    tokenizer_path = out_dir / TOKENIZER_NAME
    write_model_files(out_dir, lambda tmp: _write_gguf(tmp, variant))
    return GeneratedModel(variant, gguf_path, tokenizer_path, sha256_file(gguf_path), sha256_file(tokenizer_path))


def write_model_files(out_dir: Path, write_gguf: Callable[[Path], None]) -> None:
    """Write `tokenizer.json` (the trained vocabulary) and `model.gguf` (by `write_gguf(path)`) into `out_dir`,
    each atomically (parity.core.fs): a reader never sees a half-written model. Shared with ternary_model."""
    atomic_write_bytes(Path(out_dir) / TOKENIZER_NAME, bpe.tokenizer_json(trained_vocab()).encode("utf-8"))
    atomic_write_file(Path(out_dir) / GGUF_NAME, write_gguf)


def lock_path() -> Path:
    """Return the models lock file: `$PARITY_MODELS_LOCK` if set, else `lock/models.lock.json` in the repo."""
    override = os.environ.get(LOCK_ENV)
    if override:
        return Path(override)
    return paths.PACKAGE_DIR.parent / "lock" / "models.lock.json"


def lock_name(variant: str) -> str:
    """Return the lock entry name of a variant, e.g. "default-f32"."""
    return f"default-{variant}"


def _locked_hashes(variant: str) -> tuple[str, str]:
    path = lock_path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(
            f"cannot read the models lock {path}: {exc}",
            fix=f"restore it or point {LOCK_ENV} at a valid copy",
        ) from exc
    for entry in document.get("models", []):
        if entry.get("name") == lock_name(variant):
            companions = {c.get("name"): c.get("sha256") for c in entry.get("companions", [])}
            if isinstance(entry.get("sha256"), str) and isinstance(companions.get(TOKENIZER_NAME), str):
                return entry["sha256"], companions[TOKENIZER_NAME]
    raise ModelFormatError(
        f"the models lock {path} has no complete entry {lock_name(variant)!r}",
        fix="restore lock/models.lock.json from the repository",
    )


def materialize(variant: str, root: Path) -> GeneratedModel:
    """Return the default model under `root/<variant>/`, regenerating it unless its files match the lock.

    Raises ModelFormatError if freshly generated files do not match the locked SHA-256s, which means the
    generator (or numpy/gguf/tokenizers underneath it) no longer reproduces the pinned bytes.
    """
    _check_variant(variant)
    gguf_sha, tokenizer_sha = _locked_hashes(variant)
    out_dir = Path(root) / variant
    gguf_path = out_dir / GGUF_NAME
    tokenizer_path = out_dir / TOKENIZER_NAME
    if sha256_if_readable(gguf_path) == gguf_sha and sha256_if_readable(tokenizer_path) == tokenizer_sha:
        return GeneratedModel(variant, gguf_path, tokenizer_path, gguf_sha, tokenizer_sha)
    model = generate(variant, out_dir)
    mismatched = [
        f"{name} (locked {locked[:12]}, generated {actual[:12]})"
        for name, locked, actual in (
            (GGUF_NAME, gguf_sha, model.gguf_sha256),
            (TOKENIZER_NAME, tokenizer_sha, model.tokenizer_sha256),
        )
        if locked != actual
    ]
    if mismatched:
        raise ModelFormatError(
            f"the default-model generator no longer reproduces the locked bytes of {lock_name(variant)}: "
            + ", ".join(mismatched),
            fix="check numpy/gguf/tokenizers versions and parity/models/modelgen.py, parity/tokenize/bpe.py, "
            "parity/data/corpus.txt against the lock; rewrite the lock only on purpose",
        )
    return model


def default_model(variant: str) -> tuple[Path, Path]:
    """The embedded default model of `variant`, generated (and verified against the lock) on first use."""
    m = materialize(variant, paths.cache_dir() / "models" / "default")
    return m.gguf_path, m.tokenizer_path
