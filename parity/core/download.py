"""The one HTTP downloader: streamed downloads that resume (HTTP Range), retry with exponential backoff, hash
while they stream and show their progress (parity.core.progress); verified local copies; small JSON documents
(`fetch_json`, e.g. a PEP 691 package index page) with the same redirect checks and retries.

Everything written goes to a `.partial` file whose size and SHA-256 are checked against the pinned values
while it streams; callers (parity.models.fetch) rename it into place only after that. Received bytes reach the
`.partial` as they arrive (at most FLUSH bytes at a time, each block handed to the OS at once), so a run
killed at any moment keeps what it received and the next run resumes from there. Callers: parity.models.fetch
(model files) and parity.backends.lock (backend sdists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urljoin, urlsplit

from parity import __version__
from parity.core.fs import CHUNK, hash_into, sha256_file
from parity.core.proc import log
from parity.core.progress import Progress
from parity.errors import UsageError

if TYPE_CHECKING:
    import requests

# The largest block read from the network before it is written to the .partial: what a kill can lose at most
# (beyond bytes still in the socket). Reads return what has arrived, so a slow link writes smaller blocks.
FLUSH = 64 << 10
MAX_REDIRECTS = 10
BACKOFF_ENV = "PARITY_FETCH_BACKOFF"
CONNECT_TIMEOUT_ENV = "PARITY_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "PARITY_READ_TIMEOUT"
_URL_FIX = "use https://, file:///absolute/path, or http:// on loopback (127.0.0.0/8, ::1, localhost)"
FileState = Literal["ok", "missing", "corrupt"]


# ------------------------------------------------------------------------------------------ retrying


@dataclass(frozen=True)
class DownloadPolicy:
    """Retries and timeouts. Attempt n (1-based) that fails waits `base_delay * factor**(n-1)` (capped)."""

    attempts: int = 5
    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 30.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) before the next one."""
        return float(min(self.max_delay, self.base_delay * self.factor ** (attempt - 1)))

    def schedule(self) -> list[float]:
        """All waits of a download that fails every attempt (one fewer than `attempts`)."""
        return [self.delay(n) for n in range(1, self.attempts)]

    @classmethod
    def from_env(cls, *, connect_timeout: str | None = None, read_timeout: str | None = None) -> DownloadPolicy:
        """Default policy, adjusted by the environment and by the command line (which wins).

        `$PARITY_FETCH_BACKOFF` sets the base delay in seconds (tests use a tiny one);
        `--connect-timeout` / `$PARITY_CONNECT_TIMEOUT` and `--read-timeout` / `$PARITY_READ_TIMEOUT` the
        seconds to wait for a connection and for the next bytes of a response. A bad value is a UsageError.
        """
        policy = cls()
        raw = os.environ.get(BACKOFF_ENV)
        if raw:
            try:
                base = float(raw)
            except ValueError:
                base = -1.0
            if not base >= 0:
                raise UsageError(f"{BACKOFF_ENV}={raw!r} is not a number of seconds", fix=f"set e.g. {BACKOFF_ENV}=1")
            policy = dataclasses.replace(policy, base_delay=base)
        connect = _timeout(connect_timeout, "--connect-timeout", CONNECT_TIMEOUT_ENV, policy.connect_timeout)
        read = _timeout(read_timeout, "--read-timeout", READ_TIMEOUT_ENV, policy.read_timeout)
        return dataclasses.replace(policy, connect_timeout=connect, read_timeout=read)


def _timeout(option: str | None, flag: str, env: str, default: float) -> float:
    """A timeout from `option` (the command line), else `$env`, else `default`: a positive number of seconds."""
    if option is not None:
        raw, where, example = option, flag, f"{flag} 30"
    else:
        raw, where, example = os.environ.get(env, ""), f"${env}", f"{env}=30"
        if not raw.strip():
            return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(
            f"{where}={raw!r} is not a positive number of seconds", fix=f"use e.g. {example} (default {default:g})"
        )
    return value


# ----------------------------------------------------------------------------------------- transfers


class TransferFailed(Exception):
    """This source cannot deliver the file; the next source is tried."""


class Mismatch(TransferFailed):
    """The bytes are not the locked ones (hash or size); the partial file is deleted."""

    def __init__(self, message: str, *, resumed: bool = False) -> None:
        super().__init__(message)
        self.resumed = resumed


class _Retryable(Exception):
    """A transient failure (connection, timeout, 5xx): retried with backoff."""


class Pinned(Protocol):
    """What a transfer is checked against (parity.models.lock.LockedFile, parity.backends.lock.SdistSource)."""

    @property
    def filename(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """Return `url` if parity may fetch from it: https, file, or http to a loopback host; else UsageError."""

    def refuse(why: str) -> UsageError:
        return UsageError(f"refusing URL {url!r}: {why}", fix=_URL_FIX)

    if any(ord(ch) <= 32 or ord(ch) == 127 for ch in url):
        raise refuse("it contains whitespace or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        host = parts.hostname or ""
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise refuse(str(exc)) from exc
    if scheme == "https":
        if not host:
            raise refuse("it has no host")
    elif scheme == "http":
        if not _is_loopback(host):
            raise refuse("plain http is allowed only to loopback hosts")
    elif scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise refuse("file URLs must be file:///absolute/path")
    else:
        raise refuse(f"scheme {scheme or '(none)'!r} is not supported")
    return url


def check_file(path: Path, item: Pinned) -> tuple[FileState, str]:
    """Hash `path` (always; no stamp): ("ok", ""), ("missing", why) or ("corrupt", what differs)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing", "not in the cache"
    if size != item.size_bytes:
        return "corrupt", f"size {size} bytes, locked {item.size_bytes}"
    digest = sha256_file(path)
    if digest != item.sha256:
        return "corrupt", f"sha256 {digest[:16]}..., locked {item.sha256[:16]}..."
    return "ok", ""


def verify_digest(digest: str, size: int, item: Pinned, *, resumed: bool = False) -> None:
    """Raise Mismatch unless `size` and `digest` are the pinned ones."""
    if size != item.size_bytes:
        raise Mismatch(f"got {size} bytes, the lock says {item.size_bytes}", resumed=resumed)
    if digest != item.sha256:
        raise Mismatch(f"sha256 mismatch: got {digest}, the lock says {item.sha256}", resumed=resumed)


def copy_verified(src: Path, item: Pinned, partial: Path) -> None:
    """Copy a local file into `partial`, hashing as it goes; TransferFailed / Mismatch as for `download`."""
    try:
        st = src.stat()
    except OSError:
        raise TransferFailed("not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise TransferFailed("not a regular file")
    if st.st_size != item.size_bytes:
        raise Mismatch(f"size {st.st_size} bytes, the lock says {item.size_bytes}")
    h = hashlib.sha256()
    done = 0
    with src.open("rb") as fin, partial.open("wb") as fout, Progress(item.filename, item.size_bytes) as prog:
        while block := fin.read(CHUNK):
            fout.write(block)
            h.update(block)
            done += len(block)
            prog.update(done)
        _sync(fout)
    verify_digest(h.hexdigest(), done, item)


def _sync(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def download(url: str, item: Pinned, partial: Path, policy: DownloadPolicy) -> None:
    """Stream `url` into `partial`, resuming with Range and retrying transient failures with backoff.

    Every redirect target must pass `check_url`. Raises Mismatch (the partial is deleted) when the bytes are not
    the pinned ones, TransferFailed when this URL cannot deliver; a partial left by connection failures is
    kept, so the next run resumes it.
    """
    restarted = False
    with _session() as session:
        for attempt in range(1, policy.attempts + 1):
            try:
                _download_once(session, url, item, partial, policy)
                return
            except Mismatch as exc:
                partial.unlink(missing_ok=True)
                # A resumed download can fail only because the old partial was bad: start over once.
                if not exc.resumed or restarted or attempt == policy.attempts:
                    raise
                restarted = True
                log(f"  {exc} after resuming; restarting {item.filename} from byte 0")
            except _Retryable as exc:
                if attempt == policy.attempts:
                    kept = partial.stat().st_size if partial.exists() else 0
                    note = f"; kept {kept} bytes in {partial.name} for the next run to resume" if kept else ""
                    raise TransferFailed(f"{exc} (gave up after {attempt} attempts{note})") from None
                _wait(exc, attempt, policy)


def fetch_json(url: str, policy: DownloadPolicy, *, accept: str = "application/json") -> Any:
    """GET a small JSON document (a PEP 691 index page, say), with the redirect checks and retries of `download`.

    Raises TransferFailed when `url` cannot deliver it (an HTTP error, retries used up, a body that is not JSON).
    """
    with _session() as session:
        for attempt in range(1, policy.attempts + 1):
            try:
                with _transfer(url), _get(session, url, {"Accept": accept}, policy) as resp:
                    _check_status(resp, url)
                    if resp.status_code != 200:
                        raise TransferFailed(f"HTTP {resp.status_code} {resp.reason} from {url}")
                    body = resp.content
            except _Retryable as exc:
                if attempt == policy.attempts:
                    raise TransferFailed(f"{exc} (gave up after {attempt} attempts)") from None
                _wait(exc, attempt, policy)
                continue
            try:
                return json.loads(body)
            except ValueError as exc:
                raise TransferFailed(f"{url} did not return JSON: {exc}") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def _session() -> requests.Session:
    # requests (~0.3 s to import) is loaded on first use, so that registering the CLI stays cheap.
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = f"parity/{__version__}"
    return session


def _wait(exc: Exception, attempt: int, policy: DownloadPolicy) -> None:
    delay = policy.delay(attempt)
    log(f"  {exc}; retrying in {delay:.2f} s (attempt {attempt + 1}/{policy.attempts})")
    time.sleep(delay)


@contextlib.contextmanager
def _transfer(url: str) -> Iterator[None]:
    """Map requests' errors: an invalid URL fails this source, any other network error is retried."""
    import requests
    import urllib3

    try:
        yield
    except requests.exceptions.InvalidURL as exc:
        raise TransferFailed(f"invalid URL: {exc}") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise _Retryable(f"{_short(exc)} ({url})") from None


def _check_status(resp: requests.Response, url: str) -> None:
    code = resp.status_code
    if code >= 500 or code in (408, 429):
        raise _Retryable(f"HTTP {code} {resp.reason} from {url}")


def _get(
    session: requests.Session,
    url: str,
    headers: dict[str, str],
    policy: DownloadPolicy,
) -> requests.Response:
    # Redirects are followed by hand so that every hop is checked (no https -> remote http downgrade).
    for _ in range(MAX_REDIRECTS + 1):
        resp = session.get(
            url,
            headers=headers,
            stream=True,
            timeout=(policy.connect_timeout, policy.read_timeout),
            allow_redirects=False,
        )
        if not resp.is_redirect:
            return resp
        target = urljoin(url, resp.headers.get("Location", ""))
        resp.close()
        if urlsplit(target).scheme.lower() not in ("http", "https") or not _allowed(target):
            raise TransferFailed(f"redirected to {target}, which is not an allowed URL")
        url = target
    raise TransferFailed(f"more than {MAX_REDIRECTS} redirects")


def _download_once(
    session: requests.Session,
    url: str,
    item: Pinned,
    partial: Path,
    policy: DownloadPolicy,
) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    if have > item.size_bytes:
        partial.unlink()
        have = 0
    h = hashlib.sha256()
    if have:
        have = hash_into(h, partial)
        if have == item.size_bytes:
            verify_digest(h.hexdigest(), have, item, resumed=True)
            return
    # identity: a compressed body would make byte offsets (Range) and sizes meaningless.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with _transfer(url), _get(session, url, headers, policy) as resp:
        _check_status(resp, url)
        code = resp.status_code
        if code == 206 and have and _range_start(resp) == have:
            mode = "ab"
        elif code == 200:
            if have:
                log(f"  {url} ignored the Range request; restarting {item.filename} from byte 0")
            have, h, mode = 0, hashlib.sha256(), "wb"
        elif code in (206, 416) and have:
            # A range we did not ask for, or one the server cannot serve: the partial is of no use.
            partial.unlink(missing_ok=True)
            raise _Retryable(f"HTTP {code} to a resume request from {url}; restarting from byte 0")
        else:
            raise TransferFailed(f"HTTP {code} {resp.reason}")
        start = have
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and have + int(length) != item.size_bytes:
            raise Mismatch(
                f"the server announces {have + int(length)} bytes, the lock says {item.size_bytes}",
                resumed=start > 0,
            )
        with partial.open(mode) as f, Progress(item.filename, item.size_bytes, start=start) as prog:
            try:
                for block in _arriving(resp):
                    if have + len(block) > item.size_bytes:
                        raise Mismatch(
                            f"the server sent more than the locked {item.size_bytes} bytes", resumed=start > 0
                        )
                    # Hand each block to the OS at once: a kill (even SIGKILL) then keeps it for a resume.
                    f.write(block)
                    f.flush()
                    h.update(block)
                    have += len(block)
                    prog.update(have)
            finally:
                _sync(f)
    if have < item.size_bytes:
        raise _Retryable(f"connection closed after {have} of {item.size_bytes} bytes from {url}")
    verify_digest(h.hexdigest(), have, item, resumed=start > 0)


def _arriving(resp: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: each block is whatever the socket has (at most FLUSH bytes), not a full chunk.

    requests' iter_content(n) waits for n bytes, so on a slow link nothing reaches the .partial for a long time.
    urllib3 2's read1() returns after one read of the socket; with urllib3 1 (no read1) the blocks are FLUSH.
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:
        yield from resp.iter_content(FLUSH)
        return
    while block := read1(FLUSH, decode_content=True):
        yield block


def _allowed(url: str) -> bool:
    try:
        check_url(url)
    except UsageError:
        return False
    return True


def _range_start(resp: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _short(exc: Exception) -> str:
    import requests
    import urllib3

    # requests nests urllib3's errors, whose text repeats itself; keep the part a user can act on.
    if isinstance(exc, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError) or "timed out" in str(exc):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | urllib3.exceptions.ProtocolError):
        return "connection broken mid-transfer"
    text = str(exc)
    detail = re.search(r"(Failed to [^\"]*|\[Errno [^\"]*)", text)
    return (detail.group(1) if detail else text).strip()[:200] or type(exc).__name__
