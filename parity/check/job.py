"""The main job: one implementation under test (`--impl`, default numpy) against C++ reference lanes.

template -> tokenize (tokenizer.json and each backend) -> token parity (exit 2) -> the implementation under
test once -> one lane per reference (`--reference` specs, each a worker process) -> per-position metrics ->
receipt per lane -> summary -> exit code. Implementations come from spec strings (parity.engines.spec).
Everything that can be wrong with the input is checked before any lane starts, so bad input writes no
receipt. A lane whose worker crashes is reported as an error (exit 1), never as a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.backends.worker import Worker
from parity.check import early, inputs, mirror, pieces
from parity.check import floor as noise_floor
from parity.check import locate as localisation
from parity.compare import metrics, receipts, report_html
from parity.engines import spec as impl_specs
from parity.engines.base import Implementation
from parity.engines.bridged import apply_spec
from parity.engines.registry import OpenContext, open_implementation
from parity.engines.spec import ImplSpec
from parity.errors import (
    ParityError,
    Unsupported,
    UsageError,
    WorkerError,
)
from parity.models import modelgen
from parity.options import RunOptions
from parity.tokenize.tokenizer import check_token_parity

if TYPE_CHECKING:
    from parity.engines.numpy.engine import NumpyEngine


@dataclass
class Shared:
    """What every lane shares: computed once."""

    model_path: Path
    model_sha256: str
    architecture: str
    template: str
    formatted_prompt: str
    prompt_ids: list[int]
    generated: list[int]
    logits: np.ndarray
    authority: dict[str, Any]
    n_ctx_train: int
    seconds: dict[str, float] = field(default_factory=dict)
    # The file each lane loads when it is not `model_path` (the ternary family: each backend's native format).
    lane_models: dict[str, Path] = field(default_factory=dict)
    # Each backend's own ids for the formatted prompt (the token parity check compared them with prompt_ids).
    backend_ids: dict[str, list[int]] = field(default_factory=dict)
    # The model's own chat template when it was rendered: source, sha256, BOS/EOS strings, bos_stripped.
    chat_template: dict[str, Any] | None = None
    # The implementation under test as receipts describe it (Implementation.describe()).
    implementation: dict[str, Any] = field(default_factory=dict)
    # Why the implementation under test produced nothing (crash, hang, malformed reply): every lane is an error.
    impl_error: str | None = None
    # Opens the implementation under test again (localisation, check/locate.py); None with --no-locate.
    open_impl: Callable[[], Implementation] | None = None
    # prepare()'s tokenizer workers, one per plan key, each handed to the first lane of that key: one worker
    # process per backend per run instead of one for tokenizing and another for the lane
    spare_workers: dict[str, Worker] = field(default_factory=dict)
    # The GGUF vocabulary, for the receipts' token_text (the report's token strip; check/pieces.py).
    vocab: pieces.Vocab | None = None
    # report.html, written beside the receipts once every lane has run (compare/report_html.py).
    report: Path | None = None
    # Lanes whose model prepare() loaded in the background while the implementation ran (check/early.py).
    opened: dict[str, early.OpenedLane] = field(default_factory=dict)

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.generated

    def take_worker(self, key: str) -> Worker | None:
        """The started worker of plan `key`, once (the caller owns it); None after that."""
        return self.spare_workers.pop(key, None)

    def close_workers(self) -> None:
        while self.spare_workers:
            self.spare_workers.popitem()[1].close()
        while self.opened:
            early.discard_lane(self.opened.popitem()[1])


@dataclass
class LaneResult:
    """The outcome of one lane."""

    backend: str
    status: str  # pass | diverged | error
    receipt_path: Path | None
    summary: dict[str, Any] | None
    error: str | None = None
    greedy: dict[str, Any] | None = None
    commit: str = ""
    verdict: dict[str, Any] | None = None  # the receipt's verdict (compare/calibrate.py)
    localisation: dict[str, Any] | None = None  # the receipt's localisation (check/locate.py), when it ran

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def _pad(n: int, multiple: int = 64) -> int:
    return max(multiple, -(-n // multiple) * multiple)


# The most precise configuration each backend accepts (ggml types: 0 = F32, 1 = F16).
# bitnet.cpp's fork rejects a V cache other than F16 unless flash attention is on, and flash attention with
# an F32 KV cache segfaults in llama_decode; K F32 + V F16 with flash attention off works (measured when the lanes were written; see docs/ARCHITECTURE.md, "Backends").
PRECISE_KV = {"llama": (0, 0, 0), "bitnet": (0, 1, 0)}


def lane_params(backend: str, opts: RunOptions, n_tokens: int) -> BackendParams:
    """Context parameters for a lane: most precise KV cache, flash attention off, fixed threads, one batch."""
    n_ctx = _pad(n_tokens)
    type_k, type_v, flash = PRECISE_KV.get(backend, (0, 0, 0))
    return BackendParams(
        n_ctx=n_ctx,
        n_threads=opts.threads,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        type_k=type_k,
        type_v=type_v,
        flash_attn=flash,
        seed=opts.seed,
    )


def prepare(
    opts: RunOptions, refs: list[ImplSpec], spawned: dict[str, Any] | None = None
) -> tuple[Shared, dict[str, build.BuildPlan]]:
    """Validate input, preflight backends, tokenize, check token parity, run the implementation under test once.

    `refs` are the reference lanes (inputs.reference_specs); `spawned`: check/prestart.py's started workers by plan
    key (taken from it). Returns the shared work and one build plan per plan key (ImplSpec.plan_key: a kind,
    or kind@source), the references' and a bridged --impl's."""
    spare: dict[str, Worker] = {}  # the tokenizer workers, handed to the lanes (Shared.take_worker)
    bg = early.Background(spawned=spawned if spawned is not None else {})  # check/early.py
    try:
        return _prepare(opts, refs, spare, bg)
    except BaseException:
        bg.discard()
        for w in spare.values():
            w.close()
        raise


def _prepare(
    opts: RunOptions, refs: list[ImplSpec], spare: dict[str, Worker], bg: early.Background
) -> tuple[Shared, dict[str, build.BuildPlan]]:
    impl_spec = impl_specs.parse(opts.impl)
    lane_backends = list(dict.fromkeys(r.kind for r in refs))
    t0 = time.perf_counter()
    lane_models: dict[str, Path] = {}  # lanes that load another file than numpy (the ternary family)
    if opts.model_gguf:
        model_path = Path(opts.model_gguf).expanduser().resolve()
        tok_path = Path(opts.tokenizer).expanduser().resolve() if opts.tokenizer else None
    elif opts.variant.startswith("ternary"):
        from parity.core import paths
        from parity.models import ternary_model

        model_path, default_tok, lane_models = ternary_model.run_models(
            opts.variant,
            paths.cache_dir() / "models" / "ternary",
            lane_backends,
            verbose=opts.verbose,
            repair=opts.repair,
        )
        tok_path = Path(opts.tokenizer).expanduser().resolve() if opts.tokenizer else default_tok
    else:
        model_path, default_tok = modelgen.default_model(opts.variant)
        tok_path = Path(opts.tokenizer).expanduser().resolve() if opts.tokenizer else default_tok
    lane_models = {b: lane for b, lane in lane_models.items() if lane != model_path}
    # one build per plan key: a kind, or kind@source for another source tree of that engine
    by_key = {r.plan_key: r for r in refs}
    bg.start_vocabs(by_key, lambda kind: lane_models.get(kind, model_path), opts)  # while the input is checked
    checked = inputs.check_input(opts, lane_backends, model_path, tok_path, lane_models)
    gguf, hf = checked.gguf, checked.hf
    plans = {key: inputs.preflight(r.kind, opts, r.get("source")) for key, r in by_key.items()}
    impl_plan: build.BuildPlan | None = plans.get(impl_spec.plan_key)
    if impl_spec.bridged and impl_plan is None:
        impl_plan = inputs.preflight(impl_spec.kind, opts, impl_spec.get("source"))
    seconds = {"load": time.perf_counter() - t0}

    # Tokenize with every backend (vocab only) and compare with the external tokenizer. The workers stay
    # started: each plan key's goes to its first lane (Shared.take_worker).
    t1 = time.perf_counter()
    backend_ids: dict[str, list[int]] = {}
    template, formatted, chat_record = inputs.tokenize_in_backends(
        opts, plans, by_key, spare, lane_models, model_path, gguf.metadata, hf, backend_ids, bg.started
    )
    assert formatted is not None, "prepare() needs at least one backend"
    first = next(iter(backend_ids.values()))
    for b, ids in backend_ids.items():  # backends must agree with each other too
        check_token_parity(first, ids, backend=b, ours_str=str, theirs_str=str)
    if hf is not None:
        prompt_ids = hf.encode(formatted)
        authority = hf.authority(len(prompt_ids))
    else:
        prompt_ids = first
        authority = {
            "source": "gguf_embedded",
            "path": str(model_path),
            "file_hash": gguf.sha256(),
            "config_hash": checked.vocab_hash,
            "token_count": len(prompt_ids),
        }
    # Which tokenizers produced exactly these ids, and whether the external vocabulary is the model's own.
    authority["checked_against"] = sorted(backend_ids)
    authority["gguf_config_hash"] = checked.vocab_hash
    seconds["tokenize"] = time.perf_counter() - t1

    n_total = len(prompt_ids) + opts.max_tokens
    if n_total > checked.n_ctx_train:
        raise UsageError(
            f"prompt ({len(prompt_ids)} tokens) + --max-tokens {opts.max_tokens} = {n_total} exceeds the model's "
            f"context of {checked.n_ctx_train} tokens",
            fix="shorten --prompt or lower --max-tokens",
        )

    def params_of(r: ImplSpec) -> BackendParams:
        return apply_spec(r, lane_params(r.kind, opts, n_total))

    # each lane's first worker loads the whole model while the implementation under test runs (check/early.py)
    bg.opened.update(early.open_lanes(refs, plans, spare, lambda k: lane_models.get(k, model_path), params_of, opts))
    t2 = time.perf_counter()
    # The implementation under test, once. Its own tokenizer (if it has one) joins the token parity check
    # (exit 2); its crash, hang or garbage is recorded and becomes an error in every lane (exit 1).
    generated: list[int] = []
    logits = np.zeros((0, 0), dtype=np.float32)
    described: dict[str, Any] = {"spec": impl_spec.text, "name": impl_spec.kind}
    impl_error: str | None = None
    try:
        with _open_impl(impl_spec, impl_plan, checked.engine, model_path, opts, n_total) as impl:
            described = impl.describe()
            own_ids = impl.tokenize(formatted, True, True)
            if own_ids is not None:
                check_token_parity(prompt_ids, own_ids, backend=impl_spec.text, ours_str=str, theirs_str=str)
                backend_ids[f"impl:{impl_spec.text}"] = own_ids
            generated = impl.greedy(prompt_ids, opts.max_tokens)
            logits = impl.logits(prompt_ids + generated)
    except WorkerError as exc:
        impl_error = str(exc)
    seconds["numpy_engine" if impl_spec.kind == "numpy" else "implementation"] = time.perf_counter() - t2
    shared = Shared(
        model_path,
        gguf.sha256(),
        gguf.architecture,
        template,
        formatted,
        prompt_ids,
        generated,
        logits,
        authority,
        checked.n_ctx_train,
        seconds,
        lane_models,
        backend_ids,
    )
    shared.chat_template = chat_record
    shared.spare_workers = spare
    shared.opened = dict(bg.opened)  # each lane collects its own (Shared.close_workers the rest)
    shared.implementation = described
    shared.impl_error = impl_error
    if opts.locate != "off":  # localisation reopens the implementation under test
        # --locate keeps the numpy engine for it; automatic localisation (a diverged lane) rebuilds it rather
        # than holding every run's dequantized weights through the lanes
        kept = checked.engine if opts.locate == "on" else None
        shared.open_impl = lambda: _open_impl(impl_spec, impl_plan, kept, model_path, opts, n_total)
    shared.vocab = pieces.Vocab.from_metadata(gguf.metadata)
    return shared, plans


def _open_impl(
    s: ImplSpec, plan: build.BuildPlan | None, engine: NumpyEngine | None, model: Path, opts: RunOptions, n_tokens: int
) -> Implementation:
    """The implementation under test, from the registry (the numpy engine pre-flight built is reused)."""
    ctx = OpenContext(
        model,
        params=lane_params(s.kind, opts, n_tokens) if s.bridged else None,
        plan=plan,
        eval_shape=opts.eval_shape,
        dtype=opts.dtype,
        log_dir=Path(opts.out_dir) / "logs",
        log_name=f"impl-{s.label}",
        verbose=opts.verbose,
        timeout=opts.timeout,
    )
    return open_implementation(s, ctx, engine)


def run_lane(lane: ImplSpec | str, p: build.BuildPlan, shared: Shared, opts: RunOptions, out_dir: Path) -> LaneResult:
    """Evaluate the shared sequence in the reference `lane` (a spec), compare, and write the lane's receipt."""
    lane = impl_specs.parse(lane) if isinstance(lane, str) else lane
    backend, label = lane.kind, lane.label
    eval_shape = lane.get("eval_shape") or opts.eval_shape
    info = build.read_receipt(p)
    params = apply_spec(lane, lane_params(backend, opts, len(shared.sequence)))
    th = metrics.Thresholds(opts.cos_tol, opts.mse_tol)
    base = _receipt_base(backend, p, info, shared, opts, params, th, eval_shape)
    if lane.options:  # the default lanes' receipts stay as they were
        base["reference"] = {"spec": lane.text, "lane": label}
    lane_model = shared.lane_models.get(backend, shared.model_path)
    if shared.impl_error is not None:  # (a model loaded for it is closed by Shared.close_workers)
        return _error_lane(label, p, base, f"the implementation under test failed: {shared.impl_error}", out_dir)
    ours, base["numerics"] = mirror.lane_logits(
        backend, lane_model, shared.sequence, shared.logits, shared.seconds, opts, params, eval_shape
    )
    if lane_model != shared.model_path:
        from parity.core.fs import sha256_file
        from parity.models import ternary_model

        lane_sha = sha256_file(lane_model)
        base["model"] = {"path": str(lane_model), "sha256": lane_sha, "architecture": shared.architecture}
        base["model_sha256"] = lane_sha
        base["implementation"]["model"] = {"path": str(shared.model_path), "sha256": shared.model_sha256}
        base["model"]["quantized_by"] = ternary_model.provenance(lane_model)
    t0 = time.perf_counter()
    opened = shared.opened.pop(label, None)  # its model loaded in the background (check/early.py)
    try:
        ref, opened_s = early.lane_reference(
            opened, lane, p, lane_model, params, eval_shape, opts, out_dir, lambda: shared.take_worker(lane.plan_key)
        )
        with ref:
            base["backend_info"]["api_generation"] = ref.hello["api_generation"]
            base["backend_info"]["system_info"] = ref.hello["system_info"]
            ref_logits = ref.logits(shared.sequence)
            if opts.numerics != "exact":  # measure how far the engine's other evaluation shape lands from this one
                other_shape = "stepwise" if eval_shape == "batch" else "batch"
                other = ref.evaluate(shared.sequence, other_shape)
                base["numerics"]["engine_shape_gap"] = mirror.numerics_gap(ref_logits, other, eval_shape)
            theirs = ref.greedy(shared.prompt_ids, opts.max_tokens)
            if np.shape(ref_logits) != np.shape(ours):  # e.g. a model whose vocabulary the engines read differently
                raise WorkerError(
                    f"{label} returned logits of shape {np.shape(ref_logits)}, the implementation under test "
                    f"{np.shape(ours)}: the two engines read this model differently",
                    fix="check the model's vocabulary size and tensor shapes",
                )
            floor = None  # the reference's own variation (check/floor.py), what a calibrated verdict is judged by
            if opts.verdict == "calibrated":
                floor = noise_floor.measure(
                    ref, ref_logits, shared.sequence, params, eval_shape, lane_model, base["model_sha256"], p
                )
    except WorkerError as exc:
        return _error_lane(label, p, base, str(exc), out_dir)
    rows = metrics.position_rows(ours, ref_logits, shared.sequence, metrics.parse_metrics(opts.metrics))
    summary = metrics.summarize(rows, th)
    # The greedy decode must match exactly, except a flip at a near-tie of the reference (metrics.greedy_check).
    greedy = metrics.greedy_check(shared.generated, theirs, ref_logits, len(shared.prompt_ids), opts.tie_margin)
    verdict, greedy, summary = noise_floor.judge(
        opts, ours, ref_logits, rows, summary, greedy, floor, len(shared.prompt_ids)
    )
    status = "pass" if summary["all_passed"] and greedy["verdict"] != "mismatch" else "diverged"
    loc = None
    if shared.open_impl is not None and localisation.wanted(opts.locate, status):
        loc = base["localisation"] = localisation.localise_lane(
            impl_open=shared.open_impl,
            plan=p,
            ref_spec=lane,
            lane_model=lane_model,
            lane_sha256=base["model_sha256"],
            params=params,
            tokens=shared.sequence,
            mode=opts.locate,
            log_dir=out_dir / "logs",
            label=label,
            verbose=opts.verbose,
            timeout=opts.timeout,
        )
        status = localisation.lane_status(opts.locate, status, loc)
    base.update(status=status, error=None, rows=rows, positions=len(rows), summary=summary, greedy=greedy)
    base["verdict"] = verdict
    if floor is not None:
        base["floor"] = floor
    base["token_text"] = pieces.token_text(shared.vocab, pieces.receipt_ids(shared.sequence, rows, theirs))
    base["seconds"] = {
        **{k: round(v, 4) for k, v in shared.seconds.items()},
        "lane": round(time.perf_counter() - t0, 4),
        **({"lane_open": round(opened_s, 4)} if opened_s is not None else {}),
        **({"floor": floor["seconds"]} if floor is not None else {}),
    }
    path = out_dir / f"receipt_{label}.json"
    receipts.write(path, base)
    return LaneResult(label, status, path, summary, greedy=greedy, commit=p.commit, verdict=verdict, localisation=loc)


def _error_lane(label: str, p: build.BuildPlan, base: dict[str, Any], error: str, out_dir: Path) -> LaneResult:
    """A lane that could not compare: its receipt says why (status error), never a pass."""
    base.update(
        status="error",
        error=error,
        rows=[],
        positions=0,
        summary={"all_passed": False, "first_divergence": None, "mean_mse": None, "mean_kl": None},
    )
    path = out_dir / f"receipt_{label}.json"
    receipts.write(path, base)
    return LaneResult(label, "error", path, None, error=error, commit=p.commit)


def _receipt_base(
    backend: str,
    p: build.BuildPlan,
    info: dict[str, Any],
    shared: Shared,
    opts: RunOptions,
    params: BackendParams,
    th: metrics.Thresholds,
    eval_shape: str,
) -> dict[str, Any]:
    return {
        "version": receipts.RECEIPT_VERSION,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": backend,
        "model": {"path": str(shared.model_path), "sha256": shared.model_sha256, "architecture": shared.architecture},
        "model_sha256": shared.model_sha256,
        "backend_info": {
            "name": backend,
            "commit": p.commit,
            "source_kind": p.source_kind,
            "source_fingerprint": p.source_fingerprint,
            "cmake": info.get("cmake", {}),
            "compiler": info.get("compiler", {}),
            "bridge": str(p.bridge_path),
        },
        "implementation": dict(shared.implementation),
        "run_config": {**params.to_dict(), "threads": params.n_threads, "eval_shape": eval_shape},
        "options": opts.to_dict(),
        "tokenizer_authority": shared.authority,
        "prompt": opts.prompt,
        "prompt_template": shared.template,
        "formatted_prompt": shared.formatted_prompt,
        "chat_template": shared.chat_template,
        "token_ids": shared.sequence,
        "prompt_tokens": len(shared.prompt_ids),
        "generated_tokens": len(shared.generated),
        "determinism_seed": opts.seed,
        "thresholds": th.to_dict(),
    }


def run(
    opts: RunOptions, lane_specs: list[str], spawned: dict[str, Any] | None = None
) -> tuple[Shared, list[LaneResult]]:
    """Prepare once, then run every reference lane to completion (a failed lane never stops the others).
    `spawned`: started workers by plan key (check/prestart.py; the ones used are taken from it)."""
    out_dir = Path(opts.out_dir)
    inputs.ensure_out_dir(out_dir)
    lanes = inputs.reference_specs(lane_specs)
    shared, plans = prepare(opts, lanes, spawned)
    try:
        return _run_lanes(opts, lanes, shared, plans, out_dir)
    finally:
        shared.close_workers()  # a tokenizer worker no lane took (e.g. every lane failed before starting)


def _run_lanes(
    opts: RunOptions, lanes: list[ImplSpec], shared: Shared, plans: dict[str, build.BuildPlan], out_dir: Path
) -> tuple[Shared, list[LaneResult]]:

    def one(lane: ImplSpec) -> LaneResult:
        try:
            return run_lane(lane, plans[lane.plan_key], shared, opts, out_dir)
        except Unsupported:  # --locate on an implementation that cannot capture tensors: exit 2, not a lane error
            raise
        except ParityError as exc:
            return LaneResult(lane.label, "error", None, None, error=str(exc), commit=plans[lane.plan_key].commit)

    if opts.parallel and len(lanes) > 1:
        # Each lane's C++ work happens in its own worker process; threads here only wait on them.
        with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
            results = list(pool.map(one, lanes))
    else:
        results = [one(lane) for lane in lanes]
    # report.html beside the receipts, rendered from them (compare/report_html.py)
    lanes_written = [(r.backend, r.receipt_path, r.error) for r in results]
    shared.report = report_html.write_run(out_dir, lanes_written, shared.model_path.name)
    return shared, results


def exit_code(results: list[LaneResult]) -> int:
    """0 when every lane passes, 1 when any lane diverged or failed."""
    return 0 if results and all(r.passed for r in results) else 1
