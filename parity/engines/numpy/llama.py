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
    causal_mask_at,
    embeddings_and_head,
    linear,
    load_tensor,
    no_tap,
    output_head,
    read_hparams,
    rms_norm,
    rope,
    rope_cos_sin,
    swiglu_ffn,
)
from parity.gguf.reader import GGUFFile

# A llama model's hyperparameters are exactly the shared ones (ops.read_hparams), RoPE over the whole head.
LlamaParams = Hparams


@dataclass(frozen=True)
class LlamaLayer(BlockWeights):
    """One transformer block's weights, dequantized; shapes (out, in) in numpy order."""

    biases: dict[str, Array]  # optional biases, keyed by tensor kind ("attn_q", "ffn_up", ...)


@dataclass(frozen=True)
class LlamaWeights:
    """All weights of a llama model, dequantized to the engine dtype."""

    params: LlamaParams
    token_embd: Matrix  # (V, d): an array, or kept quantized (ops.load_matrix)
    layers: list[LlamaLayer]
    output_norm: Array  # (d,)
    output: Matrix  # (V, d); the same object as token_embd when the output is tied
    rope_freqs: Array | None  # (n_rot/2,) llama3 frequency factors


def llama_params(f: GGUFFile) -> LlamaParams:
    """Read llama hyperparameters with llama.cpp's defaults (llama-model.cpp, load_hparams)."""
    return read_hparams(f)


def load_llama(f: GGUFFile, dtype: FloatType) -> LlamaWeights:
    """Read and dequantize every llama tensor (names as in llama.cpp's LLM_TENSOR table)."""
    p = llama_params(f)
    d, f_, q_out, kv_out = p.n_embd, p.n_ff, p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    token_embd, output_norm, output = embeddings_and_head(f, p, dtype)
    bias_sizes = {"attn_q": q_out, "attn_k": kv_out, "attn_v": kv_out, "attn_output": d, "ffn_gate": f_}
    bias_sizes |= {"ffn_up": f_, "ffn_down": d}
    layers = []
    for i in range(p.n_layer):
        b = f"blk.{i}."
        biases: dict[str, Array] = {}
        for kind, size in bias_sizes.items():
            bias = load_tensor(f, f"{b}{kind}.bias", (size,), dtype, required=False)
            if bias is not None:
                biases[kind] = bias
        layers.append(LlamaLayer(**block_weights(f, i, p, dtype), biases=biases))
    return LlamaWeights(
        params=p,
        token_embd=token_embd,
        layers=layers,
        output_norm=output_norm,
        output=output,  # token_embd itself when the output is tied, as llama.cpp does
        rope_freqs=load_tensor(f, "rope_freqs.weight", (p.n_rot // 2,), dtype, required=False),
    )


def llama_block(
    x: Array,
    layer: LlamaLayer,
    p: LlamaParams,
    cos: Array,
    sin: Array,
    il: int = 0,
    tap: Tap = no_tap,
    kv: KVCache | None = None,
    allowed: Array | None = None,
) -> Array:
    """One llama block: x + attn(norm(x)); then + ffn(norm(.)). `tap` sees llama.cpp's named tensors of layer il;
    with `kv`, k and v join the cache and the queries attend over it (`allowed`: their (n, n_kv) mask), and
    quantized weights multiply block by block (ops.linear's `fast`)."""
    n, fast, bias = x.shape[0], kv is not None, layer.biases.get
    h = tap("attn_norm", il, rms_norm(x, layer.attn_norm, p.rms_eps))  # (n, d)
    q = linear(h, layer.wq, bias("attn_q"), fast).reshape(n, p.n_head, p.head_dim)  # (n, h, hd)
    k = linear(h, layer.wk, bias("attn_k"), fast).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    v = linear(h, layer.wv, bias("attn_v"), fast).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    q = tap("Qcur", il, rope(q, cos, sin))  # (n, h, hd): after RoPE, as llama.cpp names it
    k = tap("Kcur", il, rope(k, cos, sin))  # (n, hk, hd)
    v = tap("Vcur", il, v)  # (n, hk, hd)
    if kv is not None:
        k, v = kv.store(il, k, v)  # (n_kv, hk, hd) each
    # kq_scale = 1.0f/sqrtf(n_embd_head), computed in the engine dtype like ggml computes it in float;
    # llama.cpp's llama graph never reads `attention.scale` (only granite-style archs set it)
    scale = 1.0 / np.sqrt(x.dtype.type(p.head_dim))  # ()
    a = tap("kqv_out", il, attention(q, k, v, scale, allowed))  # (n, h*hd)
    x = tap("ffn_inp", il, x + tap("attn_out", il, linear(a, layer.wo, bias("attn_output"), fast)))  # (n, d)
    h = tap("ffn_norm", il, rms_norm(x, layer.ffn_norm, p.rms_eps))  # (n, d)
    f = tap("ffn_out", il, swiglu_ffn(h, layer.w_gate, layer.w_up, layer.w_down, layer.biases, tap, il, fast))
    return tap("l_out", il, x + f)  # (n, d)


def llama_forward(
    w: LlamaWeights, tokens: Array, last_only: bool = False, tap: Tap = no_tap, kv: KVCache | None = None
) -> Array:
    """Logits for tokens at positions 0..n-1: (n, V), or (1, V) for the last position when `last_only`.

    With `kv` the tokens sit at the positions after those cached, and their K/V join the cache.
    """
    p = w.params
    n = tokens.shape[0]
    positions = np.arange(n) if kv is None else kv.positions(n)  # (n,)
    allowed = None if kv is None else causal_mask_at(positions, kv.n + n)  # (n, n_kv)
    x = tap("embd", -1, w.token_embd[tokens])  # (n, d)

    def rope_table(pos: Array) -> tuple[Array, Array]:
        return rope_cos_sin(pos, p.n_rot, p.rope_base, p.rope_freq_scale, w.rope_freqs, x.dtype.type)

    cos, sin = rope_table(positions) if kv is None else kv.rows("rope", n, rope_table)  # (n, hd/2) each
    for il, layer in enumerate(w.layers):
        x = llama_block(x, layer, p, cos, sin, il, tap, kv, allowed)  # (n, d)
    if kv is not None:
        kv.advance(n)
    logits = output_head(x, w.output_norm, w.output, p.rms_eps, last_only, tap, kv is not None)  # (n, V)
    return tap("result_output", -1, logits)  # (n, V)


def build_llama(f: GGUFFile, dtype: FloatType) -> Bound:
    """The engine's builder for `llama`: dequantize once, return the bound forward."""
    return bound(load_llama(f, dtype), llama_forward)
