"""The numpy engine's fast paths against its plain reference path (issue 15: the reference stays the yardstick).

The KV-cached greedy: the prompt pass is the plain computation bit for bit; each later step evaluates one token
against the cached keys and values. That changes only the shapes of the matmuls (one query row instead of the
whole prefix), i.e. the order of float additions, so its logits may differ from the reference's by rounding:
TOL_F32 relative to the logits' scale in float32 (a few ulps of accumulated sums over d <= 640 terms), TOL_F64
in float64. Greedy ids must be equal.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.ops import KVCache, no_tap
from parity.models import ternary_model

from . import test_engine_gemma3 as g3
from . import test_engine_numpy as ll

TOL_F32, TOL_F64 = 1e-5, 1e-12
PROMPTS = [[1, 5, 17, 42, 3, 3, 60, 0, 11], [7]]
N_NEW = 8  # past the gemma3 test model's 4-token sliding window


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fast")
    return {
        "llama": str(ll.write_llama(root / "llama.gguf", ll.make_weights(5, n_layer=2))),
        "gemma3": str(g3.write_gemma3(root / "gemma3.gguf", g3.make_weights(6, n_layer=3))),
        "bitnet": str(ternary_model.generate("f32", root / "bitnet").gguf_path),
    }


def stepped_logits(e: NumpyEngine, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """Logits of every position through the cache: the prompt in one pass, then one token per pass."""
    p = e.params
    kv = KVCache(p.n_layer, len(prompt) + len(continuation), p.n_head_kv, p.head_dim, np.dtype(e.dtype).type)
    rows = [e._forward(np.asarray(prompt), False, no_tap, kv)]
    rows += [e._forward(np.asarray([t]), False, no_tap, kv) for t in continuation]
    return np.concatenate(rows).astype(np.float64)


CASES = [
    ("llama", "float32"),
    ("llama", "float64"),
    ("gemma3", "float32"),
    ("gemma3", "float64"),
    ("bitnet", "float32"),
]


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_cached_decode_matches_the_reference(paths: dict[str, str], arch: str, dtype: str) -> None:
    e = NumpyEngine(paths[arch], dtype=dtype)
    tol = TOL_F32 if dtype == "float32" else TOL_F64
    for prompt in PROMPTS:
        ids = e.greedy(prompt, N_NEW)
        assert ids == e.greedy_reference(prompt, N_NEW), (arch, prompt)
        seq = prompt + ids[:-1]
        ref = e.logits(seq)
        fast = stepped_logits(e, prompt, ids[:-1])
        n = len(prompt)
        assert np.array_equal(fast[:n], e.logits(prompt))  # the prompt pass is the plain computation
        scale = float(np.max(np.abs(ref)))
        err = float(np.max(np.abs(fast - ref)))
        print(f"{arch} {dtype} {len(prompt)}+{N_NEW}: max |dlogit| {err:.3g} = {err / scale:.3g} x max |logit|")
        assert err <= tol * scale, (arch, prompt)


def test_greedy_edge_cases(paths: dict[str, str]) -> None:
    e = NumpyEngine(paths["llama"])
    assert e.greedy([1, 2], 0) == [] and e.greedy_reference([1, 2], 0) == []
    assert e.greedy([1, 2], 1) == e.greedy_reference([1, 2], 1)
    room = e.n_ctx_train - 3
    assert len(e.greedy([1, 2, 3], room + 1)) == room + 1  # the last token needs no position of its own
