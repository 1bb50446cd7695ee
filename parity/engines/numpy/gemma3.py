"""Gemma 3 for the numpy reference engine, following llama.cpp's `gemma3` graph (src/models/gemma3.cpp).

Differences from llama, all taken from that graph and from `llama_model_gemma3::load_arch_hparams`:
- embeddings are multiplied by sqrt(n_embd) (`sqrtf` in llama.cpp, the engine dtype here);
- Q and K are RMS-normed per head (`attn_q_norm`, `attn_k_norm`) before NEOX-mode RoPE, which rotates
  the pairs (x[i], x[i + n_rot/2]) instead of adjacent pairs;
- Q is multiplied by the attention scale after RoPE and the softmax scale is 1; the scale is
  1/sqrt(head_dim), except for the 62-layer (27B) model, which uses 1/sqrt(n_embd / n_head);
- the attention and FFN outputs are RMS-normed again (`post_attention_norm`, `post_ffw_norm`) before
  their residual adds; the norm weights already include Gemma's "+1" (the converter folds it in);
- the FFN is GELU(gate) * up with the tanh approximation of GELU (computed exactly here; ggml's CPU
  backend reads it from an f16 table, see `gelu_tanh`; tests/integration/test_gemma3_llama.py bounds the
  effect on an all-F32 model: max |Δ| < 5e-3);
- layers alternate between sliding-window ("local") and full ("global") attention. With a window n_swa,
  a local layer's query at position p sees keys at positions k with p - n_swa < k <= p (llama.cpp masks
  a key when p - k >= n_swa) and uses RoPE base `rope.freq_base_swa` (default 10000) with no frequency
  scaling; global layers use `rope.freq_base` and the trained `rope.scaling.factor`. Without
  `attention.sliding_window_pattern` in the file, every 6th layer (5, 11, 17, ...) is global;
- the output head is tied to `token_embd` unless the file has `output.weight`, and the logits are
  soft-capped, cap * tanh(logits / cap), only when `final_logit_softcapping` is in the file. Gemma 3
  has no attention-logit soft-capping (that is Gemma 2).

Shapes: n = tokens, d = n_embd, h = query heads, hk = KV heads, hd = head dim, f = n_ff, V = vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parity.engines.numpy.ops import (
    Array,
    BlockWeights,
    Bound,
    FloatType,
    Hparams,
    KVCache,
    Matrix,
    Tap,
    attention,
    block_weights,
    bound,
    causal_mask,
    causal_mask_at,
    embeddings_and_head,
    float_key,
    int_key,
    linear,
    no_tap,
    output_head,
    read_hparams,
    require_tensor,
    rms_norm,
    rope_cos_sin,
    rope_neox,
)
from parity.errors import ModelFormatError
from parity.gguf.reader import GGUFFile

SWA_PERIOD_DEFAULT = 6  # llama.cpp's load_swa_pattern(ml, 6) when the file does not say
ROPE_BASE_SWA_DEFAULT = 10000.0  # llama_hparams::rope_freq_base_train_swa
N_LAYER_27B = 62  # the one Gemma 3 size whose attention scale uses n_embd / n_head

# ggml-cpu/vec.h
GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.79788456080286535587989211986876


# ---------------------------------------------------------------------------------------------------
# Operations


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation, as ggml_gelu_f32: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))).

    The formula is evaluated exactly in the engine dtype. ggml's CPU backend instead looks the result up
    in a table indexed by x rounded to f16 (GGML_GELU_FP16), which the reference deliberately does not copy:
    that table is an implementation shortcut of one backend, not part of the model.
    """
    t = x.dtype.type
    inner = t(SQRT_2_OVER_PI) * x * (t(1.0) + t(GELU_COEF_A) * x * x)  # same shape as x
    out: Array = t(0.5) * x * (t(1.0) + np.tanh(inner))  # same shape as x
    return out


def geglu_ffn(
    x: Array, w_gate: Matrix, w_up: Matrix, w_down: Matrix, tap: Tap = no_tap, il: int = -1, fast: bool = False
) -> Array:
    """LLM_FFN_GELU + LLM_FFN_PAR (ggml_geglu_split): down(gelu(gate(x)) * up(x)); taps ffn_up, ffn_gate, ffn_geglu.

    `fast`: quantized weights multiply block by block (ops.linear)."""
    up = tap("ffn_up", il, linear(x, w_up, None, fast))  # (n, f)
    gate = tap("ffn_gate", il, linear(x, w_gate, None, fast))  # (n, f)
    return linear(tap("ffn_geglu", il, gelu_tanh(gate) * up), w_down, None, fast)  # (n, d)


def sliding_window_mask(n: int, n_swa: int) -> Array:
    """(n, n) bool [query, key]: causal, and a key is dropped when query - key >= n_swa.

    This is `llama_hparams::is_masked_swa` for LLAMA_SWA_TYPE_STANDARD (p1 - p0 >= n_swa, p0 the key's
    position, p1 the query's), so each query sees itself and the n_swa - 1 keys before it.
    """
    pos = np.arange(n)  # (n,)
    distance = pos[:, None] - pos[None, :]  # (n, n): query - key
    return causal_mask(n) & (distance < n_swa)  # (n, n)


def sliding_window_mask_at(positions: Array, n_kv: int, n_swa: int) -> Array:
    """(n, n_kv) bool [query, key]: `sliding_window_mask` for queries at `positions` over keys 0..n_kv-1."""
    distance = positions[:, None] - np.arange(n_kv)[None, :]  # (n, n_kv): query - key
    return (distance >= 0) & (distance < n_swa)  # (n, n_kv)


def softcap(x: Array, cap: float) -> Array:
    """cap * tanh(x / cap), written as llama.cpp's graph does it: scale by 1/cap, tanh, scale by cap."""
    t = x.dtype.type
    out: Array = np.tanh(x * (t(1.0) / t(cap))) * t(cap)  # same shape as x
    return out


# ---------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Gemma3Params(Hparams):
    """Hyperparameters of a gemma3 model, with llama.cpp's defaults for keys the file leaves out.

    `rope_base` and `rope_freq_scale` (ops.Hparams) are the global layers'.
    """

    rope_base_swa: float  # sliding-window layers (their frequency scale is always 1)
    n_swa: int  # sliding window; 0 = every layer attends to the whole context
    is_swa: tuple[bool, ...]  # per layer: True for sliding-window attention
    attn_scale: float  # multiplies Q after RoPE
    final_logit_softcap: float  # 0 = no soft-capping


@dataclass(frozen=True)
class Gemma3Layer(BlockWeights):
    """One Gemma 3 block's weights, dequantized: llama's (ops.BlockWeights) plus the Q/K and post norms."""

    q_norm: Array  # (hd,)
    k_norm: Array  # (hd,)
    attn_post_norm: Array  # (d,)
    ffn_post_norm: Array  # (d,)


@dataclass(frozen=True)
class Gemma3Weights:
    """All weights of a Gemma 3 model, dequantized to the engine dtype."""

    params: Gemma3Params
    token_embd: Matrix  # (V, d): an array, or kept quantized (ops.load_matrix)
    layers: list[Gemma3Layer]
    output_norm: Array  # (d,)
    output: Matrix  # (V, d); the same object as token_embd when the output is tied


def _swa_layers(f: GGUFFile, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    """Which layers use the sliding window: llama_model_base::load_swa_pattern with period 6 by default.

    The pattern key is either a per-layer array (nonzero = sliding) or a period P, where layer il slides
    unless il % P == P - 1 (P = 0: every layer slides; P = 1: none). Without a window no layer slides.
    """
    if n_swa <= 0:
        return (False,) * n_layer
    key = f"{f.architecture}.attention.sliding_window_pattern"
    if isinstance(f.get(key), list):
        # like llama.cpp: entries past the last layer are ignored, layers past the array's end stay global
        entries = f.get(key)
        if not all(isinstance(v, bool) for v in entries):  # llama.cpp writes bools; accept integers too
            entries = f.get_array(key, int)
        flags = tuple(bool(v) for v in entries[:n_layer])
        return flags + (False,) * (n_layer - len(flags))
    period = f.get_int(key, SWA_PERIOD_DEFAULT, min=0, gguf_types=("uint32",))
    return tuple(period == 0 or il % period < period - 1 for il in range(n_layer))


def _same_as(f: GGUFFile, key: str, value: int) -> None:
    """Reject files whose SWA layers would differ in shape from the global ones (not a Gemma 3 layout)."""
    found = f.get_int(key, -1, min=0, gguf_types=("uint32",)) if key in f.metadata else None
    if found is not None and found != value:
        raise ModelFormatError(
            f"{f.path}: '{key}' is {found} but the global layers use {value}",
            fix="the numpy gemma3 engine needs the same head size and RoPE width in every layer",
        )


def gemma3_params(f: GGUFFile) -> Gemma3Params:
    """Read gemma3 hyperparameters as llama.cpp does (load_hparams, then llama_model_gemma3's own)."""
    arch = f.architecture
    hp = read_hparams(f, partial_rope=True)
    _same_as(f, f"{arch}.attention.key_length_swa", hp.head_dim)
    _same_as(f, f"{arch}.attention.value_length_swa", hp.head_dim)
    _same_as(f, f"{arch}.rope.dimension_count_swa", hp.n_rot)
    n_swa = int_key(f, f"{arch}.attention.sliding_window", 0, min=0)
    # ref: gemma_pytorch config.py, quoted by llama.cpp: the 27B model scales by 1/sqrt(d_model / n_head)
    scale_dim = max(hp.n_embd // hp.n_head, 1) if hp.n_layer == N_LAYER_27B else hp.head_dim
    return Gemma3Params(
        **vars(hp),
        rope_base_swa=float_key(f, f"{arch}.rope.freq_base_swa", ROPE_BASE_SWA_DEFAULT, min=0.0),
        n_swa=max(n_swa, 0),
        is_swa=_swa_layers(f, hp.n_layer, n_swa),
        attn_scale=1.0 / math.sqrt(scale_dim),  # rounded to the engine dtype where it is applied
        final_logit_softcap=float_key(f, f"{arch}.final_logit_softcapping", 0.0, min=0.0),
    )


def load_gemma3(f: GGUFFile, dtype: FloatType) -> Gemma3Weights:
    """Read and dequantize every gemma3 tensor (names as in llama.cpp's LLM_TENSOR table)."""
    p = gemma3_params(f)
    for name in ("dense_2.weight", "dense_3.weight"):
        if name in f.tensors:
            raise ModelFormatError(
                f"{f.path}: tensor '{name}' belongs to an embedding model, which the numpy engine does not run",
                fix="use a Gemma 3 text-generation model",
            )
    token_embd, output_norm, output = embeddings_and_head(f, p, dtype)
    layers = []
    for i in range(p.n_layer):
        b = f"blk.{i}."
        layers.append(
            Gemma3Layer(
                **block_weights(f, i, p, dtype),
                q_norm=require_tensor(f, b + "attn_q_norm.weight", (p.head_dim,), dtype),
                k_norm=require_tensor(f, b + "attn_k_norm.weight", (p.head_dim,), dtype),
                attn_post_norm=require_tensor(f, b + "post_attention_norm.weight", (p.n_embd,), dtype),
                ffn_post_norm=require_tensor(f, b + "post_ffw_norm.weight", (p.n_embd,), dtype),
            )
        )
    return Gemma3Weights(params=p, token_embd=token_embd, layers=layers, output_norm=output_norm, output=output)


def gemma3_block(
    x: Array,
    layer: Gemma3Layer,
    p: Gemma3Params,
    cos: Array,
    sin: Array,
    allowed: Array,
    il: int = 0,
    tap: Tap = no_tap,
    kv: KVCache | None = None,
) -> Array:
    """One Gemma 3 block: x + post_norm(attn(norm(x))); then + post_norm(ffn(norm(.))). Taps llama.cpp's names;
    with `kv`, k and v join the cache and `allowed` is the (n, n_kv) mask over it, and quantized weights multiply
    block by block (ops.linear's `fast`)."""
    n, fast = x.shape[0], kv is not None
    h = tap("attn_norm", il, rms_norm(x, layer.attn_norm, p.rms_eps))  # (n, d)
    q = linear(h, layer.wq, None, fast).reshape(n, p.n_head, p.head_dim)  # (n, h, hd)
    k = linear(h, layer.wk, None, fast).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    v = linear(h, layer.wv, None, fast).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    q = tap("Qcur_normed", il, rms_norm(q, layer.q_norm, p.rms_eps))  # (n, h, hd): norm over hd, per head
    q = tap("Qcur", il, rope_neox(q, cos, sin))  # (n, h, hd): after RoPE, before the scale
    k = tap("Kcur_normed", il, rms_norm(k, layer.k_norm, p.rms_eps))  # (n, hk, hd)
    k = tap("Kcur", il, rope_neox(k, cos, sin))  # (n, hk, hd)
    v = tap("Vcur", il, v)  # (n, hk, hd)
    if kv is not None:
        k, v = kv.store(il, k, v)  # (n_kv, hk, hd) each
    q = q * x.dtype.type(p.attn_scale)  # (n, h, hd): the graph scales Q, then attends with scale 1
    a = tap("kqv_out", il, attention(q, k, v, 1.0, allowed))  # (n, h*hd): before wo
    a = tap("attn_post_norm", il, rms_norm(linear(a, layer.wo, None, fast), layer.attn_post_norm, p.rms_eps))  # (n, d)
    x = tap("sa_out", il, x + a)  # (n, d)
    h = tap("ffn_norm", il, rms_norm(x, layer.ffn_norm, p.rms_eps))  # (n, d)
    h = tap("ffn_out", il, geglu_ffn(h, layer.w_gate, layer.w_up, layer.w_down, tap, il, fast))  # (n, d)
    return tap("l_out", il, x + tap("ffn_post_norm", il, rms_norm(h, layer.ffn_post_norm, p.rms_eps)))  # (n, d)


def gemma3_forward(
    w: Gemma3Weights, tokens: Array, last_only: bool = False, tap: Tap = no_tap, kv: KVCache | None = None
) -> Array:
    """Logits for tokens at positions 0..n-1: (n, V), or (1, V) for the last position when `last_only`.

    With `kv` the tokens sit at the positions after those cached, and their K/V join the cache.
    """
    p = w.params
    n = tokens.shape[0]
    t = w.token_embd.dtype.type
    x = tap("embd", -1, w.token_embd[tokens])  # (n, d)
    x = tap("inp_scaled", -1, x * np.sqrt(t(p.n_embd)))  # (n, d): sqrtf(n_embd) in the float32 engine
    positions = np.arange(n) if kv is None else kv.positions(n)  # (n,)

    def global_table(pos: Array) -> tuple[Array, Array]:
        return rope_cos_sin(pos, p.n_rot, p.rope_base, p.rope_freq_scale, None, t)

    def local_table(pos: Array) -> tuple[Array, Array]:
        return rope_cos_sin(pos, p.n_rot, p.rope_base_swa, 1.0, None, t)

    # (n, n_rot/2) x2 each; global before local, in this order on every path (tests/planted counts the calls)
    rope_global = global_table(positions) if kv is None else kv.rows("rope_global", n, global_table)
    rope_local = local_table(positions) if kv is None else kv.rows("rope_local", n, local_table)
    if kv is None:
        mask_global = causal_mask(n)  # (n, n)
        mask_local = sliding_window_mask(n, p.n_swa) if p.n_swa > 0 else mask_global  # (n, n)
    else:
        mask_global = causal_mask_at(positions, kv.n + n)  # (n, n_kv)
        mask_local = sliding_window_mask_at(positions, kv.n + n, p.n_swa) if p.n_swa > 0 else mask_global
    for il, (layer, swa) in enumerate(zip(w.layers, p.is_swa, strict=True)):
        cos, sin = rope_local if swa else rope_global
        x = gemma3_block(x, layer, p, cos, sin, mask_local if swa else mask_global, il, tap, kv)  # (n, d)
    if kv is not None:
        kv.advance(n)
    logits = output_head(x, w.output_norm, w.output, p.rms_eps, last_only, tap, kv is not None)  # (n, V)
    logits = softcap(logits, p.final_logit_softcap) if p.final_logit_softcap else logits  # (n, V)
    return tap("result_output", -1, logits)  # (n, V)


def build_gemma3(f: GGUFFile, dtype: FloatType) -> Bound:
    """The engine's builder for `gemma3`: dequantize once, return the bound forward."""
    return bound(load_gemma3(f, dtype), gemma3_forward)
