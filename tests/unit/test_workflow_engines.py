"""The windows run's built-in LLM engines come from parity.engines.registry: a TOML `kind` + `options` opens
what the spec string opens; reference and teacher-forced records over a fake engine."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity import options as parity_config
from parity.check import inputs, job
from parity.engines import registry
from parity.engines import spec as engine_spec
from parity.engines.base import Implementation
from parity.errors import UsageError, WorkerError
from parity.workflow import config, impls

V = 11
PROMPT = (1, 2, 3)
TOML = """
[input]
prompt_ids = [1, 2, 3]

[[implementation]]
name = "ref"
role = "reference"
kind = "llama"
options = { type_k = "f16", flash_attn = "on", threads = 1, timeout = 30 }

[[implementation]]
name = "alt"
role = "alternate"
kind = "llama"
"""


class FakeEngine(Implementation):
    """Row i's argmax is (sum of tokens[: i + 1]) % V; `greedy` disagrees with its own rows at `flip`."""

    def __init__(self, flip: int | None = None) -> None:
        self.spec = "fake"
        self.flip = flip
        self.calls: list[str] = []
        self.closed = False

    def describe(self) -> dict[str, Any]:
        return {"name": "fake"}

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self.calls.append(f"logits {len(tokens)}")
        rows = np.zeros((len(tokens), V), dtype=np.float32)
        for i in range(len(tokens)):
            rows[i, sum(tokens[: i + 1]) % V] = 1.0
        return rows

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        self.calls.append(f"greedy {n}")
        seq, out = list(prompt_ids), []
        for _ in range(n):
            t = sum(seq) % V
            if len(seq) == self.flip:
                t = (t + 1) % V
            out.append(t)
            seq.append(t)
        return out

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[engine_spec.ImplSpec, Any, FakeEngine]]:
    seen: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]] = []

    def fake_open(spec: engine_spec.ImplSpec, ctx: Any, engine: Any = None) -> Implementation:
        seen.append((spec, ctx, FakeEngine(flip=len(PROMPT) + 2)))
        return seen[-1][2]

    monkeypatch.setattr(inputs, "preflight", lambda backend, opts, source=None: "plan")
    monkeypatch.setattr(registry, "open_implementation", fake_open)
    return seen


def context(tmp_path: Path, steps: int) -> impls.RunContext:
    cfg = config.parse(TOML, tmp_path / "impls.toml")
    return impls.RunContext(cfg, tmp_path, True, {}, PROMPT, tmp_path / "m.gguf", 3, len(PROMPT) + steps)


def expected_tokens(n: int) -> list[int]:
    seq = list(PROMPT)
    for _ in range(n):
        seq.append(sum(seq) % V)
    return seq[len(PROMPT) :]


def test_bridged_kinds_open_the_spec_the_options_name(
    tmp_path: Path, opened: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]]
) -> None:
    ctx = context(tmp_path, 8)
    ref = impls.BridgeImpl(ctx.config.reference, ctx)
    out = ref.run_window(0, 6, [], tmp_path / "t")
    assert out.ok, out.error
    ((spec, octx, engine),) = opened
    assert spec == engine_spec.parse("llama:type_k=f16,flash_attn=on,threads=1")
    opts = parity_config.resolve({"timeout": 30})
    assert octx.params == job.lane_params("llama", opts, ctx.n_positions) and octx.plan == "plan"
    assert octx.timeout == 30 and octx.log_name == "llama" and octx.log_dir.parent == tmp_path / "logs"
    # greedy's proposal disagrees with the confirming rows at step 2: the window continues from the rows
    assert [r["token"] for r in out.records] == expected_tokens(6)
    assert [r["position"] for r in out.records] == list(range(2, 8))
    assert engine.calls == ["greedy 6", "logits 8", "greedy 3", "logits 8"]

    alt = impls.BridgeImpl(ctx.config.alternates[0], ctx)
    tokens = expected_tokens(6)
    out = alt.run_window(3, 3, tokens, tmp_path / "t")
    assert opened[-1][0] == engine_spec.parse("llama")
    assert [r["token"] for r in out.records] == tokens[3:6] and opened[-1][2].calls == ["logits 8"]
    assert [r["top_ids"][0] for r in out.records] == tokens[3:6] and len(out.records[0]["top_ids"]) == 3


def test_a_worker_error_closes_the_engine_and_the_next_window_opens_a_new_one(
    tmp_path: Path, opened: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path, 8)
    alt = impls.BridgeImpl(ctx.config.alternates[0], ctx)

    real = FakeEngine.logits

    def crash(self: FakeEngine, tokens: Sequence[int]) -> np.ndarray:
        raise WorkerError("llama worker was killed by signal SIGSEGV during eval")

    monkeypatch.setattr(FakeEngine, "logits", crash)
    out = alt.run_window(0, 3, expected_tokens(3), tmp_path / "t")
    assert out.error and "SIGSEGV" in out.error and opened[0][2].closed
    monkeypatch.setattr(FakeEngine, "logits", real)
    out = alt.run_window(0, 3, expected_tokens(3), tmp_path / "t")
    assert out.ok and len(opened) == 2


EXTERNAL = """
[input]
prompt_ids = [1, 2, 3]

[[implementation]]
name = "ref"
role = "reference"
kind = "cmd"
options = { argv = "./engine --greedy" }

[[implementation]]
name = "echo"
role = "alternate"
kind = "cmd"
options = { argv = "{python} '{config_dir}/my engine.py' --threads 2", timeout = 5 }

[[implementation]]
name = "file"
role = "alternate"
kind = "logits"
options = { path = "dumps/run.npz" }
"""


def external_context(tmp_path: Path, steps: int) -> impls.RunContext:
    cfg = config.parse(EXTERNAL, tmp_path / "impls.toml")
    return impls.RunContext(cfg, tmp_path, True, {}, PROMPT, tmp_path / "m.gguf", 3, len(PROMPT) + steps)


def test_external_kinds_open_the_spec_as_impl_does_and_keep_one_process(
    tmp_path: Path, opened: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]]
) -> None:
    ctx = external_context(tmp_path, 12)
    alt = impls.ExternalImpl(ctx.config.alternates[0], ctx)
    tokens = expected_tokens(12)
    for start in (0, 6):
        out = alt.run_window(start, 6, tokens, tmp_path / "t")
        assert out.ok, out.error
        assert [r["token"] for r in out.records] == tokens[start : start + 6]
    ((spec, octx, engine),) = opened  # opened once, kept between windows
    argv = [sys.executable, str(tmp_path / "my engine.py"), "--threads", "2"]
    assert spec == engine_spec.parse("cmd:" + shlex.join(argv)) and shlex.split(spec.get("argv") or "") == argv
    assert octx.timeout == 5 and octx.log_name == "cmd" and octx.log_dir.parent == tmp_path / "logs"
    assert engine.calls == ["logits 8", "logits 14"]

    file = impls.ExternalImpl(ctx.config.alternates[1], ctx)
    assert file.run_window(0, 3, tokens, tmp_path / "t").ok
    assert opened[-1][0] == engine_spec.parse(f"logits:{tmp_path / 'dumps' / 'run.npz'}")  # relative to the TOML


def test_an_external_reference_uses_greedy_only_when_it_has_it(
    tmp_path: Path, opened: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]]
) -> None:
    ctx = external_context(tmp_path, 6)
    ref = impls.ExternalImpl(ctx.config.reference, ctx)
    out = ref.run_window(0, 6, [], tmp_path / "t")
    assert out.ok and [r["token"] for r in out.records] == expected_tokens(6)
    assert opened[0][2].calls == ["greedy 6", "logits 8", "greedy 3", "logits 8"]  # proposal confirmed

    ref = impls.ExternalImpl(ctx.config.reference, ctx)
    ref._impl = FakeEngine()
    ref._impl.capabilities = set()  # type: ignore[attr-defined]  # a protocol v2 engine without greedy
    out = ref.run_window(0, 3, [], tmp_path / "t")
    assert out.ok and [r["token"] for r in out.records] == expected_tokens(3)
    assert ref._impl.calls == ["logits 3", "logits 4", "logits 5"]


def test_a_crashed_external_engine_is_restarted_and_a_missing_one_is_not_retried(
    tmp_path: Path,
    opened: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = external_context(tmp_path, 6)
    alt = impls.ExternalImpl(ctx.config.alternates[0], ctx)
    real = FakeEngine.logits

    def crash(self: FakeEngine, tokens: Sequence[int]) -> np.ndarray:
        raise WorkerError("implementation cmd:... failed in 'logits': the engine exited with status 3")

    monkeypatch.setattr(FakeEngine, "logits", crash)
    out = alt.run_window(0, 3, expected_tokens(6), tmp_path / "t")
    assert out.error and "exited with status 3" in out.error and opened[0][2].closed
    monkeypatch.setattr(FakeEngine, "logits", real)
    out = alt.run_window(3, 3, expected_tokens(6), tmp_path / "t")
    assert out.ok and len(opened) == 2 and opened[0][1].log_dir != opened[1][1].log_dir  # a new process, own log

    tries: list[int] = []

    def missing(spec: engine_spec.ImplSpec, octx: Any, engine: Any = None) -> Implementation:
        tries.append(1)
        raise UsageError("--impl cmd:./engine: command './engine' not found", fix="give a path")

    monkeypatch.setattr(registry, "open_implementation", missing)
    ref = impls.ExternalImpl(ctx.config.reference, ctx)
    for _ in range(2):
        out = ref.run_window(0, 3, [], tmp_path / "t")
        assert out.error and "ref (cmd:./engine --greedy) is unavailable" in out.error and "not found" in out.error
    assert tries == [1]


def test_a_source_option_builds_that_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: list[tuple[engine_spec.ImplSpec, Any, FakeEngine]]
) -> None:
    """`options = { source = ... }` means what `--impl llama:source=...` means: that tree is the one built."""
    asked: list[str | None] = []

    def preflight(backend: str, opts: Any, source: str | None = None) -> str:
        asked.append(source)
        return "plan"

    monkeypatch.setattr(inputs, "preflight", preflight)
    toml = TOML.replace('type_k = "f16"', 'type_k = "f16", source = "/src/llama-patched"', 1)
    assert toml != TOML
    cfg = config.parse(toml, tmp_path / "impls.toml")
    ctx = impls.RunContext(cfg, tmp_path, True, {}, PROMPT, tmp_path / "m.gguf", 3, len(PROMPT) + 8)
    assert impls.BridgeImpl(cfg.reference, ctx).run_window(0, 6, [], tmp_path / "t").ok
    assert asked == ["/src/llama-patched"]
