"""Tests for parity.engines.numpy.engine on tiny random llama GGUFs written into tmp_path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest

from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.ops import attention, rope, rope_cos_sin
from parity.errors import ModelFormatError, UsageError
from parity.gguf.reader import open_gguf

Weights = dict[str, npt.NDArray[np.float32]]
N_VOCAB, N_EMBD, N_FF, N_CTX, EPS, BASE = 96, 64, 128, 32, 1e-5, 10000.0


def make_weights(seed: int, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2, tied: bool = False) -> Weights:
    """Random llama weights in numpy (out, in) order, scaled so logits spread over a few units."""
    rng = np.random.default_rng(seed)
    hd = N_EMBD // n_head

    def mat(rows: int, cols: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> npt.NDArray[np.float32]:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: Weights = {"token_embd.weight": rng.standard_normal((N_VOCAB, N_EMBD)).astype(np.float32)}
    for i in range(n_layer):
        b = f"blk.{i}."
        w[b + "attn_norm.weight"] = norm(N_EMBD)
        w[b + "attn_q.weight"] = mat(n_head * hd, N_EMBD)
        w[b + "attn_k.weight"] = mat(n_head_kv * hd, N_EMBD)
        w[b + "attn_v.weight"] = mat(n_head_kv * hd, N_EMBD)
        w[b + "attn_output.weight"] = mat(N_EMBD, n_head * hd)
        w[b + "ffn_norm.weight"] = norm(N_EMBD)
        w[b + "ffn_gate.weight"] = mat(N_FF, N_EMBD)
        w[b + "ffn_up.weight"] = mat(N_FF, N_EMBD)
        w[b + "ffn_down.weight"] = mat(N_EMBD, N_FF)
    w["output_norm.weight"] = norm(N_EMBD)
    if not tied:
        w["output.weight"] = mat(N_VOCAB, N_EMBD) * 4.0
    return w


def write_llama(
    path: Path,
    w: Weights,
    *,
    n_head: int = 4,
    n_head_kv: int = 2,
    wtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    arch: str = "llama",
    extra: dict[str, float] | None = None,
) -> Path:
    """Write `w` as a llama GGUF: 2-D weights in `wtype`; 1-D norms stay F32 as in llama.cpp's converter."""
    writer = gguf.GGUFWriter(str(path), arch)
    n_layer = sum(1 for k in w if k.endswith("attn_norm.weight"))
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(BASE)
    for key, value in (extra or {}).items():
        writer.add_float32(key, value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(N_VOCAB)])
    for name, arr in w.items():
        if arr.ndim == 1 or wtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, arr)
        elif wtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(arr, wtype), raw_dtype=wtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def roundtrip(w: Weights, wtype: gguf.GGMLQuantizationType) -> Weights:
    """The float32 values a `wtype` file holds for `w` (1-D tensors stay F32)."""
    out: Weights = {}
    for name, arr in w.items():
        if arr.ndim == 1:
            out[name] = arr
        else:
            out[name] = gguf.quants.dequantize(gguf.quants.quantize(arr, wtype), wtype).reshape(arr.shape)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("m") / "llama.gguf", make_weights(0))


@pytest.fixture(scope="module")
def engine64(model: Path) -> NumpyEngine:
    return NumpyEngine(model, dtype="float64")


PROMPT = [1, 5, 17, 42, 3, 3, 88, 0, 95, 60]


# --- independent loop-based reference ------------------------------------------------------------


def loop_rope(x: npt.NDArray[np.float64], base: float, freq_scale: float = 1.0) -> npt.NDArray[np.float64]:
    """x (n, heads, hd): rotate adjacent pairs (2i, 2i+1) by pos * base^(-2i/hd), one scalar at a time."""
    n, heads, hd = x.shape
    out = x.copy()
    for pos in range(n):
        for h in range(heads):
            for i in range(hd // 2):
                theta = freq_scale * pos * base ** (-2.0 * i / hd)
                a, b = x[pos, h, 2 * i], x[pos, h, 2 * i + 1]
                out[pos, h, 2 * i] = a * math.cos(theta) - b * math.sin(theta)
                out[pos, h, 2 * i + 1] = a * math.sin(theta) + b * math.cos(theta)
    return out


def loop_attention(
    q: npt.NDArray[np.float64], k: npt.NDArray[np.float64], v: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Causal GQA attention, query by query and head by head."""
    n, h, hd = q.shape
    group = h // k.shape[1]
    out = np.zeros((n, h * hd))
    for i in range(n):
        for j in range(h):
            kv = j // group
            scores = [float(q[i, j] @ k[t, kv]) / math.sqrt(hd) for t in range(i + 1)]
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            out[i, j * hd : (j + 1) * hd] = sum(e[t] / sum(e) * v[t, kv] for t in range(i + 1))
    return out


def loop_llama(w: Weights, tokens: list[int], n_head: int, n_head_kv: int) -> npt.NDArray[np.float64]:
    """A straightforward float64 llama forward pass, written independently of the engine."""
    g = {k: v.astype(np.float64) for k, v in w.items()}
    hd = N_EMBD // n_head
    n_layer = sum(1 for k in w if k.endswith("attn_norm.weight"))

    def norm(x: npt.NDArray[np.float64], weight: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.stack([row / math.sqrt(float(np.mean(row**2)) + EPS) * weight for row in x])

    x = np.stack([g["token_embd.weight"][t] for t in tokens])
    n = len(tokens)
    for i in range(n_layer):
        b = f"blk.{i}."
        hn = norm(x, g[b + "attn_norm.weight"])
        q = loop_rope((hn @ g[b + "attn_q.weight"].T).reshape(n, n_head, hd), BASE)
        k = loop_rope((hn @ g[b + "attn_k.weight"].T).reshape(n, n_head_kv, hd), BASE)
        v = (hn @ g[b + "attn_v.weight"].T).reshape(n, n_head_kv, hd)
        x = x + loop_attention(q, k, v) @ g[b + "attn_output.weight"].T
        hn = norm(x, g[b + "ffn_norm.weight"])
        gate = hn @ g[b + "ffn_gate.weight"].T
        up = hn @ g[b + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g[b + "ffn_down.weight"].T
    out = g.get("output.weight", g["token_embd.weight"])
    return np.asarray(norm(x, g["output_norm.weight"]) @ out.T)


def cos_min(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    return float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


# --- operations ----------------------------------------------------------------------------------


def test_rope_matches_loop_reference() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3, 16))
    for base, scale in ((10000.0, 1.0), (500000.0, 0.25)):
        cos, sin = rope_cos_sin(np.arange(7), 16, base, scale, None, np.float64)
        assert np.allclose(rope(x, cos, sin), loop_rope(x, base, scale), rtol=0, atol=1e-12)
    # freq factors divide the angle: factor 4 everywhere equals freq_scale 1/4
    cos4, sin4 = rope_cos_sin(np.arange(7), 16, 10000.0, 1.0, np.full(8, 4.0), np.float64)
    assert np.allclose(rope(x, cos4, sin4), loop_rope(x, 10000.0, 0.25), rtol=0, atol=1e-12)
    # position 0 is the identity; pairs are adjacent, so a pure-first-pair input stays in dims 0-1
    assert np.array_equal(rope(x, cos, sin)[0], x[0])
    e = np.zeros((7, 1, 16))
    e[:, 0, 0] = 1.0
    assert np.count_nonzero(rope(e, cos, sin)[:, 0, 2:]) == 0


@pytest.mark.parametrize("n_head_kv", [4, 2, 1])
def test_attention_matches_loop_reference(n_head_kv: int) -> None:
    rng = np.random.default_rng(2)
    q = rng.standard_normal((6, 4, 8))
    k = rng.standard_normal((6, n_head_kv, 8))
    v = rng.standard_normal((6, n_head_kv, 8))
    got = attention(q, k, v, 1.0 / math.sqrt(8))
    assert np.allclose(got, loop_attention(q, k, v), rtol=0, atol=1e-12)


# --- engine --------------------------------------------------------------------------------------


def test_engine_attributes_and_shapes(model: Path, engine64: NumpyEngine) -> None:
    assert engine64.name == "numpy" and engine64.architecture == "llama" and engine64.dtype == "float64"
    assert engine64.n_vocab == N_VOCAB and engine64.n_ctx_train == N_CTX
    out = engine64.logits(PROMPT)
    assert out.shape == (len(PROMPT), N_VOCAB) and out.dtype == np.float64
    e32 = NumpyEngine(open_gguf(model))  # default float32, from an already opened file
    assert e32.dtype == "float32"
    assert e32.logits(PROMPT[:1]).shape == (1, N_VOCAB)


@pytest.mark.parametrize(("n_head", "n_head_kv"), [(4, 4), (4, 2), (4, 1), (2, 1)])
def test_forward_matches_loop_reference(tmp_path: Path, n_head: int, n_head_kv: int) -> None:
    w = make_weights(3, n_head=n_head, n_head_kv=n_head_kv)
    path = write_llama(tmp_path / "m.gguf", w, n_head=n_head, n_head_kv=n_head_kv)
    got = NumpyEngine(path, dtype="float64").logits(PROMPT)
    expected = loop_llama(w, PROMPT, n_head, n_head_kv)
    assert np.allclose(got, expected, rtol=0, atol=1e-9)
    assert float(np.std(expected)) > 0.5  # the weights produce meaningful, non-degenerate logits


def test_float32_agrees_with_float64(model: Path, engine64: NumpyEngine) -> None:
    a = NumpyEngine(model, dtype="float32").logits(PROMPT)
    b = engine64.logits(PROMPT)
    assert cos_min(a, b) > 0.99999
    assert np.max(np.abs(a - b)) < 1e-3


def test_causality(engine64: NumpyEngine) -> None:
    base = engine64.logits(PROMPT)
    changed = engine64.logits([*PROMPT[:4], 7, 8, 9, 10, 11, 12])
    assert np.allclose(base[:4], changed[:4], rtol=0, atol=1e-12)
    assert not np.allclose(base[4:], changed[4:])
    prefix = engine64.logits(PROMPT[:4])
    assert np.allclose(base[:4], prefix, rtol=0, atol=1e-12)


def test_greedy_equals_argmax_of_reevaluated_logits(engine64: NumpyEngine) -> None:
    out = engine64.greedy(PROMPT, 6)
    assert len(out) == 6 and all(isinstance(t, int) for t in out)
    seq = list(PROMPT)
    for tok in out:
        assert tok == int(np.argmax(engine64.logits(seq)[-1]))
        seq.append(tok)
    assert engine64.greedy(PROMPT, 0) == []


def test_tied_and_untied_output(tmp_path: Path) -> None:
    tied_w = make_weights(4, tied=True)
    tied = NumpyEngine(write_llama(tmp_path / "tied.gguf", tied_w), dtype="float64")
    assert "output.weight" not in tied.gguf.tensors
    explicit_w = dict(tied_w, **{"output.weight": tied_w["token_embd.weight"]})
    explicit = NumpyEngine(write_llama(tmp_path / "explicit.gguf", explicit_w), dtype="float64")
    assert np.array_equal(tied.logits(PROMPT), explicit.logits(PROMPT))
    assert np.allclose(tied.logits(PROMPT), loop_llama(tied_w, PROMPT, 4, 2), rtol=0, atol=1e-9)
    untied_w = dict(tied_w, **{"output.weight": make_weights(5)["output.weight"]})
    untied = NumpyEngine(write_llama(tmp_path / "untied.gguf", untied_w), dtype="float64")
    assert not np.allclose(untied.logits(PROMPT), tied.logits(PROMPT))


@pytest.mark.parametrize("wtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0], ids=["f16", "q8_0"])
def test_f16_and_q8_0_equal_f32_model_with_the_same_values(tmp_path: Path, wtype: gguf.GGMLQuantizationType) -> None:
    w = make_weights(6)
    quant = NumpyEngine(write_llama(tmp_path / "q.gguf", w, wtype=wtype), dtype="float32")
    assert quant.gguf.tensors["blk.0.attn_q.weight"].ggml_type == wtype
    same = NumpyEngine(write_llama(tmp_path / "f.gguf", roundtrip(w, wtype)), dtype="float32")
    assert np.array_equal(quant.logits(PROMPT), same.logits(PROMPT))
    exact = NumpyEngine(write_llama(tmp_path / "e.gguf", w), dtype="float32").logits(PROMPT)
    assert cos_min(quant.logits(PROMPT), exact) > 0.99


def test_rope_metadata_is_used(tmp_path: Path) -> None:
    w = make_weights(7)
    plain = NumpyEngine(write_llama(tmp_path / "a.gguf", w), dtype="float64").logits(PROMPT)
    scaled_path = write_llama(tmp_path / "b.gguf", w, extra={"llama.rope.scaling.factor": 2.0})
    scaled = NumpyEngine(scaled_path, dtype="float64").logits(PROMPT)
    assert np.array_equal(plain[:1], scaled[:1]) and not np.allclose(plain[1:], scaled[1:])
    factors = dict(w, **{"rope_freqs.weight": np.full(N_EMBD // 4 // 2, 2.0, dtype=np.float32)})
    with_factors = NumpyEngine(write_llama(tmp_path / "c.gguf", factors), dtype="float64").logits(PROMPT)
    assert np.array_equal(with_factors, scaled)  # theta / 2 == 0.5 * theta exactly


# --- errors --------------------------------------------------------------------------------------


def test_bad_dtype(model: Path) -> None:
    with pytest.raises(UsageError, match="unsupported numpy engine dtype 'float16'"):
        NumpyEngine(model, dtype="float16")


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([], "no tokens"),
        ([1, N_VOCAB], f"token id {N_VOCAB} at position 1 is outside the vocabulary"),
        ([-1], "token id -1 at position 0"),
        ([1.5], "must be integers"),
        (list(range(N_CTX + 1)), f"{N_CTX + 1} positions exceed the model's training context {N_CTX}"),
    ],
)
def test_bad_tokens(engine64: NumpyEngine, tokens: list[Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        engine64.logits(tokens)


def test_greedy_limits(engine64: NumpyEngine) -> None:
    with pytest.raises(UsageError, match="n_new must be >= 0"):
        engine64.greedy(PROMPT, -1)
    with pytest.raises(UsageError, match="exceed the model's training context"):
        engine64.greedy(PROMPT, N_CTX - len(PROMPT) + 2)
    assert len(engine64.greedy(list(range(N_CTX - 2)), 3)) == 3  # the last new token needs no position


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_llama(tmp_path / "g.gguf", make_weights(8), arch="gpt2")
    with pytest.raises(ModelFormatError) as exc:
        NumpyEngine(path)
    assert f"unsupported architecture 'gpt2' in {path}" in str(exc.value)


def test_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    w = make_weights(9)
    del w["blk.1.ffn_up.weight"]
    with pytest.raises(ModelFormatError, match=r"tensor 'blk\.1\.ffn_up\.weight' is missing"):
        NumpyEngine(write_llama(tmp_path / "a.gguf", w))
    w = make_weights(9)
    w["blk.0.attn_k.weight"] = w["blk.0.attn_q.weight"]  # 4 heads' worth where 2 KV heads are declared
    with pytest.raises(ModelFormatError, match=r"tensor 'blk.0.attn_k.weight' has shape \(64, 64\), expected"):
        NumpyEngine(write_llama(tmp_path / "b.gguf", w))


def test_bad_files(tmp_path: Path, model: Path) -> None:
    with pytest.raises(UsageError, match="model file not found"):
        NumpyEngine(tmp_path / "missing.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model" * 4)
    with pytest.raises(ModelFormatError, match="is not a GGUF file"):
        NumpyEngine(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model.read_bytes()[:-5000])
    with pytest.raises(ModelFormatError, match="is truncated"):
        NumpyEngine(cut)
