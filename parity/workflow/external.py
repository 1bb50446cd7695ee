"""External commands as implementations: the windows command protocol v1 (README.md, section Stepwise parity).

A command gets `--start S --count N` appended to its argv (unless `append_args = false`), the window request
as one JSON object on stdin and PARITY_WINDOW_* variables in its environment; it prints one JSON object per
step on stdout, steps numbered from S. Its stderr goes to the window's trace directory. A command that cannot
be started, times out (its process group is killed), exits non-zero or breaks the protocol did not take part
in that window (Unavailable, with the reason and the tail of its stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from parity.core.proc import log_tail, signal_name
from parity.workflow.config import DEFAULT_COMMAND_TIMEOUT
from parity.workflow.impls import Implementation, Unavailable

PROTOCOL_VERSION = 1
STDERR_TAIL = 3
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a command that overran its timeout


class CommandImpl(Implementation):
    """An external command speaking the windows protocol (README.md, section Stepwise parity, "External command protocol").

    A run uses subprocess directly rather than parity.core.proc.run because the protocol needs stdin, a
    timeout and a process-group kill, and a failure is an outcome to record, not an error to raise.
    """

    def _argv(self, start: int, count: int) -> list[str]:
        subst = {"{python}": sys.executable, "{config_dir}": str(self.ctx.config_dir)}
        argv = []
        for a in self.spec.options["command"]:
            for key, value in subst.items():
                a = a.replace(key, value)
            argv.append(a)
        if self.spec.options.get("append_args", True):
            argv += ["--start", str(start), "--count", str(count)]
        return argv

    def _window(self, start: int, count: int, tokens: list[int], trace_dir: Path) -> list[dict[str, Any]]:
        opts = self.spec.options
        timeout = float(opts.get("timeout", DEFAULT_COMMAND_TIMEOUT))
        scratch = self.ctx.run_dir / "scratch" / self.name
        scratch.mkdir(parents=True, exist_ok=True)
        trace_dir.mkdir(parents=True, exist_ok=True)
        request = {
            "protocol": PROTOCOL_VERSION,
            "implementation": self.name,
            "role": self.role,
            "start": start,
            "count": count,
            "end": start + count,
            "input": self.ctx.input,
            "tokens": tokens,
            "params": dict(opts.get("params", {})),
        }
        env = dict(os.environ)
        env.update(
            {
                "PARITY_PROTOCOL": str(PROTOCOL_VERSION),
                "PARITY_WINDOW_START": str(start),
                "PARITY_WINDOW_COUNT": str(count),
                "PARITY_WINDOW_END": str(start + count),
                "PARITY_IMPL": self.name,
                "PARITY_ROLE": self.role,
                "PARITY_RUN_DIR": str(self.ctx.run_dir),
                "PARITY_SCRATCH_DIR": str(scratch),
                "PARITY_CONFIG_DIR": str(self.ctx.config_dir),
            }
        )
        env.update({str(k): str(v) for k, v in dict(opts.get("env", {})).items()})
        cwd = (self.ctx.config_dir / str(opts["cwd"])).resolve() if "cwd" in opts else self.ctx.config_dir
        argv = self._argv(start, count)
        where = f"window [{start}, {start + count})"
        stderr_path = trace_dir / f"{self.name}.stderr"
        with open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,  # a timeout kills the command's whole process group
                )
            except OSError as exc:
                raise Unavailable(f"{self.name}: cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
            try:
                stdout, _ = proc.communicate(json.dumps(request).encode("utf-8"), timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
                raise Unavailable(f"{self.name} timed out after {timeout:g} s on {where} (killed)") from None
        tail = self._stderr_tail(stderr_path)
        if proc.returncode != 0:
            how = (
                f"was killed by {signal_name(proc.returncode)}"
                if proc.returncode < 0
                else f"exited with code {proc.returncode}"
            )
            raise Unavailable(f"{self.name} {how} on {where}" + (f"; stderr: {tail}" if tail else ""))
        return self._parse(stdout, start, where)

    def _parse(self, stdout: bytes, start: int, where: str) -> list[dict[str, Any]]:
        try:
            text = stdout.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Unavailable(f"{self.name}: protocol error on {where}: stdout is not UTF-8 ({exc})") from exc
        records: list[dict[str, Any]] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Unavailable(
                    f"{self.name}: protocol error on {where}: stdout line {n} is not JSON ({exc.msg}): {line[:80]!r}"
                ) from exc
            if not isinstance(rec, dict):
                raise Unavailable(f"{self.name}: protocol error on {where}: stdout line {n} is not a JSON object")
            want = start + len(records)
            if rec.get("step") != want:
                raise Unavailable(
                    f"{self.name}: protocol error on {where}: stdout line {n} has step {rec.get('step')!r}, expected {want}"
                )
            records.append(rec)
        return records

    @staticmethod
    def _stderr_tail(path: Path) -> str:
        return " | ".join(line.strip() for line in log_tail(path, STDERR_TAIL) if line.strip())

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.communicate(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
