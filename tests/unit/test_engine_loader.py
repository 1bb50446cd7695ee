"""parity.engines.numpy.loader: chunked, threaded dequantization gives exactly parity.gguf.dequant's values."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from parity.engines.numpy import loader
from parity.gguf.dequant import dequantize
from parity.gguf.reader import open_gguf
from parity.gguf.types import TYPES

ROWS, COLS = 37, 512  # 512: whole blocks of every type (256 for K-quants and TQ)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tensor of random block bytes per row-local type (any f16 scale, NaN and inf included)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("loader") / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for t in sorted(loader.ROW_LOCAL):
        qt = gguf.GGMLQuantizationType(t)
        info = TYPES[qt]
        row_bytes = COLS // info.block_size * info.type_size
        writer.add_tensor(f"t{t}", rng.integers(0, 256, (ROWS, row_bytes), dtype=np.uint8), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("chunk", [1, 4096, 1 << 30])  # a row per chunk, several rows, everything at once
@pytest.mark.parametrize("mapped", [False, True])  # np.empty, or the 4 KiB-page memory map of large arrays
def test_values_identical_to_dequantize(model: Path, chunk: int, mapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(loader, "HUGE_BYTES", 0 if mapped else loader.HUGE_BYTES)
    f = open_gguf(model)
    assert len(f.tensors) == len(loader.ROW_LOCAL)
    for name, t in f.tensors.items():
        want = dequantize(t)
        got = loader.dequantized(f, t, np.float32)
        assert got.shape == want.shape == (ROWS, COLS), name
        assert np.array_equal(got, want, equal_nan=True), name
        assert np.array_equal(loader.dequantized(f, t, np.float64), want.astype(np.float64), equal_nan=True), name
