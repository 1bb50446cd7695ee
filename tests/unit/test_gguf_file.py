"""Tests for parity.gguf.reader: metadata decoding, tensor views and the validation messages."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from parity.errors import ModelFormatError, UsageError
from parity.gguf.checks import HEADER_SIZE
from parity.gguf.reader import GGUFFile, open_gguf

RNG = np.random.default_rng(1234)
EMBD = RNG.standard_normal((10, 64)).astype(np.float32)  # numpy (rows, cols) = ggml ne [64, 10]
NORM = RNG.standard_normal(64).astype(np.float32)
HALF = RNG.standard_normal((3, 32)).astype(np.float16)
QUANT_SRC = RNG.standard_normal((4, 64)).astype(np.float32)


def write_sample(path: Path) -> Path:
    """A small GGUF with every metadata kind and F32, F16 and Q8_0 tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_int32("test.negative", -7)
    w.add_uint64("test.big", 2**40)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float64("test.f64", 0.125)
    w.add_bool("test.flag", True)
    w.add_string("test.name", "héllo")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "β", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1])
    w.add_tensor("token_embd.weight", EMBD)
    w.add_tensor("output_norm.weight", NORM)
    w.add_tensor("half.weight", HALF)
    q = gguf.quants.quantize(QUANT_SRC, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("quant.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return write_sample(tmp_path / "sample.gguf")


def one_line_error(exc: pytest.ExceptionInfo[Exception]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    assert "fix:" in text
    return text


def test_metadata_is_decoded_to_python_values(sample: Path) -> None:
    f = open_gguf(sample)
    assert isinstance(f, GGUFFile)
    assert f.version == 3
    assert f.architecture == "llama"
    assert f.get("llama.block_count") == 2 and isinstance(f.get("llama.block_count"), int)
    assert f.get("test.negative") == -7
    assert f.get("test.big") == 2**40
    assert f.get("llama.attention.layer_norm_rms_epsilon") == float(np.float32(1e-5))
    assert f.get("test.f64") == 0.125
    assert f.get("test.flag") is True
    assert f.get("test.name") == "héllo"
    assert f.get("tokenizer.ggml.tokens") == ["<s>", "a", "β", ""]
    assert f.get("tokenizer.ggml.scores") == [0.0, -1.5, 2.25, 3.0]
    assert f.get("tokenizer.ggml.token_type") == [3, 1, 1, 1]
    assert all(type(v) is int for v in f.get("tokenizer.ggml.token_type"))
    assert f.get("absent", 42) == 42
    assert not any(k.startswith("GGUF.") for k in f.metadata)
    assert f.require("test.name") == "héllo"
    assert f.arch_key("block_count") == "llama.block_count"


def test_require_names_missing_key(sample: Path) -> None:
    f = open_gguf(sample)
    with pytest.raises(ModelFormatError) as exc:
        f.require("llama.context_length")
    text = one_line_error(exc)
    assert "'llama.context_length'" in text and str(sample) in text


def test_tensors_are_zero_copy_views_with_numpy_shapes(sample: Path) -> None:
    f = open_gguf(sample)
    embd = f.tensors["token_embd.weight"]
    assert embd.shape == (10, 64)
    assert embd.ggml_type == gguf.GGMLQuantizationType.F32 and embd.type_name == "F32"
    assert embd.n_elements == 640 and embd.n_bytes == 640 * 4
    assert np.array_equal(embd.data, EMBD)
    assert not embd.data.flags.writeable  # a read-only view of the memory map, not a copy
    assert isinstance(embd.data.base, np.memmap) or isinstance(embd.data, np.memmap)
    assert f.tensors["output_norm.weight"].shape == (64,)
    half = f.tensors["half.weight"]
    assert half.shape == (3, 32) and half.data.dtype == np.float16 and np.array_equal(half.data, HALF)
    quant = f.tensors["quant.weight"]
    assert quant.shape == (4, 64) and quant.type_name == "Q8_0"
    assert quant.data.dtype == np.uint8 and quant.n_bytes == 4 * 2 * 34
    with open(sample, "rb") as fh:
        fh.seek(quant.offset)
        assert fh.read(quant.n_bytes) == quant.data.tobytes()


def test_sha256_matches_hashlib_and_is_cached(sample: Path) -> None:
    f = open_gguf(sample)
    expected = hashlib.sha256(sample.read_bytes()).hexdigest()
    assert f.sha256() == expected
    sample.write_bytes(b"changed")  # cached: not re-read
    assert f.sha256() == expected


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(UsageError) as exc:
        open_gguf(missing)
    assert not isinstance(exc.value, ModelFormatError)
    text = one_line_error(exc)
    assert text.startswith(f"model file not found: {missing}")
    with pytest.raises(UsageError, match="directory"):
        open_gguf(tmp_path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}' + bytes(100))
    with pytest.raises(ModelFormatError) as exc:
        open_gguf(path)
    text = one_line_error(exc)
    assert f"{path} is not a GGUF file (magic" in text


def test_file_shorter_than_header(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelFormatError, match=f"shorter than the {HEADER_SIZE}-byte header"):
        open_gguf(path)


def test_unsupported_and_big_endian_versions(tmp_path: Path, sample: Path) -> None:
    data = bytearray(sample.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    bad = tmp_path / "v7.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="GGUF version 7; supported versions are 2, 3"):
        open_gguf(bad)
    data[4:8] = struct.pack(">I", 3)
    big = tmp_path / "be.gguf"
    big.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="big-endian"):
        open_gguf(big)


def test_truncated_tensor_data_names_the_tensor(tmp_path: Path, sample: Path) -> None:
    f = open_gguf(sample)
    quant = f.tensors["quant.weight"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(sample.read_bytes()[: quant.offset + 10])
    with pytest.raises(ModelFormatError) as exc:
        open_gguf(cut)
    text = one_line_error(exc)
    assert f"{cut} is truncated: tensor 'quant.weight'" in text


@pytest.mark.parametrize("keep", [30, 200, 400])
def test_truncated_header_or_metadata(tmp_path: Path, sample: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(sample.read_bytes()[:keep])
    with pytest.raises(ModelFormatError) as exc:
        open_gguf(cut)
    text = one_line_error(exc)
    assert str(cut) in text and ("truncated" in text or "corrupt" in text)


def test_unknown_tensor_type_is_named(tmp_path: Path, sample: Path) -> None:
    data = bytearray(sample.read_bytes())
    name = b"half.weight"
    # tensor info: u64 name length, name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset
    type_pos = data.index(name) + len(name) + 4 + 8 * 2
    assert struct.unpack_from("<I", data, type_pos)[0] == gguf.GGMLQuantizationType.F16
    struct.pack_into("<I", data, type_pos, 38)  # TL1, bitnet.cpp only (36 = I2_S is read by parity.gguf.ternary)
    odd = tmp_path / "tl1.gguf"
    odd.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as exc:
        open_gguf(odd)
    text = one_line_error(exc)
    assert "tensor 'half.weight' has ggml type 38" in text


def test_corrupt_length_field_names_the_offset(tmp_path: Path, sample: Path) -> None:
    data = bytearray(sample.read_bytes())
    struct.pack_into("<Q", data, HEADER_SIZE, 2**40)  # length of the first metadata key
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as exc:
        open_gguf(bad)
    text = one_line_error(exc)
    assert f"{bad} is truncated or corrupt" in text and f"offset {HEADER_SIZE + 8}" in text
