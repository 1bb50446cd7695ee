"""Tests for parity.models.ternary_model: determinism, the lock, and the weight check of quantized files."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from parity.backends import quantizer
from parity.errors import BackendUnavailable, ModelFormatError, UsageError
from parity.gguf import ternary
from parity.gguf.reader import open_gguf
from parity.models import ternary_model

from .lock_entries import ternary_entry
from .ternary_files import copy_as_i2_s

REPO_LOCK = Path(__file__).resolve().parents[2] / "lock" / "models.lock.json"


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> ternary_model.TernaryModel:
    return ternary_model.generate("f16", tmp_path_factory.mktemp("t") / "f16")


def test_generated_variants_match_the_lock(tmp_path: Path, f16: ternary_model.TernaryModel) -> None:
    locked = {e["name"]: e for e in json.loads(REPO_LOCK.read_text(encoding="utf-8"))[ternary_model.LOCK_KEY]}
    f32 = ternary_model.generate("f32", tmp_path / "f32")
    for model in (f16, f32):
        entry = locked[ternary_model.lock_name(model.variant)]
        assert entry == ternary_entry(model)
        assert entry["tier"] == "synthetic" and entry["sha256"] == model.gguf_sha256
    again = ternary_model.generate("f16", tmp_path / "again")
    assert again.gguf_path.read_bytes() == f16.gguf_path.read_bytes()  # byte-identical every run


def test_materialize_reuses_a_locked_file(tmp_path: Path) -> None:
    first = ternary_model.materialize("f16", tmp_path)
    mtime = first.gguf_path.stat().st_mtime_ns
    assert ternary_model.materialize("f16", tmp_path).gguf_path.stat().st_mtime_ns == mtime
    first.gguf_path.write_bytes(b"GGUF garbage")  # a damaged copy is regenerated, not trusted
    assert ternary_model.materialize("f16", tmp_path).gguf_sha256 == first.gguf_sha256


def test_the_model_is_ternary_with_f16_exact_scales(f16: ternary_model.TernaryModel) -> None:
    f = open_gguf(f16.gguf_path)
    assert f.architecture == "bitnet" and "output.weight" not in f.tensors
    for name, t in f.tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in ternary_model.MATMULS:
            w = np.asarray(t.data, dtype=np.float32)
            values = np.unique(w)
            assert len(values) == 3 and values[1] == 0 and values[0] == -values[2], name
            assert t.shape[-1] % 256 == 0, name  # TQ block size (I2_S needs 128)
    assert {n for n in f.tensors if n.endswith(".scale")} == set(ternary_model.SCALES)


def test_verify_accepts_a_correct_i2_s_file(tmp_path: Path, f16: ternary_model.TernaryModel) -> None:
    good = tmp_path / "good.gguf"
    copy_as_i2_s(f16.gguf_path, good, nthread=1)
    ternary_model.verify(good, f16.gguf_path, "i2_s")


def test_verify_catches_bitnet_cpp_quantizing_on_two_threads(tmp_path: Path, f16: ternary_model.TernaryModel) -> None:
    bad = tmp_path / "two-threads.gguf"
    copy_as_i2_s(f16.gguf_path, bad, nthread=2)
    with pytest.raises(ModelFormatError) as exc:
        ternary_model.verify(bad, f16.gguf_path, "i2_s")
    text = str(exc.value)
    assert "does not decode to the ternary source" in text and "more than one thread" in text
    assert "llama-quantize SRC DST TYPE 1" in text and "\n" not in text


def _tq_copy(src: Path, dst: Path, qtype: gguf.GGMLQuantizationType, embd: gguf.GGMLQuantizationType | None) -> None:
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "bitnet")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name.startswith("blk.") and t.name.endswith(".weight") and data.ndim == 2:
            writer.add_tensor(t.name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
        elif t.name == "token_embd.weight" and embd is not None:
            writer.add_tensor(t.name, gguf.quants.quantize(data.astype(np.float32), embd), raw_dtype=embd)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_verify_tq_files_and_a_lossy_embedding(tmp_path: Path, f16: ternary_model.TernaryModel) -> None:
    for fmt, qtype in (("tq2_0", gguf.GGMLQuantizationType.TQ2_0), ("tq1_0", gguf.GGMLQuantizationType.TQ1_0)):
        path = tmp_path / f"{fmt}.gguf"
        _tq_copy(f16.gguf_path, path, qtype, None)
        ternary_model.verify(path, f16.gguf_path, fmt)
    lossy = tmp_path / "q8_embd.gguf"
    _tq_copy(f16.gguf_path, lossy, gguf.GGMLQuantizationType.TQ2_0, gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ModelFormatError, match="'token_embd.weight' is stored as Q8_0, expected F16"):
        ternary_model.verify(lossy, f16.gguf_path, "tq2_0")
    with pytest.raises(ModelFormatError, match="stored as TQ2_0, expected TQ1_0"):
        ternary_model.verify(tmp_path / "tq2_0.gguf", f16.gguf_path, "tq1_0")


def test_quantize_command_keeps_the_embedding_f16_and_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parity.backends import build

    lib = build.BuildPlan(
        "bitnet", "local", "c0ffee", "fp", {"A": "1"}, "clang", "clang++", "v", "cpu", "key", "bkey", tmp_path, tmp_path
    )
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    qp = quantizer.quantizer_plan(lib)
    assert qp.tool_dir == tmp_path / "bitnet-key-tools" and qp.cmake["LLAMA_BUILD_EXAMPLES"] == "ON"
    cmd = quantizer.quantize_command(qp, Path("in.gguf"), Path("out.gguf"), "I2_S", threads=1)
    assert cmd[1:] == [
        "--token-embedding-type",
        "f16",
        "--output-tensor-type",
        "f16",
        "in.gguf",
        "out.gguf",
        "I2_S",
        "1",
    ]
    assert quantizer.build_commands(qp, Path("/src"), 2)[1] == [
        "cmake",
        "--build",
        str(qp.build_dir),
        "--target",
        "llama-quantize",
        "--parallel",
        "2",
    ]


def test_quantize_without_repair_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, f16: ternary_model.TernaryModel
) -> None:
    monkeypatch.setattr(quantizer, "find_quantizer", lambda backend: None)
    with pytest.raises(BackendUnavailable, match="llama-quantize that writes I2_S is not built"):
        ternary_model.quantize(f16, "i2_s", tmp_path, repair=False)


def test_run_variants_and_unknown_ones() -> None:
    assert ternary_model.RUN_VARIANTS[0] == "ternary" and "ternary-i2_s" in ternary_model.RUN_VARIANTS
    assert ternary_model.NATIVE == {"bitnet": "i2_s", "llama": "tq2_0"}
    with pytest.raises(UsageError, match="unknown ternary-model variant 'q4_0'"):
        ternary_model.check_variant("q4_0")
    with pytest.raises(UsageError, match="not generated but quantized"):
        ternary_model.generate("i2_s", Path("unused"))
    assert ternary_model.expected_type("blk.0.attn_q.weight", "i2_s", 1) == int(ternary.ForkType.I2_S)
    assert ternary_model.expected_type("token_embd.weight", "tq2_0", 1) == 1
    assert ternary_model.expected_type("blk.1.attn_q.scale", "tq2_0", 0) == 0
