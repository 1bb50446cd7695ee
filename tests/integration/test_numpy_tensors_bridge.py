"""The numpy engine's graph tensors against llama.cpp's own (bridge capture) on the default model (F32).

Same names (every name the numpy graph records is one llama.cpp's graph computes; the default sets are
equal), same shapes, and values within float32 rounding (a wrong layout or a tensor tapped before/after the
wrong op would be off by O(1)); replaying llama.cpp's tensors into the numpy engine keeps its logits on
llama.cpp's. About 3 s (one worker, a 0.6 MB model).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.engines import spec as impl_spec
from parity.engines.bridged import BridgedImplementation
from parity.engines.numpy.engine import NumpyEngine
from parity.models import modelgen

pytestmark = pytest.mark.compile

TOKENS = [1, 17, 42, 99, 5, 23, 64, 7, 31, 12, 88, 3]


@pytest.fixture(scope="module")
def pair(llama_plan: build.BuildPlan) -> Iterator[tuple[NumpyEngine, BridgedImplementation]]:
    gguf, _ = modelgen.default_model("f32")
    with BridgedImplementation(impl_spec.parse("llama"), llama_plan, gguf, BackendParams()) as bridged:
        yield NumpyEngine(gguf), bridged


def test_names_shapes_and_values_agree(pair: tuple[NumpyEngine, BridgedImplementation]) -> None:
    engine, bridged = pair
    ours, theirs = engine.tensors(TOKENS, ["*"]), bridged.tensors(TOKENS, ["*"])
    only_ours = sorted(set(ours) - set(theirs))
    assert not only_ours, f"names the numpy engine records that llama.cpp's graph lacks: {only_ours}"
    assert set(engine.tensors(TOKENS)) == set(bridged.tensors(TOKENS))  # the default sets
    for name, mine in ours.items():
        ref = theirs[name]
        assert mine.shape == ref.shape, name
        scale = float(np.max(np.abs(ref)))
        err = float(np.max(np.abs(mine - ref)))
        assert err <= 1e-4 * max(scale, 1.0), (name, err, scale)


def test_replaying_llama_cpp_tensors_keeps_the_logits(pair: tuple[NumpyEngine, BridgedImplementation]) -> None:
    engine, bridged = pair
    theirs = bridged.tensors(TOKENS)
    forced = {name: value for name, value in theirs.items() if name.startswith(("kqv_out-", "ffn_out-"))}
    replayed = engine.tensors(TOKENS, ["kqv_out-*", "ffn_out-*", "result_output"], replace=forced)
    for name in forced:  # the recorded value is the numpy op's own output on llama.cpp's inputs
        assert float(np.max(np.abs(replayed[name] - theirs[name]))) <= 1e-4, name
    assert float(np.max(np.abs(replayed["result_output"] - theirs["result_output"]))) <= 1e-4
