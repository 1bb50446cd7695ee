"""Implementations that take part in a windows run: their interface and the built-in LLM engines.

Every implementation answers one question: "give me your step records for steps [start, start + count)".
A step record is a JSON object. For the LLM engines one step is one decode step and its record is

    {"step": i, "position": p, "token": t, "top_ids": [...], "top_logits": [...], "logits_digest": "sha256:..."}

plus the full logit row as a numpy array under "logits" (kept in memory for comparison, never written to
traces). Step i is the prediction made at position p = len(prompt) - 1 + i, i.e. after the prompt and the
reference's first i chosen tokens. `token` is the argmax (lowest id on exact ties) of the float32 row,
`top_ids`/`top_logits` the top-k by logit, and `logits_digest` the SHA-256 of the row as little-endian
IEEE float32 bytes (rows computed in float64 are rounded to float32 first): an exact fingerprint for
"bit-identical to last time", not a cross-engine comparison.

The reference computes its window autoregressively from its own choices; alternates are teacher-forced on
the reference's tokens, so one alternate call evaluates prefix + window in one pass and keeps the window's
rows. An implementation that cannot answer (fails to build, crashes, times out, exits non-zero, breaks the
protocol) yields a WindowOutput with `error` set: it did not take part in that window.

Built in here: adapters over the Implementations parity.engines.registry opens for the LLM kinds (numpy,
llama, bitnet, and the external cmd, py, logits: a TOML `kind` + `options` means what the spec string
`KIND:...` means); external commands of the windows command protocol v1 are in external.py, and
registry.py makes an implementation of each kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity.core.fs import sha256_file
from parity.engines.spec import ImplSpec as EngineSpec
from parity.errors import ParityError, UsageError
from parity.workflow.config import DEFAULT_TOP_K, ImplSpec, WindowsConfig

if TYPE_CHECKING:
    import numpy as np

    from parity.engines.base import Implementation as EngineImplementation


class Unavailable(Exception):
    """An implementation could not produce a window (the message is recorded as the reason)."""


@dataclass(frozen=True)
class RunContext:
    """What every implementation of a run receives, resolved once per process."""

    config: WindowsConfig
    run_dir: Path
    llm: bool
    input: dict[str, Any]  # the [input] table as external commands receive it (resolved for LLM runs)
    prompt_ids: tuple[int, ...] = ()
    model_path: Path | None = None
    top_k: int = DEFAULT_TOP_K
    n_positions: int = 0  # prompt + steps: the context the engines must hold
    digest: str = ""  # SHA-256 of the resolved input (and model file): a resumed run must match it

    @property
    def config_dir(self) -> Path:
        return self.config.path.parent


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def resolve_context(cfg: WindowsConfig, run_dir: Path, end: int) -> RunContext:
    """Resolve the run's input: for an LLM run the model, tokenizer and prompt ids (checked against the context)."""
    if not cfg.llm:
        inp = dict(cfg.input)
        return RunContext(cfg, run_dir, False, inp, digest=hashlib.sha256(_canonical(inp).encode()).hexdigest())
    from parity.engines.numpy.ops import int_key
    from parity.gguf.reader import open_gguf
    from parity.models.modelgen import default_model
    from parity.tokenize.tokenizer import HFTokenizer, apply_template

    inp = dict(cfg.input)
    base = cfg.path.parent
    if "model" in inp:
        model_path = (base / str(inp["model"])).expanduser().resolve()
        tok_path = (base / str(inp["tokenizer"])).expanduser().resolve() if "tokenizer" in inp else None
    else:
        model_path, default_tok = default_model(str(inp.get("variant", "f32")))
        tok_path = (base / str(inp["tokenizer"])).expanduser().resolve() if "tokenizer" in inp else default_tok
    gguf = open_gguf(model_path)
    n_ctx = int_key(gguf, f"{gguf.architecture}.context_length")
    if "prompt_ids" in inp:
        prompt_ids = [int(t) for t in inp["prompt_ids"]]
        formatted = None
    else:
        if tok_path is None:
            raise UsageError(
                f"{cfg.path}: [input] prompt needs a tokenizer for {model_path.name}",
                fix="set [input] tokenizer = PATH to its tokenizer.json, or give prompt_ids",
            )
        hf = HFTokenizer.load(tok_path)
        sys_prompt = inp.get("system_prompt")
        _, formatted, _ = apply_template(
            str(inp.get("template", "auto")),
            str(inp["prompt"]),
            str(sys_prompt) if sys_prompt else None,
            gguf.metadata,
            model_path,
            add_bos=hf.encode("")[:1] == [gguf.get("tokenizer.ggml.bos_token_id")],  # the tokenizer adds BOS
        )
        prompt_ids = hf.encode(formatted)
    if len(prompt_ids) + end > n_ctx:
        raise UsageError(
            f"{cfg.path}: prompt ({len(prompt_ids)} tokens) + {end} steps exceeds the context of "
            f"{model_path.name} ({n_ctx} positions)",
            fix=f"lower [run] steps to at most {n_ctx - len(prompt_ids)} or shorten the prompt",
        )
    top_k = int(inp.get("top_k", DEFAULT_TOP_K))
    resolved = {
        **{k: v for k, v in inp.items() if k not in ("model", "tokenizer")},
        "model": str(model_path),
        "model_sha256": sha256_file(model_path),
        "tokenizer": str(tok_path) if tok_path else None,
        "formatted_prompt": formatted,
        "prompt_ids": prompt_ids,
        "top_k": top_k,
    }
    digest_src = {k: v for k, v in resolved.items() if k not in ("model", "tokenizer")}
    return RunContext(
        cfg,
        run_dir,
        True,
        resolved,
        tuple(prompt_ids),
        model_path,
        top_k,
        len(prompt_ids) + end,
        hashlib.sha256(_canonical(digest_src).encode()).hexdigest(),
    )


def logits_digest(row: np.ndarray) -> str:
    """SHA-256 of a logit row as little-endian float32 bytes: `sha256:<hex>`."""
    import numpy as np

    return "sha256:" + hashlib.sha256(np.ascontiguousarray(row, dtype="<f4").tobytes()).hexdigest()


def step_record(step: int, position: int, row: np.ndarray, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """The record of one decode step from its logit row (see the module docstring for the fields)."""
    import numpy as np

    r32 = np.ascontiguousarray(row, dtype=np.float32)  # (V,)
    top = np.argsort(-r32, kind="stable")[:top_k]  # (k,): stable, so exact ties rank the lower id first
    return {
        "step": step,
        "position": position,
        "token": int(top[0]),
        "top_ids": [int(i) for i in top],
        "top_logits": [float(r32[i]) for i in top],
        "logits_digest": logits_digest(r32),
        "logits": r32,
    }


def persistable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without in-memory arrays (full logit rows stay out of traces; the digest stands for them)."""
    np = sys.modules.get("numpy")  # without numpy loaded, no value can be an array
    if np is None:
        return dict(record)
    return {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}


@dataclass
class WindowOutput:
    """An implementation's answer for one window: its records, or why it could not take part."""

    records: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class Implementation(ABC):
    """Base class: `run_window` never raises for an implementation's own failure, it reports it."""

    def __init__(self, spec: ImplSpec, ctx: RunContext) -> None:
        self.spec = spec
        self.ctx = ctx

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role

    def run_window(self, start: int, count: int, tokens: Sequence[int], trace_dir: Path) -> WindowOutput:
        """Records for steps [start, start + count); `tokens` are the reference's tokens known so far."""
        t0 = time.perf_counter()
        try:
            out = WindowOutput(self._window(start, count, list(tokens), trace_dir))
        except (Unavailable, ParityError) as exc:
            out = WindowOutput(error=str(exc))
        out.seconds = time.perf_counter() - t0
        if out.ok and self.role == "reference":
            out.error = self._check_reference(start, count, out.records)
        return out

    def _check_reference(self, start: int, count: int, records: list[dict[str, Any]]) -> str | None:
        # Alternates are compared against these records and (LLM) teacher-forced on their tokens, so a
        # reference that answers short or without tokens cannot anchor the window.
        if len(records) != count:
            return (
                f"reference {self.name} emitted {len(records)} of {count} steps for window [{start}, {start + count})"
            )
        if self.ctx.llm:
            for r in records:
                tok = r.get("token")
                if not isinstance(tok, int) or isinstance(tok, bool):
                    return f"reference {self.name}: step {r.get('step')} has no integer 'token' (needed for teacher forcing)"
        return None

    @abstractmethod
    def _window(self, start: int, count: int, tokens: list[int], trace_dir: Path) -> list[dict[str, Any]]:
        """The records of steps [start, start + count) of this implementation."""

    def close(self) -> None:  # noqa: B027 - a no-op default: most implementations hold nothing to release
        """Release processes and memory (idempotent)."""


class EngineImpl(Implementation):
    """A built-in LLM engine: the Implementation parity.engines.registry opens for the spec's `kind` and
    `options` (the same as `--impl KIND:key=value,...`), opened on first use and kept between windows.

    An alternate is teacher-forced: one `logits` call over prefix + window, keeping the window's rows. How
    the reference decodes its window depends on the engine (`_reference`). A ParityError (a crashed or hung
    worker) closes the engine; the next window opens a new one.
    """

    def __init__(self, spec: ImplSpec, ctx: RunContext) -> None:
        super().__init__(spec, ctx)
        self._impl: EngineImplementation | None = None
        self._fatal: str | None = None  # a failure no restart can fix (build, missing program) is not retried
        self._starts = 0

    def _new_log_dir(self) -> Path:
        """One log directory per engine start: a restarted engine must not truncate the log of the one that
        crashed (engines open their logs for writing)."""
        self._starts += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return self.ctx.run_dir / "logs" / f"{self.name}-{stamp}-{os.getpid()}-{self._starts}"

    def _timeout(self) -> float:
        """Seconds per engine call: options.timeout, else parity's --timeout setting (PARITY_TIMEOUT, ...)."""
        from parity import options as parity_config

        return parity_config.resolve({"timeout": self.spec.options.get("timeout")}).timeout

    @abstractmethod
    def _open(self) -> EngineImplementation:
        """The engine's Implementation (from parity.engines.registry.open_implementation)."""

    @abstractmethod
    def _reference(self, impl: EngineImplementation, start: int, count: int, tokens: list[int]) -> list[dict[str, Any]]:
        """The reference's records of steps [start, start + count), decoded from its own choices."""

    def _window(self, start: int, count: int, tokens: list[int], trace_dir: Path) -> list[dict[str, Any]]:
        try:
            if self._impl is None:
                self._impl = self._open()
            if self.role == "reference":
                return self._reference(self._impl, start, count, tokens)
            return self._teacher_forced(self._impl, start, count, tokens)
        except ParityError:
            self.close()  # a crashed worker is replaced on the next window
            raise

    def _teacher_forced(
        self, impl: EngineImplementation, start: int, count: int, tokens: list[int]
    ) -> list[dict[str, Any]]:
        import numpy as np

        prompt = list(self.ctx.prompt_ids)
        first = len(prompt) - 1 + start
        rows = np.asarray(impl.logits(prompt + tokens[: start + count - 1]))[first : first + count]  # (count, V)
        return [step_record(start + j, first + j, rows[j], self.ctx.top_k) for j in range(len(rows))]

    def close(self) -> None:
        if self._impl is not None:
            with contextlib.suppress(ParityError, OSError):
                self._impl.close()
        self._impl = None


class NumpyImpl(EngineImpl):
    """parity's numpy engine, in process. The reference decodes step by step (no KV cache: each step is a
    full forward pass of prompt + tokens so far)."""

    def _open(self) -> EngineImplementation:
        from parity.engines.registry import OpenContext, open_implementation

        assert self.ctx.model_path is not None
        return open_implementation(self.spec.engine, OpenContext(self.ctx.model_path))

    def _reference(self, impl: EngineImplementation, start: int, count: int, tokens: list[int]) -> list[dict[str, Any]]:
        return stepwise_reference(impl, self.ctx, start, count, tokens)


class BridgeImpl(EngineImpl):
    """llama.cpp or bitnet.cpp through parity's bridge in a worker process (built on first use), under the
    lane's most precise parameters with the spec's options applied (parity.engines.bridged).

    The reference proposes a window with the backend's KV-cached greedy decode, then confirms it with one
    `logits` call over prefix + proposal: if a row's argmax disagrees with the proposal (a near-tie between
    the two evaluation shapes), the window continues from that row's choice.
    """

    def _open(self) -> EngineImplementation:
        if self._fatal:
            raise Unavailable(self._fatal)
        from parity import options as parity_config
        from parity.check import inputs, job
        from parity.engines.registry import OpenContext, open_implementation

        backend = self.spec.kind
        try:
            opts = parity_config.resolve({"timeout": self.spec.options.get("timeout")})
            plan = inputs.preflight(backend, opts, self.spec.engine.get("source"))
        except ParityError as exc:
            self._fatal = f"{self.name} ({backend}) is unavailable: {exc}"
            raise Unavailable(self._fatal) from exc
        log_dir = self._new_log_dir()
        assert self.ctx.model_path is not None
        ctx = OpenContext(
            self.ctx.model_path,
            params=job.lane_params(backend, opts, self.ctx.n_positions),
            plan=plan,
            log_dir=log_dir,
            log_name=backend,
            timeout=opts.timeout,
        )
        return open_implementation(self.spec.engine, ctx)

    def _reference(self, impl: EngineImplementation, start: int, count: int, tokens: list[int]) -> list[dict[str, Any]]:
        return greedy_reference(impl, self.ctx, start, count, tokens)


class ExternalImpl(EngineImpl):
    """An implementation brought by the user, opened by parity.engines.registry exactly as `--impl` opens it:
    `cmd` (a program speaking protocol v2, docs/PROTOCOL.md), `py` (a Python factory served in its own
    process) or `logits` (an .npz of precomputed logits).

    The engine process is started on first use and serves every window of the pass (protocol v2: one
    long-lived process per run); a crash, a hang past `timeout` or a protocol error is a WorkerError, so the
    window records the implementation as unavailable and the next window starts a new process (its log in a
    directory of its own). A program that cannot be found or a missing logits file is not retried.

    In `argv`, `{python}` is the interpreter running parity and `{config_dir}` the TOML's directory; the
    engine runs in parity's working directory, as with `--impl`. A relative logits `path` is relative to
    the TOML's directory (like `[input] model`). As the reference, an engine with `greedy` proposes each
    window and confirms it with one `logits` call (as BridgeImpl); one without decodes step by step.
    """

    def _resolved(self) -> EngineSpec:
        spec = self.spec.engine
        key, value = spec.options[0]
        subst = {"{python}": sys.executable, "{config_dir}": str(self.ctx.config_dir)}

        def fill(text: str) -> str:
            for k, v in subst.items():
                text = text.replace(k, v)
            return text

        if spec.kind == "cmd":
            value = shlex.join(fill(a) for a in shlex.split(value))
        elif spec.kind == "logits":
            path = Path(fill(value)).expanduser()
            value = str(path if path.is_absolute() else self.ctx.config_dir / path)
        return EngineSpec(spec.kind, ((key, value),))

    def _open(self) -> EngineImplementation:
        if self._fatal:
            raise Unavailable(self._fatal)
        from parity.engines.registry import OpenContext, open_implementation

        spec = self._resolved()
        assert self.ctx.model_path is not None
        ctx = OpenContext(self.ctx.model_path, log_dir=self._new_log_dir(), log_name=spec.kind, timeout=self._timeout())
        try:
            return open_implementation(spec, ctx)
        except UsageError as exc:  # cannot start at all: the same next window
            self._fatal = f"{self.name} ({spec.text}) is unavailable: {exc}"
            raise Unavailable(self._fatal) from exc

    def _reference(self, impl: EngineImplementation, start: int, count: int, tokens: list[int]) -> list[dict[str, Any]]:
        caps = getattr(impl, "capabilities", None)  # protocol v2 engines say; a logits file always has greedy
        if caps is None or "greedy" in caps:
            return greedy_reference(impl, self.ctx, start, count, tokens)
        return stepwise_reference(impl, self.ctx, start, count, tokens)


def stepwise_reference(
    impl: EngineImplementation, ctx: RunContext, start: int, count: int, tokens: list[int]
) -> list[dict[str, Any]]:
    """A reference window decoded step by step: one `logits` call over prompt + tokens so far per step."""
    seq = list(ctx.prompt_ids) + tokens[:start]
    out = []
    for j in range(count):
        row = impl.logits(seq)[-1]  # (V,)
        rec = step_record(start + j, len(seq) - 1, row, ctx.top_k)
        out.append(rec)
        seq.append(rec["token"])
    return out


def greedy_reference(
    impl: EngineImplementation, ctx: RunContext, start: int, count: int, tokens: list[int]
) -> list[dict[str, Any]]:
    """A reference window proposed by the engine's greedy decode and confirmed by one `logits` call over
    prefix + proposal: where a row's argmax disagrees with the proposal (a near-tie between the two
    evaluation shapes), the window continues from that row's choice."""
    import numpy as np

    seq = list(ctx.prompt_ids) + tokens[:start]
    out: list[dict[str, Any]] = []
    while len(out) < count:
        remaining = count - len(out)
        proposal = impl.greedy(seq, remaining)
        rows = np.asarray(impl.logits(seq + proposal[:-1]))[len(seq) - 1 :]  # (remaining, V)
        for j in range(remaining):
            rec = step_record(start + len(out), len(seq) - 1, rows[j], ctx.top_k)
            out.append(rec)
            seq = [*seq, rec["token"]]
            if rec["token"] != proposal[j]:
                break  # later rows were computed on the proposal's token, not this one
    return out
