"""Operations and weight access shared by every architecture of the numpy engine (parity.engines.numpy).

One pure function per operation, picoGPT style: weights passed in explicitly, every line carries its shape.
The orders of float operations mirror llama.cpp where that costs no clarity (see each function).

Shapes: n = tokens, d = n_embd, h = query heads, hk = KV heads, hd = head dim, f = n_ff, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from parity.errors import ModelFormatError
from parity.gguf.dequant import dequantize
from parity.gguf.reader import GGUFFile

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


def rope_neox(x: Array, cos: Array, sin: Array) -> Array:
    """NEOX-mode RoPE (LLAMA_ROPE_TYPE_NEOX): rotates the pairs (x[i], x[i + n_rot/2]) for i < n_rot/2.

    x is (n, heads, hd); the first n_rot = 2 * cos.shape[1] dims are rotated, the rest pass through.
    Pair i turns by the angle of index i, as ggml_rope's `rotate_pairs` with stride n_rot/2.
    """
    half = cos.shape[1]
    x0 = x[:, :, 0:half]  # (n, heads, n_rot/2)
    x1 = x[:, :, half : 2 * half]  # (n, heads, n_rot/2)
    c = cos[:, None, :]  # (n, 1, n_rot/2)
    s = sin[:, None, :]  # (n, 1, n_rot/2)
    out = x.copy()  # (n, heads, hd)
    out[:, :, 0:half] = x0 * c - x1 * s
    out[:, :, half : 2 * half] = x0 * s + x1 * c
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


# (tokens, last_only) -> logits: what each architecture's builder returns
Forward = Callable[[Array, bool], Array]
