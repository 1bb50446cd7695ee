from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from parity.core.fs import atomic_write_bytes, atomic_write_json, safe_extract, sha256_file
from parity.errors import UsageError


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            payload = data.get(m.name)
            if payload is not None:
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
            else:
                tar.addfile(m)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_extracts_only_the_prefix_and_strips_it(tmp_path: Path) -> None:
    arc = _tar(
        tmp_path / "a.tgz",
        [_file("pkg/vendor/lib/CMakeLists.txt"), _file("pkg/vendor/lib/src/a.c"), _file("pkg/other.txt")],
        {"pkg/vendor/lib/CMakeLists.txt": b"x", "pkg/vendor/lib/src/a.c": b"y", "pkg/other.txt": b"z"},
    )
    n = safe_extract(arc, tmp_path / "out", member_prefix="pkg/vendor/lib/", strip="pkg/vendor/lib/")
    assert n == 2
    assert (tmp_path / "out" / "CMakeLists.txt").read_bytes() == b"x"
    assert (tmp_path / "out" / "src" / "a.c").read_bytes() == b"y"
    assert not (tmp_path / "out" / "other.txt").exists()


def test_skips_git_metadata(tmp_path: Path) -> None:
    arc = _tar(tmp_path / "a.tgz", [_file("t/.git"), _file("t/a.c")], {"t/.git": b"gitdir: ../x", "t/a.c": b"1"})
    safe_extract(arc, tmp_path / "out", member_prefix="t/", strip="t/")
    assert not (tmp_path / "out" / ".git").exists()
    assert (tmp_path / "out" / "a.c").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "a/../../evil.txt"])
def test_refuses_path_traversal(tmp_path: Path, name: str) -> None:
    arc = _tar(tmp_path / "a.tgz", [_file(name)], {name: b"boom"})
    with pytest.raises(UsageError, match="unsafe path"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_refuses_symlink_out_of_tree(tmp_path: Path) -> None:
    link = tarfile.TarInfo("t/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../etc/passwd"
    arc = _tar(tmp_path / "a.tgz", [link], {})
    with pytest.raises(UsageError, match="points outside the tree"):
        safe_extract(arc, tmp_path / "out")


def test_refuses_absolute_symlink(tmp_path: Path) -> None:
    link = tarfile.TarInfo("t/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    arc = _tar(tmp_path / "a.tgz", [link], {})
    with pytest.raises(UsageError, match="points outside the tree"):
        safe_extract(arc, tmp_path / "out")


def test_allows_symlink_inside_tree(tmp_path: Path) -> None:
    link = tarfile.TarInfo("t/sub/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "../a.c"
    arc = _tar(tmp_path / "a.tgz", [_file("t/a.c"), link], {"t/a.c": b"1"})
    safe_extract(arc, tmp_path / "out", member_prefix="t/", strip="t/")
    assert (tmp_path / "out" / "sub" / "link").resolve() == (tmp_path / "out" / "a.c").resolve()


def test_refuses_hard_links(tmp_path: Path) -> None:
    link = tarfile.TarInfo("t/hard")
    link.type = tarfile.LNKTYPE
    link.linkname = "t/a.c"
    arc = _tar(tmp_path / "a.tgz", [_file("t/a.c"), link], {"t/a.c": b"1"})
    with pytest.raises(UsageError, match="hard links"):
        safe_extract(arc, tmp_path / "out")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
