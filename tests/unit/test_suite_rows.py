"""The scored rows path of a suite: Implementation.logits_at's default, the worker's out-of-band framing, the
threads each slot gets, and the stats rows (no subprocess: the framing goes through an in-process pipe)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from parity.backends import worker
from parity.engines.base import Implementation
from parity.suite import executors, stats


class _Table(Implementation):
    """logits(tokens)[i] = a fixed random row per (position, token): a deterministic engine without a model."""

    spec = "table"

    def __init__(self) -> None:
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"name": "table"}

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self.calls += 1
        rng = np.random.default_rng(sum(tokens))
        return rng.standard_normal((len(tokens), 32)).astype(np.float32)

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        return [0] * n


def test_logits_at_default_is_a_contiguous_slice_of_logits() -> None:
    impl = _Table()
    tokens = [3, 1, 4, 1, 5, 9]
    at = impl.logits_at(tokens, np.array([2, 3, 5]))
    assert impl.calls == 1 and at.flags.c_contiguous
    assert np.array_equal(at, impl.logits(tokens)[[2, 3, 5]])
    assert impl.logits_at(tokens, []).shape == (0, 32)


def test_framing_carries_arrays_out_of_band_unchanged() -> None:
    big = np.arange(3 * 70_001, dtype=np.float32).reshape(3, 70_001)  # > the pipe's buffer: written while read
    message = ("ok", {"rows": big, "f": np.float64(1.5), "empty": np.zeros((0, 4), np.float32), "s": "x"})
    r, w = os.pipe()
    with os.fdopen(r, "rb") as rf, os.fdopen(w, "wb") as wf:
        t = threading.Thread(target=worker._send, args=(wf, message))
        t.start()
        got = worker._recv(rf)
        t.join()
        wf.close()
        with pytest.raises(EOFError):
            worker._recv(rf)  # a closed stream is the worker's death, not a garbled message
    kind, body = got
    assert kind == "ok" and body["s"] == "x" and body["f"] == 1.5
    assert body["rows"].dtype == np.float32 and np.array_equal(body["rows"], big)
    assert body["empty"].shape == (0, 4)
    body["rows"][0, 0] = -1  # received arrays are ordinary writable arrays
    non_contiguous = big[:, ::2]
    r2, w2 = os.pipe()
    with os.fdopen(r2, "rb") as rf, os.fdopen(w2, "wb") as wf:
        t = threading.Thread(target=worker._send, args=(wf, non_contiguous))
        t.start()
        assert np.array_equal(worker._recv(rf), non_contiguous)  # in band: pickled as a copy
        t.join()


@pytest.mark.parametrize(
    ("threads", "workers", "explicit", "want"),
    [(2, 1, False, 2), (2, 2, False, 1), (2, 3, False, 1), (8, 2, False, 4), (2, 2, True, 2), (1, 4, False, 1)],
)
def test_slots_share_the_thread_budget_unless_threads_are_given(
    threads: int, workers: int, explicit: bool, want: int
) -> None:
    assert executors.slot_threads(threads, workers, explicit=explicit) == want


def _uint16_by_full_code(r: np.ndarray, q: np.ndarray, tok: int) -> tuple[float, float, float, bool]:
    """llama-perplexity's row numerics decoded from the WHOLE uint16 code (stats.encode_base), the plain way."""
    f32 = np.float32
    scale, min_log_prob, codes = stats.encode_base(r)
    lpb = scale * codes.astype(f32) + min_log_prob
    imax = int(q.argmax())
    lse = f32(np.log(np.exp(q - q[imax]).sum(dtype=np.float64)))
    shift = f32(q[imax] + lse)
    keep = lpb > f32(-16)
    kld = float((np.exp(lpb[keep]) * ((lpb[keep] - q[keep]) + shift)).sum(dtype=np.float64))
    nll = f32(shift - q[tok])
    return float(lpb[tok]), -float(nll), kld, imax == int(lpb.argmax())


def test_uint16_rows_decode_only_candidates_yet_equal_the_whole_code() -> None:
    """_row_uint16 codes only the logits above the floor; the values equal decoding every code, to the bit."""
    rng = np.random.default_rng(11)
    vocab = 4000
    rows = [3 * rng.standard_normal(vocab), 0.5 * rng.standard_normal(vocab), np.zeros(vocab)]
    wide = 3 * rng.standard_normal(vocab)
    wide[:7] += 40  # clipped range: most logits sit at the floor
    tie = 0.5 * rng.standard_normal(vocab)
    tie[[10, 20]] = tie.max() + 1  # two equal top codes: the first wins
    rows += [wide, tie]
    for r64 in rows:
        r = r64.astype(np.float32)
        q = (r + 0.3 * rng.standard_normal(vocab)).astype(np.float32)
        for tok in (0, 10, int(r.argmin()), int(r.argmax())):
            got = stats._row_uint16(r.copy(), q.copy(), tok, np.empty(vocab, np.float32))
            lr, lq, kld, same = _uint16_by_full_code(r, q, tok)
            assert (got[0], got[1], got[2], got[5]) == (lr, lq, kld, same)


def _through_pipe(obj: Any, pool: list[bytearray]) -> Any:
    r, w = os.pipe()
    with os.fdopen(r, "rb") as rf, os.fdopen(w, "wb") as wf:
        t = threading.Thread(target=worker._send, args=(wf, obj))
        t.start()
        got = worker._recv(rf, pool)
        t.join()
    return got


def test_reply_buffers_are_reused_only_once_nothing_holds_them() -> None:
    pool: list[bytearray] = []
    first = _through_pipe(np.full((2, worker.POOL_MIN // 8 + 1), 1.0, np.float32), pool)
    second = _through_pipe(np.full(first.shape, 2.0, np.float32), pool)  # the first is still held: a new buffer
    assert (first == 1.0).all() and (second == 2.0).all()
    assert not np.shares_memory(first, second)
    base = first.ctypes.data
    del first
    third = _through_pipe(np.full(second.shape, 3.0, np.float32), pool)  # the first's buffer is free again
    assert third.ctypes.data == base and (third == 3.0).all() and (second == 2.0).all()
    small = _through_pipe(np.ones(16, np.float32), pool)  # below POOL_MIN: never pooled
    assert small.sum() == 16 and len(pool) == 2
