"""The `bitnet` architecture (BitNet b1.58) in numpy, as BOTH C++ engines define it.

Checked against bitnet.cpp's fork (src/llama.cpp, `build_bitnet`, tensors in `llm_load_tensors`) and mainline
llama.cpp (src/models/bitnet.cpp); the two graphs are the same:

    x = token_embd[tokens]
    per layer:  h = RMSNorm(x) * attn_norm
                q, k, v = h @ Wq, Wk, Wv   (each optionally * its 1-element `.scale` tensor, after the matmul)
                q, k = NEOX RoPE (the two HALVES of each head rotated, LLAMA_ROPE_TYPE_NEOX)
                a = softmax(q k^T / sqrt(head_dim), causal) v      (grouped-query)
                a = RMSNorm(a) * attn_sub_norm;  x = x + a @ Wo (* wo.scale)
                h = RMSNorm(x) * ffn_norm
                f = silu(h @ Wgate (* scale)) * (h @ Wup (* scale))
                f = RMSNorm(f) * ffn_sub_norm;   x = x + f @ Wdown (* scale)
    logits = (RMSNorm(x) * output_norm) @ token_embd^T   (the output is ALWAYS tied: no `output.weight`)

No biases: neither engine creates bias tensors for bitnet, and both reject a file with tensors they do not
create (llama_model_loader: "wrong number of tensors"), so this loader rejects them too, naming the tensor.
Both require Wq and Wo to be n_embd x n_embd, i.e. n_head * head_dim == n_embd.

The matmuls go through `parity.engines.numpy.numerics.matmul`, so the same graph runs `exact` or mirroring one engine's
rounding points. Shapes: n tokens, d n_embd, h/hk heads, hd head dim, f n_ff, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from parity.engines.numpy.llama import LlamaParams, llama_params
from parity.engines.numpy.numerics import Numerics, Weight, matmul
from parity.engines.numpy.ops import (
    Array,
    Bound,
    FloatType,
    KVCache,
    Tap,
    attention,
    bound,
    causal_mask_at,
    no_tap,
    require_tensor,
    rms_norm,
    rope_cos_sin,
    rope_neox,
    silu,
)
from parity.errors import ModelFormatError
from parity.gguf import ternary
from parity.gguf.reader import GGUFFile

NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")  # BitnetLayer's field names
MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TERNARY_TYPES = (int(ternary.ForkType.I2_S), 34, 35)  # I2_S, TQ1_0, TQ2_0


# Both engines read a bitnet model's hyperparameters exactly as they read llama's.
BitnetParams = LlamaParams


@dataclass(frozen=True)
class BitnetLayer:
    """One block: norms (float) and matmul weights (numerics.Weight), plus optional per-matmul scales."""

    attn_norm: Array  # (d,)
    attn_sub_norm: Array  # (d,)
    ffn_norm: Array  # (d,)
    ffn_sub_norm: Array  # (f,)
    mm: dict[str, Weight]  # kind ("attn_q", ...) -> weight, (out, in)
    scales: dict[str, Array] = field(default_factory=dict)  # kind -> (1,) `.scale` tensor, when present


@dataclass(frozen=True)
class BitnetWeights:
    """All weights of a bitnet model; `output` is the token embedding (tied)."""

    params: BitnetParams
    token_embd: Array  # (V, d) for the lookup
    output: Weight  # the same values as a matmul weight (V, d), with its stored type
    layers: list[BitnetLayer]
    output_norm: Array  # (d,)
    weight_types: dict[str, int]  # tensor name -> ggml type, for receipts and format checks


def bitnet_params(f: GGUFFile) -> BitnetParams:
    """Hyperparameters (llama_model_loader / llm_load_hparams in both engines): llama's, plus one bitnet rule."""
    p = llama_params(f)
    if p.head_dim * p.n_head != p.n_embd:
        raise ModelFormatError(
            f"{f.path}: {p.n_head} heads x head dim {p.head_dim} != n_embd {p.n_embd}",
            fix="both engines create attn_q/attn_output as n_embd x n_embd for bitnet; fix the converter",
        )
    return p


def expected_tensors(p: BitnetParams) -> dict[str, tuple[int, ...]]:
    """Every tensor the engines create for bitnet, with its numpy shape (`.scale` tensors are optional)."""
    d, f_, kv = p.n_embd, p.n_ff, p.n_head_kv * p.head_dim
    shapes = {"token_embd.weight": (p.n_vocab, d), "output_norm.weight": (d,)}
    mm_shapes = {
        "attn_q": (d, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, d),
        "ffn_gate": (f_, d),
        "ffn_up": (f_, d),
        "ffn_down": (d, f_),
    }
    for i in range(p.n_layer):
        b = f"blk.{i}."
        for kind in NORMS:
            shapes[f"{b}{kind}.weight"] = (f_,) if kind == "ffn_sub_norm" else (d,)
        for kind, shape in mm_shapes.items():
            shapes[f"{b}{kind}.weight"] = shape
            shapes[f"{b}{kind}.scale"] = (1,)
    return shapes


def _weight(f: GGUFFile, name: str, shape: tuple[int, ...], dtype: FloatType, keep_codes: bool) -> Weight:
    w = require_tensor(f, name, shape, dtype)
    t = f.tensors[name]
    codes = scales = None
    if keep_codes and t.ggml_type in TERNARY_TYPES:
        codes, scales = ternary.ternary_codes(t.ggml_type, t.data, t.shape)
    return Weight(name, w, t.ggml_type, codes, scales)


def load_bitnet(f: GGUFFile, dtype: FloatType, keep_codes: bool = False) -> BitnetWeights:
    """Read and dequantize every bitnet tensor; `keep_codes` also keeps ternary codes for mirroring."""
    p = bitnet_params(f)
    expected = expected_tensors(p)
    if "output.weight" in f.tensors:
        raise ModelFormatError(
            f"{f.path}: bitnet model has an 'output.weight' tensor, but both engines tie the output to token_embd "
            "and reject the file ('wrong number of tensors')",
            fix="drop output.weight from the file (the converter must tie the output head)",
        )
    extra = sorted(set(f.tensors) - set(expected))
    if extra:
        raise ModelFormatError(
            f"{f.path}: tensor '{extra[0]}' is not part of the bitnet architecture "
            f"({len(extra)} unexpected tensor(s)); both engines reject the file",
            fix="convert the model with llama.cpp's convert_hf_to_gguf.py (BitnetForCausalLM)",
        )
    layers = []
    for i in range(p.n_layer):
        b = f"blk.{i}."
        mm = {
            kind: _weight(f, f"{b}{kind}.weight", expected[f"{b}{kind}.weight"], dtype, keep_codes) for kind in MATMULS
        }
        scales: dict[str, Array] = {}
        for kind in MATMULS:
            if f"{b}{kind}.scale" in f.tensors:
                scales[kind] = require_tensor(f, f"{b}{kind}.scale", (1,), dtype)
        norms = {kind: require_tensor(f, f"{b}{kind}.weight", expected[f"{b}{kind}.weight"], dtype) for kind in NORMS}
        layers.append(BitnetLayer(**norms, mm=mm, scales=scales))
    output = _weight(f, "token_embd.weight", expected["token_embd.weight"], dtype, keep_codes)
    return BitnetWeights(
        params=p,
        token_embd=output.w,
        output=output,
        layers=layers,
        output_norm=require_tensor(f, "output_norm.weight", expected["output_norm.weight"], dtype),
        weight_types={name: t.ggml_type for name, t in f.tensors.items()},
    )


def _proj(x: Array, layer: BitnetLayer, kind: str, num: Numerics) -> Array:
    """One matmul plus its optional `.scale` (ggml_mul after ggml_mul_mat, as build_lora_mm does)."""
    y = matmul(x, layer.mm[kind], num)  # (n, out)
    scale = layer.scales.get(kind)
    return y if scale is None else y * scale  # (n, out)


def bitnet_block(
    x: Array,
    layer: BitnetLayer,
    p: BitnetParams,
    cos: Array,
    sin: Array,
    num: Numerics,
    il: int = 0,
    tap: Tap = no_tap,
    kv: KVCache | None = None,
    allowed: Array | None = None,
) -> Array:
    """One bitnet block: x + Wo(subnorm(attn(norm(x)))); then + Wdown(subnorm(swiglu(norm(.)))). Taps llama.cpp's
    names; with `kv`, k and v join the cache and the queries attend over it (`allowed`: their (n, n_kv) mask)."""
    n = x.shape[0]
    h = tap("attn_norm", il, rms_norm(x, layer.attn_norm, p.rms_eps))  # (n, d)
    q = _proj(h, layer, "attn_q", num).reshape(n, p.n_head, p.head_dim)  # (n, h, hd)
    k = _proj(h, layer, "attn_k", num).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    v = _proj(h, layer, "attn_v", num).reshape(n, p.n_head_kv, p.head_dim)  # (n, hk, hd)
    q = tap("Qcur", il, rope_neox(q, cos, sin))  # (n, h, hd)
    k = num.cache(tap("Kcur", il, rope_neox(k, cos, sin)), num.k_f16)  # (n, hk, hd): as the KV cache stores it
    v = num.cache(tap("Vcur", il, v), num.v_f16)  # (n, hk, hd)
    if kv is not None:
        k, v = kv.store(il, k, v)  # (n_kv, hk, hd) each
    scale = 1.0 / np.sqrt(x.dtype.type(p.head_dim))  # 1.0f/sqrtf(float(n_embd_head))
    a = tap("kqv_out", il, attention(q, k, v, scale, allowed, f16_probs=num.round_probs))  # (n, d)
    a = tap("attn_sub_norm", il, rms_norm(a, layer.attn_sub_norm, p.rms_eps))  # (n, d)
    x = tap("ffn_inp", il, x + tap("attn_out", il, _proj(a, layer, "attn_output", num)))  # (n, d)
    h = tap("ffn_norm", il, rms_norm(x, layer.ffn_norm, p.rms_eps))  # (n, d)
    g = silu(_proj(h, layer, "ffn_gate", num)) * _proj(h, layer, "ffn_up", num)  # (n, f)
    g = tap("ffn_sub_norm", il, rms_norm(tap("ffn_sub_out", il, g), layer.ffn_sub_norm, p.rms_eps))  # (n, f)
    return tap("l_out", il, x + tap("ffn_down", il, _proj(g, layer, "ffn_down", num)))  # (n, d)


def bitnet_forward(
    w: BitnetWeights,
    tokens: Array,
    last_only: bool = False,
    tap: Tap = no_tap,
    kv: KVCache | None = None,
    num: Numerics | None = None,
) -> Array:
    """Logits for tokens at positions 0..n-1: (n, V), or (1, V) for the last position when `last_only`.

    With `kv` the tokens sit at the positions after those cached, and their K/V join the cache.
    """
    num = num or Numerics()
    p = w.params
    n = tokens.shape[0]
    positions = np.arange(n) if kv is None else kv.positions(n)  # (n,)
    allowed = None if kv is None else causal_mask_at(positions, kv.n + n)  # (n, n_kv)
    x = tap("embd", -1, w.token_embd[tokens])  # (n, d)
    cos, sin = rope_cos_sin(positions, p.n_rot, p.rope_base, p.rope_freq_scale, None, x.dtype.type)  # (n, hd/2) x2
    for il, layer in enumerate(w.layers):
        x = bitnet_block(x, layer, p, cos, sin, num, il, tap, kv, allowed)  # (n, d)
    if kv is not None:
        kv.advance(n)
    if last_only:
        x = x[-1:]  # (1, d)
    x = tap("result_norm", -1, rms_norm(x, w.output_norm, p.rms_eps))  # (n, d)
    return tap("result_output", -1, matmul(x, w.output, num))  # (n, V): the tied head


def build_bitnet(f: GGUFFile, dtype: FloatType) -> Bound:
    """ARCHITECTURES entry: the `exact` forward, bound to the weights."""
    return bound(load_bitnet(f, dtype), bitnet_forward)


def mirrored_logits(f: GGUFFile, tokens: list[int], num: Numerics, dtype: FloatType) -> npt.NDArray[np.float64]:
    """Logits of every position with `num`'s rounding points, on the weights exactly as `f` stores them."""
    weights = load_bitnet(f, dtype, keep_codes=True)
    ids = np.asarray(tokens, dtype=np.int64)
    return bitnet_forward(weights, ids, False, no_tap, None, num).astype(np.float64)
