"""Tests for parity.engines.numpy.numerics: activation quantizers and mirrored matmuls against C transliterations."""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest
from gguf import GGMLQuantizationType as Q

from parity.compare.metrics import logit_gap
from parity.engines.numpy import numerics
from parity.engines.numpy.numerics import Numerics, Weight
from parity.errors import UsageError
from parity.gguf import ternary

RNG = np.random.default_rng(7)
F32 = np.float32


def _c_nearest_int(f: float) -> int:
    """ggml's nearest_int: the float32 bit trick."""
    val = np.float32(np.float32(f) + np.float32(12582912.0))
    i = int(struct.unpack("<i", struct.pack("<f", float(val)))[0])
    return (i & 0x007FFFFF) - 0x00400000


def _c_quantize_row_i8_s(x: npt.NDArray[np.float32]) -> tuple[list[int], np.float32, int]:
    mx = 0.00001
    for v in x:
        mx = max(mx, abs(float(v)))
    s = F32(127 / mx)
    q = [min(127, max(-128, _c_nearest_int(float(F32(v) * s)))) for v in x]
    return q, s, sum(q)


def _c_quantize_row_q8_k(x: npt.NDArray[np.float32]) -> tuple[list[int], np.float32]:
    mx = amax = F32(0.0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if not amax:
        return [0] * 256, F32(0.0)
    iscale = F32(F32(-127.0) / mx)
    return [min(127, _c_nearest_int(float(iscale * v))) for v in x], F32(F32(1.0) / iscale)


def test_nearest_int_is_round_half_even() -> None:
    for v in (0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -7.51):
        assert int(numerics.nearest_int(np.array([v], dtype=F32))[0]) == _c_nearest_int(v)


def test_i8_row_matches_c() -> None:
    x = (RNG.standard_normal((3, 256)) * [[1.0], [1e-7], [30.0]]).astype(F32)
    q, s = numerics.quantize_i8_row(x)
    for r in range(3):
        cq, cs, _ = _c_quantize_row_i8_s(x[r])
        assert q[r].astype(int).tolist() == cq and s[r, 0] == cs


def test_q8_k_matches_c() -> None:
    x = RNG.standard_normal((2, 512)).astype(F32)
    x[1, 256:] = 0.0  # an all-zero block
    x[0, 3] = -9.0  # the signed largest value is negative
    q, d = numerics.quantize_q8_k(x)
    for r in range(2):
        for b in range(2):
            cq, cd = _c_quantize_row_q8_k(x[r, 256 * b : 256 * (b + 1)])
            assert q[r, b].astype(int).tolist() == cq and d[r, b, 0] == cd


def test_i2_s_matmul_follows_the_fork_formula() -> None:
    w = (RNG.integers(-1, 2, size=(4, 256)) * 0.078125).astype(F32)
    raw = np.frombuffer(ternary.quantize_i2_s(w), dtype=np.uint8)
    codes, scales = ternary.ternary_codes(int(ternary.ForkType.I2_S), raw, w.shape)
    weight = Weight("w", w, int(ternary.ForkType.I2_S), codes, scales)
    x = RNG.standard_normal((2, 256)).astype(F32)
    y = numerics.matmul(x, weight, Numerics("mirror", "bitnet"))
    for r in range(2):
        q, s, act_sum = _c_quantize_row_i8_s(x[r])
        for o in range(4):
            code = [int(c) + 1 for c in codes[o]]  # 0, 1, 2 as stored
            tmp = F32(sum(c * v for c, v in zip(code, q, strict=True)))  # (float)sumi of the vec_dot
            want = F32(F32(tmp - F32(act_sum)) / s) * scales[0, 0]
            assert y[r, o] == want
    exact = numerics.matmul(x, weight, Numerics())
    assert np.allclose(y, exact, rtol=0.05, atol=0.05) and not np.array_equal(y, exact)


def _c_vec_dot_tq2_0_q8_k_avx2(qs: bytes, xd: np.float32, q: list[int], yd: np.float32) -> list[np.float32]:
    """One block of ggml_vec_dot_tq2_0_q8_K's AVX2 branch, register lane by register lane; returns 8 float lanes."""
    sumi16 = [0] * 16  # int16 lanes: maddubs adds the products of bytes 2k and 2k+1
    for j in (0, 32):
        for shift in range(4):
            for m in range(32):
                code = (qs[j + m] >> (2 * shift)) & 3
                sumi16[m // 2] += code * q[j * 4 + 32 * shift + m]
    bsums = [sum(q[16 * k : 16 * k + 16]) for k in range(16)]
    lanes = [(sumi16[2 * i] - bsums[2 * i]) + (sumi16[2 * i + 1] - bsums[2 * i + 1]) for i in range(8)]  # madd_epi16
    d = F32(yd * xd)
    return [F32(F32(v) * d) for v in lanes]


def _hsum_float_8(s: list[np.float32]) -> np.float32:
    return F32(F32(F32(s[0] + s[4]) + F32(s[2] + s[6])) + F32(F32(s[1] + s[5]) + F32(s[3] + s[7])))


def test_tq2_0_matmul_follows_the_avx2_kernel() -> None:
    w = (RNG.integers(-1, 2, size=(3, 512)) * 0.0546875).astype(F32)
    raw = np.frombuffer(ternary.quantize_tq2_0(w), dtype=np.uint8).reshape(3, 2, 66)
    codes, scales = ternary.ternary_codes(int(Q.TQ2_0), raw, w.shape)
    weight = Weight("w", w, int(Q.TQ2_0), codes, scales)
    x = RNG.standard_normal((2, 512)).astype(F32)
    y = numerics.matmul(x, weight, Numerics("mirror", "llama"))
    for r in range(2):
        for o in range(3):
            sumf = [F32(0.0)] * 8
            for b in range(2):
                q, yd = _c_quantize_row_q8_k(x[r, 256 * b : 256 * (b + 1)])
                xd = raw[o, b, 64:66].view("<f2")[0].astype(F32)
                lanes = _c_vec_dot_tq2_0_q8_k_avx2(raw[o, b, :64].tobytes(), xd, q, yd)
                sumf = [F32(a + t) for a, t in zip(sumf, lanes, strict=True)]
            assert y[r, o] == _hsum_float_8(sumf)
    tq1 = np.frombuffer(ternary.quantize_tq1_0(w), dtype=np.uint8)
    c1, s1 = ternary.ternary_codes(int(Q.TQ1_0), tq1, w.shape)
    y1 = numerics.matmul(x, Weight("w", w, int(Q.TQ1_0), c1, s1), Numerics("mirror", "bitnet"))
    assert np.array_equal(y1, y)  # same weights, same Q8_K input, same lane layout (value e at byte e % 32)


def test_rules_per_backend_and_shape() -> None:
    r = numerics.input_rule
    assert r("bitnet", 36) == numerics.I8_ROW
    assert r("llama", int(Q.TQ2_0)) == r("bitnet", int(Q.TQ1_0)) == r("llama", int(Q.Q6_K)) == numerics.Q8_K_IN
    assert r("llama", int(Q.Q8_0)) == r("llama", int(Q.Q4_0)) == numerics.Q8_0_IN
    assert r("llama", int(Q.F16)) == numerics.F16_IN
    assert r("bitnet", int(Q.F16), "batch") == numerics.NONE  # tinyBLAS takes f32 inputs for n >= 2
    assert r("bitnet", int(Q.F16), "stepwise") == numerics.F16_IN  # llamafile_sgemm refuses n < 2
    assert r("llama", int(Q.F32)) == numerics.NONE
    assert Numerics().rule(36) == numerics.NONE  # exact: no rounding anywhere


def test_lane_numerics_and_description() -> None:
    num = numerics.for_lane("mirror", "bitnet", "stepwise", 0, 1)
    assert num.v_f16 and not num.k_f16 and num.round_probs
    assert not numerics.for_lane("mirror", "bitnet", "batch", 0, 1).round_probs
    d = num.describe({"a": 36, "b": int(Q.F16), "c": int(Q.F32)})
    assert d["mode"] == "mirror" and d["mirrors"] == "bitnet"
    assert d["input_rounding"] == {"F32": "none", "F16": "f16", "I2_S": "i8_row"}
    assert numerics.for_lane("exact", "llama", "batch", 0, 0).describe() == {"mode": "exact"}
    note = numerics.gap_note(numerics.for_lane("mirror", "bitnet", "batch", 0, 1), {"a": 36})
    assert note is not None and "tinyBLAS" in note and "batch path" in note
    assert numerics.gap_note(numerics.for_lane("mirror", "llama", "batch", 0, 0), {"a": 35}) is None
    assert numerics.gap_note(numerics.for_lane("exact", "bitnet", "batch", 0, 1), {"a": 36}) is None


def test_compare_summarizes_like_a_receipt() -> None:
    a = RNG.standard_normal((3, 16))
    same = logit_gap(a, a)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-15) and same["max_abs"] == 0.0
    assert same["min_cosine"] == pytest.approx(1.0)
    shifted = logit_gap(a + 1.0, a)  # a constant shift leaves the softmax unchanged
    assert shifted["mean_kl"] == pytest.approx(0.0, abs=1e-12) and shifted["max_abs"] == pytest.approx(1.0)


def test_compare_is_the_metrics_of_the_receipt_rows() -> None:
    from parity.compare import metrics

    ours, ref = RNG.standard_normal((4, 32)), RNG.standard_normal((4, 32))
    rows = metrics.position_rows(ours, ref, [0, 1, 2, 3])
    gap = logit_gap(ours, ref)
    assert gap["min_cosine"] == min(r["cosine"] for r in rows)
    assert gap["max_abs"] == max(r["max_abs"] for r in rows)
    assert gap["mean_kl"] == pytest.approx(float(np.mean([r["kl"] for r in rows])), rel=1e-12)
    with pytest.raises(ValueError, match="logit shapes differ"):
        logit_gap(ours[:1], ref)


def test_unknown_modes_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--numerics must be one of exact, mirror"):
        numerics.check_mode("fast", "batch")
    with pytest.raises(UsageError, match="--eval-shape must be one of batch, stepwise"):
        numerics.check_mode("exact", "chunked")


def test_cache_rounding_only_when_mirroring() -> None:
    v = np.array([0.1, 1 / 3], dtype=F32)
    assert np.array_equal(Numerics().cache(v, True), v)
    assert np.array_equal(Numerics("mirror", "bitnet").cache(v, True), v.astype(np.float16).astype(F32))
