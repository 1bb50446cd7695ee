"""Protocol v2 framing (docs/PROTOCOL.md): a JSON header line, then `payload_bytes` bytes of payload.

Both sides use it: parity.engines.external (parity talking to an engine, with deadlines) and
parity.engines.pyhost (a Python object served as an engine).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import time
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

PROTOCOL_VERSION = 2
MAX_HEADER = 1 << 20  # a header line longer than this is garbage, not a message
PIPE_BYTES = 1 << 20  # the pipe buffer a Reader asks for (the default /proc/sys/fs/pipe-max-size)


class FrameError(Exception):
    """The peer broke the framing (not JSON, too long, closed early, late)."""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One message: the header (with payload_bytes when there is a payload) and the payload."""
    if payload:
        header = {**header, "payload_bytes": len(payload)}
    return json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n" + payload


def logits_payload(logits: np.ndarray) -> tuple[dict[str, Any], bytes]:
    """Header fields and payload of a logits reply: little-endian float32, row-major [positions, vocab].

    The payload is a byte view of the array (no copy: encode() copies it once, into the message)."""
    arr = np.ascontiguousarray(logits, dtype="<f4")
    view: Any = arr.reshape(-1).view(np.uint8).data if arr.size else b""
    return {"shape": list(arr.shape), "dtype": "float32"}, view


def decode_logits(header: dict[str, Any], payload: bytes, n_tokens: int) -> np.ndarray:
    """The [n_tokens, vocab] float32 array of a logits reply; FrameError naming what is wrong."""
    shape = header.get("shape")
    if header.get("dtype", "float32") != "float32":
        raise FrameError(f"logits dtype {header.get('dtype')!r}, protocol v2 sends float32")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise FrameError(f"logits shape {shape!r} is not [positions, vocab]")
    if shape[0] != n_tokens:
        raise FrameError(f"logits for {shape[0]} positions, {n_tokens} tokens were sent")
    if len(payload) != 4 * shape[0] * shape[1]:
        raise FrameError(f"payload of {len(payload)} bytes for shape {shape} (expected {4 * shape[0] * shape[1]})")
    out = np.frombuffer(payload, dtype="<f4").reshape(shape[0], shape[1])
    # the Reader's payload is a fresh writable buffer: used in place (a read-only `bytes` payload is copied)
    out = out.astype(np.float32, copy=not out.flags.writeable)
    if not (np.isfinite(out.max()) and np.isfinite(out.min())):  # NaN propagates; +-inf is the max or min
        bad = np.argwhere(~np.isfinite(out))[0]
        raise FrameError(f"logits are not finite (first at position {bad[0]}, token {bad[1]})")
    return out


def tensors_payload(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], bytes]:
    """The `tensors` list and payload of a tensors reply (or of a request's `replace`): each array as
    little-endian float32, row-major, one after another; entries {name, shape, dtype, offset, bytes}."""
    entries: list[dict[str, Any]] = []
    parts: list[bytes] = []
    offset = 0
    for name, value in arrays.items():
        arr = np.ascontiguousarray(value, dtype="<f4")
        if arr.ndim != 2:
            raise ValueError(f"tensor {name!r} has shape {arr.shape}, the protocol sends (positions, width)")
        data = arr.tobytes()
        entries.append(
            {"name": name, "shape": list(arr.shape), "dtype": "float32", "offset": offset, "bytes": len(data)}
        )
        parts.append(data)
        offset += len(data)
    return entries, b"".join(parts)


def decode_tensors(entries: Any, payload: bytes, n_tokens: int) -> dict[str, np.ndarray]:
    """name -> float32 (n_tokens, width) from a `tensors` list and its payload; FrameError naming what is wrong."""
    if not isinstance(entries, list):
        raise FrameError(f"'tensors' is {type(entries).__name__}, a list of {{name, shape, dtype, offset, bytes}}")
    out: dict[str, np.ndarray] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise FrameError(f"tensor entry {str(e)[:120]} has no name")
        name, shape, offset, size = e["name"], e.get("shape"), e.get("offset"), e.get("bytes")
        if e.get("dtype", "float32") != "float32":
            raise FrameError(f"tensor {name!r} dtype {e.get('dtype')!r}, protocol v2 sends float32")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise FrameError(f"tensor {name!r} shape {shape!r} is not [positions, width]")
        if shape[0] != n_tokens:
            raise FrameError(f"tensor {name!r} has {shape[0]} rows, {n_tokens} tokens were sent")
        if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0 and size == 4 * shape[0] * shape[1]):
            raise FrameError(f"tensor {name!r}: offset {offset!r} / bytes {size!r} do not describe shape {shape}")
        if offset + size > len(payload):
            raise FrameError(f"tensor {name!r} ends at byte {offset + size}, the payload has {len(payload)}")
        if name in out:
            raise FrameError(f"tensor {name!r} sent twice")
        out[name] = (
            np.frombuffer(payload, dtype="<f4", count=size // 4, offset=offset).reshape(shape).astype(np.float32)
        )
    return out


class Reader:
    """Reads messages from a file descriptor with a deadline per message (select + os.read).

    A payload is read straight into one preallocated buffer (os.readv into its free tail, large reads), and on
    Linux the pipe is widened to PIPE_BYTES, so a 75 MB logits reply costs no quadratic copies and few wake-ups.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        _widen_pipe(fd)

    def _wait(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.fd], [], [], left)
        if not ready:
            raise TimeoutError

    def _fill(self, deadline: float) -> None:
        self._wait(deadline)
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            raise FrameError("the engine closed its standard output")
        self.buf += chunk

    def read(self, deadline: float, max_payload: int | None = None) -> tuple[dict[str, Any], bytes]:
        """(header, payload) of the next message (the payload is a bytearray when there is one); a payload
        announced larger than `max_payload` bytes is a FrameError before anything is allocated."""
        start = 0
        while (end := self.buf.find(b"\n", start)) < 0:
            if len(self.buf) > MAX_HEADER:
                raise FrameError(f"no header line in the first {MAX_HEADER} bytes: {bytes(self.buf[:80])!r}")
            start = len(self.buf)
            self._fill(deadline)
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        try:
            header = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"header is not JSON: {line[:120]!r}") from exc
        if not isinstance(header, dict):
            raise FrameError(f"header is not a JSON object: {line[:120]!r}")
        n = header.get("payload_bytes", 0)
        if not isinstance(n, int) or n < 0:
            raise FrameError(f"payload_bytes {n!r} is not a byte count")
        if n == 0:
            return header, b""
        if max_payload is not None and n > max_payload:
            raise FrameError(f"payload of {n} bytes announced, more than the {max_payload} this reply may carry")
        payload = bytearray(n)
        view = memoryview(payload)
        have = min(n, len(self.buf))
        view[:have] = self.buf[:have]
        del self.buf[:have]
        while have < n:
            self._wait(deadline)
            got = os.readv(self.fd, [view[have:]])
            if not got:
                raise FrameError("the engine closed its standard output")
            have += got
        view.release()
        return header, payload  # type: ignore[return-value]  # a bytearray: bytes to every reader of it


def _widen_pipe(fd: int) -> None:
    """Make a pipe's buffer PIPE_BYTES (Linux F_SETPIPE_SZ; the default 64 KiB means a wake-up per 64 KiB)."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setpipe is None:
        return
    with contextlib.suppress(OSError):  # not a pipe, or above /proc/sys/fs/pipe-max-size: the default works
        fcntl.fcntl(fd, setpipe, PIPE_BYTES)


def read_blocking(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """The next message from a blocking stream (the engine side); None at end of input."""
    line = stream.readline(MAX_HEADER)
    if not line:
        return None
    header = json.loads(line.decode("utf-8"))
    n = int(header.get("payload_bytes", 0)) if isinstance(header, dict) else 0
    return header, stream.read(n) if n else b""
