"""Tests for parity.engines.numpy.gemma3 on tiny random Gemma 3 GGUFs written into tmp_path.

The engine is checked against `loop_gemma3`, a float64 forward pass written independently, one scalar
loop per operation, from llama.cpp's gemma3 graph (src/models/gemma3.cpp).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest

from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.gemma3 import gelu_tanh, gemma3_params, sliding_window_mask, softcap
from parity.engines.numpy.ops import attention, rope_cos_sin, rope_neox
from parity.errors import ModelFormatError
from parity.gguf.reader import open_gguf

Weights = dict[str, npt.NDArray[np.float32]]
F64 = npt.NDArray[np.float64]
N_VOCAB, N_EMBD, N_FF, N_CTX, EPS = 80, 64, 96, 64, 1e-6
N_HEAD, N_HEAD_KV, HEAD_DIM = 4, 2, 32  # q width 128 != n_embd, as in Gemma 3 (4 x 256 vs 640)
ROPE_BASE, ROPE_BASE_SWA = 1e6, 10000.0
PROMPT = [2, 5, 17, 42, 3, 3, 60, 0, 79, 11, 8, 33, 21, 7]


def make_weights(seed: int, n_layer: int = 3, tied: bool = True) -> Weights:
    """Random Gemma 3 weights in numpy (out, in) order; norm weights near 1 (the "+1" is folded in)."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, gain: float = 1.0) -> npt.NDArray[np.float32]:
        return (gain * rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> npt.NDArray[np.float32]:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    q_out, kv_out = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    w: Weights = {"token_embd.weight": (0.3 * rng.standard_normal((N_VOCAB, N_EMBD))).astype(np.float32)}
    for i in range(n_layer):
        b = f"blk.{i}."
        w[b + "attn_norm.weight"] = norm(N_EMBD)
        w[b + "attn_q.weight"] = mat(q_out, N_EMBD)
        w[b + "attn_k.weight"] = mat(kv_out, N_EMBD)
        w[b + "attn_v.weight"] = mat(kv_out, N_EMBD)
        w[b + "attn_q_norm.weight"] = norm(HEAD_DIM)
        w[b + "attn_k_norm.weight"] = norm(HEAD_DIM)
        w[b + "attn_output.weight"] = mat(N_EMBD, q_out)
        w[b + "post_attention_norm.weight"] = norm(N_EMBD)
        w[b + "ffn_norm.weight"] = norm(N_EMBD)
        w[b + "ffn_gate.weight"] = mat(N_FF, N_EMBD, 2.0)
        w[b + "ffn_up.weight"] = mat(N_FF, N_EMBD)
        w[b + "ffn_down.weight"] = mat(N_EMBD, N_FF)
        w[b + "post_ffw_norm.weight"] = norm(N_EMBD)
    w["output_norm.weight"] = norm(N_EMBD)
    if not tied:
        w["output.weight"] = mat(N_VOCAB, N_EMBD, 8.0)
    return w


def write_gemma3(
    path: Path,
    w: Weights,
    *,
    n_swa: int | None = 4,
    pattern: int | list[bool] | None = 3,
    wtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    extra: dict[str, Any] | None = None,
    n_layer: int | None = None,
) -> Path:
    """Write `w` as a gemma3 GGUF that llama.cpp loads; 1-D norms stay F32 as in llama.cpp's converter.

    `n_swa=None` leaves the window out (every layer global); `pattern=None` leaves the pattern out
    (llama.cpp's default period 6); `extra` adds float32 keys (int values: uint32) under the gemma3 prefix.
    """
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer if n_layer is not None else sum(1 for k in w if k.endswith("attn_norm.weight")))
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(ROPE_BASE)
    if n_swa is not None:
        writer.add_sliding_window(n_swa)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)
    for key, value in (extra or {}).items():
        if isinstance(value, int):
            writer.add_uint32(f"gemma3.{key}", value)
        else:
            writer.add_float32(f"gemma3.{key}", value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(N_VOCAB)])
    for name, arr in w.items():
        if arr.ndim == 1 or wtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, arr)
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, wtype), raw_dtype=wtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- independent loop-based reference ------------------------------------------------------------


def loop_rope_neox(x: F64, base: float, freq_scale: float = 1.0) -> F64:
    """x (n, heads, hd): rotate (x[i], x[i + hd/2]) by freq_scale * pos * base^(-2i/hd), scalar by scalar."""
    n, heads, hd = x.shape
    half = hd // 2
    out = x.copy()
    for pos in range(n):
        for h in range(heads):
            for i in range(half):
                theta = freq_scale * pos * base ** (-2.0 * i / hd)
                a, b = x[pos, h, i], x[pos, h, i + half]
                out[pos, h, i] = a * math.cos(theta) - b * math.sin(theta)
                out[pos, h, i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


def loop_attention(q: F64, k: F64, v: F64, window: int) -> F64:
    """Query by query and head by head; key t is visible from query i when t <= i and i - t < window."""
    n, h, hd = q.shape
    group = h // k.shape[1]
    out = np.zeros((n, h * hd))
    for i in range(n):
        for j in range(h):
            visible = [t for t in range(i + 1) if i - t < window]
            scores = [float(q[i, j] @ k[t, j // group]) for t in visible]
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            out[i, j * hd : (j + 1) * hd] = sum(e[c] / sum(e) * v[t, j // group] for c, t in enumerate(visible))
    return out


def loop_gemma3(
    w: Weights,
    tokens: list[int],
    *,
    swa: list[bool],
    n_swa: int,
    base_swa: float = ROPE_BASE_SWA,
    freq_scale: float = 1.0,
    cap: float = 0.0,
) -> F64:
    """A straightforward float64 Gemma 3 forward pass, written independently of the engine."""
    g = {k: v.astype(np.float64) for k, v in w.items()}
    n = len(tokens)

    def norm(x: F64, weight: F64) -> F64:
        flat = x.reshape(-1, x.shape[-1])
        rows = [row / math.sqrt(float(np.mean(row**2)) + EPS) * weight for row in flat]
        return np.stack(rows).reshape(x.shape)

    def gelu(x: F64) -> F64:
        def one(t: float) -> float:
            return 0.5 * t * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3)))

        return np.array([one(float(t)) for t in x.reshape(-1)]).reshape(x.shape)

    x = np.stack([g["token_embd.weight"][t] for t in tokens]) * math.sqrt(N_EMBD)
    for i, local in enumerate(swa):
        b = f"blk.{i}."
        base, scale = (base_swa, 1.0) if local else (ROPE_BASE, freq_scale)
        hn = norm(x, g[b + "attn_norm.weight"])
        q = norm((hn @ g[b + "attn_q.weight"].T).reshape(n, N_HEAD, HEAD_DIM), g[b + "attn_q_norm.weight"])
        k = norm((hn @ g[b + "attn_k.weight"].T).reshape(n, N_HEAD_KV, HEAD_DIM), g[b + "attn_k_norm.weight"])
        v = (hn @ g[b + "attn_v.weight"].T).reshape(n, N_HEAD_KV, HEAD_DIM)
        q = loop_rope_neox(q, base, scale) / math.sqrt(HEAD_DIM)
        k = loop_rope_neox(k, base, scale)
        a = loop_attention(q, k, v, n_swa if local else n + 1) @ g[b + "attn_output.weight"].T
        x = x + norm(a, g[b + "post_attention_norm.weight"])
        hn = norm(x, g[b + "ffn_norm.weight"])
        ff = (gelu(hn @ g[b + "ffn_gate.weight"].T) * (hn @ g[b + "ffn_up.weight"].T)) @ g[b + "ffn_down.weight"].T
        x = x + norm(ff, g[b + "post_ffw_norm.weight"])
    logits = norm(x, g["output_norm.weight"]) @ g.get("output.weight", g["token_embd.weight"]).T
    return np.asarray(cap * np.tanh(logits / cap) if cap else logits)


def cos_min(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    return float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def weights() -> Weights:
    return make_weights(0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, weights: Weights) -> Path:
    """3 layers, window 4, pattern 3: layers 0 and 1 slide, layer 2 is global."""
    return write_gemma3(tmp_path_factory.mktemp("g") / "gemma3.gguf", weights)


@pytest.fixture(scope="module")
def engine64(model: Path) -> NumpyEngine:
    return NumpyEngine(model, dtype="float64")


# --- operations ----------------------------------------------------------------------------------


def test_rope_neox_matches_loop_and_rotates_halves() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3, 16))
    for base, scale in ((10000.0, 1.0), (1e6, 0.125)):
        cos, sin = rope_cos_sin(np.arange(7), 16, base, scale, None, np.float64)
        assert np.allclose(rope_neox(x, cos, sin), loop_rope_neox(x, base, scale), rtol=0, atol=1e-12)
    # dim 0 pairs with dim 8 (not dim 1): a unit vector in dim 0 only ever moves into dim 8
    e = np.zeros((7, 1, 16))
    e[:, 0, 0] = 1.0
    out = rope_neox(e, cos, sin)
    assert np.count_nonzero(out[:, 0, [i for i in range(16) if i not in (0, 8)]]) == 0
    assert np.count_nonzero(out[1:, 0, 8]) == 6 and np.array_equal(out[0], e[0])
    # partial rotation: dims past n_rot pass through
    cos4, sin4 = rope_cos_sin(np.arange(7), 8, 10000.0, 1.0, None, np.float64)
    assert np.array_equal(rope_neox(x, cos4, sin4)[:, :, 8:], x[:, :, 8:])


@pytest.mark.parametrize("n_swa", [1, 2, 3, 5, 9, 100])
def test_sliding_window_mask_matches_llama_cpp_rule(n_swa: int) -> None:
    n = 9
    expected = np.zeros((n, n), dtype=bool)
    for p1 in range(n):  # query position
        for p0 in range(n):  # key position
            masked = p0 > p1 or p1 - p0 >= n_swa  # causal, then llama_hparams::is_masked_swa (STANDARD)
            expected[p1, p0] = not masked
    got = sliding_window_mask(n, n_swa)
    assert np.array_equal(got, expected)
    assert got.sum(axis=1).tolist() == [min(i + 1, n_swa) for i in range(n)]  # each query sees n_swa keys at most


@pytest.mark.parametrize("n_head_kv", [4, 2, 1])
def test_windowed_attention_matches_loop(n_head_kv: int) -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((10, 4, 8))
    k = rng.standard_normal((10, n_head_kv, 8))
    v = rng.standard_normal((10, n_head_kv, 8))
    for window in (1, 3, 10):
        got = attention(q, k, v, 1.0, sliding_window_mask(10, window))
        assert np.allclose(got, loop_attention(q, k, v, window), rtol=0, atol=1e-12)
    assert np.allclose(attention(q, k, v, 1.0), loop_attention(q, k, v, 11), rtol=0, atol=1e-12)
    assert np.allclose(
        attention(q, k, v, 1.0, sliding_window_mask(10, 1)), np.repeat(v, 4 // n_head_kv, axis=1).reshape(10, -1)
    )


def test_gelu_and_softcap() -> None:
    x = np.linspace(-12.0, 12.0, 97)
    expected = [0.5 * t * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3))) for t in x]
    assert np.allclose(gelu_tanh(x), expected, rtol=0, atol=1e-13)
    x32 = x.astype(np.float32)
    assert gelu_tanh(x32).dtype == np.float32 and np.allclose(gelu_tanh(x32), expected, rtol=1e-6, atol=1e-6)
    capped = softcap(x * 10.0, 30.0)
    assert np.allclose(capped, 30.0 * np.tanh(x / 3.0), rtol=0, atol=1e-12) and np.max(np.abs(capped)) < 30.0


# --- hyperparameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_layer", "n_swa", "pattern", "expected_global"),
    [
        (18, 512, None, [5, 11, 17]),  # Gemma 3 270M: no pattern key, llama.cpp's default period 6
        (7, 4, 3, [2, 5]),
        (4, 4, 0, []),  # period 0: every layer slides
        (4, 4, 1, [0, 1, 2, 3]),  # period 1: none does
        (5, 4, [True, False, True], [1, 3, 4]),  # array; layers past its end stay global
        (3, 4, [True, True, False, True, True], [2]),  # extra entries are ignored, as in llama.cpp
        (6, 0, 3, [0, 1, 2, 3, 4, 5]),  # window 0: no sliding layers
        (6, None, 3, [0, 1, 2, 3, 4, 5]),  # no window key at all
    ],
)
def test_sliding_window_pattern(
    tmp_path: Path, n_layer: int, n_swa: int | None, pattern: int | list[bool] | None, expected_global: list[int]
) -> None:
    p = gemma3_params(open_gguf(write_gemma3(tmp_path / "p.gguf", {}, n_swa=n_swa, pattern=pattern, n_layer=n_layer)))
    assert [i for i, s in enumerate(p.is_swa) if not s] == expected_global
    assert p.n_swa == (n_swa or 0)


def test_hyperparameter_defaults_and_27b_scale(tmp_path: Path) -> None:
    p = gemma3_params(open_gguf(write_gemma3(tmp_path / "a.gguf", {}, n_layer=3)))
    assert (p.rope_base, p.rope_base_swa, p.rope_freq_scale) == (ROPE_BASE, 10000.0, 1.0)
    assert p.attn_scale == 1.0 / math.sqrt(HEAD_DIM) and p.final_logit_softcap == 0.0
    assert (p.head_dim, p.n_rot, p.n_head, p.n_head_kv, p.n_ctx_train) == (HEAD_DIM, HEAD_DIM, N_HEAD, N_HEAD_KV, N_CTX)
    extra = {"rope.freq_base_swa": 500.0, "rope.scaling.factor": 8.0, "final_logit_softcapping": 30.0}
    p = gemma3_params(open_gguf(write_gemma3(tmp_path / "b.gguf", {}, n_layer=3, extra=extra)))
    assert (p.rope_base_swa, p.rope_freq_scale, p.final_logit_softcap) == (500.0, 0.125, 30.0)
    # the 62-layer (27B) model scales Q by 1/sqrt(n_embd / n_head) = 1/sqrt(16) instead of 1/sqrt(head_dim)
    p = gemma3_params(open_gguf(write_gemma3(tmp_path / "c.gguf", {}, n_layer=62)))
    assert p.attn_scale == 0.25


# --- engine --------------------------------------------------------------------------------------


def test_shapes_and_attributes(model: Path, engine64: NumpyEngine) -> None:
    assert engine64.architecture == "gemma3" and engine64.n_vocab == N_VOCAB and engine64.n_ctx_train == N_CTX
    out = engine64.logits(PROMPT)
    assert out.shape == (len(PROMPT), N_VOCAB) and out.dtype == np.float64
    assert NumpyEngine(model).logits(PROMPT[:1]).shape == (1, N_VOCAB)


def test_forward_matches_loop_reference(weights: Weights, engine64: NumpyEngine) -> None:
    expected = loop_gemma3(weights, PROMPT, swa=[True, True, False], n_swa=4)
    got = engine64.logits(PROMPT)
    assert np.allclose(got, expected, rtol=0, atol=1e-9)
    assert float(np.std(expected)) > 0.5  # the weights produce meaningful, non-degenerate logits


def test_sliding_window_changes_only_positions_past_the_window(tmp_path: Path, weights: Weights) -> None:
    windowed = NumpyEngine(write_gemma3(tmp_path / "w.gguf", weights, n_swa=4), dtype="float64").logits(PROMPT)
    full = NumpyEngine(write_gemma3(tmp_path / "f.gguf", weights, n_swa=None), dtype="float64")
    unmasked = loop_gemma3(weights, PROMPT, swa=[False] * 3, n_swa=0)
    assert np.allclose(full.logits(PROMPT), unmasked, rtol=0, atol=1e-9)
    # with no window every layer is global (RoPE base 1e6): a different model from position 1 on
    wide = NumpyEngine(write_gemma3(tmp_path / "x.gguf", weights, n_swa=len(PROMPT)), dtype="float64").logits(PROMPT)
    expected_wide = loop_gemma3(weights, PROMPT, swa=[True, True, False], n_swa=len(PROMPT))
    assert np.allclose(wide, expected_wide, rtol=0, atol=1e-9)
    # a window of 4 only masks keys for queries at position >= 4
    assert np.allclose(windowed[:4], wide[:4], rtol=0, atol=1e-12)
    assert np.all(np.max(np.abs(windowed[4:] - wide[4:]), axis=1) > 1e-3)


def test_window_of_one_sees_only_itself(tmp_path: Path, weights: Weights) -> None:
    one = NumpyEngine(write_gemma3(tmp_path / "one.gguf", weights, n_swa=1, pattern=0), dtype="float64")
    # every layer attends to its own position only: attention returns the token's own V whatever RoPE does,
    # so each position's logits are those of the token evaluated alone
    together = one.logits(PROMPT)
    alone = np.concatenate([one.logits([t]) for t in PROMPT])
    assert np.allclose(together, alone, rtol=0, atol=1e-12)
    assert np.allclose(together, loop_gemma3(weights, PROMPT, swa=[True] * 3, n_swa=1), rtol=0, atol=1e-9)


def test_causality(engine64: NumpyEngine) -> None:
    base = engine64.logits(PROMPT)
    changed = engine64.logits([*PROMPT[:6], 9, 9, 9, 9, 9, 9, 9, 9])
    assert np.allclose(base[:6], changed[:6], rtol=0, atol=1e-12)
    assert not np.allclose(base[6:], changed[6:])
    assert np.allclose(base[:6], engine64.logits(PROMPT[:6]), rtol=0, atol=1e-12)


def test_float32_agrees_with_float64(model: Path, engine64: NumpyEngine) -> None:
    a = NumpyEngine(model, dtype="float32").logits(PROMPT)
    b = engine64.logits(PROMPT)
    assert cos_min(a, b) > 0.99999 and np.max(np.abs(a - b)) < 1e-3


def test_greedy_uses_the_last_position(engine64: NumpyEngine) -> None:
    out = engine64.greedy(PROMPT, 3)
    seq = list(PROMPT)
    for tok in out:
        assert tok == int(np.argmax(engine64.logits(seq)[-1]))
        seq.append(tok)


def test_rope_bases_and_scaling_reach_the_right_layers(tmp_path: Path, weights: Weights) -> None:
    extra = {"rope.freq_base_swa": 300.0, "rope.scaling.factor": 4.0}
    got = NumpyEngine(write_gemma3(tmp_path / "r.gguf", weights, extra=extra), dtype="float64").logits(PROMPT)
    expected = loop_gemma3(weights, PROMPT, swa=[True, True, False], n_swa=4, base_swa=300.0, freq_scale=0.25)
    assert np.allclose(got, expected, rtol=0, atol=1e-9)


def test_final_logit_softcapping(tmp_path: Path, weights: Weights, engine64: NumpyEngine) -> None:
    path = write_gemma3(tmp_path / "c.gguf", weights, extra={"final_logit_softcapping": 2.0})
    capped = NumpyEngine(path, dtype="float64").logits(PROMPT)
    plain = engine64.logits(PROMPT)
    assert np.allclose(capped, 2.0 * np.tanh(plain / 2.0), rtol=0, atol=1e-12)
    assert np.max(np.abs(capped)) < 2.0 < np.max(np.abs(plain))


def test_tied_and_untied_output(tmp_path: Path) -> None:
    w = make_weights(4, tied=False)
    got = NumpyEngine(write_gemma3(tmp_path / "u.gguf", w), dtype="float64").logits(PROMPT)
    assert np.allclose(got, loop_gemma3(w, PROMPT, swa=[True, True, False], n_swa=4), rtol=0, atol=1e-9)
    tied = {k: v for k, v in w.items() if k != "output.weight"}
    assert not np.allclose(NumpyEngine(write_gemma3(tmp_path / "t.gguf", tied), dtype="float64").logits(PROMPT), got)


@pytest.mark.parametrize(
    "wtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0], ids=["q8_0", "q5_0"]
)
def test_quantized_file_equals_f32_file_with_the_same_values(
    tmp_path: Path, weights: Weights, wtype: gguf.GGMLQuantizationType
) -> None:
    quant = NumpyEngine(write_gemma3(tmp_path / "q.gguf", weights, wtype=wtype))
    assert quant.gguf.tensors["blk.0.ffn_up.weight"].ggml_type == wtype
    same = {
        k: v if v.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(v, wtype), wtype).reshape(v.shape)
        for k, v in weights.items()
    }
    assert np.array_equal(quant.logits(PROMPT), NumpyEngine(write_gemma3(tmp_path / "f.gguf", same)).logits(PROMPT))


# --- errors --------------------------------------------------------------------------------------


def test_missing_gemma_tensors_are_named(tmp_path: Path) -> None:
    w = make_weights(5)
    del w["blk.2.post_ffw_norm.weight"]
    with pytest.raises(ModelFormatError, match=r"tensor 'blk\.2\.post_ffw_norm\.weight' is missing") as exc:
        NumpyEngine(write_gemma3(tmp_path / "a.gguf", w))
    assert "not a complete gemma3 model" in str(exc.value.fix)
    w = make_weights(5)
    w["blk.0.attn_q_norm.weight"] = w["blk.0.attn_norm.weight"]  # n_embd wide instead of head_dim
    with pytest.raises(ModelFormatError, match=r"'blk\.0\.attn_q_norm\.weight' has shape \(64,\), expected \(32,\)"):
        NumpyEngine(write_gemma3(tmp_path / "b.gguf", w))


def test_unsupported_layouts_are_rejected(tmp_path: Path) -> None:
    w = make_weights(6)
    with pytest.raises(ModelFormatError, match="'gemma3.attention.key_length_swa' is 16 but the global layers use 32"):
        NumpyEngine(write_gemma3(tmp_path / "a.gguf", w, extra={"attention.key_length_swa": 16}))
    f = open_gguf(write_gemma3(tmp_path / "b.gguf", w))
    f.metadata["gemma3.rope.scaling.type"] = "yarn"
    with pytest.raises(ModelFormatError, match="rope scaling type 'yarn'"):
        NumpyEngine(f)
    embed = dict(w, **{"dense_2.weight": np.zeros((N_EMBD, N_EMBD), dtype=np.float32)})
    with pytest.raises(ModelFormatError, match="embedding model"):
        NumpyEngine(write_gemma3(tmp_path / "c.gguf", embed))
