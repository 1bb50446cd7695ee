"""The per-user build cache: where it is, and that a build killed half-way is never found, used or resumed.

The build steps (CMake, scikit-build-core) are replaced by fakes that write what they would; the real builds are
exercised by tests/integration/test_setup_cpp.py, two racing builders by tests/integration/test_build_cache.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from parity.backends import build, lock
from parity.core import paths


def test_cache_and_sources_are_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("PARITY_CACHE", "PARITY_THIRD_PARTY", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "parity" / "build"
    assert paths.third_party_dir() == tmp_path / "home" / ".cache" / "parity" / "sources"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "parity" / "build"
    assert paths.third_party_dir() == tmp_path / "xdg" / "parity" / "sources"
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("PARITY_THIRD_PARTY", str(tmp_path / "src"))
    assert (paths.cache_dir(), paths.third_party_dir()) == (tmp_path / "mine", tmp_path / "src")
    # neither depends on the checkout: another clone of the project finds the same entries
    assert paths.project_root() not in paths.cache_dir().parents


class FakeBuild:
    """Stands in for CMake and scikit-build-core: writes what they would, counts the builds, can die half-way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.lib_builds = self.bridge_builds = 0
        self.die_in: str | None = None
        src = tmp_path / "src"
        src.mkdir()
        monkeypatch.setattr(
            lock, "acquire", lambda spec, override, verbose=False: lock.SourceTree(src, "fake", "c0ffee", "fp")
        )
        monkeypatch.setattr(build, "_build_lib", self.build_lib)
        monkeypatch.setattr(build, "_build_bridge", self.build_bridge)

    def build_lib(self, spec: Any, p: build.BuildPlan, src: Path, *, verbose: bool, jobs: Any, into: Path) -> float:
        self.lib_builds += 1
        assert not any(into.iterdir()), "a staging directory starts empty"
        (into / "build").mkdir()
        (into / "build" / "half.o").write_text("objects")
        (into / "prefix" / "include").mkdir(parents=True)
        (into / "prefix" / "include" / "llama.h").write_text("// llama.h")
        if self.die_in == "lib":
            raise KeyboardInterrupt  # killed after writing half of the entry
        (into / "lib.json").write_text("{}")
        return 1.0

    def build_bridge(self, p: build.BuildPlan, *, verbose: bool) -> None:
        self.bridge_builds += 1
        assert p.bridge_dir.name.endswith(".partial") and not any(p.bridge_dir.iterdir())
        p.bridge_path.write_bytes(b"\x7fELF")
        if self.die_in == "bridge":
            raise KeyboardInterrupt


@pytest.fixture()
def fake(fp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBuild:
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PARITY_LLAMA_SRC", raising=False)
    fp.register(["c++", "--version"], stdout="c++ (Debian 12.2.0-14) 12.2.0\n", occurrences=100)
    fp.register([fp.any()], stdout="c++ (Debian 12.2.0-14) 12.2.0\n", occurrences=100)
    return FakeBuild(monkeypatch, tmp_path)


def test_an_entry_appears_complete_or_not_at_all(fake: FakeBuild) -> None:
    spec = lock.get_spec("llama")
    p = build.ensure_built(spec)
    assert build.is_built(p) and build.lib_complete(p.lib_dir) and (fake.lib_builds, fake.bridge_builds) == (1, 1)
    assert not (p.lib_dir / "build").exists(), "the build tree (its CMake cache names the staging path) is dropped"
    assert not list(p.lib_dir.parent.glob("*.partial")) and not list(p.lib_dir.glob("*.partial"))
    assert build.lock_path(p) == p.lib_dir.parent / ".llama.build.lock"
    assert build.ensure_built(spec) == p and (fake.lib_builds, fake.bridge_builds) == (1, 1)  # nothing rebuilt


def test_a_killed_library_build_is_never_used_or_resumed(fake: FakeBuild) -> None:
    spec = lock.get_spec("llama")
    fake.die_in = "lib"
    with pytest.raises(KeyboardInterrupt):
        build.ensure_built(spec)
    p = build.plan(spec, None)
    assert not p.lib_dir.exists() and not build.is_built(p)  # only <entry>.partial holds the half-written files
    assert (p.lib_dir.parent / f"{p.lib_dir.name}.partial" / "build" / "half.o").is_file()
    fake.die_in = None
    assert build.is_built(build.ensure_built(spec)) and fake.lib_builds == 2  # rebuilt from an empty staging dir
    assert not (p.lib_dir.parent / f"{p.lib_dir.name}.partial").exists()


def test_a_killed_bridge_build_is_never_used(fake: FakeBuild) -> None:
    spec = lock.get_spec("llama")
    fake.die_in = "bridge"
    with pytest.raises(KeyboardInterrupt):
        build.ensure_built(spec)
    p = build.plan(spec, None)
    assert build.lib_complete(p.lib_dir) and not p.bridge_dir.exists() and not build.is_built(p)
    fake.die_in = None
    assert build.is_built(build.ensure_built(spec)) and (fake.lib_builds, fake.bridge_builds) == (1, 2)


def test_an_interrupted_in_place_entry_of_an_older_parity_is_replaced(fake: FakeBuild) -> None:
    """Before staging, parity built in place: a killed build left <entry>/ without lib.json. It is moved aside and
    deleted when the complete entry is published, never built on."""
    spec = lock.get_spec("llama")
    p = build.plan(spec, None)
    (p.lib_dir / "build").mkdir(parents=True)
    (p.lib_dir / "build" / "CMakeCache.txt").write_text("truncated")
    (p.bridge_dir).mkdir()
    (p.bridge_path).write_bytes(b"half")  # a bridge without its receipt
    assert not build.is_built(p)
    assert build.is_built(build.ensure_built(spec)) and fake.lib_builds == 1
    assert not (p.lib_dir / "build").exists() and p.bridge_path.read_bytes() == b"\x7fELF"
    assert not list(p.lib_dir.parent.glob("*.stale-*"))
