"""Q8_0/Q5_0/Q4_0 matrices kept quantized (parity.engines.numpy.qrows) against the dequantized float matrix.

Rows (the embedding lookup) must be exactly parity.gguf.dequant's values. Products may differ from x @ W.T by
the order of float additions only: by Higham's bound, a sum of n products computed in any order is within
gamma_n = n u / (1 - n u) of the exact sum, relative to sum |x_j w_ij| (u = 2^-24 in float32, 2^-53 in float64).
Both the reference and the quantized product meet it; the fast product adds each row in n = cols + cols/32 + 1
roundings (32-wide block sums, a scale, the blocks' sum), so they differ by at most 2 gamma_n.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from parity.engines.numpy import blas
from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.qrows import CHUNK_ROWS, QRows
from parity.gguf.dequant import dequantize
from parity.gguf.reader import open_gguf

from . import test_engine_gemma3 as g3
from .test_engine_fast import N_NEW, PROMPTS, TOL_F32, TOL_F64, stepped_logits

ROWS, COLS = 2 * CHUNK_ROWS + 37, 96  # three chunks, the last one padded
Q8, Q5, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q4_0
TYPES = {"q8_0": Q8, "q5_0": Q5, "q4_0": Q4}


def gamma(n: int, dtype: type[np.floating]) -> float:
    u = float(np.finfo(dtype).eps) / 2
    return n * u / (1 - n * u)


@pytest.fixture(scope="module", params=list(TYPES))
def q_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "m.gguf"
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((ROWS, COLS)) * rng.uniform(0.01, 3.0, (ROWS, 1))).astype(np.float32)
    w[7] = 0  # an all-zero row: zero block scales
    writer = gguf.GGUFWriter(str(path), "llama")
    qtype = TYPES[request.param]
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_and_products_match_the_dequantized_matrix(q_file: Path, dtype: type[np.floating]) -> None:
    f = open_gguf(q_file)
    t = f.tensors["token_embd.weight"]
    m = QRows.load(f, t, dtype)
    w = dequantize(t).astype(dtype)  # (ROWS, COLS): the reference weights
    assert m.shape == w.shape and m.dtype == dtype and m.nbytes < w.nbytes * 0.7
    ids = np.array([0, 1, 7, CHUNK_ROWS - 1, CHUNK_ROWS, ROWS - 1, 5, 5])
    assert np.array_equal(m[ids], w[ids]) and np.array_equal(np.asarray(m), w)
    x = (np.random.default_rng(4).standard_normal((3, COLS)) * 10).astype(dtype)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)  # (3, ROWS), exact but for float64's own rounding
    size = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)  # sum_j |x_j w_ij|
    for got, n in ((m.project(x), COLS), (m.project_fast(x), COLS + COLS // 32 + 1)):
        assert got.shape == (3, ROWS) and got.dtype == dtype
        err = np.abs(got.astype(np.float64) - ref)
        assert np.all(err <= gamma(n, dtype) * size + gamma(COLS, np.float64) * size)
    plain = x @ w.T
    assert np.all(np.abs(m.project_fast(x) - plain) <= 2 * gamma(COLS + COLS // 32 + 1, dtype) * size)
    assert not np.array_equal(m.project_fast(x[:1]), np.zeros((1, ROWS)))


@pytest.mark.parametrize(("dtype", "wtype"), [("float32", Q8), ("float64", Q8), ("float32", Q5)])
def test_engine_keeps_weights_quantized_and_its_greedy_matches(
    tmp_path: Path, dtype: str, wtype: gguf.GGMLQuantizationType
) -> None:
    path = g3.write_gemma3(tmp_path / "q.gguf", g3.make_weights(6, n_layer=3), wtype=wtype)
    e = NumpyEngine(path, dtype=dtype)
    assert isinstance(e.weights.output, QRows) and e.weights.output is e.weights.token_embd  # tied, quantized
    assert all(isinstance(layer.w_up, QRows) and isinstance(layer.wk, QRows) for layer in e.weights.layers)
    tol = TOL_F32 if dtype == "float32" else TOL_F64
    for prompt in PROMPTS:
        ids = e.greedy(prompt, N_NEW)
        assert ids == e.greedy_reference(prompt, N_NEW)
        ref = e.logits(prompt + ids[:-1])
        fast = stepped_logits(e, prompt, ids[:-1])
        assert float(np.max(np.abs(fast - ref))) <= tol * float(np.max(np.abs(ref)))


def test_one_thread_sets_openblas_to_one_thread_and_restores_it() -> None:
    found = blas.openblas_setters()
    config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if found is None:  # only when numpy's BLAS is not OpenBLAS
        assert "openblas" not in str(config.get("name", "")).lower()
        return
    setter, getter = found
    before = int(getter())
    setter(2)
    try:
        with blas.one_thread():
            assert int(getter()) == 1
            with blas.one_thread():  # nested: still one, and the outer block restores
                assert int(getter()) == 1
            assert int(getter()) == 1
        assert int(getter()) == 2
    finally:
        setter(before)


def test_one_thread_blocks_overlapping_in_threads_keep_one_thread_until_the_last_leaves() -> None:
    """Thread A enters, B enters, A leaves: B still runs on one thread; the count comes back when B leaves."""
    import threading

    found = blas.openblas_setters()
    if found is None:  # only when numpy's BLAS is not OpenBLAS
        assert "openblas" not in str(np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", "")).lower()
        return
    setter, getter = found
    before = int(getter())
    setter(2)
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def a() -> None:
        with blas.one_thread():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with blas.one_thread():
            b_in.set()
            a_out.wait(5)
            seen.append(int(getter()))

    try:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen == [1] and int(getter()) == 2
    finally:
        setter(before)
