"""Numerics modes of the numpy engine: `exact`, or `mirror` the rounding points of one C++ engine.

`exact` multiplies by the dequantized weights in the engine dtype (float32 or float64): the yardstick.

`mirror` follows the engine a lane is compared with, at the places where that engine rounds the INPUT of a
matrix multiply (the weights are already exact: they are the decoded file):

| engine (backend) | weight type | input rounding | engine code |
|---|---|---|---|
| bitnet.cpp fork | I2_S | int8 per token row, one absmax scale s = 127/max(amax, 1e-5), round half to even | quantize_row_i8_s (ggml-quants.c) |
| both | TQ1_0, TQ2_0, K-quants | Q8_K: per 256 values, scale from the signed largest-magnitude value, -127/m | quantize_row_q8_K_ref |
| both | Q8_0, Q4_0, Q5_0 (Q4_1, Q5_1: Q8_1, same values) | Q8_0: per 32 values, d = amax/127 stored as f16 | quantize_row_q8_0 (x86) |
| llama.cpp (mainline) | F16 | f16 (vec_dot_type F16; its tinyBLAS takes f16 inputs) | ggml_cpu_fp32_to_fp16 |
| bitnet.cpp fork, batch | F16 | none: llamafile tinyBLAS multiplies f16 weights by the f32 input | sgemm.cpp (2024) |
| bitnet.cpp fork, stepwise | F16 | f16: its llamafile_sgemm refuses n < 2, so vec_dot_f16 runs | sgemm.cpp, ggml.c |
| both | F32 | none | |

plus the lane's KV cache: a cache type F16 (bitnet.cpp's V cache, which must be F16 without flash attention)
rounds what is stored, and the attention probabilities multiplied with an F16 V follow the F16 rule above
(rounded to f16 by mainline always, by the fork only one token at a time).

Integer dot products are exact here and the float scalings after them follow the C order in float32: I2_S as
the fork's `(sum - act_sum) / act_scale * scale`, TQ1_0/TQ2_0 lane by lane as their AVX2 kernels (an ulp there
flips f16 V-cache roundings in bitnet.cpp, which later int8/Q8_K quantizations amplify). Other float sums
(attention, F16 matmuls, softmax exp) are not bit-exact, so a rounding flips now and then; compare the mean KL
of `parity run --variant ternary --numerics mirror` with `--numerics exact` (both are in the receipts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGMLQuantizationType as Q

from parity.errors import UsageError
from parity.gguf.ternary import QK_K, ForkType

Array = npt.NDArray[Any]
F32 = np.float32

MODES = ("exact", "mirror")
EVAL_SHAPES = ("batch", "stepwise")

# Input-rounding rules (names recorded in receipts).
NONE, F16_IN, Q8_0_IN, Q8_K_IN, I8_ROW = "none", "f16", "q8_0", "q8_k", "i8_row"

_Q8_0_FAMILY = {int(Q.Q8_0), int(Q.Q4_0), int(Q.Q4_1), int(Q.Q5_0), int(Q.Q5_1)}
_Q8_K_FAMILY = {int(Q.TQ1_0), int(Q.TQ2_0), int(Q.Q2_K), int(Q.Q3_K), int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)}


def input_rule(backend: str, ggml_type: int, eval_shape: str = "batch") -> str:
    """How `backend` rounds the input of a matmul with weights of `ggml_type` (see the module table)."""
    if ggml_type == ForkType.I2_S:
        return I8_ROW
    if ggml_type in _Q8_K_FAMILY:
        return Q8_K_IN
    if ggml_type in _Q8_0_FAMILY:
        return Q8_0_IN
    if ggml_type == int(Q.F16):
        return F16_IN if backend == "llama" or eval_shape == "stepwise" else NONE
    return NONE


def check_mode(numerics: str, eval_shape: str) -> None:
    """Reject unknown mode names, naming the flag."""
    if numerics not in MODES:
        raise UsageError(f"--numerics must be one of {', '.join(MODES)}, got {numerics!r}", fix="e.g. --numerics exact")
    if eval_shape not in EVAL_SHAPES:
        raise UsageError(
            f"--eval-shape must be one of {', '.join(EVAL_SHAPES)}, got {eval_shape!r}", fix="e.g. --eval-shape batch"
        )


@dataclass(frozen=True)
class Numerics:
    """Where the numpy engine rounds: nowhere (`exact`), or where `backend` does (`mirror`)."""

    mode: str = "exact"
    backend: str | None = None
    eval_shape: str = "batch"  # how the lane evaluates: the fork's F16 rule depends on it
    k_f16: bool = False  # the lane's K cache is F16
    v_f16: bool = False  # the lane's V cache is F16

    @property
    def mirroring(self) -> bool:
        return self.mode == "mirror"

    def rule(self, ggml_type: int) -> str:
        """The input rounding applied before a matmul with `ggml_type` weights."""
        if not self.mirroring or self.backend is None:
            return NONE
        return input_rule(self.backend, ggml_type, self.eval_shape)

    @property
    def round_probs(self) -> bool:
        """Whether attention probabilities are rounded to f16 before meeting an F16 V cache."""
        return self.v_f16 and self.rule(int(Q.F16)) == F16_IN

    def cache(self, x: Array, f16: bool) -> Array:
        """A K or V tensor as the lane's cache stores it (rounded through f16 when its type is F16)."""
        if not self.mirroring or not f16:
            return x
        return x.astype(np.float16).astype(x.dtype)

    def describe(self, weight_types: dict[str, int] | None = None) -> dict[str, Any]:
        """JSON for receipts: mode, engine mirrored, cache rounding and the input rule per weight type."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mirroring:
            out["mirrors"] = self.backend
            out["eval_shape"] = self.eval_shape
            out["kv_cache_f16"] = {"k": self.k_f16, "v": self.v_f16, "probs_rounded": self.round_probs}
            if weight_types:
                from parity.gguf.ternary import type_name

                out["input_rounding"] = {type_name(t): self.rule(t) for t in sorted(set(weight_types.values()))}
        return out


# ---------------------------------------------------------------------------------------------------
# Activation quantizers (one pure function per C function)


def nearest_int(x: Array) -> Array:
    """ggml's `nearest_int`: add 1.5 * 2^23 in float32 -> round half to even (== np.rint for |x| < 2^22)."""
    return np.rint(x.astype(F32))


def quantize_i8_row(x: Array) -> tuple[Array, Array]:
    """bitnet.cpp's `quantize_row_i8_s`: per row, s = (float)(127 / max(max|x| (double), 1e-5)), q = clamp(rint(x*s)).

    Returns q (n, k) as float64 integers and s (n, 1) float32.
    """
    amax = np.maximum(np.max(np.abs(x.astype(np.float64)), axis=-1, keepdims=True), 1e-5)  # (n, 1) double
    s = (127.0 / amax).astype(F32)  # (n, 1): `float s = 127 / max` (double division, rounded to float)
    q = np.clip(nearest_int(x.astype(F32) * s), -128, 127)  # (n, k): float32 product, then rounded
    return q.astype(np.float64), s


def quantize_q8_k(x: Array) -> tuple[Array, Array]:
    """`quantize_row_q8_K_ref` (x86 uses the reference): per 256 values, iscale = -127/m with m the signed
    largest-magnitude value; q = min(127, rint(iscale * x)); d = 1/iscale. All-zero blocks get d = 0, q = 0.

    Returns q (n, nb, 256) float64 integers and d (n, nb, 1) float32.
    """
    n, k = x.shape
    xb = x.astype(F32).reshape(n, k // QK_K, QK_K)  # (n, nb, 256)
    idx = np.argmax(np.abs(xb), axis=-1)[..., None]  # (n, nb, 1): the first largest |x|, as `ax > amax`
    m = np.take_along_axis(xb, idx, axis=-1)  # (n, nb, 1) signed
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(m != 0, F32(-127.0) / m, F32(0.0)).astype(F32)  # (n, nb, 1)
        d = np.where(m != 0, F32(1.0) / iscale, F32(0.0)).astype(F32)  # (n, nb, 1)
    q = np.minimum(127.0, nearest_int(iscale * xb))  # (n, nb, 256)
    return q.astype(np.float64), d


def quantize_q8_0(x: Array) -> Array:
    """`quantize_row_q8_0` (x86 AVX path): per 32 values d = amax/127 (stored f16), q = rint(x * 127/amax).

    Returns the dequantized input q * f16(d) (n, k) as float64, which is what the dot product sees.
    """
    n, k = x.shape
    xb = x.astype(F32).reshape(n, k // 32, 32)  # (n, nb, 32)
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)  # (n, nb, 1)
    d16 = (amax / F32(127.0)).astype(np.float16).astype(np.float64)  # (n, nb, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(amax != 0, F32(127.0) / amax, F32(0.0)).astype(F32)
    q = nearest_int(xb * inv)  # (n, nb, 32)
    out: Array = (q * d16).reshape(n, k)  # (n, k)
    return out


# ---------------------------------------------------------------------------------------------------
# Matmuls

# ggml_vec_dot_tq1_0_q8_K / ggml_vec_dot_tq2_0_q8_K on AVX2 (identical in mainline and the fork) keep 8 float32
# lanes: value e of a block lands at byte e % 32 of a 256-bit register, maddubs + madd sum it into int32 lane
# (e % 32) // 4, and the Q8_K block sums (bsums, 16 values each) are subtracted lane-wise, 32 values per lane.
_PRODUCT_LANE = (np.arange(QK_K) % 32) // 4  # (256,)
_PRODUCT_ORDER = np.argsort(_PRODUCT_LANE, kind="stable")  # values grouped by lane, 32 per lane


def tq_dot_avx2(qx: Array, dx: Array, codes: Array, scales: Array) -> Array:
    """Ternary-weight x Q8_K dot products with the float order of the AVX2 kernels, (n, nb, 256) -> (n, out).

    Per block: int32 lanes P_L = sum over lane L of (t + 1) * q minus bsums of values 32L..32L+31 (exact);
    sumf_L += (float)P_L * (y.d * x.d) block by block; then hsum_float_8: ((s0+s4)+(s2+s6)) + ((s1+s5)+(s3+s7)).
    An ulp here matters: bitnet.cpp rounds V to f16, and every later Q8_K quantization can flip on it.
    """
    n, nb, _ = qx.shape
    out = codes.shape[0]
    c = (codes.astype(np.float64) + 1.0).reshape(out, nb, QK_K)[:, :, _PRODUCT_ORDER].reshape(out, nb, 8, 32)
    q = qx[:, :, _PRODUCT_ORDER].reshape(n, nb, 8, 32)  # (n, nb, 8, 32)
    bsums = qx.reshape(n, nb, 8, 32).sum(axis=-1)  # (n, nb, 8): values 32L..32L+31
    d = dx.reshape(n, 1, nb) * scales.astype(F32).reshape(1, out, nb)  # (n, out, nb) float32
    acc = np.zeros((n, out, 8), dtype=F32)  # (n, out, lane)
    for b in range(nb):
        lanes = np.einsum("nlk,olk->nol", q[:, b], c[:, b]) - bsums[:, b][:, None, :]  # (n, out, 8): exact ints
        acc = acc + lanes.astype(F32) * d[:, :, b : b + 1]  # mul then add, as _mm256_mul_ps / _mm256_add_ps
    r = [acc[:, :, i] for i in range(8)]
    result: Array = ((r[0] + r[4]) + (r[2] + r[6])) + ((r[1] + r[5]) + (r[3] + r[7]))  # (n, out)
    return result


@dataclass(frozen=True)
class Weight:
    """One matmul weight as the engines hold it: dequantized values, stored type, and ternary codes if any."""

    name: str
    w: Array  # (out, in) dequantized, engine dtype
    ggml_type: int
    codes: Array | None = None  # (out, in) int8 in {-1, 0, 1} for I2_S / TQ1_0 / TQ2_0
    scales: Array | None = None  # (1, 1) for I2_S, (out, in/256) for TQ: the weights are codes * scales


def matmul(x: Array, weight: Weight, num: Numerics) -> Array:
    """y = x @ W.T with `num`'s input rounding for this weight type; (n, in) -> (n, out) in x's dtype."""
    rule = num.rule(weight.ggml_type)
    if rule == NONE:
        return x @ weight.w.T  # (n, out)
    if rule == F16_IN:
        x16 = x.astype(np.float16).astype(np.float64)  # (n, in)
        return (x16 @ weight.w.astype(np.float64).T).astype(x.dtype)  # (n, out)
    if rule == Q8_0_IN:
        return (quantize_q8_0(x) @ weight.w.astype(np.float64).T).astype(x.dtype)  # (n, out)
    if rule == I8_ROW:
        if weight.codes is None or weight.scales is None:
            raise ValueError(f"{weight.name}: I2_S mirroring needs the ternary codes")
        q, s = quantize_i8_row(x)  # (n, in), (n, 1)
        sumi = q @ weight.codes.astype(np.float64).T  # (n, out): exact integers (|sum| < 2^53)
        # (float)sumi - (float)act_sum is exact; then `/ act_scales[i1] * (*scale)` in float32
        y = (sumi.astype(F32) / s) * F32(weight.scales.reshape(-1)[0])  # (n, out)
        return y.astype(x.dtype)
    # Q8_K
    qx, dx = quantize_q8_k(x)  # (n, nb, 256), (n, nb, 1)
    if weight.codes is not None and weight.scales is not None:
        return tq_dot_avx2(qx, dx, weight.codes, weight.scales).astype(x.dtype)  # (n, out)
    n = qx.shape[0]
    x_deq = (qx * dx.astype(np.float64)).reshape(n, -1)  # (n, in): K-quant weights without codes
    return (x_deq @ weight.w.astype(np.float64).T).astype(x.dtype)


def for_lane(mode: str, backend: str, eval_shape: str, type_k: int, type_v: int) -> Numerics:
    """The numerics of one lane: `mode`, mirroring `backend` evaluated in `eval_shape` with its KV cache types."""
    check_mode(mode, eval_shape)
    f16 = int(Q.F16)
    return Numerics(mode, backend, eval_shape, type_k == f16, type_v == f16)


def gap_note(num: Numerics, weight_types: dict[str, int]) -> str | None:
    """Why this lane's numbers depend on the evaluation shape, for the receipt (None where they do not)."""
    if not (num.mirroring and num.backend == "bitnet"):
        return None
    return (
        "bitnet.cpp rounds differently in its two evaluation shapes: with two or more tokens its llamafile tinyBLAS "
        "multiplies F16 weights (here the tied token_embd head) and the F16 V cache by the f32 inputs, while one "
        "token at a time llamafile_sgemm refuses (n < 2) and ggml's vec_dot_f16 rounds the inputs and the attention "
        "probabilities to f16 first. Where matmul inputs are re-quantized (int8 rows for I2_S, Q8_K for TQ1_0/TQ2_0) "
        "that difference flips roundings and grows, so the engine's batch and one-token logits differ "
        "(measured in every mirror receipt as engine_shape_gap); this mirror follows the rounding points of "
        f"the {num.eval_shape} path. A mirror applying the one-token rules to the batch path lands at that gap "
        "instead of at the mirroring floor."
    )
