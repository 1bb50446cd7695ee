"""Operations and weight access shared by every architecture of the numpy engine (parity.engines.numpy).

One pure function per operation, picoGPT style: weights passed in explicitly, every line carries its shape.
The orders of float operations mirror llama.cpp where that costs no clarity (see each function).

Shapes: n = tokens, d = n_embd, h = query heads, hk = KV heads, hd = head dim, f = n_ff, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from parity.engines.numpy.blas import one_thread
from parity.engines.numpy.loader import dequantized
from parity.engines.numpy.qrows import QRows, holds
from parity.errors import ModelFormatError
from parity.gguf.reader import GGUFFile

Array = npt.NDArray[Any]
FloatType = type[np.floating[Any]]
# A weight matrix: an array, or a Q8_0/Q5_0/Q4_0 one kept quantized (parity.engines.numpy.qrows)
Matrix = Array | QRows
DTYPES: dict[str, FloatType] = {"float32": np.float32, "float64": np.float64}

# A tap point: (op, layer or -1, tensor) -> the tensor the graph continues with (parity.engines.numpy.taps).
Tap = Callable[[str, int, Array], Array]


def no_tap(op: str, il: int, x: Array) -> Array:
    """The plain path's tap: records nothing, replaces nothing."""
    return x


# ---------------------------------------------------------------------------------------------------
# Operations


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm as ggml_rms_norm followed by ggml_mul: x / sqrt(mean(x^2) + eps) * w.

    ggml squares in float32 but accumulates the sum in double; `dtype=np.float64` does the same.
    """
    # np.mean(..., dtype=np.float64) computed as it computes it (float64 sum / count), without its Python layers
    total: Array = np.add.reduce(np.square(x), axis=-1, keepdims=True, dtype=np.float64)  # (n, 1)
    ms = (total / x.shape[-1]).astype(x.dtype)  # (n, 1)
    scale = 1.0 / np.sqrt(ms + eps)  # (n, 1)
    out: Array = x * scale * w  # (n, d)
    return out


def linear(x: Array, w: Matrix, b: Array | None = None, fast: bool = False) -> Array:
    """y = x @ W.T (+ b): W is (out, in) in numpy order, i.e. ggml's [in, out].

    A quantized W (QRows) multiplies by its dequantized weights, or with `fast` (the KV-cached greedy: a few
    rows) block by block from its integers (QRows.project_fast: the same sum, rounded in another order).
    """
    y = times_transposed(x, w, fast)  # (n, out)
    return y if b is None else y + b  # (n, out)


def times_transposed(x: Array, w: Matrix, fast: bool = False) -> Array:
    """x @ W.T for an array or a QRows W (`linear`)."""
    if isinstance(w, QRows):
        return w.project_fast(x) if fast else w.project(x)  # (n, out)
    out: Array = x @ w.T  # (n, out)
    return out


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
    steps: Array = np.full((positions.shape[0], n_rot // 2), theta_scale, dtype=dtype)  # (n, n_rot/2)
    steps[:, 0] = positions.astype(dtype)
    # theta[:, i] = ((pos * theta_scale) * theta_scale) ... i times: accumulate multiplies one step at a time
    theta = np.multiply.accumulate(steps, axis=1)  # (n, n_rot/2)
    ff = np.ones(n_rot // 2, dtype=dtype) if freq_factors is None else freq_factors.astype(dtype)  # (n_rot/2,)
    angles = dtype(freq_scale) * (theta / ff)  # (n, n_rot/2)
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


def causal_mask_at(positions: Array, n_kv: int) -> Array:
    """(n, n_kv) bool [query, key] for queries at `positions` over keys at 0..n_kv-1: key <= query.

    With positions 0..n-1 and n_kv = n this is causal_mask(n).
    """
    return np.arange(n_kv)[None, :] <= positions[:, None]  # (n, n_kv)


class KVCache:
    """Keys and values of the positions evaluated so far, per layer: greedy's incremental decode.

    The plain path has none (every call evaluates positions 0..n-1 from scratch). With a cache, a call evaluates
    its tokens at positions n_cached.., stores their K/V (after RoPE, as llama.cpp's cache holds them) and
    attends over everything stored. Evaluating a whole prompt into an empty cache is the plain computation.
    """

    def __init__(self, n_layer: int, capacity: int, n_head_kv: int, head_dim: int, dtype: FloatType) -> None:
        self.k: Array = np.zeros((n_layer, capacity, n_head_kv, head_dim), dtype=dtype)  # (L, cap, hk, hd)
        self.v: Array = np.zeros_like(self.k)  # (L, cap, hk, hd)
        self.n = 0  # positions stored
        self.tables: dict[str, tuple[Array, ...]] = {}  # per-position tables over the whole capacity (`rows`)

    def rows(self, name: str, n: int, build: Callable[[Array], tuple[Array, ...]]) -> tuple[Array, ...]:
        """Rows of the next `n` positions of the tables `build(positions)` (e.g. RoPE's cos, sin), built once for
        every position the cache holds: a table's rows are computed independently, so a row is the same value
        whatever else is computed with it (the prompt pass stays bit-identical, tests/unit/test_engine_fast.py)."""
        tables = self.tables.get(name)
        if tables is None:
            tables = self.tables[name] = build(np.arange(self.k.shape[1]))
        return tuple(t[self.n : self.n + n] for t in tables)

    def positions(self, n: int) -> Array:
        """Positions of the next `n` tokens."""
        return np.arange(self.n, self.n + n)  # (n,)

    def store(self, il: int, k: Array, v: Array) -> tuple[Array, Array]:
        """Append layer il's k, v (n, hk, hd) at the next positions; every stored key and value of the layer."""
        end = self.n + k.shape[0]
        self.k[il, self.n : end] = k
        self.v[il, self.n : end] = v
        return self.k[il, :end], self.v[il, :end]  # (n_kv, hk, hd) each

    def advance(self, n: int) -> None:
        """After every layer stored its `n` new positions."""
        self.n += n


def attention(
    q: Array,
    k: Array,
    v: Array,
    scale: float | np.floating[Any],
    allowed: Array | None = None,
    *,
    f16_probs: bool = False,
) -> Array:
    """Grouped-query attention over one sequence at positions 0..n-1, causal unless `allowed` says otherwise.

    q is (n, h, hd), k and v are (n, hk, hd); query head j reads KV head j // (h / hk), as ggml's
    broadcasting mul_mat does. As in ggml_soft_max_ext, the scale multiplies q.k, not q. `allowed` is an
    (n, n) bool [query, key] mask (e.g. a sliding window); masked keys get -inf, as in llama.cpp's KQ mask.
    `f16_probs` rounds the probabilities to f16 before the V product, as an engine does whose V cache is F16
    and whose kernel converts them to V's vec_dot_type (numerics.Numerics.round_probs).
    """
    n, h, hd = q.shape
    group = h // k.shape[1]
    k = np.repeat(k, group, axis=1)  # (n, h, hd)
    v = np.repeat(v, group, axis=1)  # (n, h, hd)
    scores = q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)  # (h, n, n): [head, query, key]
    keep = causal_mask(n) if allowed is None else allowed  # (n, n)
    scores = np.where(keep, scores * scale, -np.inf)  # (h, n, n)
    probs = softmax(scores, axis=-1)  # (h, n, n)
    if f16_probs:
        probs = probs.astype(np.float16).astype(q.dtype)  # (h, n, n) through f16
    out = probs @ v.transpose(1, 0, 2)  # (h, n, hd)
    return out.transpose(1, 0, 2).reshape(n, h * hd)  # (n, h*hd)


def silu(x: Array) -> Array:
    """SiLU as ggml_silu_f32: x / (1 + exp(-x))."""
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the correct limit -0
        return x / (1.0 + np.exp(-x))


def tapped_linear(x: Array, w: Matrix, b: Array | None, tap: Tap, op: str, il: int, fast: bool = False) -> Array:
    """`linear` with llama.cpp's build_ffn names: the matmul is `op`, the biased sum `op_b` (when there is a bias)."""
    y = tap(op, il, linear(x, w, None, fast))  # (n, out)
    return y if b is None else tap(op + "_b", il, y + b)  # (n, out)


def swiglu_ffn(
    x: Array,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
    biases: dict[str, Array],
    tap: Tap = no_tap,
    il: int = -1,
    fast: bool = False,
) -> Array:
    """LLM_FFN_SILU + LLM_FFN_PAR: down(silu(gate(x)) * up(x)); build_ffn's tap points ffn_up, ffn_gate, ffn_swiglu."""
    up = tapped_linear(x, w_up, biases.get("ffn_up"), tap, "ffn_up", il, fast)  # (n, f)
    gate = tapped_linear(x, w_gate, biases.get("ffn_gate"), tap, "ffn_gate", il, fast)  # (n, f)
    par = tap("ffn_swiglu", il, silu(gate) * up)  # (n, f)
    down_b = biases.get("ffn_down")
    if down_b is None:
        return linear(par, w_down, None, fast)  # (n, d)
    return tap("ffn_down", il, linear(par, w_down, None, fast)) + down_b  # (n, d)


def output_head(
    x: Array, output_norm: Array, output: Matrix, eps: float, last_only: bool, tap: Tap, fast: bool = False
) -> Array:
    """The final RMSNorm (tap `result_norm`) and the output matmul, (n, d) -> (n, V); the last row when `last_only`.

    llama.cpp also skips the head for rows it does not output. `fast`: see `linear`.
    """
    if last_only:
        x = x[-1:]  # (1, d)
    return linear(tap("result_norm", -1, rms_norm(x, output_norm, eps)), output, None, fast)  # (n, V)


# ---------------------------------------------------------------------------------------------------
# Hyperparameters and weights


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


@dataclass(frozen=True)
class Hparams:
    """The hyperparameters every architecture of the engine reads, as llama.cpp's load_hparams does."""

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


def read_hparams(f: GGUFFile, *, partial_rope: bool = False) -> Hparams:
    """Read the shared hyperparameters with llama.cpp's defaults (llama-model.cpp, load_hparams).

    RoPE covers the whole head (`rope.dimension_count` == head dim, else llama.cpp's 'invalid n_rot'), or with
    `partial_rope` any even width up to it. Key and value heads must be the same size, and the query heads
    must be a whole multiple of the KV heads. Each violation is a ModelFormatError naming the key.
    """
    arch = f.architecture
    n_embd = int_key(f, f"{arch}.embedding_length")
    n_head = int_key(f, f"{arch}.attention.head_count")
    head_dim = int_key(f, f"{arch}.attention.key_length", max(n_embd // n_head, 1))
    n_rot = int_key(f, f"{arch}.rope.dimension_count", head_dim)
    if partial_rope and (n_rot > head_dim or n_rot % 2):
        raise ModelFormatError(
            f"{f.path}: '{arch}.rope.dimension_count' is {n_rot}, which does not fit the head dimension {head_dim}",
            fix="RoPE needs an even number of dimensions no larger than the head; check the converter",
        )
    if not partial_rope and n_rot != head_dim:
        raise ModelFormatError(
            f"{f.path}: '{arch}.rope.dimension_count' is {n_rot} but the head dimension is {head_dim}",
            fix="llama.cpp rejects this model too ('invalid n_rot'); check the converter",
        )
    if int_key(f, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ModelFormatError(
            f"{f.path}: '{arch}.attention.value_length' differs from the key length {head_dim}",
            fix=f"llama.cpp's {arch} graph requires equal key and value head sizes; check the converter",
        )
    n_head_kv = int_key(f, f"{arch}.attention.head_count_kv", n_head)
    if n_head % n_head_kv != 0:
        raise ModelFormatError(
            f"{f.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}",
            fix="check the attention head counts in the metadata",
        )
    return Hparams(
        n_vocab=n_vocab_of(f),
        n_embd=n_embd,
        n_layer=int_key(f, f"{arch}.block_count"),
        n_ff=int_key(f, f"{arch}.feed_forward_length"),
        n_head=n_head,
        n_head_kv=n_head_kv,
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
    return dequantized(f, t, dtype)


def require_tensor(f: GGUFFile, name: str, shape: tuple[int, ...], dtype: FloatType) -> Array:
    """`load_tensor` for a tensor that must be present."""
    arr = load_tensor(f, name, shape, dtype)
    assert arr is not None  # required=True raises instead of returning None
    return arr


@dataclass(frozen=True)
class BlockWeights:
    """The weights every llama-shaped block has (architectures add their own), dequantized; (out, in) order."""

    attn_norm: Array  # (d,)
    wq: Matrix  # (h*hd, d)
    wk: Matrix  # (hk*hd, d)
    wv: Matrix  # (hk*hd, d)
    wo: Matrix  # (d, h*hd)
    ffn_norm: Array  # (d,)
    w_gate: Matrix  # (f, d)
    w_up: Matrix  # (f, d)
    w_down: Matrix  # (d, f)


def block_weights(f: GGUFFile, il: int, p: Hparams, dtype: FloatType) -> dict[str, Any]:
    """Block `il`'s BlockWeights fields, by field name (names as in llama.cpp's LLM_TENSOR table); Q8_0, Q5_0 and
    Q4_0 matrices stay quantized (`load_matrix`)."""
    d, f_, q_out, kv_out = p.n_embd, p.n_ff, p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    shapes = {
        "attn_norm": ("attn_norm", (d,)),
        "wq": ("attn_q", (q_out, d)),
        "wk": ("attn_k", (kv_out, d)),
        "wv": ("attn_v", (kv_out, d)),
        "wo": ("attn_output", (d, q_out)),
        "ffn_norm": ("ffn_norm", (d,)),
        "w_gate": ("ffn_gate", (f_, d)),
        "w_up": ("ffn_up", (f_, d)),
        "w_down": ("ffn_down", (d, f_)),
    }
    out: dict[str, Any] = {}
    for field, (name, shape) in shapes.items():
        full = f"blk.{il}.{name}.weight"
        m = load_matrix(f, full, shape, dtype) if len(shape) == 2 else None
        out[field] = require_tensor(f, full, shape, dtype) if m is None else m
    return out


def load_matrix(f: GGUFFile, name: str, shape: tuple[int, ...], dtype: FloatType) -> Matrix | None:
    """`load_tensor` for a matrix: Q8_0, Q5_0 and Q4_0 ones stay quantized (QRows), any other is dequantized."""
    t = f.tensors.get(name)
    if t is None or t.shape != shape or not holds(t):
        return load_tensor(f, name, shape, dtype, required=False)
    return QRows.load(f, t, dtype)


def embeddings_and_head(f: GGUFFile, p: Hparams, dtype: FloatType) -> tuple[Matrix, Array, Matrix]:
    """token_embd (V, d), output_norm (d,) and the output head (V, d): `output.weight`, or token_embd itself
    when the file has none (tied, as llama.cpp's TENSOR_DUPLICATED). Q8_0 ones stay quantized (`load_matrix`)."""
    token_embd = load_matrix(f, "token_embd.weight", (p.n_vocab, p.n_embd), dtype)
    if token_embd is None:
        token_embd = require_tensor(f, "token_embd.weight", (p.n_vocab, p.n_embd), dtype)  # raises: missing
    output_norm = require_tensor(f, "output_norm.weight", (p.n_embd,), dtype)
    output = load_matrix(f, "output.weight", (p.n_vocab, p.n_embd), dtype)
    return token_embd, output_norm, token_embd if output is None else output


# (tokens, last_only, tap, kv) -> logits: what each architecture's forward is, bound to its weights
Forward = Callable[[Array, bool, Tap, KVCache | None], Array]


class Loaded(Protocol):
    """An architecture's weights: whatever they hold, they carry the shared hyperparameters."""

    @property
    def params(self) -> Hparams: ...


W = TypeVar("W", bound=Loaded)


@dataclass(frozen=True)
class Bound:
    """What an architecture's builder returns: its forward bound to the loaded weights, and their hyperparameters."""

    forward: Forward
    params: Hparams
    weights: Any = None  # what `forward` is bound to (an architecture's weights dataclass)


def bound(weights: W, forward: Callable[[W, Array, bool, Tap, KVCache | None], Array]) -> Bound:
    """`forward` bound to its loaded `weights`."""

    def run(tokens: Array, last_only: bool, tap: Tap = no_tap, kv: KVCache | None = None) -> Array:
        with one_thread():  # numpy's BLAS on one thread: see engines/numpy/engine.py
            return forward(weights, tokens, last_only, tap, kv)

    return Bound(run, weights.params, weights)
