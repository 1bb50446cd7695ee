"""The `llama` architecture of the numpy reference engine: hyperparameters, weights and the forward pass.

Written in the style of picoGPT / llama3.np: weights are passed in explicitly, every line carries its
shape, and there are no speed tricks. Faster paths are checked against this one, never the other way
round. The graph follows llama.cpp's (src/models/llama.cpp); where llama.cpp fixes an order of float
operations that does not cost clarity (RMSNorm accumulation, the RoPE angle recurrence, the softmax
scale), it is mirrored so the float32 engine lands as close to llama.cpp as numpy allows.

Shapes: n = tokens, d = n_embd, h = query heads, hk = KV heads, hd = head dim, f = n_ff, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parity.engines.numpy.ops import (
    Array,
    FloatType,
    Forward,
    attention,
    float_key,
    int_key,
    linear,
    load_tensor,
    n_vocab_of,
    require_tensor,
    rms_norm,
    rope,
    rope_cos_sin,
    rope_freq_scale,
    swiglu_ffn,
)
from parity.errors import ModelFormatError
from parity.gguf.reader import GGUFFile


@dataclass(frozen=True)
class LlamaParams:
    """Hyperparameters of a llama-architecture model, as llama.cpp reads them."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float
    n_ctx_train: int


@dataclass(frozen=True)
class LlamaLayer:
    """One transformer block's weights, dequantized; shapes (out, in) in numpy order."""

    attn_norm: Array  # (d,)
    wq: Array  # (h*hd, d)
    wk: Array  # (hk*hd, d)
    wv: Array  # (hk*hd, d)
    wo: Array  # (d, h*hd)
    ffn_norm: Array  # (d,)
    w_gate: Array  # (f, d)
    w_up: Array  # (f, d)
    w_down: Array  # (d, f)
    biases: dict[str, Array]  # optional biases, keyed by tensor kind ("attn_q", "ffn_up", ...)


@dataclass(frozen=True)
class LlamaWeights:
    """All weights of a llama model, dequantized to the engine dtype."""

    params: LlamaParams
    token_embd: Array  # (V, d)
    layers: list[LlamaLayer]
    output_norm: Array  # (d,)
    output: Array  # (V, d); the same array as token_embd when the output is tied
    rope_freqs: Array | None  # (n_rot/2,) llama3 frequency factors


def llama_params(f: GGUFFile) -> LlamaParams:
    """Read llama hyperparameters with llama.cpp's defaults (llama-model.cpp, load_hparams)."""
    arch = f.architecture
    n_embd = int_key(f, f"{arch}.embedding_length")
    n_head = int_key(f, f"{arch}.attention.head_count")
    head_dim = int_key(f, f"{arch}.attention.key_length", max(n_embd // n_head, 1))
    n_rot = int_key(f, f"{arch}.rope.dimension_count", head_dim)
    if n_rot != head_dim:
        raise ModelFormatError(
            f"{f.path}: '{arch}.rope.dimension_count' is {n_rot} but the head dimension is {head_dim}",
            fix="llama.cpp rejects this model too ('invalid n_rot'); check the converter",
        )
    if int_key(f, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ModelFormatError(
            f"{f.path}: '{arch}.attention.value_length' differs from the key length {head_dim}",
            fix="llama.cpp's llama graph requires equal key and value head sizes; check the converter",
        )
    return LlamaParams(
        n_vocab=n_vocab_of(f),
        n_embd=n_embd,
        n_layer=int_key(f, f"{arch}.block_count"),
        n_ff=int_key(f, f"{arch}.feed_forward_length"),
        n_head=n_head,
        n_head_kv=int_key(f, f"{arch}.attention.head_count_kv", n_head),
        head_dim=head_dim,
        n_rot=n_rot,
        rms_eps=float_key(f, f"{arch}.attention.layer_norm_rms_epsilon", min=0.0),
        rope_base=float_key(f, f"{arch}.rope.freq_base", 10000.0, min=0.0),
        rope_freq_scale=rope_freq_scale(f),
        n_ctx_train=int_key(f, f"{arch}.context_length"),
    )


def load_llama(f: GGUFFile, dtype: FloatType) -> LlamaWeights:
    """Read and dequantize every llama tensor (names as in llama.cpp's LLM_TENSOR table)."""
    p = llama_params(f)
    d, f_, q_out, kv_out = p.n_embd, p.n_ff, p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    if p.n_head_kv <= 0 or p.n_head % p.n_head_kv != 0:
        raise ModelFormatError(
            f"{f.path}: head_count {p.n_head} is not a multiple of head_count_kv {p.n_head_kv}",
            fix="check the attention head counts in the metadata",
        )
    token_embd = require_tensor(f, "token_embd.weight", (p.n_vocab, d), dtype)
    layers = []
    for i in range(p.n_layer):
        b = f"blk.{i}."
        biases: dict[str, Array] = {}
        for kind, size in (("attn_q", q_out), ("attn_k", kv_out), ("attn_v", kv_out), ("attn_output", d)):
            bias = load_tensor(f, f"{b}{kind}.bias", (size,), dtype, required=False)
            if bias is not None:
                biases[kind] = bias
        for kind, size in (("ffn_gate", f_), ("ffn_up", f_), ("ffn_down", d)):
            bias = load_tensor(f, f"{b}{kind}.bias", (size,), dtype, required=False)
            if bias is not None:
                biases[kind] = bias
        layers.append(
            LlamaLayer(
                attn_norm=require_tensor(f, b + "attn_norm.weight", (d,), dtype),
                wq=require_tensor(f, b + "attn_q.weight", (q_out, d), dtype),
                wk=require_tensor(f, b + "attn_k.weight", (kv_out, d), dtype),
                wv=require_tensor(f, b + "attn_v.weight", (kv_out, d), dtype),
                wo=require_tensor(f, b + "attn_output.weight", (d, q_out), dtype),
                ffn_norm=require_tensor(f, b + "ffn_norm.weight", (d,), dtype),
                w_gate=require_tensor(f, b + "ffn_gate.weight", (f_, d), dtype),
                w_up=require_tensor(f, b + "ffn_up.weight", (f_, d), dtype),
                w_down=require_tensor(f, b + "ffn_down.weight", (d, f_), dtype),
                biases=biases,
            )
        )
    output = load_tensor(f, "output.weight", (p.n_vocab, d), dtype, required=False)
    return LlamaWeights(
        params=p,
        token_embd=token_embd,
        layers=layers,
        output_norm=require_tensor(f, "output_norm.weight", (d,), dtype),
        output=token_embd if output is None else output,  # tied embeddings, as llama.cpp does
        rope_freqs=load_tensor(f, "rope_freqs.weight", (p.n_rot // 2,), dtype, required=False),
    )


def llama_block(x: Array, layer: LlamaLayer, p: LlamaParams, cos: Array, sin: Array) -> Array:
    """One llama block: x + attn(norm(x)); then + ffn(norm(.))."""
    n = x.shape[0]
    h = rms_norm(x, layer.attn_norm, p.rms_eps)  # (n, d)
    q = linear(h, layer.wq, layer.biases.get("attn_q")).reshape(n, p.n_head, p.head_dim)  # (n, h, hd)
    k = linear(h, layer.wk, layer.biases.get("attn_k")).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    v = linear(h, layer.wv, layer.biases.get("attn_v")).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    q = rope(q, cos, sin)  # (n, h, hd)
    k = rope(k, cos, sin)  # (n, hk, hd)
    # kq_scale = 1.0f/sqrtf(n_embd_head), computed in the engine dtype like ggml computes it in float;
    # llama.cpp's llama graph never reads `attention.scale` (only granite-style archs set it)
    scale = 1.0 / np.sqrt(x.dtype.type(p.head_dim))  # ()
    a = attention(q, k, v, scale)  # (n, h*hd)
    x = x + linear(a, layer.wo, layer.biases.get("attn_output"))  # (n, d)
    h = rms_norm(x, layer.ffn_norm, p.rms_eps)  # (n, d)
    return x + swiglu_ffn(h, layer.w_gate, layer.w_up, layer.w_down, layer.biases)  # (n, d)


def llama_forward(w: LlamaWeights, tokens: Array, last_only: bool = False) -> Array:
    """Logits for tokens at positions 0..n-1: (n, V), or (1, V) for the last position when `last_only`."""
    p = w.params
    x = w.token_embd[tokens]  # (n, d)
    cos, sin = rope_cos_sin(
        np.arange(tokens.shape[0]), p.n_rot, p.rope_base, p.rope_freq_scale, w.rope_freqs, x.dtype.type
    )  # (n, hd/2) each
    for layer in w.layers:
        x = llama_block(x, layer, p, cos, sin)  # (n, d)
    if last_only:
        x = x[-1:]  # (1, d): llama.cpp also skips the head for rows it does not output
    x = rms_norm(x, w.output_norm, p.rms_eps)  # (n, d)
    return linear(x, w.output)  # (n, V)


def build_llama(f: GGUFFile, dtype: FloatType) -> tuple[Forward, int, int]:
    weights = load_llama(f, dtype)

    def forward(tokens: Array, last_only: bool) -> Array:
        return llama_forward(weights, tokens, last_only)

    return forward, weights.params.n_vocab, weights.params.n_ctx_train
