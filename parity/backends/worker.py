"""Backend worker processes: each C++ backend runs in its own process.

A crash, abort or hang inside llama.cpp kills only the worker. The harness sees a WorkerError carrying the
signal or exit code and the last lines the worker wrote to stderr (llama.cpp's log goes there), and the
lane is reported as failed. The worker's stderr is a file in the run's output directory (kept for
debugging) or a temp file.

Timed mode (for `parity bench`): `RemoteModel.time_greedy` runs K back-to-back greedy evaluations and returns
the seconds of each, measured inside the worker (`time_greedy`), so the pipe round trip and the harness's
wake-up latency are not part of any figure; `Worker.ping` is a round trip that does nothing, to measure them.

Test hook: PARITY_FAULT_INJECT=abort:<method> makes the worker call abort() when it receives <method>
(e.g. abort:eval), to exercise exactly the path a C++ abort takes. It is read only in the worker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from parity.core.proc import log_tail, signal_name
from parity.errors import UsageError, WorkerError

STDERR_TAIL = 15
DEFAULT_TIMEOUT = 600.0
_HEADER = struct.Struct("<QI")  # pickle bytes, number of out-of-band buffers (each preceded by its "<Q" length)
_LEN = struct.Struct("<Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    """One framed message: a protocol-5 pickle whose large contiguous buffers (numpy arrays: a logit matrix is
    n_tokens x n_vocab floats, 268 MB for 256 Gemma tokens) travel out of band, written from their own memory
    instead of being copied into the pickle first."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    stream.write(_HEADER.pack(len(data), len(raws)) + b"".join(_LEN.pack(r.nbytes) for r in raws) + data)
    for r in raws:
        stream.write(r)
    stream.flush()


def _read_exact(stream: IO[bytes], n: int, buf: bytearray | None = None) -> bytearray:
    """`n` bytes read straight into one buffer (`buf` when given, else a new one); a numpy array is then built
    on it without a copy."""
    buf = bytearray(n) if buf is None else buf
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise EOFError
        got += k
    return buf


POOL_MIN = 1 << 20  # out-of-band buffers of at least this many bytes are kept for reuse
POOL_SIZE = 4


def _pooled(pool: list[bytearray] | None, n: int) -> bytearray | None:
    """A buffer of `n` bytes from `pool` that nothing references any more (the arrays built on it are gone), or
    a new one kept in the pool; None: allocate as usual. A fresh 128 MB buffer costs ~130 ms of page faults
    per reply (Gemma's 127 scored rows), a reused one none."""
    if pool is None or n < POOL_MIN:
        return None
    evict = None
    for b in pool:  # (not enumerate: its cached result tuple would hold one more reference)
        # references: the pool's list, the loop variable, getrefcount's argument - nobody else holds it
        if sys.getrefcount(b) == 3:
            if len(b) == n:
                return b
            evict = b
    if evict is not None and len(pool) >= POOL_SIZE:
        pool[:] = [b for b in pool if b is not evict]  # a free buffer of another size makes room (by identity)
    b = bytearray(n)
    if len(pool) < POOL_SIZE:
        pool.append(b)
    return b


def _recv(stream: IO[bytes], pool: list[bytearray] | None = None) -> Any:
    """One message of `_send`; its large out-of-band buffers come from `pool` when one is free (see _pooled)."""
    n, count = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    sizes = [_LEN.unpack_from(_read_exact(stream, _LEN.size))[0] for _ in range(count)]
    data = _read_exact(stream, n)
    buffers: list[bytearray] = []
    for k in sizes:
        buffers.append(_read_exact(stream, k, _pooled(pool, k)))
    return pickle.loads(data, buffers=buffers)


def time_greedy(model: Any, tokens: list[int], n_new: int, count: int) -> list[float]:
    """Seconds of each of `count` back-to-back `model.greedy(tokens, n_new)` calls, timed where they run.

    Each call is timed on its own (the loop around it is not), as llama-bench times each repetition; every
    call starts from position 0 with a fresh KV cache (greedy clears it), as llama-bench clears it.
    """
    out = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        model.greedy(tokens, n_new)
        out.append((time.perf_counter_ns() - t0) / 1e9)
    return out


def serve(lib_path: str, log_level: int) -> None:
    """Worker main loop: load the bridge, then answer (method, args) requests until 'exit' or EOF.

    The protocol uses a private duplicate of fd 1; fds 1 and 2 then point at the log (inherited stderr),
    so anything llama.cpp prints can never corrupt the protocol stream.
    """
    proto_out = os.fdopen(os.dup(1), "wb")
    proto_in = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    fault = os.environ.get("PARITY_FAULT_INJECT", "")
    from parity.backends.bridge import Bridge, BridgeError

    models: dict[int, Any] = {}
    try:
        bridge = Bridge(Path(lib_path))
        bridge.set_log_level(log_level)
    except Exception as exc:
        _send(proto_out, ("err", "load", f"cannot load bridge {lib_path}: {exc}"))
        return
    _send(proto_out, ("ok", {"api_generation": bridge.api_generation(), "system_info": bridge.system_info()}))
    while True:
        try:
            method, args = _recv(proto_in)
        except EOFError:
            return
        if method == "exit":
            for m in models.values():
                m.close()
            _send(proto_out, ("ok", None))
            return
        if fault == f"abort:{method}":
            os.abort()
        try:
            if method == "open":
                model = bridge.open(*args)
                models[id(model)] = model
                result: Any = id(model)
            elif method == "dequantize":
                result = bridge.dequantize(*args)
            elif method == "chat_apply_template":
                result = bridge.chat_apply_template(*args)
            elif method == "ping":
                result = None
            else:
                handle, *rest = args
                model = models[handle]
                if method == "time_greedy":
                    result = time_greedy(model, *rest)
                elif method == "close":
                    model.close()
                    del models[handle]
                    result = None
                else:
                    result = getattr(model, method)(*rest)
            _send(proto_out, ("ok", result))
            result = None  # sent: the bridge may reuse its output buffer for the next request
        except BridgeError as exc:
            # A capture refused for its request (a name the graph lacks, over the byte budget) is bad input,
            # not a backend failure: the harness raises UsageError (exit 2) for kind "usage".
            usage = method == "capture" and exc.code in (1, 4)
            _send(proto_out, ("err", "usage" if usage else "bridge", str(exc)))
        except Exception as exc:
            _send(proto_out, ("err", "python", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class Worker:
    """A worker process serving one backend's bridge. Use as a context manager."""

    def __init__(
        self,
        backend: str,
        lib_path: Path,
        *,
        log_dir: Path | None = None,
        log_level: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.backend = backend
        self.timeout = timeout
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.stderr_path = log_dir / f"worker_{backend}.log"
        else:
            fd, name = tempfile.mkstemp(prefix=f"parity-worker-{backend}-", suffix=".log")
            os.close(fd)
            self.stderr_path = Path(name)
        self._log = open(self.stderr_path, "wb")  # noqa: SIM115 - lives as long as the worker
        # sys.path travels explicitly so the worker imports this same parity (checkout or install).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parity.backends.worker", str(lib_path), str(log_level)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out: IO[bytes] = self.proc.stdout
        self._pool: list[bytearray] = []  # reply buffers, reused once the arrays built on them are gone
        self.hello: dict[str, Any] = self._receive("start")

    def __enter__(self) -> Worker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, n: int = STDERR_TAIL) -> str:
        return "\n".join(log_tail(self.stderr_path, n))

    def _death(self, during: str) -> WorkerError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        if code is not None and code < 0:
            how = f"was killed by signal {signal_name(code)}"
        else:
            how = f"exited with code {code}"
        tail = self.stderr_tail()
        msg = f"{self.backend} worker {how} during {during}"
        if tail:
            msg += "\n--- last worker stderr ---\n" + tail
        return WorkerError(msg, fix=f"see {self.stderr_path}; rerun with --verbose for llama.cpp's full log")

    def _receive(self, during: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            ready, _, _ = select.select([self._out], [], [], 0.2)
            if ready:
                try:
                    reply = _recv(self._out, self._pool)
                except (EOFError, OSError, pickle.UnpicklingError):
                    raise self._death(during) from None
                break
            if self.proc.poll() is not None:
                raise self._death(during)
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerError(
                    f"{self.backend} worker timed out after {self.timeout:.0f} s during {during}",
                    fix="raise the timeout or check the model size",
                )
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        if kind == "usage":
            raise UsageError(f"{self.backend} {during}: {message}")
        raise WorkerError(f"{self.backend} {during} failed: {message}")

    def call(self, method: str, *args: Any) -> Any:
        """Send one request and wait for its reply (or the worker's death)."""
        if self.proc.poll() is not None:
            raise self._death(method)
        try:
            _send(self._in, (method, args))
        except (BrokenPipeError, OSError):
            raise self._death(method) from None
        return self._receive(method)

    def ping(self) -> None:
        """One round trip that does nothing in the worker (what a call costs besides its work)."""
        self.call("ping")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def close(self) -> None:
        """Ask the worker to exit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                _send(self._in, ("exit", ()))
                self.proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self._in, self._out, self._log):
            with contextlib.suppress(OSError):
                stream.close()


class RemoteModel:
    """A model opened inside a worker; methods mirror parity.backends.bridge.BridgeModel."""

    def __init__(self, worker: Worker, model_path: str, params: Any) -> None:
        self.worker = worker
        self.handle = worker.call("open", model_path, params)

    def info(self) -> dict[str, Any]:
        return dict(self.worker.call("info", self.handle))

    def meta(self, key: str) -> str | None:
        r = self.worker.call("meta", self.handle, key)
        return None if r is None else str(r)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.worker.call("tokenize", self.handle, text, add_special, parse_special))

    def piece(self, token: int) -> bytes:
        return bytes(self.worker.call("piece", self.handle, token))

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.worker.call("detokenize", self.handle, tokens))

    def eval(self, tokens: list[int]) -> Any:
        return self.worker.call("eval", self.handle, tokens)

    def eval_rows(self, tokens: list[int], rows: list[int]) -> Any:
        return self.worker.call("eval_rows", self.handle, tokens, rows)

    def eval_stepwise(self, tokens: list[int]) -> Any:
        return self.worker.call("eval_stepwise", self.handle, tokens)

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        return list(self.worker.call("greedy", self.handle, tokens, n_new))

    def capture(
        self,
        tokens: list[int],
        names: list[str],
        replace: dict[str, Any] | None,
        max_bytes: int,
        with_logits: bool = True,
    ) -> Any:
        """BridgeModel.capture in the worker: a bridge.Capture (logits, tensors, names, occurrences)."""
        return self.worker.call("capture", self.handle, tokens, names, replace, max_bytes, with_logits)

    def time_greedy(self, tokens: list[int], n_new: int, count: int) -> list[float]:
        """`time_greedy` in the worker: seconds of each of `count` greedy(tokens, n_new), timed there."""
        return [float(x) for x in self.worker.call("time_greedy", self.handle, tokens, n_new, count)]

    def close(self) -> None:
        self.worker.call("close", self.handle)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
