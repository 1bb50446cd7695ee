"""Dataset statistics of a suite, with llama-perplexity's KL-divergence definitions (issue 16).

The definitions are those of tools/perplexity/perplexity.cpp in the pinned llama.cpp source
(`kl_divergence()`, `log_softmax(..., base_log_prob, ...)`, `kl_divergence_result`): the reference is the
*base*, the implementation is *Q*. At one scored position, with next token t:

    nll        = -log p_Q(t)          nll_base = -log p_base(t)
    KLD        = sum_i p_base(i) * (log p_base(i) - log p_Q(i))
    dp         = p_Q(t) - p_base(t)
    same top   = argmax logits_Q == argmax log p_base   (first index on ties, as the C++ loops)

and over the scored positions (N of them) `summarize()` gives what llama-perplexity prints: PPL = exp(mean
nll) of both and their ratio with the covariance-corrected uncertainty, mean KLD +- sqrt(var/(N-1)), the KLD
percentiles, mean/percentiles of dp, RMS dp = sqrt(mean dp^2) +- 0.5/RMS * unc(mean dp^2), same top p +-
sqrt(p(1-p)/(N-1)).

Two encodings of the per-position values:
- "float64" (the default, mode "all"): the exact definitions in double precision over the whole vocabulary.
- "uint16" (mode "perplexity"): llama-perplexity's numerics, so its printout can be reproduced. The base
  log-probs go through the same uint16 code the `--kl-divergence-base` file stores (range [max-16, max]
  over 65535 steps, `nearest_int` rounding), the KLD sum skips base log-probs <= -16, nll and dp are
  float32, and every float32 expression is evaluated in float32 in the C++ order.

Scoring modes: "all" scores every position that has a next token; "perplexity" scores exactly llama-
perplexity's positions, the second half of each chunk: positions n_ctx/2 .. n_ctx-2 of a chunk of n_ctx
tokens (position j predicts token j+1; the last position has no target inside its chunk). Chunks are cut
from the whole text tokenized WITH its special tokens, and each chunk's first token is replaced by BOS when
the vocabulary adds one (`perplexity_chunks`).

Reductions are deterministic: sums are exactly rounded (math.fsum) and percentiles come from sorting, so
the same positions in any order and any sharding give the same summary to the last bit.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.core.fs import atomic_write_bytes
from parity.errors import UsageError

MODES = ("all", "perplexity")
ENCODINGS = ("float64", "uint16")
MODE_ENCODING = {"all": "float64", "perplexity": "uint16"}
STATS_VERSION = 1
# Fractions llama-perplexity prints (as C++ float literals), top first.
KLD_PERCENTILES = (0.999, 0.990, 0.950, 0.900, 0.100, 0.050, 0.010, 0.001)
DP_PERCENTILES = (0.999, 0.990, 0.950, 0.900, 0.750, 0.250, 0.100, 0.050, 0.010, 0.001)
_ROW_ELEMENTS = 1 << 22  # logits elements handled per block (bounds the temporaries: ~16-32 MB)
_F32 = np.float32
_FIELDS = ("item", "position", "token", "logp_ref", "logp_impl", "kld", "p_ref", "p_impl", "same_top")


def scored_positions(n_tokens: int, mode: str = "all") -> np.ndarray:
    """Positions of a sequence of `n_tokens` that are scored (each predicts the token after it)."""
    if mode not in MODES:
        raise UsageError(f"unknown scoring mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    first = 0 if mode == "all" else n_tokens // 2
    return np.arange(first, max(n_tokens - 1, first), dtype=np.int64)


def perplexity_chunks(tokens: Sequence[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: `tokens` (the whole text, tokenized with special tokens) cut into
    len // n_ctx chunks of n_ctx tokens, the first token of each replaced by `bos` (None: no BOS added)."""
    if n_ctx < 4:
        raise UsageError(f"context {n_ctx} is too small to score half a chunk", fix="use --ctx 4 or more")
    if len(tokens) < 2 * n_ctx:
        raise UsageError(
            f"the text has {len(tokens)} tokens; llama-perplexity needs at least 2 x ctx = {2 * n_ctx}",
            fix="use a longer text or a smaller --ctx",
        )
    chunks = [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(len(tokens) // n_ctx)]
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


@dataclass(frozen=True)
class PositionStats:
    """Per-scored-position values (one array each, same length), in scoring order.

    item/position: where the position is (item index, token index in the item); token: the next token;
    logp_ref/logp_impl: log-prob of the next token under the reference (base) and the implementation (Q);
    kld: KL(ref || impl); p_ref/p_impl: probability of the next token; same_top: argmaxes agree.
    """

    encoding: str
    item: np.ndarray
    position: np.ndarray
    token: np.ndarray
    logp_ref: np.ndarray
    logp_impl: np.ndarray
    kld: np.ndarray
    p_ref: np.ndarray
    p_impl: np.ndarray
    same_top: np.ndarray

    def __len__(self) -> int:
        return int(self.kld.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in _FIELDS}

    def select(self, mask: np.ndarray) -> PositionStats:
        """The positions where `mask` is true (e.g. `stats.select(stats.item == 3)`)."""
        return PositionStats(self.encoding, **{f: a[mask] for f, a in self.arrays().items()})

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays: dict[str, Any] = {"version": np.int64(STATS_VERSION), "encoding": np.str_(self.encoding)}
        np.savez_compressed(buf, **(arrays | self.arrays()))
        return buf.getvalue()

    def save(self, path: Path) -> None:
        """Persist atomically (npz; float64 values, so a reload summarizes identically)."""
        atomic_write_bytes(path, self.to_bytes())


def empty(encoding: str = "float64") -> PositionStats:
    return PositionStats(
        encoding,
        item=np.zeros(0, np.int64),
        position=np.zeros(0, np.int64),
        token=np.zeros(0, np.int64),
        **{f: np.zeros(0, np.float64) for f in ("logp_ref", "logp_impl", "kld", "p_ref", "p_impl")},
        same_top=np.zeros(0, np.bool_),
    )


def concat(parts: Sequence[PositionStats]) -> PositionStats:
    """The parts one after another (all of one encoding)."""
    encodings = {p.encoding for p in parts}
    if len(encodings) > 1:
        raise UsageError(f"cannot combine statistics of encodings {sorted(encodings)}", fix="use one scoring mode")
    if not parts:
        return empty()
    return PositionStats(parts[0].encoding, **{f: np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS})


def load(path: Path) -> PositionStats:
    """A file written by PositionStats.save()."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != STATS_VERSION:
                raise UsageError(f"{path}: statistics version {int(z['version'])}, expected {STATS_VERSION}")
            return PositionStats(str(z["encoding"]), **{f: z[f] for f in _FIELDS})
    except (OSError, KeyError, ValueError) as e:
        raise UsageError(f"{path} is not a parity statistics file ({e})", fix="delete it and run again") from e


def compute(
    ref_logits: np.ndarray,
    impl_logits: np.ndarray,
    tokens: Sequence[int] | np.ndarray,
    *,
    mode: str = "all",
    encoding: str | None = None,
    item: int = 0,
) -> PositionStats:
    """Per-position statistics of one item: `tokens` (n of them) and the logits of both sides.

    The logits are either every position's, shape (n, vocab), or only the scored positions' rows, shape
    (len(scored_positions(n, mode)), vocab). Float32 logits are used as they are; others are cast to float32
    for the "uint16" encoding and to float64 for "float64".
    """
    enc = encoding or MODE_ENCODING.get(mode, "")
    if enc not in ENCODINGS:
        raise UsageError(f"unknown statistics encoding {enc!r}", fix=f"use one of {', '.join(ENCODINGS)}")
    toks = np.asarray(tokens, dtype=np.int64)
    pos = scored_positions(len(toks), mode)
    rows_ref, rows_impl = _rows(ref_logits, len(toks), pos, "reference"), _rows(impl_logits, len(toks), pos, "impl")
    if rows_ref.shape[1] != rows_impl.shape[1]:
        raise UsageError(
            f"vocabulary sizes differ: reference {rows_ref.shape[1]}, implementation {rows_impl.shape[1]}",
            fix="compare models that share a vocabulary",
        )
    targets = toks[pos + 1]
    if len(targets) and (targets.min() < 0 or targets.max() >= rows_ref.shape[1]):
        raise UsageError(f"a next token is outside the vocabulary of {rows_ref.shape[1]}", fix="check the token ids")
    out = {f: np.zeros(len(pos), np.float64) for f in ("logp_ref", "logp_impl", "kld", "p_ref", "p_impl")}
    same = np.zeros(len(pos), np.bool_)
    row = _row_uint16 if enc == "uint16" else _row_float64
    dtype = _F32 if enc == "uint16" else np.float64
    # one set of row-sized work buffers for the item: a fresh 1-2 MB temporary per operation costs more in page
    # faults than the arithmetic (measured 2.5 ms vs 1.0 ms for exp(r - max) of a 262144-token row)
    scratch = np.empty((3, rows_ref.shape[1]), dtype)
    for k in range(len(pos)):
        r, q = scratch[0], scratch[1]
        np.copyto(r, rows_ref[k], casting="same_kind" if dtype == _F32 else "safe")
        np.copyto(q, rows_impl[k], casting="same_kind" if dtype == _F32 else "safe")
        vals = row(r, q, int(targets[k]), scratch[2])
        for f, v in zip(("logp_ref", "logp_impl", "kld", "p_ref", "p_impl"), vals[:5], strict=True):
            out[f][k] = v
        same[k] = vals[5]
    return PositionStats(enc, item=np.full(len(pos), item, np.int64), position=pos, token=targets, **out, same_top=same)


def _rows(logits: np.ndarray, n: int, pos: np.ndarray, side: str) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 2:
        raise UsageError(f"{side} logits must be a (positions, vocab) matrix, got shape {arr.shape}")
    if arr.shape[0] == n:
        return arr[pos] if len(pos) != n else arr
    if arr.shape[0] == len(pos):
        return arr
    raise UsageError(
        f"{side} logits have {arr.shape[0]} rows; expected {n} (every position) or {len(pos)} (scored positions)"
    )


def _row_float64(
    r: np.ndarray, q: np.ndarray, tok: int, work: np.ndarray
) -> tuple[float, float, float, float, float, bool]:
    """Exact definitions in double precision: KLD = sum p_r (r - q) - (lse_r - lse_q), p_r = e^(r - lse_r).

    `work`: a row-sized float64 buffer this call may overwrite; q is overwritten too."""
    mr, mq = r.max(), q.max()
    same = int(r.argmax()) == int(q.argmax())
    np.subtract(q, mq, out=work)
    lse_q = mq + math.log(float(np.exp(work, out=work).sum()))
    lq = float(q[tok]) - lse_q
    er = np.subtract(r, mr, out=work)
    np.exp(er, out=er)
    sr = float(er.sum())
    lse_r = mr + math.log(sr)
    diff = np.subtract(r, q, out=q)
    kld = float(np.einsum("i,i->", er, diff)) / sr - (lse_r - lse_q)  # not np.dot: no BLAS threads spinning
    lr = float(r[tok]) - lse_r
    return lr, lq, kld, math.exp(lr), math.exp(lq), same


def _encode(r: np.ndarray) -> tuple[np.float32, np.float32, np.ndarray]:
    """encode_base with the codes as exact float32 integers (what the decoding multiplies)."""
    max_l, min_l = r.max(), r.min()
    min_l = max(min_l, _F32(max_l - _F32(16)))
    lse = _F32(math.log(float(np.exp(r - max_l).sum(dtype=np.float64))))
    min_log_prob = _F32(_F32(min_l - max_l) - lse)
    scale = _F32(_F32(max_l - min_l) / _F32(65535))
    if not scale:
        return scale, min_log_prob, np.zeros(r.shape, _F32)
    inv = _F32(_F32(1) / scale)
    # nearest_int() of inv * (r - min), 0 where r <= min: fval + 1.5*2^23 in float32 rounds half to even (rint);
    # r <= min gives fval <= 0, which max(., 0) sends to 0. fval never reaches 65535.5 (float32 rounding of
    # 65535 steps), so the 16-bit store never wraps.
    codes = np.rint(np.maximum(inv * (r - min_l), _F32(0)))
    return scale, min_log_prob, codes


def encode_base(r: np.ndarray) -> tuple[np.float32, np.float32, np.ndarray]:
    """The uint16 code of one row of base logits, as llama-perplexity's base run writes it: (scale,
    min_log_prob, codes); log p(i) is decoded as scale * codes[i] + min_log_prob (float32)."""
    scale, min_log_prob, codes = _encode(np.asarray(r, _F32))
    return scale, min_log_prob, codes.astype(np.uint16)


def _row_uint16(
    r: np.ndarray, q: np.ndarray, tok: int, work: np.ndarray
) -> tuple[float, float, float, float, float, bool]:
    """llama-perplexity's numerics: the base through its uint16 code, float32 where the C++ uses float.

    Only the logits at or above the code's floor (r >= min) can decode above the -16 the KLD sum keeps: below
    it (the row's range clipped to 16) the code is 0, which decodes to min - max - lse <= -16. So the codes
    are computed for those candidates only (about 4% of Gemma's 262144 logits; every logit of a row whose
    range is under 16), with the same float32 operations as `_encode` on the whole row; the kept terms are
    the same elements in the same order, hence the same sums.
    `work`: a row-sized float32 buffer this call may overwrite.
    """
    max_l, min_l = r.max(), r.min()
    min_l = max(min_l, _F32(max_l - _F32(16)))
    lse_b = _F32(math.log(float(np.exp(np.subtract(r, max_l, out=work), out=work).sum(dtype=np.float64))))
    min_log_prob = _F32(_F32(min_l - max_l) - lse_b)
    scale = _F32(_F32(max_l - min_l) / _F32(65535))
    cand = np.flatnonzero(r >= min_l)  # a flat row (scale 0): every logit, each code 0
    if scale:
        inv = _F32(_F32(1) / scale)
        codes = np.rint(np.maximum(inv * (r[cand] - min_l), _F32(0)))
        code_tok = np.rint(np.maximum(inv * (r[tok : tok + 1] - min_l), _F32(0)))[0]
    else:
        codes, code_tok = np.zeros(len(cand), _F32), _F32(0)
    imax = int(q.argmax())
    max_q = q[imax]
    lse = _F32(math.log(float(np.exp(np.subtract(q, max_q, out=work), out=work).sum(dtype=np.float64))))
    nll = _F32(_F32(max_q + lse) - q[tok])
    nll_base = _F32(-_F32(_F32(scale * code_tok) + min_log_prob))
    shift = _F32(max_q + lse)
    lpb = scale * codes + min_log_prob
    keep = np.flatnonzero(lpb > _F32(-16))  # the C++ sum skips base log-probs <= -16
    lk = lpb[keep]
    terms = np.exp(lk) * ((lk - q[cand[keep]]) + shift)
    kld = float(terms.sum(dtype=np.float64))
    p_base, p = np.exp(-nll_base), np.exp(-nll)
    # the C++ loop keeps the first index of the largest decoded log-prob: the first of the largest codes (every
    # logit outside the candidates has code 0; with scale 0 every code is 0 and the first index wins)
    top_base = int(cand[int(codes.argmax())]) if len(cand) and codes.max() > 0 else 0
    return -float(nll_base), -float(nll), kld, float(p_base), float(p), imax == top_base


def _fsum(x: np.ndarray) -> float:
    return math.fsum(x.tolist())


def _mean_unc(s: float, s2: float, n: int) -> tuple[float, float | None]:
    """llama-perplexity's mean_and_uncertainty; the uncertainty is None where it prints 0 (n <= 10)."""
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else (0.0 if n > 10 else None))


def _percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile of sorted float values (index arithmetic in float32, as in C++)."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = _F32(_F32(fraction) * _F32(len(values) - 1))
    ip = int(p)
    w = _F32(p - _F32(ip))
    lo, hi = _F32(values[ip]), _F32(values[min(ip + 1, len(values) - 1)])
    return float(_F32(_F32(_F32(1) - w) * lo) + _F32(w * hi))


def _median(values: np.ndarray) -> float:
    n = len(values)
    return (
        float(_F32(_F32(0.5) * _F32(_F32(values[n // 2]) + _F32(values[n // 2 - 1]))))
        if n % 2 == 0
        else float(_F32(values[n // 2]))
    )


def _spread(ordered: np.ndarray, mean: float, uncertainty: float | None, fractions: Sequence[float]) -> dict[str, Any]:
    """Mean with its uncertainty, extremes, median and percentiles of sorted values, as llama-perplexity prints them."""
    return {
        "mean": mean,
        "uncertainty": uncertainty,
        "max": float(ordered[-1]),
        "median": _median(ordered),
        "min": float(ordered[0]),
        "percentiles": {f"{100 * f:.1f}": _percentile(ordered, f) for f in fractions},
    }


def _pm(value: float, unc: float | None) -> dict[str, float | None]:
    return {"value": value, "uncertainty": unc}


def summarize(stats: PositionStats) -> dict[str, Any]:
    """llama-perplexity's final statistics over every position of `stats` (JSON-ready).

    Figures that need more positions than there are (any figure of 0 positions, an uncertainty of 10 or
    fewer) are None, never 0.
    """
    n = len(stats)
    out: dict[str, Any] = {"positions": n, "encoding": stats.encoding}
    if n == 0:
        return out | {k: None for k in ("ppl_impl", "ppl_ref", "ln_ppl_ratio", "ppl_ratio", "kld", "dp", "same_top")}
    f32 = stats.encoding == "uint16"  # the C++ squares float32 values in float32

    def sq(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        b = a if b is None else b
        return (a.astype(_F32) * b.astype(_F32)).astype(np.float64) if f32 else a * b

    nll, nll_base = -stats.logp_impl, -stats.logp_ref
    ln_q, unc_q = _mean_unc(_fsum(nll), _fsum(sq(nll)), n)
    ln_b, unc_b = _mean_unc(_fsum(nll_base), _fsum(sq(nll_base)), n)
    cov = (_fsum(sq(nll, nll_base)) / n - (_fsum(nll) / n) * (_fsum(nll_base) / n)) / (n - 1) if n >= 10 else 0.0
    ratio_unc = (
        math.sqrt(max(unc_q * unc_q + unc_b * unc_b - 2 * cov, 0.0))
        if unc_q is not None and unc_b is not None
        else None
    )
    ppl_q, ppl_b = math.exp(ln_q), math.exp(ln_b)
    out["ppl_impl"] = _pm(ppl_q, None if unc_q is None else ppl_q * unc_q)
    out["ppl_ref"] = _pm(ppl_b, None if unc_b is None else ppl_b * unc_b)
    out["ppl_correlation"] = cov / (unc_q * unc_b) if unc_q and unc_b else None
    out["ln_ppl_ratio"] = _pm(ln_q - ln_b, ratio_unc)
    out["ppl_ratio"] = _pm(math.exp(ln_q - ln_b), None if ratio_unc is None else math.exp(ln_q - ln_b) * ratio_unc)
    pq_unc, pb_unc = out["ppl_impl"]["uncertainty"], out["ppl_ref"]["uncertainty"]
    diff_unc = (
        math.sqrt(max(pq_unc**2 + pb_unc**2 - 2 * ppl_q * ppl_b * cov, 0.0))
        if pq_unc is not None and pb_unc is not None
        else None
    )
    out["ppl_diff"] = _pm(ppl_q - ppl_b, diff_unc)

    kld = stats.kld
    kld_sorted = np.sort(kld.astype(_F32) if f32 else kld)
    mean_kld, unc_kld = _mean_unc(_fsum(kld), _fsum(kld * kld), n)
    out["kld"] = _spread(kld_sorted, mean_kld, unc_kld, KLD_PERCENTILES)
    dp = stats.p_impl - stats.p_ref
    if f32:
        dp = (stats.p_impl.astype(_F32) - stats.p_ref.astype(_F32)).astype(np.float64)
    dp2 = sq(dp)
    dp_sorted = np.sort(dp.astype(_F32) if f32 else dp)
    mean_dp, unc_dp = _mean_unc(_fsum(dp), _fsum(dp2), n)
    mse, unc_mse = _mean_unc(_fsum(dp2), _fsum(dp2 * dp2), n)
    rms = math.sqrt(mse)
    out["dp"] = {
        **_spread(dp_sorted, mean_dp, unc_dp, DP_PERCENTILES),
        "rms": rms,
        "rms_uncertainty": None if unc_mse is None or rms == 0 else 0.5 / rms * unc_mse,
    }
    same = int(np.count_nonzero(stats.same_top))
    p_top = same / n
    out["same_top"] = {
        "count": same,
        "p": p_top,
        "uncertainty": math.sqrt(p_top * (1 - p_top) / (n - 1)) if n > 1 else None,
    }
    return out


def _u(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "n/a".rjust(len(fmt % 0.0)) if x is None else fmt % (scale * x)


def format_text(summary: dict[str, Any]) -> str:
    """The summary in llama-perplexity's final printout (same labels, same precision)."""
    n = summary["positions"]
    if not n:
        return "no scored positions\n"
    s = summary
    k, d, t = s["kld"], s["dp"], s["same_top"]
    cor = s["ppl_correlation"]
    lines = [
        f"scored positions: {n}",
        "",
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl_impl']['value']:10.6f} ± {_u(s['ppl_impl']['uncertainty'], '%10.6f')}",
        f"Mean PPL(base)                : {s['ppl_ref']['value']:10.6f} ± {_u(s['ppl_ref']['uncertainty'], '%10.6f')}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {_u(cor, '%6.2f', 100.0)}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']['value']:10.6f} ± "
        f"{_u(s['ln_ppl_ratio']['uncertainty'], '%10.6f')}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']['value']:10.6f} ± {_u(s['ppl_ratio']['uncertainty'], '%10.6f')}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']['value']:10.6f} ± {_u(s['ppl_diff']['uncertainty'], '%10.6f')}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {k['mean']:10.6f} ± {_u(k['uncertainty'], '%10.6f')}",
        f"Maximum KLD: {k['max']:10.6f}",
    ]
    label = {"99.9": "99.9%  ", "99.0": "99.0%  ", "95.0": "95.0%  ", "90.0": "90.0%  ", "75.0": "75.0%  "}
    label |= {"25.0": "25.0%  ", "10.0": "10.0%  ", "5.0": " 5.0%  ", "1.0": " 1.0%  ", "0.1": " 0.1%  "}
    kp = k["percentiles"]
    lines += [f"{label[q]} KLD: {kp[q]:10.6f}" for q in ("99.9", "99.0", "95.0", "90.0")]
    lines.append(f"Median  KLD: {k['median']:10.6f}")
    lines += [f"{label[q]} KLD: {kp[q]:10.6f}" for q in ("10.0", "5.0", "1.0", "0.1")]
    lines += [f"Minimum KLD: {k['min']:10.6f}", "", "====== Token probability statistics ======"]
    lines.append(f"Mean    Δp: {100 * d['mean']:6.3f} ± {_u(d['uncertainty'], '%5.3f', 100.0)} %")
    lines.append(f"Maximum Δp: {100 * d['max']:6.3f}%")
    dpp = d["percentiles"]
    lines += [f"{label[q]} Δp: {100 * dpp[q]:6.3f}%" for q in ("99.9", "99.0", "95.0", "90.0", "75.0")]
    lines.append(f"Median  Δp: {100 * d['median']:6.3f}%")
    lines += [f"{label[q]} Δp: {100 * dpp[q]:6.3f}%" for q in ("25.0", "10.0", "5.0", "1.0", "0.1")]
    lines.append(f"Minimum Δp: {100 * d['min']:6.3f}%")
    lines.append(f"RMS Δp    : {100 * d['rms']:6.3f} ± {_u(d['rms_uncertainty'], '%5.3f', 100.0)} %")
    lines.append(f"Same top p: {100 * t['p']:6.3f} ± {_u(t['uncertainty'], '%5.3f', 100.0)} %")
    return "\n".join(lines) + "\n"
