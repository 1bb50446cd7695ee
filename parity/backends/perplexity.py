"""llama.cpp's `llama-perplexity --kl-divergence`, run as users run it: the suite's agreement check (issue 16).

Two runs make one comparison: `-m BASE --kl-divergence-base FILE` evaluates the text and stores the base
model's tokens and log-probs (uint16-coded, see parity.suite.stats.encode_base); `-m OTHER
--kl-divergence-base FILE --kl-divergence` evaluates the same tokens and prints the statistics that
parity.suite.stats reproduces. Both runs get parity's precise lane configuration (F32 KV cache, flash
attention off, threads fixed) and one sequence per decode (`-b = -ub = -c`: llama-perplexity otherwise packs
n_batch / n_ctx chunks into one batch), so their logits are those of parity's bridge on the same chunk.
The binary is built by parity.backends.tools.ensure_llama_perplexity.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.core.proc import run
from parity.errors import UsageError

MAGIC = b"_logits_"
_HEADER = struct.Struct("<8sIii")  # magic, n_ctx (uint32), n_vocab, n_chunk
# "Mean    KLD:   0.012345 ±   0.000123", "RMS Δp    :  1.234 ± 0.012 %", "99.9%   KLD:   0.1"
_LINE = re.compile(r"^(?P<label>[^:]+?)\s*:\s*(?P<value>-?\d+(?:\.\d+)?)%?(?:\s*±\s*(?P<unc>\d+(?:\.\d+)?))?\s*%?\s*$")


def common_args(*, n_ctx: int, threads: int) -> list[str]:
    """The flags both runs share: one chunk per decode, parity's precise KV cache, fixed threads."""
    return [
        *("-c", str(n_ctx), "-b", str(n_ctx), "-ub", str(n_ctx)),
        *("-t", str(threads), "-fa", "off", "-ctk", "f32", "-ctv", "f32"),
    ]


def base_command(
    binary: Path, model: Path, text: Path, base_file: Path, *, n_ctx: int, n_chunks: int, threads: int
) -> list[str]:
    """The run that evaluates `text` with the base model and writes its log-probs to `base_file`."""
    return [
        str(binary),
        *("-m", str(model), "-f", str(text), "--kl-divergence-base", str(base_file), "--chunks", str(n_chunks)),
        *common_args(n_ctx=n_ctx, threads=threads),
    ]


def kld_command(binary: Path, model: Path, base_file: Path, *, n_ctx: int, threads: int) -> list[str]:
    """The run that scores `model` against the base file's tokens and log-probs."""
    return [
        str(binary),
        *("-m", str(model), "--kl-divergence-base", str(base_file), "--kl-divergence"),
        *common_args(n_ctx=n_ctx, threads=threads),
    ]


@dataclass(frozen=True)
class BaseFile:
    """The header and tokens of a `--kl-divergence-base` file (the log-probs follow them)."""

    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32, n_ctx * n_chunk: the text's tokens as llama-perplexity cut them (no BOS swap)


def read_base_file(path: Path) -> BaseFile:
    """Header and tokens of a base file written by `llama-perplexity --kl-divergence-base`."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            raise UsageError(f"{path} is not a llama-perplexity log-probabilities file", fix="write it again")
        _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
        tokens = np.fromfile(f, dtype="<i4", count=n_ctx * n_chunk)
    if len(tokens) != n_ctx * n_chunk:
        raise UsageError(f"{path} is truncated ({len(tokens)} of {n_ctx * n_chunk} tokens)", fix="write it again")
    return BaseFile(n_ctx, n_vocab, n_chunk, tokens)


def read_base_rows(path: Path, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's stored base log-probs: (scale, min_log_prob, codes) per scored position, codes uint16
    (positions, n_vocab); log p = scale * code + min_log_prob (parity.suite.stats.encode_base's layout)."""
    base = read_base_file(path)
    nv = 2 * ((base.n_vocab + 1) // 2) + 4
    rows = base.n_ctx - 1 - base.n_ctx // 2
    if not 0 <= chunk < base.n_chunk:
        raise UsageError(f"{path} has {base.n_chunk} chunks, not chunk {chunk}")
    offset = _HEADER.size + 4 * len(base.tokens) + 2 * chunk * rows * nv
    block = np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(rows, nv))
    head = np.ascontiguousarray(block[:, :4]).view("<f4")
    return head[:, 0].copy(), head[:, 1].copy(), np.array(block[:, 4 : 4 + base.n_vocab])


def parse_output(text: str) -> dict[str, tuple[float, float | None]]:
    """The final statistics llama-perplexity prints: label -> (value, uncertainty or None), in its units
    (Δp figures and same top p in percent). Labels are normalised to single spaces ("Mean KLD", "99.9% KLD")."""
    out: dict[str, tuple[float, float | None]] = {}
    started = False
    for line in text.splitlines():
        if line.startswith("====== Perplexity statistics"):
            started = True
        if not started:
            continue
        m = _LINE.match(line.strip())
        if m:
            label = " ".join(m["label"].split())
            out[label] = (float(m["value"]), float(m["unc"]) if m["unc"] is not None else None)
    if "Mean KLD" not in out:
        raise UsageError(
            "llama-perplexity printed no KL-divergence statistics (it prints none for fewer than 100 positions)",
            fix="score more chunks, or a longer context",
        )
    return out


@dataclass(frozen=True)
class ToolRun:
    output: str
    seconds: float


def run_tool(cmd: list[str], log_file: Path) -> ToolRun:
    """Run one llama-perplexity command, its combined output logged to `log_file`; wall time measured."""
    t0 = time.perf_counter()
    out = run(cmd, log_file=log_file)
    return ToolRun(out, time.perf_counter() - t0)
