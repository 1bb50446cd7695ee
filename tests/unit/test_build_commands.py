"""The exact command lines of a backend build, asserted without running CMake (pytest-subprocess)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build, lock


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PARITY_THIRD_PARTY", str(tmp_path / "tp"))
    monkeypatch.delenv("PARITY_LLAMA_SRC", raising=False)
    return tmp_path


def _plan(fp: Any) -> build.BuildPlan:
    fp.register([fp.any()], stdout="c++ (Debian 12.2.0-14) 12.2.0\n")  # `c++ --version`
    return build.plan(lock.get_spec("llama"), None)


def test_lock_pins_llama(isolated: Path) -> None:
    spec = lock.get_spec("llama")
    assert len(spec.commit) == 40 and spec.sdist is not None and len(spec.sdist.sha256) == 64
    assert spec.cmake["BUILD_SHARED_LIBS"] == "OFF" and spec.cmake["CMAKE_BUILD_TYPE"] == "Release"


def test_plan_is_keyed_and_stable(fp: Any, isolated: Path) -> None:
    p1 = _plan(fp)
    p2 = _plan(fp)
    assert p1.lib_key == p2.lib_key and p1.bridge_key == p2.bridge_key
    assert p1.lib_dir.parent == isolated / "cache"
    assert p1.bridge_path.name == "libparity_bridge_llama.so"
    assert p1.source_fingerprint == f"sdist:{lock.get_spec('llama').sdist.sha256}"  # type: ignore[union-attr]


def test_compiler_change_changes_the_key(fp: Any, isolated: Path) -> None:
    p1 = _plan(fp)
    fp.register([fp.any()], stdout="c++ (Debian 13.1.0) 13.1.0\n")
    p2 = build.plan(lock.get_spec("llama"), None)
    assert p1.lib_key != p2.lib_key


def test_cmake_command_lines(fp: Any, isolated: Path) -> None:
    p = _plan(fp)
    src = isolated / "src"
    cmds = build.cmake_commands(p, src, 2)
    b = str(p.lib_dir / "build")
    assert cmds == [
        ["cmake", "-S", str(src), "-B", b, "-G", "Ninja", "-C", str(p.lib_dir / "init-cache.cmake")],
        ["cmake", "--build", b, "--parallel", "2"],
        ["cmake", "--install", b],
    ]
    init = build._init_cache(p, p.lib_dir / "prefix")
    assert 'set(GGML_NATIVE "ON" CACHE STRING "" FORCE)' in init
    assert f'set(CMAKE_INSTALL_PREFIX "{p.lib_dir / "prefix"}" CACHE PATH "" FORCE)' in init


def test_build_lib_runs_exactly_these_commands(fp: Any, isolated: Path) -> None:
    p = _plan(fp)
    src = isolated / "src"
    for cmd in build.cmake_commands(p, src, 3):
        fp.register(cmd, stdout="ok\n")
    secs = build._build_lib(lock.get_spec("llama"), p, src, verbose=False, jobs=3)
    assert secs >= 0
    assert json.loads((p.lib_dir / "lib.json").read_text())["prefix"] == str(p.lib_dir / "prefix")
    for label in ("configure", "build", "install"):
        assert (p.lib_dir / f"{label}.log").read_text() == "ok\n"


def test_failed_build_raises_build_error_with_output(fp: Any, isolated: Path) -> None:
    p = _plan(fp)
    src = isolated / "src"
    cmds = build.cmake_commands(p, src, 1)
    fp.register(cmds[0], stdout="configured\n")
    fp.register(cmds[1], stdout="error: something broke\n", returncode=1)
    with pytest.raises(build.BuildError) as e:
        build._build_lib(lock.get_spec("llama"), p, src, verbose=False, jobs=1)
    assert e.value.exit_code == 5
    assert "something broke" in str(e.value) and "cmake --build" in str(e.value)
    assert not (p.lib_dir / "lib.json").exists()


def test_bridge_command_uses_scikit_build_core(fp: Any, isolated: Path) -> None:
    p = _plan(fp)
    cmd = build.bridge_command(p, isolated / "wheels")
    assert "scikit_build_core.build" in cmd[2]
    settings = json.loads(cmd[4])
    assert settings["cmake.define.PARITY_BACKEND"] == "llama"
    assert settings["cmake.define.PARITY_LLAMA_PREFIX"] == str(p.lib_dir / "prefix")
    assert settings["build-dir"] == str(p.bridge_dir / "build")


def test_source_override_requires_cmakelists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_LLAMA_SRC", str(tmp_path))
    with pytest.raises(lock.UsageError, match="no CMakeLists.txt"):
        lock.source_override(lock.get_spec("llama"))
