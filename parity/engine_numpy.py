"""The numpy reference engine: a plain forward pass, one pure function per operation.

Written in the style of picoGPT / llama3.np: weights are passed in explicitly, every line carries its
shape, and there are no speed tricks. Faster paths are checked against this one, never the other way
round. The graph follows llama.cpp's (src/models/llama.cpp); where llama.cpp fixes an order of float
operations that does not cost clarity (RMSNorm accumulation, the RoPE angle recurrence, the softmax
scale), it is mirrored so the float32 engine lands as close to llama.cpp as numpy allows.

Shapes: n = tokens, d = n_embd, h = query heads, hk = KV heads, hd = head dim, f = n_ff, V = vocab.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from parity.dequant import dequantize
from parity.errors import ModelFormatError, UsageError
from parity.gguf_file import GGUFFile, open_gguf

Array = npt.NDArray[Any]
FloatType = type[np.floating[Any]]
DTYPES: dict[str, FloatType] = {"float32": np.float32, "float64": np.float64}


# ---------------------------------------------------------------------------------------------------
# Operations


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm as ggml_rms_norm followed by ggml_mul: x / sqrt(mean(x^2) + eps) * w.

    ggml squares in float32 but accumulates the sum in double; `dtype=np.float64` does the same.
    """
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float64).astype(x.dtype)  # (n, 1)
    scale = 1.0 / np.sqrt(ms + eps)  # (n, 1)
    return x * scale * w  # (n, d)


def linear(x: Array, w: Array, b: Array | None = None) -> Array:
    """y = x @ W.T (+ b): W is (out, in) in numpy order, i.e. ggml's [in, out]."""
    y = x @ w.T  # (n, out)
    return y if b is None else y + b  # (n, out)


def rope_cos_sin(
    positions: Array, n_rot: int, base: float, freq_scale: float, freq_factors: Array | None, dtype: FloatType
) -> tuple[Array, Array]:
    """cos/sin tables for RoPE, built like ggml_rope_cache_init (YaRN off).

    The angle of pair i is pos * base^(-2i/n_rot): ggml computes it by repeated multiplication with
    theta_scale, not by a power per pair, so the same recurrence is used here: in float32 it follows
    ggml's rounding, in float64 it is exact to ~1e-15. Optional llama3 `rope_freqs` factors divide
    the angle.
    """
    theta_scale = np.power(dtype(base), dtype(-2.0) / dtype(n_rot))  # ()
    theta: Array = positions.astype(dtype)  # (n,)
    angles: Array = np.empty((positions.shape[0], n_rot // 2), dtype=dtype)  # (n, n_rot/2)
    for i in range(n_rot // 2):
        ff = dtype(1.0) if freq_factors is None else dtype(freq_factors[i])  # ()
        angles[:, i] = dtype(freq_scale) * (theta / ff)  # (n,)
        theta = theta * theta_scale  # (n,)
    # cos/sin evaluated in float64 then rounded: numpy's float32 SIMD cos/sin differ from libm's cosf/sinf
    # (which ggml calls) by 1 ulp for many angles, the rounded float64 result for far fewer
    cos = np.cos(angles.astype(np.float64)).astype(dtype)  # (n, n_rot/2)
    sin = np.sin(angles.astype(np.float64)).astype(dtype)  # (n, n_rot/2)
    return cos, sin


def rope(x: Array, cos: Array, sin: Array) -> Array:
    """Normal-mode RoPE (LLAMA_ROPE_TYPE_NORM): rotates ADJACENT pairs (x[2i], x[2i+1]).

    x is (n, heads, hd); the first n_rot = 2 * cos.shape[1] dims are rotated, the rest pass through.
    """
    n_rot = 2 * cos.shape[1]
    x0 = x[:, :, 0:n_rot:2]  # (n, heads, n_rot/2)
    x1 = x[:, :, 1:n_rot:2]  # (n, heads, n_rot/2)
    c = cos[:, None, :]  # (n, 1, n_rot/2)
    s = sin[:, None, :]  # (n, 1, n_rot/2)
    out = x.copy()  # (n, heads, hd)
    out[:, :, 0:n_rot:2] = x0 * c - x1 * s
    out[:, :, 1:n_rot:2] = x0 * s + x1 * c
    return out


def softmax(x: Array, axis: int = -1) -> Array:
    """Numerically stable softmax; -inf entries get probability 0."""
    e: Array = np.exp(x - np.max(x, axis=axis, keepdims=True))  # same shape as x
    p: Array = e / np.sum(e, axis=axis, keepdims=True)  # same shape as x
    return p


def causal_mask(n: int) -> Array:
    """(n, n) bool [query, key]: True where the key may be attended to, i.e. key <= query."""
    return np.tril(np.ones((n, n), dtype=bool))  # (n, n)


def attention(q: Array, k: Array, v: Array, scale: float | np.floating[Any], allowed: Array | None = None) -> Array:
    """Grouped-query attention over one sequence at positions 0..n-1, causal unless `allowed` says otherwise.

    q is (n, h, hd), k and v are (n, hk, hd); query head j reads KV head j // (h / hk), as ggml's
    broadcasting mul_mat does. As in ggml_soft_max_ext, the scale multiplies q.k, not q. `allowed` is an
    (n, n) bool [query, key] mask (e.g. a sliding window); masked keys get -inf, as in llama.cpp's KQ mask.
    """
    n, h, hd = q.shape
    group = h // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (n, h, hd)
    v = np.repeat(v, group, axis=1)  # (n, h, hd)
    scores = q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)  # (h, n, n): [head, query, key]
    keep = causal_mask(n) if allowed is None else allowed  # (n, n)
    scores = np.where(keep, scores * scale, -np.inf)  # (h, n, n)
    probs = softmax(scores, axis=-1)  # (h, n, n)
    out = probs @ v.transpose(1, 0, 2)  # (h, n, hd)
    return out.transpose(1, 0, 2).reshape(n, h * hd)  # (n, h*hd)


def silu(x: Array) -> Array:
    """SiLU as ggml_silu_f32: x / (1 + exp(-x))."""
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the correct limit -0
        return x / (1.0 + np.exp(-x))


def swiglu_ffn(x: Array, w_gate: Array, w_up: Array, w_down: Array, biases: dict[str, Array]) -> Array:
    """LLM_FFN_SILU + LLM_FFN_PAR: down(silu(gate(x)) * up(x))."""
    gate = linear(x, w_gate, biases.get("ffn_gate"))  # (n, f)
    up = linear(x, w_up, biases.get("ffn_up"))  # (n, f)
    return linear(silu(gate) * up, w_down, biases.get("ffn_down"))  # (n, d)


# ---------------------------------------------------------------------------------------------------
# llama


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


def int_key(f: GGUFFile, key: str, default: int | None = None, *, min: int = 1) -> int:
    """A uint32 hyperparameter >= `min`; `default` when absent, or required when no default is given.

    llama.cpp reads hyperparameters as exactly uint32 and accepts per-layer arrays for some keys; an array
    with equal entries is the same model. Anything else is a ModelFormatError naming the key.
    """
    return f.get_int(key, default, min=min, gguf_types=("uint32",), per_layer=True)


def float_key(f: GGUFFile, key: str, default: float | None = None, *, min: float | None = None) -> float:
    """A finite float32 hyperparameter (llama.cpp reads them as exactly float32); ModelFormatError otherwise."""
    return f.get_float(key, default, min=min)


def n_vocab_of(f: GGUFFile) -> int:
    """Rows of `token_embd.weight` (0 when it is missing or has no dimensions; the shape check reports it)."""
    t = f.tensors.get("token_embd.weight")
    return t.shape[0] if t is not None and len(t.shape) == 2 else 0


def rope_freq_scale(f: GGUFFile) -> float:
    """The trained RoPE frequency scale, 1 / `rope.scaling.factor` (llama-model.cpp, load_hparams).

    Only unscaled and linearly scaled RoPE are implemented; YaRN and LongRoPE are rejected.
    """
    arch = f.architecture
    scaling = f.get_str(f"{arch}.rope.scaling.type", "linear")
    if scaling not in ("none", "linear"):
        raise ModelFormatError(
            f"{f.path}: rope scaling type '{scaling}' is not supported by the numpy engine (none, linear)",
            fix="use a model without YaRN/LongRoPE scaling",
        )
    factor = float_key(
        f, f"{arch}.rope.scaling.factor", float_key(f, f"{arch}.rope.scale_linear", 0.0, min=0.0), min=0.0
    )
    return 1.0 if factor == 0.0 else 1.0 / factor


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


def load_tensor(
    f: GGUFFile, name: str, shape: tuple[int, ...], dtype: FloatType, required: bool = True
) -> Array | None:
    """Dequantize one tensor to `dtype` after checking its shape against the hyperparameters."""
    t = f.tensors.get(name)
    if t is None:
        if required:
            raise ModelFormatError(
                f"{f.path}: tensor '{name}' is missing", fix=f"the file is not a complete {f.architecture} model"
            )
        return None
    if t.shape != shape:
        raise ModelFormatError(
            f"{f.path}: tensor '{name}' has shape {t.shape}, expected {shape} from the metadata",
            fix="the metadata does not match the weights; regenerate or re-convert the model",
        )
    return dequantize(t).astype(dtype, copy=False)


def require_tensor(f: GGUFFile, name: str, shape: tuple[int, ...], dtype: FloatType) -> Array:
    """`load_tensor` for a tensor that must be present."""
    arr = load_tensor(f, name, shape, dtype)
    assert arr is not None  # required=True raises instead of returning None
    return arr


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


# ---------------------------------------------------------------------------------------------------
# Engine

Forward = Callable[[Array, bool], Array]


def _build_llama(f: GGUFFile, dtype: FloatType) -> tuple[Forward, int, int]:
    weights = load_llama(f, dtype)

    def forward(tokens: Array, last_only: bool) -> Array:
        return llama_forward(weights, tokens, last_only)

    return forward, weights.params.n_vocab, weights.params.n_ctx_train


def _build_gemma3(f: GGUFFile, dtype: FloatType) -> tuple[Forward, int, int]:
    # imported here because parity.arch_gemma3 builds on this module's operations
    from parity.arch_gemma3 import build_gemma3

    return build_gemma3(f, dtype)


def _build_bitnet(f: GGUFFile, dtype: FloatType) -> tuple[Forward, int, int]:
    # imported here because parity.arch_bitnet builds on this module's operations
    from parity.arch_bitnet import build_bitnet

    return build_bitnet(f, dtype)


# One builder per architecture: (gguf, dtype) -> (forward, n_vocab, n_ctx_train).
ARCHITECTURES: dict[str, Callable[[GGUFFile, FloatType], tuple[Forward, int, int]]] = {
    "llama": _build_llama,
    "gemma3": _build_gemma3,
    "bitnet": _build_bitnet,
}


class NumpyEngine:
    """The reference implementation under test: a full forward pass per call, in numpy."""

    name = "numpy"

    def __init__(self, model: GGUFFile | str | os.PathLike[str], *, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise UsageError(f"unsupported numpy engine dtype '{dtype}'", fix=f"use one of {', '.join(DTYPES)}")
        self.gguf = model if isinstance(model, GGUFFile) else open_gguf(model)
        self.architecture = self.gguf.architecture
        self.dtype = dtype
        builder = ARCHITECTURES.get(self.architecture)
        if builder is None:
            raise ModelFormatError(
                f"unsupported architecture '{self.architecture}' in {self.gguf.path}: "
                f"the numpy engine supports {', '.join(ARCHITECTURES)}",
                fix="use a model of a supported architecture",
            )
        self._forward, self.n_vocab, self.n_ctx_train = builder(self.gguf, DTYPES[dtype])

    def _check_tokens(self, tokens: Sequence[int], n_extra: int = 0) -> Array:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise UsageError(f"token ids must be a flat sequence, got shape {ids.shape}", fix="pass a list of ints")
        if ids.size == 0:
            raise UsageError("no tokens to evaluate", fix="pass a non-empty list of token ids")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(f"token ids must be integers, got {ids.dtype}", fix="pass a list of int token ids")
        bad = np.flatnonzero((ids < 0) | (ids >= self.n_vocab))
        if bad.size:
            i = int(bad[0])
            raise UsageError(
                f"token id {int(ids[i])} at position {i} is outside the vocabulary [0, {self.n_vocab})",
                fix="tokenize with this model's vocabulary",
            )
        if ids.size + n_extra > self.n_ctx_train:
            raise UsageError(
                f"{ids.size + n_extra} positions exceed the model's training context {self.n_ctx_train}",
                fix="use a shorter prompt or fewer new tokens",
            )
        return ids.astype(np.int64)

    def logits(self, tokens: Sequence[int]) -> npt.NDArray[np.float64]:
        """Logits for every position of one forward pass: (len(tokens), n_vocab), returned as float64."""
        ids = self._check_tokens(tokens)
        return self._forward(ids, False).astype(np.float64)

    def greedy(self, tokens: Sequence[int], n_new: int) -> list[int]:
        """Argmax continuation of `n_new` tokens, recomputing the whole forward pass each step."""
        if n_new < 0:
            raise UsageError(f"n_new must be >= 0, got {n_new}", fix="ask for zero or more new tokens")
        # the last generated token is never fed back, so it needs no position of its own
        ids = list(self._check_tokens(tokens, max(n_new - 1, 0)).tolist())
        out: list[int] = []
        for _ in range(n_new):
            last = self._forward(np.asarray(ids, dtype=np.int64), True)[0]  # (V,)
            nxt = int(np.argmax(last))
            out.append(nxt)
            ids.append(nxt)
        return out
