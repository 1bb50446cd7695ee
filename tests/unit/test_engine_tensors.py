"""Named graph tensors of the numpy engine (Implementation.tensors): llama.cpp's names and layouts, replay."""

from __future__ import annotations

import numpy as np
import pytest

from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.impl import NumpyImplementation
from parity.errors import UsageError
from parity.models import ternary_model

from . import test_engine_gemma3 as g3
from . import test_engine_numpy as ll

TOKENS = [1, 5, 17, 42, 3, 3, 60, 0, 11]
N_LAYER = 3

# The default names each graph carries, per layer and layer-less (src/models/{llama,gemma3,bitnet}.cpp).
LAYER_OPS = {
    "llama": {"attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"},
    "gemma3": {
        "attn_norm",
        "Qcur_normed",
        "Kcur_normed",
        "Qcur",
        "Kcur",
        "Vcur",
        "kqv_out",
        "attn_post_norm",
        "sa_out",
        "ffn_norm",
        "ffn_out",
        "ffn_post_norm",
        "l_out",
    },
    "bitnet": {"attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "l_out"},
}
GLOBALS = {
    "llama": {"embd", "result_norm", "result_output"},
    "gemma3": {"embd", "inp_scaled", "result_norm", "result_output"},
    "bitnet": {"embd", "result_norm", "result_output"},
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NumpyEngine]:
    root = tmp_path_factory.mktemp("tensors")
    llama = ll.write_llama(root / "llama.gguf", ll.make_weights(3, n_layer=N_LAYER))
    gemma = g3.write_gemma3(root / "gemma3.gguf", g3.make_weights(4, n_layer=N_LAYER))
    bitnet = ternary_model.generate("f32", root / "bitnet").gguf_path
    return {arch: NumpyEngine(path) for arch, path in (("llama", llama), ("gemma3", gemma), ("bitnet", bitnet))}


def expected_widths(e: NumpyEngine) -> dict[str, int]:
    """Row width of each default tensor from the hyperparameters (ggml's ne0 * ne1 per token)."""
    from parity.engines.numpy.ops import read_hparams

    p = read_hparams(e.gguf, partial_rope=True)
    q, kv = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    w = {
        "Qcur": q,
        "Qcur_normed": q,
        "kqv_out": q,
        "Kcur": kv,
        "Kcur_normed": kv,
        "Vcur": kv,
        "result_output": p.n_vocab,
    }
    return w


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bitnet"])
def test_default_names_and_shapes(engines: dict[str, NumpyEngine], arch: str) -> None:
    e = engines[arch]
    got = e.tensors(TOKENS)
    n_layer = N_LAYER if arch != "bitnet" else int(e.gguf.get_int("bitnet.block_count"))
    want = {f"{op}-{il}" for op in LAYER_OPS[arch] for il in range(n_layer)} | GLOBALS[arch]
    assert set(got) == want
    widths = expected_widths(e)
    d = e.gguf.tensors["token_embd.weight"].shape[1]
    for name, arr in got.items():
        op = name.rpartition("-")[0] or name
        assert arr.dtype == np.float32, name
        assert arr.shape == (len(TOKENS), widths.get(op, d)), name


def test_layout_is_ggml_row_per_token(engines: dict[str, NumpyEngine]) -> None:
    """ne = [head_dim, heads, tokens] flattens as heads one after another: each head's slice is RMS-normed
    by itself in Qcur_normed (the per-head norm), which a token-major or dim-major flattening would break."""
    e = engines["gemma3"]
    got = e.tensors(TOKENS, names=["Qcur_normed-1"])
    w = e.gguf.tensors["blk.1.attn_q_norm.weight"].data.astype(np.float64)
    per_head = got["Qcur_normed-1"].astype(np.float64).reshape(len(TOKENS), g3.N_HEAD, g3.HEAD_DIM) / w
    rms = np.sqrt(np.mean(per_head**2, axis=-1))
    assert np.allclose(rms, 1.0, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bitnet"])
def test_result_output_is_the_logits(engines: dict[str, NumpyEngine], arch: str) -> None:
    e = engines[arch]
    got = e.tensors(TOKENS, names=["result_output"])
    assert list(got) == ["result_output"]
    assert np.array_equal(got["result_output"], e.logits(TOKENS).astype(np.float32))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bitnet"])
def test_replacing_with_own_values_is_bit_identical(engines: dict[str, NumpyEngine], arch: str) -> None:
    e = engines[arch]
    own = e.tensors(TOKENS, names=["*"])
    replayed = e.tensors(TOKENS, names=["*"], replace=own)
    assert set(replayed) == set(own)
    for name, arr in own.items():
        assert np.array_equal(replayed[name], arr), name


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bitnet"])
def test_replace_at_layer_changes_only_what_follows(engines: dict[str, NumpyEngine], arch: str) -> None:
    e = engines[arch]
    own = e.tensors(TOKENS, names=["*"])
    order = list(own)  # recorded in graph order
    target = "kqv_out-1"
    rng = np.random.default_rng(0)
    planted = own[target] + rng.standard_normal(own[target].shape).astype(np.float32)
    replayed = e.tensors(TOKENS, names=["*"], replace={target: planted})
    assert list(replayed) == order
    at = order.index(target)
    for name in order[: at + 1]:  # earlier tensors, and the replaced one records its own value
        assert np.array_equal(replayed[name], own[name]), name
    changed = [name for name in order[at + 1 :] if not np.array_equal(replayed[name], own[name])]
    assert "l_out-1" in changed and "result_output" in changed
    assert all(not name.endswith("-0") for name in changed)


def test_name_patterns_and_bad_replacements(engines: dict[str, NumpyEngine]) -> None:
    e = engines["llama"]
    assert set(e.tensors(TOKENS, names=["l_out-*", "embd"])) == {"l_out-0", "l_out-1", "l_out-2", "embd"}
    assert {"ffn_up-0", "ffn_gate-0", "ffn_swiglu-0"} <= set(e.tensors(TOKENS, names=["*"]))  # build_ffn's own
    with pytest.raises(UsageError, match="cannot replace 'attn_post_norm-0'"):
        e.tensors(TOKENS, replace={"attn_post_norm-0": np.zeros((len(TOKENS), ll.N_EMBD), np.float32)})
    with pytest.raises(UsageError, match="must be"):
        e.tensors(TOKENS, replace={"attn_norm-0": np.zeros((len(TOKENS) - 1, ll.N_EMBD), np.float32)})
    with pytest.raises(UsageError, match="must be"):
        e.tensors(TOKENS, replace={"attn_norm-0": np.zeros((len(TOKENS), ll.N_EMBD + 1), np.float32)})
    with pytest.raises(UsageError, match="'attn_post_norm-0' names no"):
        e.tensors(TOKENS, names=["attn_post_norm-0"])


def test_implementation_delegates(engines: dict[str, NumpyEngine]) -> None:
    impl = NumpyImplementation(engines["llama"])
    got = impl.tensors(TOKENS, names=["attn_norm-0"])
    assert np.array_equal(got["attn_norm-0"], engines["llama"].tensors(TOKENS)["attn_norm-0"])
