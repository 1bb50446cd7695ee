"""A tiny synthetic ternary `bitnet` model, and its conversion by each engine's OWN quantizer.

`generate("f16" | "f32", dir)` writes the same bytes on every run (the rules of parity.models.modelgen: PCG64's raw
stream, integer/IEEE-only arithmetic, gguf-py writing in call order, no paths or timestamps). Every matmul
weight is alpha * t with t in {-1, 0, +1} and one alpha per tensor of the form m/1024, exactly representable
in f16 and f32, so every ternary format can store it EXACTLY: I2_S keeps alpha as its per-tensor scale, TQ2_0
and TQ1_0 as each block's f16 absmax. All row lengths are multiples of 256 (TQ blocks; I2_S needs 128).
The token embedding (tied to the output head) and the norms are ordinary F16/F32 values.

The native formats come from the engines' quantizers, built from the pinned sources (parity.backends.quantizer):
bitnet.cpp -> I2_S, llama.cpp -> TQ2_0 and TQ1_0, always single-threaded (bitnet.cpp's I2_S quantizer
silently corrupts weights with more threads; see parity.gguf.ternary) and with the embedding kept F16 (mainline
would write a tied embedding as Q6_K). `verify()` then decodes every tensor of the result and requires it to
equal the F16 source exactly, with the expected type per tensor.

Hashes live in lock/models.lock.json under the top-level key "ternary" (entries shaped like the synthetic
"models" entries): parity.models.fetch reads only "models" and cannot generate these, so they stay out of its list.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from parity.core.fs import atomic_write_file, atomic_write_json, sha256_file, sha256_if_readable
from parity.errors import BackendUnavailable, ModelFormatError, UsageError
from parity.gguf import ternary
from parity.models.modelgen import GeneratedModel, add_shape_and_vocab, lock_path, trained_vocab, write_model_files
from parity.tokenize import bpe

GENERATED: tuple[str, ...] = ("f32", "f16")
# native format -> (backend whose llama-quantize writes it, llama-quantize type name, ggml type id)
QUANTIZED: dict[str, tuple[str, str, int]] = {
    "i2_s": ("bitnet", "I2_S", int(ternary.ForkType.I2_S)),
    "tq2_0": ("llama", "TQ2_0", int(gguf.GGMLQuantizationType.TQ2_0)),
    "tq1_0": ("llama", "TQ1_0", int(gguf.GGMLQuantizationType.TQ1_0)),
}
VARIANTS: tuple[str, ...] = (*GENERATED, *QUANTIZED)
# What each backend runs natively: the lane's file when the run selects the ternary family.
NATIVE: dict[str, str] = {"bitnet": "i2_s", "llama": "tq2_0"}
# `--variant` values of `parity run` (and PARITY_VARIANT for parity-both): "ternary" gives every lane its
# backend's native format (NATIVE) while numpy reads the F16 source, which decodes to the same weights;
# "ternary-<format>" gives every lane (and numpy) that one file.
FAMILY = "ternary"
RUN_VARIANTS: tuple[str, ...] = (FAMILY, *(f"{FAMILY}-{v}" for v in VARIANTS))
GGUF_NAME = "model.gguf"
TOKENIZER_NAME = "tokenizer.json"
PROVENANCE_NAME = "quantize.json"
LOCK_KEY = "ternary"

N_EMBD = 256
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 512
N_CTX = 256
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
BASE_SEED = 20241017
MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Optional per-matmul `.scale` tensors (both engines multiply after the matmul): two of them, so that the
# scale path is exercised without every matmul depending on it.
SCALES = {"blk.1.attn_q.scale": 1.25, "blk.1.ffn_down.scale": 0.8125}

Float32Array = npt.NDArray[np.float32]


# One variant on disk: GGUF + tokenizer.json and their SHA-256s (the same record as the default model's).
TernaryModel = GeneratedModel


def check_variant(variant: str) -> None:
    """UsageError for an unknown ternary variant."""
    if variant not in VARIANTS:
        raise UsageError(f"unknown ternary-model variant {variant!r}", fix=f"choose one of {', '.join(VARIANTS)}")


# ---------------------------------------------------------------------------------------------------
# Generation


def _stream(name: str, count: int) -> npt.NDArray[np.uint64]:
    # Per-tensor streams keyed by name: adding a tensor never shifts the others' values.
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.PCG64(np.random.SeedSequence([BASE_SEED, digest])).random_raw(count)


def _normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> Float32Array:
    """Irwin-Hall sum of four exact 53-bit uniforms, rescaled (IEEE ops only: bit-identical everywhere)."""
    count = math.prod(shape)
    raw = _stream(name, 4 * count).reshape(4, count)
    uniform = (raw >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    values = (uniform.sum(axis=0) - 2.0) * (math.sqrt(3.0) * std) + mean
    out: Float32Array = values.astype(np.float32).reshape(shape)
    return out


def ternary_alpha(name: str, fan_in: int) -> float:
    """The tensor's ternary magnitude m/1024 (exact in f16), near 1/sqrt(2/3 * fan_in) so outputs keep unit scale."""
    target = 1024.0 / math.sqrt(2.0 / 3.0 * fan_in)  # two thirds of the weights are non-zero
    spread = int(_stream(name + "#alpha", 1)[0] % np.uint64(17)) - 8  # -8..8, deterministic per tensor
    return (round(target) + spread) / 1024.0


def ternary_values(name: str, shape: tuple[int, ...]) -> npt.NDArray[np.int8]:
    """Uniform draws from {-1, 0, +1}: floor(3 * u) - 1 with u the top 32 bits of each raw value."""
    raw = _stream(name, math.prod(shape))
    t = ((raw >> np.uint64(32)) * np.uint64(3)) >> np.uint64(32)  # 0, 1, 2: exact integer arithmetic
    return (t.astype(np.int8) - 1).reshape(shape)


def build_weights() -> dict[str, Float32Array]:
    """The float32 weights in GGUF tensor order, numpy layout (out, in); matmul weights are alpha * ternary."""
    n_vocab = len(trained_vocab().tokens)
    kv = N_HEAD_KV * HEAD_DIM
    shapes = {
        "attn_q": (N_EMBD, N_EMBD),
        "attn_k": (kv, N_EMBD),
        "attn_v": (kv, N_EMBD),
        "attn_output": (N_EMBD, N_EMBD),
        "ffn_gate": (N_FF, N_EMBD),
        "ffn_up": (N_FF, N_EMBD),
        "ffn_down": (N_EMBD, N_FF),
    }
    weights: dict[str, Float32Array] = {}
    # Logit std ~= std * sqrt(n_embd) * |output_norm| ~= 3: a real model's spread. Rounded through f16 so that
    # the F32 and F16 variants (and every quantized one) hold exactly the same weights.
    embd = _normal("token_embd.weight", (n_vocab, N_EMBD), 0.1875)
    weights["token_embd.weight"] = embd.astype(np.float16).astype(np.float32)
    for layer in range(N_LAYER):
        p = f"blk.{layer}"
        weights[f"{p}.attn_norm.weight"] = _normal(f"{p}.attn_norm.weight", (N_EMBD,), 0.1, 1.0)
        for kind in MATMULS:
            name = f"{p}.{kind}.weight"
            alpha = np.float32(ternary_alpha(name, shapes[kind][1]))
            weights[name] = ternary_values(name, shapes[kind]).astype(np.float32) * alpha
            if f"{p}.{kind}.scale" in SCALES:
                weights[f"{p}.{kind}.scale"] = np.array([SCALES[f"{p}.{kind}.scale"]], dtype=np.float32)
            if kind == "attn_v":
                weights[f"{p}.attn_sub_norm.weight"] = _normal(f"{p}.attn_sub_norm.weight", (N_EMBD,), 0.1, 1.0)
            if kind == "attn_output":
                weights[f"{p}.ffn_norm.weight"] = _normal(f"{p}.ffn_norm.weight", (N_EMBD,), 0.1, 1.0)
            if kind == "ffn_up":
                weights[f"{p}.ffn_sub_norm.weight"] = _normal(f"{p}.ffn_sub_norm.weight", (N_FF,), 0.1, 1.0)
    weights["output_norm.weight"] = _normal("output_norm.weight", (N_EMBD,), 0.1, 1.0)
    return weights


def _add_metadata(writer: gguf.GGUFWriter, variant: str, vocab: bpe.BpeVocab) -> None:
    writer.add_name(f"parity-ternary-{variant}")
    file_type = gguf.LlamaFileType.ALL_F32 if variant == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(len(vocab.tokens))
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


def _write_gguf(path: Path, variant: str) -> None:
    writer = gguf.GGUFWriter(path, "bitnet")
    _add_metadata(writer, variant, trained_vocab())
    for name, data in build_weights().items():
        # 1-D tensors (norms, scales) stay F32 in every variant, as converters and quantizers keep them.
        writer.add_tensor(name, data if data.ndim == 1 or variant == "f32" else data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def generate(variant: str, out_dir: Path) -> TernaryModel:
    """Write `model.gguf` + `tokenizer.json` of a generated variant ("f32" or "f16"); byte-identical every run."""
    if variant not in GENERATED:
        raise UsageError(
            f"ternary variant {variant!r} is not generated but quantized by an engine",
            fix=f"generate one of {', '.join(GENERATED)}; use materialize() for {', '.join(QUANTIZED)}",
        )
    out_dir = Path(out_dir)
    gguf_path, tok_path = out_dir / GGUF_NAME, out_dir / TOKENIZER_NAME
    write_model_files(out_dir, lambda tmp: _write_gguf(tmp, variant))
    return TernaryModel(variant, gguf_path, tok_path, sha256_file(gguf_path), sha256_file(tok_path))


# ---------------------------------------------------------------------------------------------------
# Verification of engine-quantized files


def expected_type(name: str, fmt: str, source_type: int) -> int:
    """The ggml type a correctly quantized `fmt` file stores for tensor `name`: ternary for matmul weights,
    unchanged for everything else (the embedding stays F16, norms and scales F32)."""
    is_matmul = name.startswith("blk.") and name.endswith(".weight") and name.split(".")[2] in MATMULS
    return QUANTIZED[fmt][2] if is_matmul else source_type


def verify(quantized: Path, source: Path, fmt: str) -> None:
    """Raise ModelFormatError unless every tensor of `quantized` decodes exactly to the ternary `source`.

    Checks the tensor set, each tensor's type (a silent fallback such as Q4_0 or a Q6_K embedding is named)
    and every decoded value; an I2_S mismatch is diagnosed (parity.gguf.ternary.diagnose_i2_s), which names a
    multi-threaded bitnet.cpp quantizer when that is the cause.
    """
    from parity.gguf.dequant import dequantize
    from parity.gguf.reader import open_gguf

    q, s = open_gguf(quantized), open_gguf(source)
    if set(q.tensors) != set(s.tensors):
        diff = sorted(set(q.tensors) ^ set(s.tensors))
        raise ModelFormatError(
            f"{quantized}: tensor set differs from the ternary source {source} (e.g. '{diff[0]}')",
            fix="re-quantize from the source with parity's quantize step",
        )
    for name, st in s.tensors.items():
        qt = q.tensors[name]
        want = expected_type(name, fmt, st.ggml_type)
        if qt.ggml_type != want:
            raise ModelFormatError(
                f"{quantized}: tensor '{name}' is stored as {qt.type_name}, expected {ternary.type_name(want)} "
                f"for a {fmt.upper()} conversion (a quantizer fallback or an unwanted embedding type)",
                fix="row lengths must be multiples of 256 for TQ (128 for I2_S); keep the embedding with "
                "--token-embedding-type f16 --output-tensor-type f16",
            )
        ref = dequantize(st)
        got = dequantize(qt)
        if not np.array_equal(got, ref):
            if qt.ggml_type == ternary.ForkType.I2_S and ref.ndim == 2:
                why = ternary.diagnose_i2_s(qt.data, ref)
            else:
                rows = np.flatnonzero(np.any(got.reshape(ref.shape[0], -1) != ref.reshape(ref.shape[0], -1), axis=1))
                why = f"{rows.size} of {ref.shape[0]} rows differ (first: row {int(rows[0])})"
            raise ModelFormatError(
                f"{quantized}: tensor '{name}' ({qt.type_name}) does not decode to the ternary source: {why}",
                fix="re-quantize single-threaded (llama-quantize SRC DST TYPE 1), as parity's quantize step does",
            )


# ---------------------------------------------------------------------------------------------------
# The lock and materialization


def lock_name(variant: str) -> str:
    """The lock entry name of a variant, e.g. "ternary-i2_s"."""
    return f"ternary-{variant}"


def _lock_entries() -> dict[str, dict[str, Any]]:
    path = lock_path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(
            f"cannot read the models lock {path}: {exc}", fix="restore lock/models.lock.json"
        ) from exc
    return {e["name"]: e for e in document.get(LOCK_KEY, []) if isinstance(e, dict) and "name" in e}


def _check_lock(model: TernaryModel, entries: dict[str, dict[str, Any]]) -> None:
    entry = entries.get(lock_name(model.variant))
    if entry is None:
        raise ModelFormatError(
            f"the models lock {lock_path()} has no entry {lock_name(model.variant)!r} under '{LOCK_KEY}'",
            fix="restore lock/models.lock.json from the repository",
        )
    if entry.get("sha256") != model.gguf_sha256:
        raise ModelFormatError(
            f"{model.gguf_path} (sha256 {model.gguf_sha256[:12]}) does not match the locked "
            f"{lock_name(model.variant)} ({str(entry.get('sha256'))[:12]})",
            fix="check the generator / quantizer source against the lock; rewrite the lock only on purpose",
        )


def materialize(variant: str, root: Path, *, verbose: bool = False, repair: bool = True) -> TernaryModel:
    """The ternary model `variant` under root/<variant>/: reused when it matches the lock, else regenerated, or
    quantized by its engine's pinned llama-quantize (built on first use unless `repair` is off) and verified
    against the F16 source."""
    check_variant(variant)
    out_dir = Path(root) / variant
    gguf_path, tok_path = out_dir / GGUF_NAME, out_dir / TOKENIZER_NAME
    entries = _lock_entries()
    locked = entries.get(lock_name(variant), {}).get("sha256")
    have = sha256_if_readable(gguf_path)
    if variant in GENERATED:
        if have is not None and have == locked and tok_path.is_file():
            tok_sha = sha256_if_readable(tok_path) or ""
            return TernaryModel(variant, gguf_path, tok_path, have, tok_sha)
        model = generate(variant, out_dir)
    else:
        source = materialize("f16", root, verbose=verbose)
        if have is None or have != locked or not (out_dir / PROVENANCE_NAME).is_file():
            quantize(source, variant, out_dir, verbose=verbose, repair=repair)
        verify(gguf_path, source.gguf_path, variant)
        model = TernaryModel(
            variant, gguf_path, source.tokenizer_path, sha256_if_readable(gguf_path) or "", source.tokenizer_sha256
        )
    _check_lock(model, entries)
    return model


def quantize(source: TernaryModel, fmt: str, out_dir: Path, *, verbose: bool = False, repair: bool = True) -> Path:
    """Convert the F16 source to `fmt` with its engine's own pinned llama-quantize, single-threaded (bitnet.cpp's
    I2_S quantizer corrupts weights with more threads); write a provenance file."""
    from parity.backends import quantizer
    from parity.core.proc import run

    backend, qtype, _ = QUANTIZED[fmt]
    found = quantizer.find_quantizer(backend)
    if found is None and not repair:
        raise BackendUnavailable(
            f"the {backend} llama-quantize that writes {qtype} is not built and auto-repair is off",
            fix=f"python -c \"from parity.backends import quantizer; quantizer.ensure_quantizer('{backend}')\" "
            "(or allow repair)",
        )
    qp = found or quantizer.ensure_quantizer(backend, verbose=verbose)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / GGUF_NAME

    def write(tmp: Path) -> None:  # the command below, writing the atomic writer's temporary file
        run(
            quantizer.quantize_command(qp, source.gguf_path, tmp, qtype, threads=1),
            verbose=verbose,
            log_file=out_dir / "quantize.log",
        )

    t0 = time.perf_counter()
    atomic_write_file(dst, write)
    provenance = {
        "format": fmt,
        "backend": backend,
        "command": quantizer.quantize_command(qp, source.gguf_path, dst, qtype, threads=1),
        "threads": 1,
        "source": {"path": str(source.gguf_path), "sha256": source.gguf_sha256},
        "tool": quantizer.read_receipt(qp),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out_dir / PROVENANCE_NAME, provenance)
    return dst


def provenance(model_path: Path) -> dict[str, Any] | None:
    """The quantize.json written beside an engine-quantized file, if any (for receipts)."""
    p = model_path.parent / PROVENANCE_NAME
    try:
        data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


# ---------------------------------------------------------------------------------------------------
# Run integration: which file numpy reads and which file each lane loads


def run_models(
    variant: str, root: Path, lane_backends: list[str], *, verbose: bool = False, repair: bool = True
) -> tuple[Path, Path, dict[str, Path]]:
    """(numpy's model, tokenizer.json, {backend: lane model}) for a `--variant` from RUN_VARIANTS.

    "ternary": numpy reads the F16 source and each lane its backend's native format (NATIVE), every one of
    them verified to decode to exactly the source's weights, so one numpy reference serves all lanes.
    "ternary-<format>": numpy and every lane read that one file (a backend that cannot load it is then
    refused before any lane runs: unsupported model format, exit 2).
    """
    if variant == FAMILY:
        source = materialize("f16", root, verbose=verbose)
        lanes = {
            b: materialize(NATIVE[b], root, verbose=verbose, repair=repair).gguf_path
            if b in NATIVE
            else source.gguf_path
            for b in lane_backends
        }
        return source.gguf_path, source.tokenizer_path, lanes
    fmt = variant.removeprefix(f"{FAMILY}-")
    check_variant(fmt)
    m = materialize(fmt, root, verbose=verbose, repair=repair)
    return m.gguf_path, m.tokenizer_path, {b: m.gguf_path for b in lane_backends}
