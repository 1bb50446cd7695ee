"""A C++ backend (llama.cpp, bitnet.cpp) as an Implementation: its bridge in a worker process.

Any context parameters (KV cache types, flash attention, threads, batch sizes, evaluation shape) come from
the spec (parity.engines.spec); the rest from the lane's most precise configuration. A crash, abort or hang
in C++ is a WorkerError (a lane error, exit 1), never a harness crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.backends.bridge import CAPTURE_BUDGET, BackendParams
from parity.backends.build import BuildPlan
from parity.backends.worker import RemoteModel, Worker
from parity.engines import tensor_names
from parity.engines.base import Implementation
from parity.engines.spec import FLASH_ATTN, GGML_TYPES, ImplSpec


def apply_spec(spec: ImplSpec, base: BackendParams) -> BackendParams:
    """`base` with the context parameters the spec sets (type_k, type_v, flash_attn, threads, batch sizes)."""
    changes: dict[str, int] = {}
    for key in ("type_k", "type_v"):
        value = spec.get(key)
        if value is not None:
            changes[key] = GGML_TYPES[value]
    if (fa := spec.get("flash_attn")) is not None:
        changes["flash_attn"] = FLASH_ATTN[fa]
    for key, field in (("threads", "n_threads"), ("n_batch", "n_batch"), ("n_ubatch", "n_ubatch")):
        value_int = spec.int_option(key)
        if value_int is not None:
            changes[field] = value_int
    return dataclasses.replace(base, **changes)


class BridgedImplementation(Implementation):
    """One backend worker with `model` loaded under `params`; logits in `eval_shape` (batch or stepwise)."""

    def __init__(
        self,
        spec: ImplSpec,
        plan: BuildPlan,
        model: Path,
        params: BackendParams,
        *,
        eval_shape: str = "batch",
        log_dir: Path | None = None,
        log_name: str | None = None,
        verbose: bool = False,
        timeout: float = 600.0,
        worker: Worker | None = None,
    ) -> None:
        """`worker`: an already started worker of this backend to load the model in (it becomes this
        implementation's and is closed with it); by default a new one is started."""
        self.spec = spec.text
        self.kind = spec.kind
        self.plan = plan
        self.params = params
        self.eval_shape = spec.get("eval_shape") or eval_shape
        self.capture_budget = CAPTURE_BUDGET  # bytes of recorded tensors one tensors() call may hold
        self._graph_names: dict[int, list[str]] = {}  # n_tokens -> per-token tensor names the graph computes
        self._worker = worker or Worker(
            log_name or spec.label, plan.bridge_path, log_dir=log_dir, log_level=3 if verbose else 1, timeout=timeout
        )
        self._model_path = str(model)
        try:
            self._model = RemoteModel(self._worker, str(model), params)
        except BaseException:
            self._worker.close()
            raise

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.kind,
            "spec": self.spec,
            "commit": self.plan.commit,
            "source_kind": self.plan.source_kind,
            "source_fingerprint": self.plan.source_fingerprint,
            "api_generation": self._worker.hello["api_generation"],
            "run_config": {**self.params.to_dict(), "eval_shape": self.eval_shape},
        }

    @property
    def hello(self) -> dict[str, Any]:
        """What the worker reported at start: api_generation, system_info."""
        return dict(self._worker.hello)

    def evaluate(self, tokens: Sequence[int], shape: str) -> np.ndarray:
        """Logits of every position, in one decode (batch) or one token per decode (stepwise)."""
        ids = list(tokens)
        return np.asarray(self._model.eval(ids) if shape == "batch" else self._model.eval_stepwise(ids))

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self.evaluate(tokens, self.eval_shape)

    def logits_at(self, tokens: Sequence[int], positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Batch shape: one decode computing the output head for `positions` only (parity_eval_rows); stepwise
        evaluation computes every position anyway, so it slices `logits`."""
        if self.eval_shape != "batch":
            return super().logits_at(tokens, positions)
        return np.asarray(self._model.eval_rows(list(tokens), [int(p) for p in positions]))

    def open_variant(self, params: BackendParams) -> RemoteModel:
        """The same model file under other context parameters, in this worker (the reference's own variation,
        check/floor.py); the caller closes it."""
        return RemoteModel(self._worker, self._model_path, params)

    def greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        return self._model.greedy(list(prompt_ids), n) if n else []

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int] | None:
        return self._model.tokenize(text, add_special, parse_special)

    def graph_names(self, tokens: Sequence[int]) -> list[str]:
        """The per-token tensor names llama.cpp's graph computes for `tokens` (one decode, cached per length)."""
        ids = list(tokens)
        if len(ids) not in self._graph_names:
            cap = self._model.capture(ids, [], None, self.capture_budget, False)
            self._graph_names[len(ids)] = list(cap.names)
        return self._graph_names[len(ids)]

    def tensors(
        self,
        tokens: Sequence[int],
        names: Sequence[str] | None = None,
        replace: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Graph tensors of ONE llama_decode of `tokens` through the eval callback (parity_capture_run).

        Names the graph gives to several nodes are recorded (and replaced) at the last one computed.
        Listing what the graph computes (for None or patterns) costs one extra decode per sequence length.
        """
        ids = list(tokens)
        who = f"implementation '{self.spec}'"
        exact = names is not None and not isinstance(names, str) and not any(map(tensor_names.is_pattern, names))
        available = None if exact and not replace else self.graph_names(ids)
        wanted = list(names or []) if available is None else tensor_names.select(names, available, who)
        rep = tensor_names.check_replace(replace, len(ids), who, available)
        cap = self._model.capture(ids, wanted, rep or None, self.capture_budget, False)
        return dict(cap.tensors)

    def close(self) -> None:
        try:
            if self._worker.proc.poll() is None:  # a worker that crashed has nothing left to close
                self._model.close()
        finally:
            self._worker.close()
