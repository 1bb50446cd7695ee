"""Tests for parity.engines.numpy.bitnet: the numpy `bitnet` graph on the synthetic ternary model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import pytest

from parity.engines.numpy import bitnet
from parity.engines.numpy.engine import ARCHITECTURES, NumpyEngine
from parity.engines.numpy.numerics import Numerics
from parity.engines.numpy.ops import attention, rms_norm, rope_cos_sin, silu, softmax
from parity.errors import ModelFormatError
from parity.gguf.reader import open_gguf
from parity.models import ternary_model

from .ternary_files import copy_as_i2_s

TOKENS = [1, 17, 300, 42, 99, 7, 256, 511, 3, 64, 128, 200]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ternary")
    out = {v: ternary_model.generate(v, root / v).gguf_path for v in ternary_model.GENERATED}
    copy_as_i2_s(out["f16"], root / "i2_s.gguf")
    out["i2_s"] = root / "i2_s.gguf"
    return out


def test_registered() -> None:
    assert "bitnet" in ARCHITECTURES


def test_every_format_holds_the_same_weights(models: dict[str, Path]) -> None:
    ref = NumpyEngine(models["f16"], dtype="float64").logits(TOKENS)
    assert ref.shape == (len(TOKENS), 512)
    assert 1.5 < float(ref.std()) < 5.0  # a realistic logit spread
    for variant in ("f32", "i2_s"):
        assert np.array_equal(NumpyEngine(models[variant], dtype="float64").logits(TOKENS), ref), variant


def _reference_forward(path: Path, tokens: list[int]) -> npt.NDArray[np.float64]:
    """An independent float64 transcription of build_bitnet (HF-style rotate_half RoPE, explicit loops over heads)."""
    f = open_gguf(path)
    w = {name: np.asarray(t.data, dtype=np.float64).reshape(t.shape) for name, t in f.tensors.items()}
    d, nh, nkv, hd = 256, 4, 2, 64
    n = len(tokens)
    x = w["token_embd.weight"][tokens]
    pos = np.arange(n)[:, None]
    inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv[None, :]
    cos, sin = np.concatenate([np.cos(ang)] * 2, axis=1), np.concatenate([np.sin(ang)] * 2, axis=1)

    def rotate_half(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.concatenate([-v[:, hd // 2 :], v[:, : hd // 2]], axis=1)

    def norm(v: npt.NDArray[np.float64], g: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        out: npt.NDArray[np.float64] = v / np.sqrt(np.mean(v * v, axis=1, keepdims=True) + 1e-5) * g
        return out

    def mm(v: npt.NDArray[np.float64], name: str) -> npt.NDArray[np.float64]:
        y = v @ w[name + ".weight"].T
        return y * w[name + ".scale"][0] if name + ".scale" in w else y

    for layer in range(2):
        b = f"blk.{layer}."
        h = norm(x, w[b + "attn_norm.weight"])
        q, k, v = mm(h, b + "attn_q"), mm(h, b + "attn_k"), mm(h, b + "attn_v")
        heads = []
        for j in range(nh):
            kj = j // (nh // nkv)
            qh = q[:, j * hd : (j + 1) * hd]
            kh = k[:, kj * hd : (kj + 1) * hd]
            qh, kh = qh * cos + rotate_half(qh) * sin, kh * cos + rotate_half(kh) * sin
            s = qh @ kh.T / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            heads.append((p / p.sum(axis=1, keepdims=True)) @ v[:, kj * hd : (kj + 1) * hd])
        a = norm(np.concatenate(heads, axis=1), w[b + "attn_sub_norm.weight"])
        x = x + mm(a, b + "attn_output")
        h = norm(x, w[b + "ffn_norm.weight"])
        g = mm(h, b + "ffn_gate")
        f_ = norm(g / (1 + np.exp(-g)) * mm(h, b + "ffn_up"), w[b + "ffn_sub_norm.weight"])
        x = x + mm(f_, b + "ffn_down")
    assert d == x.shape[1]
    return norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


def test_graph_matches_an_independent_transcription(models: dict[str, Path]) -> None:
    ours = NumpyEngine(models["f32"], dtype="float64").logits(TOKENS)
    ref = _reference_forward(models["f32"], TOKENS)
    assert float(np.max(np.abs(ours - ref))) < 1e-9


def test_scale_tensors_are_applied(models: dict[str, Path]) -> None:
    f = open_gguf(models["f32"])
    w = bitnet.load_bitnet(f, np.float64)
    assert set(w.layers[1].scales) == {"attn_q", "ffn_down"} and not w.layers[0].scales
    ids = np.asarray(TOKENS)
    with_scales = bitnet.bitnet_forward(w, ids)
    w.layers[1].scales.clear()
    assert float(np.max(np.abs(bitnet.bitnet_forward(w, ids) - with_scales))) > 1e-2


def test_rope_neox_rotates_halves() -> None:
    cos, sin = rope_cos_sin(np.arange(3), 8, 10000.0, 1.0, None, np.float64)
    x = np.arange(3 * 1 * 8, dtype=np.float64).reshape(3, 1, 8)
    y = bitnet.rope_neox(x, cos, sin)
    assert np.array_equal(y[0], x[0])  # position 0: angle 0
    i = 1  # pair (x[1], x[5]) of position 2 rotates by angle 2 * 10000^(-2/8)
    ang = 2 * 10000.0 ** (-2 * i / 8)
    assert y[2, 0, i] == pytest.approx(x[2, 0, i] * np.cos(ang) - x[2, 0, i + 4] * np.sin(ang))
    assert y[2, 0, i + 4] == pytest.approx(x[2, 0, i] * np.sin(ang) + x[2, 0, i + 4] * np.cos(ang))


def test_last_only_and_greedy(models: dict[str, Path]) -> None:
    e = NumpyEngine(models["f16"], dtype="float32")
    full = e.logits(TOKENS)
    w = bitnet.load_bitnet(e.gguf, np.float32)
    last = bitnet.bitnet_forward(w, np.asarray(TOKENS), last_only=True)
    assert np.allclose(last[0], full[-1], atol=1e-4)
    assert len(e.greedy(TOKENS[:4], 3)) == 3


def test_mirror_numerics_stay_close_to_exact(models: dict[str, Path]) -> None:
    exact = NumpyEngine(models["f16"], dtype="float64").logits(TOKENS)
    f = open_gguf(models["i2_s"])
    for backend in ("bitnet", "llama"):
        mirrored = bitnet.mirrored_logits(f, TOKENS, Numerics("mirror", backend, "batch", False, True), np.float32)
        cos = np.sum(mirrored * exact, 1) / np.linalg.norm(mirrored, axis=1) / np.linalg.norm(exact, axis=1)
        assert 0.99 < float(cos.min()) < 1.0  # int8 / Q8_K activations: close, never identical


def test_attention_can_round_its_probabilities_through_f16() -> None:
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((5, 4, 8)).astype(np.float32) for _ in range(3))
    probs = softmax(np.where(np.tril(np.ones((5, 5), bool)), np.einsum("qhd,khd->hqk", q, k) * 0.5, -np.inf))
    rounded = probs.astype(np.float16).astype(np.float32)  # (h, n, n), as an engine with an F16 V cache
    want = np.einsum("hqk,khd->qhd", rounded, v).reshape(5, 32)
    got = attention(q, k, v, 0.5, f16_probs=True)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6) and not np.array_equal(got, attention(q, k, v, 0.5))


def _rewrite(src: Path, dst: Path, drop: set[str], add: dict[str, npt.NDArray[np.float32]]) -> None:
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "bitnet")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.asarray(t.data))
    for name, value in add.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_output_weight_and_unknown_tensors_are_rejected(models: dict[str, Path], tmp_path: Path) -> None:
    with_output = tmp_path / "output.gguf"
    _rewrite(models["f32"], with_output, set(), {"output.weight": np.zeros((512, 256), dtype=np.float32)})
    with pytest.raises(ModelFormatError, match="'output.weight'.*tie the output"):
        NumpyEngine(with_output)
    with_bias = tmp_path / "bias.gguf"
    _rewrite(models["f32"], with_bias, set(), {"blk.0.attn_q.bias": np.zeros(256, dtype=np.float32)})
    with pytest.raises(ModelFormatError, match="'blk.0.attn_q.bias' is not part of the bitnet architecture"):
        NumpyEngine(with_bias)
    missing = tmp_path / "missing.gguf"
    _rewrite(models["f32"], missing, {"blk.1.ffn_sub_norm.weight"}, {})
    with pytest.raises(ModelFormatError, match="tensor 'blk.1.ffn_sub_norm.weight' is missing"):
        NumpyEngine(missing)


def test_ops_used_are_the_shared_ones() -> None:
    x = np.array([[1.0, -2.0, 3.0, 0.5]], dtype=np.float32)
    assert np.allclose(rms_norm(x, np.ones(4, dtype=np.float32), 1e-5), x / np.sqrt(np.mean(x * x) + 1e-5))
    assert silu(np.array([0.0]))[0] == 0.0
