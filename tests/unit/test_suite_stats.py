"""parity.suite.stats: llama-perplexity's KL-divergence definitions, checked against hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from parity.errors import UsageError
from parity.suite import stats as S

LN2 = math.log(2.0)


def _pair(n: int = 60, vocab: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = (3 * rng.normal(size=(n, vocab))).astype(np.float32)
    impl = (ref + 0.3 * rng.normal(size=(n, vocab))).astype(np.float32)
    return ref, impl, rng.integers(0, vocab, n)


def test_scored_positions_all_and_perplexity() -> None:
    assert S.scored_positions(5).tolist() == [0, 1, 2, 3]
    # llama-perplexity: first = n_ctx/2, positions first .. n_ctx-2 (n_ctx - 1 - first of them)
    assert S.scored_positions(8, "perplexity").tolist() == [4, 5, 6]
    assert S.scored_positions(9, "perplexity").tolist() == [4, 5, 6, 7]
    assert S.scored_positions(1).tolist() == []
    with pytest.raises(UsageError, match="scoring mode"):
        S.scored_positions(5, "half")


def test_perplexity_chunks_replace_first_token_by_bos() -> None:
    toks = list(range(100, 121))  # 21 tokens, n_ctx 8 -> 2 chunks, the tail dropped
    assert S.perplexity_chunks(toks, 8, bos=1) == [[1, *range(101, 108)], [1, *range(109, 116)]]
    assert S.perplexity_chunks(toks, 8, bos=None)[1] == list(range(108, 116))
    with pytest.raises(UsageError, match="at least 2 x ctx = 24"):
        S.perplexity_chunks(toks, 12, bos=1)


def test_two_token_vocabulary_by_hand() -> None:
    # reference p = (1/2, 1/2); implementation q = (3/4, 1/4); the next token is 1
    ref = np.array([[0.0, 0.0], [0.0, 0.0]])
    impl = np.array([[math.log(3.0), 0.0], [0.0, 0.0]])
    st = S.compute(ref, impl, [0, 1])
    assert len(st) == 1 and st.position.tolist() == [0] and st.token.tolist() == [1]
    assert st.logp_ref[0] == pytest.approx(-LN2, abs=1e-15)
    assert st.logp_impl[0] == pytest.approx(math.log(0.25), abs=1e-15)
    assert st.kld[0] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-15)  # .5 ln(.5/.75) + .5 ln(.5/.25)
    assert st.p_ref[0] == pytest.approx(0.5) and st.p_impl[0] == pytest.approx(0.25)
    assert bool(st.same_top[0])  # both argmaxes are token 0 (a tie takes the first index, as the C++ loop)


def test_identical_logits_have_zero_divergence() -> None:
    ref, _, toks = _pair()
    for enc in S.ENCODINGS:
        st = S.compute(ref, ref.copy(), toks, encoding=enc)
        s = S.summarize(st)
        assert s["same_top"]["p"] == 1.0 and s["same_top"]["uncertainty"] == 0.0
        assert s["dp"]["rms"] == pytest.approx(0.0, abs=1e-6)
        if enc == "float64":
            assert s["kld"]["mean"] == pytest.approx(0.0, abs=1e-12)
            assert s["ppl_ratio"]["value"] == pytest.approx(1.0, abs=1e-12)
        else:  # the base went through 16 bits: |sum p (log p_base - log p)| <= half a step of 16/65535
            assert np.abs(st.kld).max() <= 0.5 * 16 / 65535 * 1.01
            assert np.abs(st.kld).max() > 0


def test_uint16_encoding_by_hand() -> None:
    # max 0, min clamped to max-16; scale 16/65535; -8 -> 65535/16*8 = 32767.5 -> 32768 (nearest, half to even)
    scale, min_log_prob, codes = S.encode_base(np.array([0.0, -8.0, -16.0, -20.0], np.float32))
    assert scale == np.float32(16 / 65535)
    assert codes.tolist() == [65535, 32768, 0, 0]
    lse = np.float32(math.log(1 + math.exp(-8) + math.exp(-16) + math.exp(-20)))
    assert min_log_prob == np.float32(np.float32(-16) - lse)
    flat_scale, _, flat = S.encode_base(np.zeros(4, np.float32))
    assert flat_scale == 0 and flat.tolist() == [0, 0, 0, 0]


def test_uint16_kld_skips_base_log_probs_at_or_below_minus_16() -> None:
    # base: token 0 dominates, token 1 sits at -20 (clamped into the -16 floor, then skipped by the KLD sum)
    ref = np.array([[0.0, -20.0], [0.0, 0.0]], np.float32)
    impl = np.array([[0.0, 0.0], [0.0, 0.0]], np.float32)
    st = S.compute(ref, impl, [0, 0], encoding="uint16")
    lse_base = math.log(1 + math.exp(-20.0))
    # only i=0 counts: p_base(0) * (log p_base(0) - log q(0)) with q(0) = 1/2
    assert st.kld[0] == pytest.approx(math.exp(-lse_base) * (-lse_base + LN2), rel=1e-6)
    exact = S.compute(ref, impl, [0, 0])
    # the float64 encoding also sums token 1's term, e^-20 * (-20 + ln 2) < 0
    assert exact.kld[0] == pytest.approx(math.exp(-lse_base) * (-lse_base + LN2) + math.exp(-20) * (-20 + LN2))
    assert exact.kld[0] < st.kld[0]
    assert st.logp_ref[0] == pytest.approx(-lse_base, abs=1e-6)


def test_encodings_agree_on_ordinary_logits() -> None:
    ref, impl, toks = _pair()
    toks = ref.argmax(axis=1)  # likely next tokens: far from the -16 floor
    a, b = S.compute(ref, impl, toks), S.compute(ref, impl, toks, encoding="uint16")
    assert np.abs(a.kld - b.kld).max() < 1e-3 * max(a.kld.max(), 1e-3)
    assert np.abs(a.logp_ref - b.logp_ref).max() < 1e-3
    assert (a.same_top == b.same_top).all()


def test_full_rows_or_scored_rows_give_identical_values() -> None:
    ref, impl, toks = _pair(n=16)
    pos = S.scored_positions(16, "perplexity")
    full = S.compute(ref, impl, toks, mode="perplexity")
    rows = S.compute(ref[pos], impl[pos], toks, mode="perplexity")
    assert full.encoding == "uint16" and full.position.tolist() == list(range(8, 15))
    for f, arr in full.arrays().items():
        assert np.array_equal(arr, rows.arrays()[f]), f
    with pytest.raises(UsageError, match="expected 16 .every position. or 7"):
        S.compute(ref[:5], impl[:5], toks, mode="perplexity")


def test_summary_by_hand() -> None:
    # 12 positions: KLD = 0..11 / 100, dp = +-1/100 alternately, same top on 9 of 12
    n = 12
    kld = np.arange(n) / 100
    st = S.PositionStats(
        "float64",
        item=np.zeros(n, np.int64),
        position=np.arange(n),
        token=np.zeros(n, np.int64),
        logp_ref=np.full(n, -2.0),
        logp_impl=np.full(n, -2.0) - np.arange(n) % 2,
        kld=kld,
        p_ref=np.full(n, 0.5),
        p_impl=0.5 + np.where(np.arange(n) % 2 == 0, 0.01, -0.01),
        same_top=np.arange(n) >= 3,
    )
    s = S.summarize(st)
    assert s["kld"]["mean"] == pytest.approx(0.055)
    assert s["kld"]["uncertainty"] == pytest.approx(math.sqrt((np.mean(kld**2) - 0.055**2) / 11))
    assert s["kld"]["median"] == pytest.approx(0.055, rel=1e-6)  # (0.05 + 0.06) / 2
    assert s["kld"]["percentiles"]["90.0"] == pytest.approx(0.099, rel=1e-6)  # 0.9 * 11 = 9.9 -> 0.09 + .9 * .01
    assert s["kld"]["max"] == 0.11 and s["kld"]["min"] == 0.0
    assert s["dp"]["mean"] == pytest.approx(0.0, abs=1e-15)
    assert s["dp"]["rms"] == pytest.approx(0.01)
    assert s["same_top"] == {"count": 9, "p": 0.75, "uncertainty": pytest.approx(math.sqrt(0.75 * 0.25 / 11))}
    # nll_impl alternates 2, 3 -> mean 2.5; base constant 2 (no variance -> uncertainty 0, as llama-perplexity)
    assert s["ppl_impl"]["value"] == pytest.approx(math.exp(2.5))
    assert s["ppl_ref"] == {"value": pytest.approx(math.exp(2.0)), "uncertainty": 0.0}
    assert s["ln_ppl_ratio"]["value"] == pytest.approx(0.5)
    assert s["ln_ppl_ratio"]["uncertainty"] == pytest.approx(math.sqrt(0.25 / 11))  # var(nll)/(n-1), cov 0
    assert s["ppl_ratio"]["value"] == pytest.approx(math.exp(0.5))


def test_few_positions_have_no_uncertainty_and_none_have_no_figures() -> None:
    ref, impl, toks = _pair(n=6)
    s = S.summarize(S.compute(ref, impl, toks))
    assert s["positions"] == 5 and s["kld"]["uncertainty"] is None and s["ppl_ratio"]["uncertainty"] is None
    assert "n/a" in S.format_text(s)
    none = S.summarize(S.empty())
    assert none["kld"] is None and none["same_top"] is None
    assert S.format_text(none) == "no scored positions\n"


def test_sharding_and_order_do_not_change_a_digit(tmp_path: Path) -> None:
    parts = [S.compute(*_pair(n=30, seed=i), item=i, mode=m) for i in range(5) for m in ("all",)]
    whole = S.concat(parts)
    shuffled = S.concat([parts[i] for i in (3, 0, 4, 2, 1)])
    halves = S.concat([S.concat(parts[:2]), S.concat(parts[2:])])
    assert S.summarize(whole) == S.summarize(shuffled) == S.summarize(halves)
    assert S.format_text(S.summarize(whole)) == S.format_text(S.summarize(shuffled))
    path = tmp_path / "stats.npz"
    whole.save(path)
    back = S.load(path)
    assert back.encoding == "float64" and S.summarize(back) == S.summarize(whole)
    assert S.summarize(whole.select(whole.item == 2)) == S.summarize(parts[2])
    with pytest.raises(UsageError, match="encodings"):
        S.concat([parts[0], S.compute(*_pair(n=30), encoding="uint16")])


def test_load_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a parity statistics file"):
        S.load(bad)


def test_text_has_llama_perplexity_labels() -> None:
    text = S.format_text(S.summarize(S.compute(*_pair(), mode="perplexity")))
    for label in ("Mean PPL(Q)", "Mean ln(PPL(Q)/PPL(base))", "Mean    KLD:", "99.9%   KLD:", "Median  KLD:"):
        assert label in text
    for label in (" 0.1%   Δp:", "RMS Δp    :", "Same top p:"):
        assert label in text
