"""parity.backends.perplexity: llama-perplexity's command lines, its printout and its base-file layout.

The real tool runs in tests/integration/test_suite_kld.py; here the printout is the one its format strings
(tools/perplexity/perplexity.cpp, kl_divergence()) produce, and the base file is written in its layout.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from parity.backends import perplexity as P
from parity.errors import UsageError
from parity.suite import stats

PRINTOUT = """\
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      12.3456 ±    1.2345       0.01234 ±    0.00123       0.05678 ±    0.00567     4.321 ±  0.432 %    91.234 ±  1.234 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  12.345678 ±   1.234567
Mean PPL(base)                :  12.000000 ±   1.200000
Cor(ln(PPL(Q)), ln(PPL(base))):  98.76%
Mean ln(PPL(Q)/PPL(base))     :   0.028393 ±   0.004321
Mean PPL(Q)/PPL(base)         :   1.028806 ±   0.004445
Mean PPL(Q)-PPL(base)         :   0.345678 ±   0.053333

====== KL divergence statistics ======
Mean    KLD:   0.056789 ±   0.001234
Maximum KLD:   2.345678
99.9%   KLD:   1.234567
 0.1%   KLD:   0.000012
Minimum KLD:  -0.000003

====== Token probability statistics ======
Mean    Δp: -0.123 ± 0.045 %
Maximum Δp: 45.678%
 5.0%   Δp: -12.345%
RMS Δp    :  4.321 ± 0.123 %
Same top p: 91.234 ± 0.567 %

llama_perf_context_print:        load time =     123.45 ms
"""


def test_parse_output_reads_the_final_statistics() -> None:
    out = P.parse_output(PRINTOUT)
    assert out["Mean KLD"] == (0.056789, 0.001234)
    assert out["Same top p"] == (91.234, 0.567)
    assert out["RMS Δp"] == (4.321, 0.123)
    assert out["Mean Δp"] == (-0.123, 0.045)
    assert out["Maximum Δp"] == (45.678, None)
    assert out["5.0% Δp"] == (-12.345, None)
    assert out["Minimum KLD"] == (-3e-6, None)
    assert out["Mean PPL(Q)/PPL(base)"] == (1.028806, 0.004445)
    assert "1" not in out  # the per-chunk table before the statistics is not parsed


def test_parse_output_without_statistics_names_the_cause() -> None:
    with pytest.raises(UsageError, match="fewer than 100 positions"):
        P.parse_output(PRINTOUT.split("\n\n")[0])


def test_commands_give_both_runs_parity_s_precise_configuration() -> None:
    b = P.base_command(
        Path("/t/llama-perplexity"), Path("m.gguf"), Path("x.txt"), Path("b.kld"), n_ctx=64, n_chunks=8, threads=2
    )
    k = P.kld_command(Path("/t/llama-perplexity"), Path("q.gguf"), Path("b.kld"), n_ctx=64, threads=2)
    shared = ["-c", "64", "-b", "64", "-ub", "64", "-t", "2", "-fa", "off", "-ctk", "f32", "-ctv", "f32"]
    assert b == [
        "/t/llama-perplexity",
        "-m",
        "m.gguf",
        "-f",
        "x.txt",
        "--kl-divergence-base",
        "b.kld",
        "--chunks",
        "8",
        *shared,
    ]
    assert k == ["/t/llama-perplexity", "-m", "q.gguf", "--kl-divergence-base", "b.kld", "--kl-divergence", *shared]


def _write_base(path: Path, n_ctx: int, n_vocab: int, logits: list[np.ndarray]) -> np.ndarray:
    """A base file in perplexity.cpp's layout: header, tokens, then per chunk and scored position
    [scale f32, min_log_prob f32, codes u16 x n_vocab, padding to nv = 2*((n_vocab+1)/2) + 4]."""
    tokens = np.arange(n_ctx * len(logits), dtype="<i4") % n_vocab
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(struct.pack("<8sIii", b"_logits_", n_ctx, n_vocab, len(logits)))
        f.write(tokens.tobytes())
        for rows in logits:
            for row in rows:
                scale, mlp, codes = stats.encode_base(row)
                rec = np.zeros(nv, "<u2")
                rec[:4] = np.array([scale, mlp], "<f4").view("<u2")
                rec[4 : 4 + n_vocab] = codes
                f.write(rec.tobytes())
    return tokens


def test_base_file_round_trip(tmp_path: Path) -> None:
    n_ctx, n_vocab = 8, 7  # odd vocabulary: one padding code per row
    rng = np.random.default_rng(0)
    logits = [(4 * rng.normal(size=(n_ctx - 1 - n_ctx // 2, n_vocab))).astype(np.float32) for _ in range(3)]
    path = tmp_path / "base.kld"
    tokens = _write_base(path, n_ctx, n_vocab, logits)
    head = P.read_base_file(path)
    assert (head.n_ctx, head.n_vocab, head.n_chunk) == (n_ctx, n_vocab, 3)
    assert head.tokens.tolist() == tokens.tolist()
    scale, mlp, codes = P.read_base_rows(path, 2)
    for k, row in enumerate(logits[2]):
        s, m, c = stats.encode_base(row)
        assert (scale[k], mlp[k]) == (s, m) and codes[k].tolist() == c.tolist()
    with pytest.raises(UsageError, match="3 chunks"):
        P.read_base_rows(path, 3)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UsageError, match="truncated"):
        P.read_base_file(path)
    path.write_bytes(b"_weights_" + bytes(40))
    with pytest.raises(UsageError, match="not a llama-perplexity"):
        P.read_base_file(path)


def test_suite_rate_runs_the_same_question_through_parity_suite() -> None:
    from parity.bench import suite_rate

    cmd = suite_rate.suite_command(
        Path("b.gguf"), Path("q.gguf"), Path("t.txt"), Path("out"), ctx=64, chunks=8, threads=2
    )
    assert cmd[1:4] == ["-m", "parity", "suite"]
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=True))
    assert flags == {
        "--text": "t.txt",
        "--ctx": "64",
        "--chunks": "8",
        "--score": "perplexity",
        "--reference": "llama:model=b.gguf",
        "--impl": "llama:model=q.gguf",
        "--threads": "2",
        "--out-dir": "out",
        "--format": "json",
        "--verdict": "fixed",  # llama-perplexity judges nothing: the calibrated floor is not what is timed
    }
