"""Graph tensor capture through llama.cpp's eval callback (bridge parity_capture_run, BridgedImplementation.tensors).

On the default model (F32, two layers): every default name of every layer, shapes, result_output = the logits of
the same decode, micro-batch splits, teacher forcing (own values: bit-identical; a perturbed layer: only what is
downstream moves), the byte budget and unknown names. About 4 s (one worker, one 1 MB model).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.engines import spec as impl_spec
from parity.engines import tensor_names
from parity.engines.base import TENSOR_GLOBALS, TENSOR_OPS
from parity.engines.bridged import BridgedImplementation
from parity.errors import UsageError, WorkerError
from parity.models import modelgen

pytestmark = pytest.mark.compile

TOKENS = [1, 17, 42, 99, 5, 23, 64, 7, 31, 12, 88, 3]


def _open(plan: build.BuildPlan, text: str = "llama", **params: int) -> BridgedImplementation:
    # one thread: a capture syncs after every named node, and waking a second thread each time is most of
    # the cost on a loaded machine (the tests compare captures of one configuration with each other)
    gguf, _ = modelgen.default_model("f32")
    return BridgedImplementation(impl_spec.parse(text), plan, gguf, BackendParams(**{"n_threads": 1, **params}))


@pytest.fixture(scope="module")
def impl(llama_plan: build.BuildPlan) -> Iterator[BridgedImplementation]:
    with _open(llama_plan) as im:
        yield im


def test_default_names_cover_every_layer(impl: BridgedImplementation) -> None:
    info = impl._model.info()
    n_layer, n_embd, n_vocab = int(info["n_layer"]), int(info["n_embd"]), int(info["n_vocab"])
    assert tensor_names.can_capture(impl)
    out = impl.tensors(TOKENS)
    layered = {"attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"}
    assert layered <= set(TENSOR_OPS)
    for layer in range(n_layer):
        for op in layered:
            assert f"{op}-{layer}" in out, f"{op}-{layer} missing from {sorted(out)}"
    assert {"result_norm", "result_output"} <= set(out) and set(out) - {
        f"{o}-{i}" for o in TENSOR_OPS for i in range(n_layer)
    } <= set(TENSOR_GLOBALS)
    for name, value in out.items():
        assert value.dtype == np.float32 and value.shape[0] == len(TOKENS) and np.isfinite(value).all(), name
    assert out["attn_norm-0"].shape == (len(TOKENS), n_embd)
    assert out["result_output"].shape == (len(TOKENS), n_vocab)


def test_result_output_is_the_decodes_logits(impl: BridgedImplementation) -> None:
    cap = impl._model.capture(TOKENS, ["result_output", "Qcur-0"], None, 1 << 30)
    assert np.array_equal(cap.tensors["result_output"], cap.logits)
    # the eval callback changes nothing about a decode: bit-identical to parity_eval
    assert np.array_equal(cap.logits, impl.logits(TOKENS))
    # llama.cpp names Qcur at three nodes (projection, reshape, RoPE): the last one computed is recorded
    assert cap.occurrences["Qcur-0"] > 1
    assert "Qcur-0" in impl.graph_names(TOKENS)


def test_patterns_and_unknown_names(impl: BridgedImplementation) -> None:
    out = impl.tensors(TOKENS, ["l_out-*", "result_output"])
    assert sorted(out) == sorted([n for n in impl.graph_names(TOKENS) if n.startswith("l_out-")] + ["result_output"])
    with pytest.raises(UsageError, match="'no_such_tensor-0'"):
        impl.tensors(TOKENS, ["attn_norm-0", "no_such_tensor-0"])
    with pytest.raises(UsageError, match="'zzz\\*'"):
        impl.tensors(TOKENS, ["zzz*"])


def test_memory_budget_refuses_with_the_size_needed(impl: BridgedImplementation) -> None:
    budget = impl.capture_budget
    impl.capture_budget = 1000
    try:
        with pytest.raises(UsageError, match=r"needs \d+ bytes, over the budget of 1000 bytes"):
            impl.tensors(TOKENS, ["result_output"])
    finally:
        impl.capture_budget = budget


def test_replace_with_own_values_is_bit_identical(impl: BridgedImplementation) -> None:
    free = impl.tensors(TOKENS)
    forced = impl.tensors(TOKENS, replace={n: v for n, v in free.items() if n != "result_output"})
    for name, value in free.items():
        assert np.array_equal(forced[name], value), name


def test_perturbed_layer_moves_only_what_is_downstream(impl: BridgedImplementation) -> None:
    free = impl.tensors(TOKENS)
    bumped = free["ffn_out-1"] * np.float32(1.05)
    forced = impl.tensors(TOKENS, replace={"ffn_out-1": bumped})
    assert np.array_equal(forced["ffn_out-1"], free["ffn_out-1"])  # the recorded value: its own output
    for name in ("attn_norm-0", "Qcur-0", "l_out-0", "attn_norm-1", "kqv_out-1", "ffn_inp-1"):
        assert np.array_equal(forced[name], free[name]), f"{name} is upstream of ffn_out-1 and moved"
    for name in ("l_out-1", "result_norm", "result_output"):
        assert not np.array_equal(forced[name], free[name]), f"{name} is downstream of ffn_out-1 and did not move"
    np.testing.assert_array_equal(forced["l_out-1"], bumped + free["ffn_inp-1"])


def test_micro_batches_concatenate_rows(llama_plan: build.BuildPlan, impl: BridgedImplementation) -> None:
    whole = impl.tensors(TOKENS)
    with _open(llama_plan, n_ubatch=5) as split:
        parts = split.tensors(TOKENS)
        assert sorted(parts) == sorted(whole)
        # three graphs (5 + 5 + 2 tokens); the same function evaluated in another order: close, not identical
        for name, value in whole.items():
            np.testing.assert_allclose(parts[name], value, rtol=1e-4, atol=1e-4, err_msg=name)
        assert np.array_equal(parts["result_output"], split.logits(TOKENS))
        # replay across micro-batches: rows are written back where they were read
        forced = split.tensors(TOKENS, replace={"ffn_out-0": parts["ffn_out-0"]})
        assert np.array_equal(forced["result_output"], parts["result_output"])


def test_a_crash_during_capture_is_a_worker_error(llama_plan: build.BuildPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_FAULT_INJECT", "abort:capture")  # the worker aborts as a C++ abort would
    with _open(llama_plan) as im:
        with pytest.raises(WorkerError, match="killed by signal SIGABRT during capture") as info:
            im.tensors(TOKENS, ["l_out-0"])
        assert info.value.exit_code == 1


@pytest.mark.bitnet_cpp
def test_fork_captures_and_replays() -> None:
    """bitnet.cpp's 2024 llama.h: the same capture through its eval callback (its own names: inp_embd, ...)."""
    from parity.backends import lock

    spec = lock.get_spec("bitnet")
    override = lock.source_override(spec)
    if override is None:
        pytest.fail(
            "this test needs a bitnet.cpp source: set PARITY_BITNET_SRC to a checkout of microsoft/BitNet at "
            "c82b5e6 with 3rdparty/llama.cpp at 406a5036 (CI deselects it with -m 'not bitnet_cpp')"
        )
    plan = build.ensure_built(spec, override)
    with _open(plan, "bitnet", type_v=1) as fork:  # its most precise working configuration: V cache F16
        free = fork.tensors(TOKENS)
        for name in ("attn_norm-0", "l_out-1", "result_norm", "result_output"):
            assert free[name].shape[0] == len(TOKENS), name
        assert np.array_equal(free["result_output"], fork.logits(TOKENS))
        forced = fork.tensors(TOKENS, replace={n: v for n, v in free.items() if n != "result_output"})
        assert all(np.array_equal(forced[n], v) for n, v in free.items())
        bumped = fork.tensors(TOKENS, replace={"l_out-0": free["l_out-0"] * np.float32(1.05)})
        assert np.array_equal(bumped["attn_norm-0"], free["attn_norm-0"])
        assert not np.array_equal(bumped["result_output"], free["result_output"])
