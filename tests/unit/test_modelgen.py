"""The embedded default model: reproducible bytes, lock agreement, metadata/tokenizer consistency."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from tokenizers import Tokenizer

from parity.core.fs import sha256_file
from parity.errors import ModelFormatError, UsageError
from parity.models import modelgen
from parity.tokenize import bpe

from .lock_entries import default_model_entry

REPO_LOCK = Path(__file__).resolve().parents[2] / "lock" / "models.lock.json"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, modelgen.GeneratedModel]:
    root = tmp_path_factory.mktemp("gen")
    return {variant: modelgen.generate(variant, root / variant) for variant in modelgen.VARIANTS}


@pytest.fixture(scope="module")
def tokenizer(generated: dict[str, modelgen.GeneratedModel]) -> Tokenizer:
    return Tokenizer.from_file(str(generated["f32"].tokenizer_path))


def _locked() -> dict[str, dict[str, object]]:
    document = json.loads(REPO_LOCK.read_text(encoding="utf-8"))
    return {entry["name"]: entry for entry in document["models"]}


@pytest.fixture
def repo_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(modelgen.LOCK_ENV, raising=False)


def test_generating_twice_gives_identical_bytes(generated: dict[str, modelgen.GeneratedModel], tmp_path: Path) -> None:
    for variant, first in generated.items():
        second = modelgen.generate(variant, tmp_path / variant)
        assert second.gguf_path.read_bytes() == first.gguf_path.read_bytes()
        assert second.tokenizer_path.read_bytes() == first.tokenizer_path.read_bytes()
        assert second.gguf_sha256 == first.gguf_sha256 == sha256_file(first.gguf_path)
        assert second.tokenizer_sha256 == first.tokenizer_sha256 == sha256_file(first.tokenizer_path)
    assert sorted(p.name for p in (tmp_path / "f32").iterdir()) == ["model.gguf", "tokenizer.json"]


def test_hashes_match_the_lock(generated: dict[str, modelgen.GeneratedModel]) -> None:
    locked = _locked()
    for variant, model in generated.items():
        entry = locked[f"default-{variant}"]
        assert default_model_entry(model) == entry
        assert entry["sha256"] == model.gguf_sha256
        assert entry["size_bytes"] == model.gguf_path.stat().st_size


def test_lock_file_is_canonical() -> None:
    text = REPO_LOCK.read_text(encoding="utf-8")
    document = json.loads(text)
    assert document["schema_version"] == 1
    assert text == json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    names = [entry["name"] for entry in document["models"]]
    assert {f"default-{v}" for v in modelgen.VARIANTS} <= set(names)


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown default-model variant 'q4_0'"):
        modelgen.generate("q4_0", tmp_path)
    with pytest.raises(UsageError, match="unknown default-model variant"):
        modelgen.materialize("F32", tmp_path)
    assert not any(tmp_path.iterdir())


TEXTS = [
    "Hello, world!",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\r\n  mixed \t\n",
    "12345 3.14159 1,000,000 2024-06-11T07:15",
    "café naïve Zürich São Paulo jalapeño Ελλάδα Привет 日本語 ブレートヒェン",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 and symbols € © — …",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); }',
    "It's we're they've I'm you'll he'd DON'T",
    "\x00\x01\x7f control bytes",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_and_adds_one_bos(tokenizer: Tokenizer, text: str) -> None:
    bos = tokenizer.token_to_id(bpe.BOS)
    ids = tokenizer.encode(text).ids
    assert ids[0] == bos and bos not in ids[1:]
    assert ids[1:] == tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == bpe.BOS + text


def _field(reader: GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_gguf_vocab_matches_tokenizer_json(generated: dict[str, modelgen.GeneratedModel]) -> None:
    for model in generated.values():
        reader = GGUFReader(model.gguf_path)
        document = json.loads(model.tokenizer_path.read_text(encoding="utf-8"))
        by_id = {i: t for t, i in document["model"]["vocab"].items()}
        by_id.update({added["id"]: added["content"] for added in document["added_tokens"]})
        tokens = _field(reader, "tokenizer.ggml.tokens")
        assert tokens == [by_id[i] for i in range(len(by_id))]
        merges = _field(reader, "tokenizer.ggml.merges")
        assert merges == [f"{left} {right}" for left, right in document["model"]["merges"]]
        assert isinstance(tokens, list)
        types = _field(reader, "tokenizer.ggml.token_type")
        specials = {added["content"] for added in document["added_tokens"] if added["special"]}
        assert types == [TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens]
        assert specials == set(bpe.SPECIAL_TOKENS)
        assert _field(reader, "tokenizer.ggml.bos_token_id") == tokens.index(bpe.BOS)
        assert _field(reader, "tokenizer.ggml.eos_token_id") == tokens.index(bpe.EOS)
        assert _field(reader, "tokenizer.ggml.padding_token_id") == tokens.index(bpe.PAD)
        post = document["post_processor"]["processors"][1]
        assert post["special_tokens"][bpe.BOS]["ids"] == [tokens.index(bpe.BOS)]


def test_gguf_metadata(generated: dict[str, modelgen.GeneratedModel]) -> None:
    file_types = {"f32": 0, "f16": 1, "q8_0": 7}
    for variant, model in generated.items():
        reader = GGUFReader(model.gguf_path)
        n_vocab = len(_field(reader, "tokenizer.ggml.tokens"))  # type: ignore[arg-type]
        expected = {
            "general.architecture": "llama",
            "general.name": f"parity-default-{variant}",
            "general.file_type": file_types[variant],
            "llama.vocab_size": n_vocab,
            "llama.context_length": 256,
            "llama.embedding_length": 64,
            "llama.block_count": 2,
            "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 16,
            "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False,
        }
        assert {key: _field(reader, key) for key in expected} == expected
        eps = _field(reader, "llama.attention.layer_norm_rms_epsilon")
        assert eps == pytest.approx(1e-5)
        assert n_vocab == 512


def test_tensors_per_variant(generated: dict[str, modelgen.GeneratedModel]) -> None:
    weights = modelgen.build_weights()
    wanted = {
        "f32": GGMLQuantizationType.F32,
        "f16": GGMLQuantizationType.F16,
        "q8_0": GGMLQuantizationType.Q8_0,
    }
    for variant, model in generated.items():
        reader = GGUFReader(model.gguf_path)
        assert [t.name for t in reader.tensors] == list(weights)
        for tensor in reader.tensors:
            reference = weights[tensor.name]
            # ggml lists dimensions innermost first: numpy (out, in) is ggml [in, out].
            assert [int(n) for n in tensor.shape] == list(reversed(reference.shape))
            values = dequantize(tensor.data, tensor.tensor_type).reshape(reference.shape)
            if reference.ndim == 1:
                assert tensor.tensor_type == GGMLQuantizationType.F32
                np.testing.assert_array_equal(values, reference)
            elif variant == "f32":
                assert tensor.tensor_type == wanted[variant]
                np.testing.assert_array_equal(values, reference)
            else:
                assert tensor.tensor_type == wanted[variant]
                step = np.abs(reference).max() / (2048 if variant == "f16" else 127)
                np.testing.assert_allclose(values, reference, rtol=0, atol=float(step))
    assert "output.weight" in weights and "token_embd.weight" in weights  # untied head


def test_weights_have_a_model_like_scale() -> None:
    weights = modelgen.build_weights()
    # Deterministic, roughly normal: the Irwin-Hall sum is bounded by 2*sqrt(3) standard deviations.
    q = weights["blk.0.attn_q.weight"]
    assert q.dtype == np.float32
    assert float(q.std()) == pytest.approx(1 / 8, rel=0.05)
    assert float(np.abs(q).max()) <= 2 * np.sqrt(3) / 8 + 1e-6
    assert float(weights["output_norm.weight"].mean()) == pytest.approx(1.0, abs=0.05)
    head = weights["output.weight"].astype(np.float64)
    logits = head @ np.ones(64)  # a unit-RMS hidden state
    assert 1.0 < float(logits.std()) < 5.0


def test_materialize_reuses_then_repairs(tmp_path: Path, repo_lock: None) -> None:
    first = modelgen.materialize("q8_0", tmp_path)
    assert first.gguf_path == tmp_path / "q8_0" / "model.gguf"
    assert first.gguf_sha256 == _locked()["default-q8_0"]["sha256"]
    inode = first.gguf_path.stat().st_ino

    again = modelgen.materialize("q8_0", tmp_path)
    assert again == first
    assert again.gguf_path.stat().st_ino == inode  # matching files are left alone

    first.gguf_path.write_bytes(first.gguf_path.read_bytes()[:-1] + b"\x01")
    repaired = modelgen.materialize("q8_0", tmp_path)
    assert repaired == first and sha256_file(repaired.gguf_path) == first.gguf_sha256

    first.tokenizer_path.unlink()
    repaired = modelgen.materialize("q8_0", tmp_path)
    assert sha256_file(repaired.tokenizer_path) == first.tokenizer_sha256

    shutil.rmtree(tmp_path / "q8_0")
    assert modelgen.materialize("q8_0", tmp_path) == first
    assert not [p for p in (tmp_path / "q8_0").iterdir() if p.name.endswith(".tmp")]


def test_materialize_rejects_bytes_that_differ_from_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    document = json.loads(REPO_LOCK.read_text(encoding="utf-8"))
    for entry in document["models"]:
        if entry["name"] == "default-f16":
            entry["sha256"] = "0" * 64
    lock = tmp_path / "models.lock.json"
    lock.write_text(json.dumps(document), encoding="utf-8")
    monkeypatch.setenv(modelgen.LOCK_ENV, str(lock))
    assert modelgen.lock_path() == lock
    with pytest.raises(ModelFormatError, match="no longer reproduces the locked bytes of default-f16"):
        modelgen.materialize("f16", tmp_path / "models")


def test_materialize_needs_a_lock_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(modelgen.LOCK_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ModelFormatError, match="cannot read the models lock"):
        modelgen.materialize("f32", tmp_path)
    lock = tmp_path / "empty.json"
    lock.write_text('{"schema_version": 1, "models": []}\n', encoding="utf-8")
    monkeypatch.setenv(modelgen.LOCK_ENV, str(lock))
    with pytest.raises(ModelFormatError, match="no complete entry 'default-f32'"):
        modelgen.materialize("f32", tmp_path)


def test_default_lock_path(repo_lock: None) -> None:
    assert modelgen.lock_path() == REPO_LOCK
