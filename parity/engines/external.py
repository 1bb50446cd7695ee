"""Implementations brought by the user: `cmd:ARGV` (protocol v2, docs/PROTOCOL.md), `py:module:factory` (a
Python object served by parity.engines.pyhost in its own process) and `logits:FILE` (precomputed logits).

An external engine always runs in its own process: a crash, a hang past the timeout, a malformed frame, a
wrong shape or non-finite logits is a WorkerError - a lane error (exit 1) naming the cause and the last
lines of the engine's standard error - never a pass and never a harness traceback.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from parity.backends.bridge import CAPTURE_BUDGET
from parity.compare.metrics import first_difference
from parity.core.fs import sha256_file
from parity.core.proc import log_tail, signal_name
from parity.engines import protocol, tensor_names
from parity.engines.base import Implementation
from parity.engines.spec import ImplSpec
from parity.errors import Unsupported, UsageError, WorkerError

STDERR_TAIL = 12


def command_argv(spec: ImplSpec) -> list[str]:
    """The argv of a `cmd:` or `py:` spec; UsageError (exit 2) when the program cannot be found."""
    if spec.kind == "py":
        return [sys.executable, "-m", "parity.engines.pyhost", spec.get("target") or ""]
    try:
        argv = shlex.split(spec.get("argv") or "")
    except ValueError as exc:
        raise UsageError(f"--impl {spec.text}: {exc}", fix="quote the command as a shell would") from exc
    if not argv:
        raise UsageError(f"--impl {spec.text}: no command", fix="e.g. --impl 'cmd:./my-engine --threads 2'")
    exe = shutil.which(argv[0]) if "/" not in argv[0] else (argv[0] if Path(argv[0]).is_file() else None)
    if exe is None:
        raise UsageError(f"--impl {spec.text}: command {argv[0]!r} not found", fix="give a path or a program on PATH")
    return (
        [str(Path(exe).absolute()), *argv[1:]] if "/" in argv[0] else argv
    )  # not resolve(): a venv python is a symlink


class CommandImplementation(Implementation):
    """One long-lived process speaking protocol v2 for the whole run."""

    def __init__(
        self,
        spec: ImplSpec,
        model: Path,
        *,
        timeout: float = 600.0,
        log_dir: Path | None = None,
        log_name: str | None = None,
    ) -> None:
        self.spec = spec.text
        self.kind = spec.kind
        self.argv = command_argv(spec)
        self.timeout = timeout
        name = (log_name or f"impl-{spec.kind}").replace("/", "_")
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.stderr_path = log_dir / f"{name}.log"
        else:
            self.stderr_path = Path(tempfile.mkstemp(prefix=f"parity-{name}-", suffix=".log")[1])
        self._log = open(self.stderr_path, "wb")  # noqa: SIM115 - lives as long as the process
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        except OSError as exc:
            self._log.close()
            raise UsageError(f"--impl {spec.text}: cannot start {self.argv[0]}: {exc.strerror}") from exc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._reader = protocol.Reader(self.proc.stdout.fileno())
        self._id = 0
        self._closed = False
        self.hello = self.request(
            {"op": "hello", "protocol": protocol.PROTOCOL_VERSION, "model": str(model), "options": {}}
        )[0]
        if self.hello.get("protocol") != protocol.PROTOCOL_VERSION:
            raise self._error("hello", f"speaks protocol {self.hello.get('protocol')!r}, parity speaks 2")
        caps = self.hello.get("capabilities", [])
        self.capabilities = {c for c in caps if isinstance(c, str)} if isinstance(caps, list) else set()

    # ---------------------------------------------------------------------------------------- plumbing

    def stderr_tail(self, n: int = STDERR_TAIL) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(log_tail(self.stderr_path, n))

    def _error(self, op: str, what: str) -> WorkerError:
        tail = self.stderr_tail()
        detail = f"\n--- last lines of {self.stderr_path} ---\n{tail}" if tail else ""
        return WorkerError(
            f"implementation {self.spec} failed in '{op}': {what}{detail}",
            fix=f"run the engine by hand and read {self.stderr_path} (protocol: docs/PROTOCOL.md)",
        )

    def _death(self, op: str) -> WorkerError:
        code = self.proc.poll()
        if code is None:
            try:
                code = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None and code < 0:
            what = f"the engine was killed by {signal_name(code)}"
        elif code is not None:
            what = f"the engine exited with status {code}"
        else:
            what = "the engine closed its output"
        return self._error(op, what)

    def request(
        self, header: dict[str, Any], payload: bytes = b"", max_payload: int | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request (and its payload), return (reply header, payload); WorkerError on anything but an
        ok reply (a reply payload over `max_payload` bytes included)."""
        op = str(header["op"])
        if self._closed:
            raise self._error(op, "the engine was already stopped")
        self._id += 1
        header = {**header, "id": self._id}
        try:
            self._in.write(protocol.encode(header, payload))
            self._in.flush()
        except (BrokenPipeError, OSError):
            raise self._death(op) from None
        try:
            reply, payload = self._reader.read(time.monotonic() + self.timeout, max_payload)
        except TimeoutError:
            self.kill()
            raise self._error(op, f"no reply within {self.timeout:g} s (--timeout); the engine was killed") from None
        except protocol.FrameError as exc:
            if self.proc.poll() is not None or "closed" in str(exc):
                raise self._death(op) from None
            self.kill()
            raise self._error(op, f"malformed reply: {exc}") from None
        if reply.get("id") != self._id:
            raise self._error(op, f"reply id {reply.get('id')!r}, request id {self._id}")
        if reply.get("ok") is not True:
            raise self._error(op, f"the engine answered an error: {reply.get('error', 'no error message')}")
        return reply, payload

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._closed = True

    # ---------------------------------------------------------------------------------- the interface

    def describe(self) -> dict[str, Any]:
        """Who was tested: name and version from hello, the command, and the SHA-256 of every file it names
        (the executable, a script, the module a py: factory lives in)."""
        files = [a for a in self.argv if Path(a).is_file()]
        module = self.hello.get("module")
        if self.kind == "py" and isinstance(module, str) and Path(module).is_file():
            files.append(module)
        return {
            "name": str(self.hello.get("name", self.kind)),
            "kind": self.kind,
            "spec": self.spec,
            "version": str(self.hello.get("version", "")),
            "command": self.argv,
            "files": {str(Path(f).resolve()): sha256_file(Path(f)) for f in files},
            "protocol": protocol.PROTOCOL_VERSION,
        }

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in tokens]
        reply, payload = self.request({"op": "logits", "tokens": ids})
        try:
            return protocol.decode_logits(reply, payload, len(ids))
        except protocol.FrameError as exc:
            raise self._error("logits", str(exc)) from None

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        if n <= 0:
            return []
        if "greedy" not in self.capabilities:  # one logits request per step, argmax of the last row
            out: list[int] = []
            for _ in range(n):
                out.append(int(np.argmax(self.logits(ids + out)[-1])))
            return out
        reply, _ = self.request({"op": "greedy", "tokens": ids, "n": n})
        got = reply.get("tokens")
        if not (isinstance(got, list) and len(got) == n and all(isinstance(t, int) and t >= 0 for t in got)):
            raise self._error("greedy", f"expected {n} token ids, got {json.dumps(got)[:200]}")
        return got

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int] | None:
        if "tokenize" not in self.capabilities:
            return None
        reply, _ = self.request(
            {"op": "tokenize", "text": text, "add_special": add_special, "parse_special": parse_special}
        )
        got = reply.get("tokens")
        if not (isinstance(got, list) and all(isinstance(t, int) and t >= 0 for t in got)):
            raise self._error("tokenize", f"expected token ids, got {json.dumps(got)[:200]}")
        return got

    def tensors(
        self,
        tokens: Sequence[int],
        names: Sequence[str] | None = None,
        replace: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The `tensors` request (docs/PROTOCOL.md). Unsupported (exit 2), before anything is sent, when the
        engine's hello does not announce the capability. Exact names go to the engine; None and fnmatch
        patterns ask it for every tensor it has and select here. A name asked exactly that the reply lacks
        is a UsageError naming it; a malformed reply is a lane error."""
        if "tensors" not in self.capabilities:
            raise Unsupported(
                f"implementation '{self.spec}' does not announce 'tensors' in its hello (capabilities: "
                f"{sorted(self.capabilities) or 'none'})",
                fix="serve the `tensors` request and list it in `capabilities` (docs/PROTOCOL.md), or run without "
                "--locate",
            )
        ids = [int(t) for t in tokens]
        who = f"implementation '{self.spec}'"
        exact = names is not None and not isinstance(names, str) and not any(map(tensor_names.is_pattern, names))
        entries, payload = protocol.tensors_payload(tensor_names.check_replace(replace, len(ids), who))
        request = {"op": "tensors", "tokens": ids, "names": list(names or []) if exact else None, "replace": entries}
        reply, data = self.request(request, payload, CAPTURE_BUDGET)
        try:
            got = protocol.decode_tensors(reply.get("tensors"), data, len(ids))
        except protocol.FrameError as exc:
            raise self._error("tensors", str(exc)) from None
        if exact:
            missing = [n for n in names or [] if n not in got]
            if missing:
                raise UsageError(
                    f"{who} computed no tensor named {', '.join(repr(n) for n in missing)}",
                    fix=f"use names it has: {', '.join(list(got)[:12]) or 'none'}",
                )
            return {n: got[n] for n in names or []}
        return {n: got[n] for n in tensor_names.select(names, list(got), who)}

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.proc.poll() is None:
                self._id += 1
                self._in.write(protocol.encode({"op": "bye", "id": self._id}))
                self._in.flush()
                self._in.close()
                self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
            self._log.close()


class LogitsFileImplementation(Implementation):
    """`logits:FILE.npz`: logits computed elsewhere, with the token ids they were computed for.

    The file holds `tokens` (int, the whole sequence: prompt + continuation) and `logits` (float [n, V]).
    Its continuation is the greedy decode; a run whose sequence differs from its ids is refused (exit 2).
    """

    def __init__(self, spec: ImplSpec) -> None:
        self.spec = spec.text
        self.path = Path(spec.get("path") or "").expanduser()
        if not self.path.is_file():
            raise UsageError(f"--impl {spec.text}: no such file {self.path}", fix="write it with numpy.savez")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                self.ids = [int(t) for t in np.asarray(data["tokens"]).reshape(-1)]
                self.table = np.asarray(data["logits"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(
                f"--impl {spec.text}: {self.path} is not an .npz with arrays 'tokens' and 'logits' ({exc})",
                fix="numpy.savez(path, tokens=ids, logits=array_of_shape_[len(ids), vocab])",
            ) from exc
        if self.table.ndim != 2 or self.table.shape[0] != len(self.ids):
            raise UsageError(
                f"--impl {spec.text}: logits of shape {self.table.shape} for {len(self.ids)} tokens",
                fix="save one row of logits per token id",
            )

    def _require_prefix(self, tokens: Sequence[int], what: str) -> None:
        ids = [int(t) for t in tokens]
        at = first_difference(ids, self.ids[: len(ids)])
        if at is not None:
            theirs = self.ids[at] if at < len(self.ids) else "end of file"
            ours = ids[at] if at < len(ids) else "end of sequence"
            raise UsageError(
                f"--impl {self.spec}: the file's token ids differ from the run's {what} at position {at} "
                f"(file {theirs}, run {ours})",
                fix="compute the logits for the run's token ids (--dump-ids prints them)",
            )

    def describe(self) -> dict[str, Any]:
        return {
            "name": "logits",
            "kind": "logits",
            "spec": self.spec,
            "file": str(self.path.resolve()),
            "sha256": sha256_file(self.path),
            "positions": len(self.ids),
            "vocab": int(self.table.shape[1]),
        }

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._require_prefix(tokens, "sequence")
        return self.table[: len(tokens)].copy()

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        self._require_prefix(prompt_ids, "prompt")
        if len(prompt_ids) + n > len(self.ids):
            raise UsageError(
                f"--impl {self.spec}: the file has {len(self.ids) - len(prompt_ids)} tokens after the prompt, "
                f"the run asks for {n}",
                fix=f"lower --max-tokens to {len(self.ids) - len(prompt_ids)} or save a longer continuation",
            )
        return self.ids[len(prompt_ids) : len(prompt_ids) + n]
