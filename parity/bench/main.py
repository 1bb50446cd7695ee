"""`parity bench`: throughput of every implementation on every model, baselines, and a regression gate.

What is timed: an evaluation is one `greedy(tokens, n_new)` call of a lane (parity.bench.lanes.Lane), timed
where it runs (C++ engines inside their worker process, so the pipe round trip is not part of any figure;
`rpc_overhead_ms` records it for reference). Every evaluation starts at position 0 with a fresh KV cache.
  pp  prompt processing: ONE evaluation of all P prompt positions (one batch, logits of the last position,
      as llama-bench's pp test does): `greedy(prompt, 1)`.
  tg  token generation: G greedy steps from a single token at depth 0, one token per evaluation (as
      llama-bench's tg test): `greedy([t0], G)`.
A sample is K back-to-back evaluations (tokens x K / their summed time), K chosen per lane and metric at
warm-up so that a sample lasts at least `min_sample_s` (bench_lanes.calibrate): a tiny model's 1.5 ms
evaluation is not left to one scheduler time slice. Samples are taken in interleaved rounds (one of each
lane, then the next round ...), each preceded by one untimed warm-up evaluation of that lane, so ratios such as
numpy / llama.cpp are measured under the same machine load. Each figure records what ran: evals_per_sample,
warmup_evals (calibration plus one per round) and timed_evals. Statistics and the gate rule: parity.bench.gate.

Cross-check (llama.cpp only, unless --no-llama-bench): llama.cpp's own llama-bench, built from the same pinned
source (parity.backends.tools), runs once per round of prompt processing (between our rounds) in two
configurations: `matched` against a second llama.cpp lane of ours with exactly its settings (batch sizes,
F16 KV cache because this llama-bench cannot select F32, flash attention off, threads, thread-pool polling,
one warm-up then `-r K` evaluations per invocation with K = our lane's evaluations per sample), and `default`
(llama-bench's defaults), reported beside our precise F32-KV lane. The medians of the matched pp samples must
agree within 10 % + noise, noise = relative MAD of both sides (exit 1 otherwise).

External implementations (`--impl 'cmd:ARGV'`, `--impl py:module:factory`, docs/PROTOCOL.md) time the same
evaluations from this process, around each protocol request, so their figures include the protocol
(parity.bench.lanes.ExternalLane); `logits:FILE` has nothing to time and is refused (exit 2).

Protocol overhead (issue 13; on by default, --no-protocol-probe skips it): the seconds one `logits` reply of
Gemma 3 270M's size (72 positions x 262,144 float32, 75.5 MB) takes through protocol v2 - parity's reader, a
real pipe, a real child process answering zeros (parity.bench.protocol_probe) - median of a few requests,
recorded as `protocol_overhead` and gated: above BAR_S (0.25 s) the run fails (exit 1).

Exit codes: 0 pass, no baseline yet, or baseline written; 1 gate failure, cross-check disagreement, an
implementation failing while measured, or the protocol overhead above its bar; 2 usage / backend unavailable;
5 build failure (llama-bench); 7 too noisy to judge (nothing failed, but a figure's noise band is wider than the
threshold: parity.bench.noise, parity.errors.TooNoisy).

Implementations are spec strings of the one registry (parity.engines.spec: `numpy`, `numpy:dtype=float64`,
`llama`, `llama:type_k=f16,flash_attn=on`, `bitnet`, ...; --impl, repeatable; default numpy, llama, and bitnet
where built). A lane is named by its spec's label (`llama-type_k-f16`) in the receipt, the report and the gate,
so the default lanes keep their names; a C++ lane's context parameters are the bench's base parameters (the
most precise configuration, parity.check.job.lane_params) with the spec applied (parity.engines.bridged.apply_spec,
see `lane_params`). Same-run ratios divide every other lane by the `llama` lane, when there is one.

Models and implementations are chosen in parity.bench.inputs. Errors go to parity.cli's one funnel: `run`
returns the exit code or raises ParityError. Python API: `finish(run_bench(opts), opts)`;
`run_bench(opts, open_lane=...)` takes the function that opens each lane (bench_lanes.open_lane), so a caller
can wrap an implementation, e.g. slow it down in a test.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity.backends import lock
from parity.backends import tools as build_tools
from parity.bench import gate as bench_gate
from parity.bench import host, inputs, llama_bench, protocol_probe
from parity.bench import lanes as bench_lanes
from parity.compare import receipts
from parity.core.fs import atomic_write_text
from parity.core.proc import log
from parity.engines.bridged import apply_spec
from parity.engines.spec import ImplSpec
from parity.errors import ParityError, TooNoisy, UsageError

if TYPE_CHECKING:
    from parity.backends.bridge import BackendParams

BENCH_VERSION = 2
SCHEMA_PATH = bench_gate.SCHEMA_PATH
XCHECK_LABEL = bench_lanes.XCHECK_LABEL  # our llama.cpp lane in the configuration llama-bench can also express


@dataclass(frozen=True)
class BenchOptions:
    """Resolved `parity bench` settings (recorded in the receipt)."""

    models: tuple[str, ...] = ("default-f32",)
    impls: tuple[str, ...] = ()  # spec strings; empty: numpy, llama, and bitnet when its build is present
    prompt_tokens: int = 64
    gen_tokens: int = 16
    reps: int = 5
    threads: int = 1
    out_dir: str = ".parity/bench"
    baseline: bool = False
    llama_bench: bool = True
    format: str = "text"
    verbose: bool = False
    max_drop: float = bench_gate.THRESHOLD
    min_sample_s: float = bench_lanes.MIN_SAMPLE_S
    cross_check_threads: int = 1
    protocol_probe: bool = True  # measure (and gate) the protocol overhead on Gemma-sized logits
    harness_overhead: bool = True  # time `parity run` against the engines' own work (parity.bench.overhead)
    suite_rate: tuple[str, str] | None = None  # BASE, OTHER: parity suite vs llama-perplexity (bench.suite_rate)
    suite_rate_ctx: int = 256
    suite_ray: tuple[str, str] | None = None  # BASE, OTHER: 2 Ray actors vs 1 local worker (bench.suite_ray)

    def validate(self) -> None:
        """Reject values that cannot work, naming the flag."""
        for flag, value in (("--prompt-tokens", self.prompt_tokens), ("--gen-tokens", self.gen_tokens)):
            if value < 1:
                raise UsageError(f"{flag} must be >= 1, got {value}")
        if not 0.0 < self.max_drop < 1.0:
            raise UsageError(f"--max-drop must be in (0, 1), got {self.max_drop}", fix="e.g. --max-drop 0.10")
        if self.reps < 1:
            raise UsageError(f"--reps must be >= 1, got {self.reps}", fix="e.g. --reps 5")
        if self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.cross_check_threads < 1:
            raise UsageError(f"--cross-check-threads must be >= 1, got {self.cross_check_threads}")
        if not 0.0 < self.min_sample_s <= 10.0:
            raise UsageError(f"min_sample_s must be in (0, 10] seconds, got {self.min_sample_s}")
        inputs.parse_impls(self.impls)


# ------------------------------------------------------------------------------------------------ schema


def schema() -> dict[str, Any]:
    """The bench receipt JSON Schema."""
    return receipts.schema(SCHEMA_PATH)


def validation_errors(receipt: Any) -> list[str]:
    """Human-readable schema violations of a bench receipt (empty when valid)."""
    return receipts.validation_errors(receipt, SCHEMA_PATH)


def write_receipt(path: Path, receipt: dict[str, Any]) -> None:
    """Validate, then write atomically; a receipt violating its schema is a bug and is never written."""
    receipts.write(path, receipt, SCHEMA_PATH)


# -------------------------------------------------------------------------------------------- the run


def lane_params(spec: ImplSpec, opts: BenchOptions) -> BackendParams | None:
    """A C++ lane's context parameters: the bench's base parameters for its kind (the most precise
    configuration, one batch of prompt + generated tokens, --threads) with the spec applied; None for numpy."""
    return apply_spec(spec, _base_params(spec.kind, opts)) if spec.bridged else None


def _base_params(kind: str, opts: BenchOptions) -> BackendParams:
    """parity.check.job.lane_params of `kind` (its most precise configuration) for one batch of the bench's
    prompt + generated tokens, at --threads."""
    from parity.check.job import lane_params as base_params

    return base_params(kind, _run_options(opts), opts.prompt_tokens + opts.gen_tokens)


def llama_lane(impls: dict[str, inputs.Impl]) -> inputs.Impl | None:
    """The llama.cpp lane the cross-check uses (the plain `llama` lane, else the first of kind llama); llama-bench
    is built from the same source tree, so the two always time the same code."""
    lanes = [i for i in impls.values() if i.spec.kind == "llama"]
    return next((i for i in lanes if i.spec.plan_key == "llama"), lanes[0] if lanes else None)


def bench_model(
    model: inputs.ModelRef,
    impls: dict[str, inputs.Impl],
    opts: BenchOptions,
    tools: build_tools.ToolsPlan | None = None,
    open_lane: bench_lanes.LaneOpener = bench_lanes.open_lane,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Results of every lane (by label) on one model, plus extras: architecture, samples, cross-check lane,
    and llama-bench's figures (run between our repetitions when `tools` is given)."""
    out_dir = Path(opts.out_dir)
    log_dir = out_dir / "logs"
    results = {label: _result(model, i.spec) for label, i in impls.items()}
    wanted = [
        bench_lanes.LaneSpec(label, i.spec, i.plan, model.path, lane_params(i.spec, opts), log_dir, opts.threads)
        for label, i in impls.items()
    ]
    xlane, xparams = llama_lane(impls), xcheck_params(opts)
    xplan = xlane.plan if xlane is not None else None
    if xplan is not None and tools is not None:
        wanted.append(bench_lanes.LaneSpec(XCHECK_LABEL, ImplSpec("llama"), xplan, model.path, xparams, log_dir))
    lanes: list[bench_lanes.Lane] = []
    extra: dict[str, Any] = {"architecture": None, "xcheck": None, "llama_bench": []}
    for spec in wanted:
        label = spec.label
        try:
            lane = open_lane(spec)
        except ParityError as exc:
            if label in results:
                results[label].update(status="unavailable", reason=str(exc).splitlines()[0])
            log(f"bench: {label} cannot load {model.name}: {str(exc).splitlines()[0]}")
            continue
        extra["architecture"] = extra["architecture"] or lane.architecture
        lanes.append(lane)
    if lanes and not extra["architecture"]:  # only external engines, which do not report it: the model's own
        from parity.gguf.reader import open_gguf

        extra["architecture"] = open_gguf(model.path).architecture
    runner: llama_bench.LlamaBenchRunner | None = None
    lb_errors: list[ParityError] = []

    def between() -> None:
        if runner is not None and not lb_errors:
            try:
                runner.run_once()
            except ParityError as exc:  # raised after our lanes are closed
                lb_errors.append(exc)

    figures: dict[str, dict[str, bench_lanes.Figure]] = {}  # lane label -> metric -> how it was measured
    try:
        if lanes:
            figures = bench_lanes.calibrate(lanes, opts.prompt_tokens, opts.gen_tokens, opts.min_sample_s)
            if tools is not None and XCHECK_LABEL in figures:
                # llama-bench's repetitions per invocation = our matched lane's evaluations per sample: both
                # sides then run one warm-up and k timed evaluations per round, and their k sum to a sample
                runner = llama_bench.LlamaBenchRunner(
                    tools,
                    model.path,
                    opts.prompt_tokens,
                    opts.gen_tokens,
                    opts.threads,
                    xparams.to_dict(),
                    figures[XCHECK_LABEL]["pp"].evals_per_sample,
                )
            bench_lanes.measure(lanes, figures, opts.prompt_tokens, opts.gen_tokens, opts.reps, between)
    except ParityError as exc:
        for lane in lanes:
            if lane.label in results:
                results[lane.label].update(status="error", reason=str(exc).splitlines()[0])
        figures = {}
    finally:
        for lane in lanes:
            try:
                lane.record.update(lane.close())
            except ParityError as exc:
                lane.record.update(peak_rss_bytes=None, rss_method=f"unavailable: {exc}")
    for lane in lanes:
        record = {**lane.record, "evaluations": lane.evaluations}
        stats = {m: f.stats() for m, f in figures.get(lane.label, {}).items() if f.samples}
        if lane.label == XCHECK_LABEL:
            extra["xcheck"] = {**record, **stats} if stats else None
            continue
        results[lane.label].update(record)
        if stats and results[lane.label]["status"] == "ok":
            results[lane.label].update(stats)
        elif results[lane.label]["status"] == "ok":
            results[lane.label].update(status="error", reason="no samples were measured")
    if lb_errors:
        raise lb_errors[0]
    if runner is not None:
        extra["llama_bench"] = runner.results(out_dir, model.name)
    extra["samples"] = {label: {m: f.samples for m, f in per.items()} for label, per in figures.items()}
    extra["cpu_wait"] = {label: {m: f.cpu_wait for m, f in per.items()} for label, per in figures.items()}
    extra["cpu_pressure"] = {label: {m: f.cpu_pressure for m, f in per.items()} for label, per in figures.items()}
    return list(results.values()), extra


def xcheck_params(opts: BenchOptions) -> BackendParams:
    """Our llama.cpp lane in the configuration llama-bench `matched` runs (parity.bench.llama_bench.matched_flags),
    from the base parameters of the `llama` kind (whatever --impl specs the run has).

    Batch sizes: one batch holding prompt + generated tokens (llama-bench clamps n_batch to its context, which
    llama.cpp pads to 256 on both sides, so both evaluate the prompt as one ubatch). KV cache F16 (this
    llama-bench cannot select F32), flash attention off. Threads: --cross-check-threads (default 1, see
    parity.bench.command.CROSS_CHECK_THREADS_HELP).
    """
    n = opts.prompt_tokens + opts.gen_tokens
    return dataclasses.replace(
        _base_params("llama", opts),
        n_ctx=n,
        n_batch=n,
        n_ubatch=n,
        type_k=1,
        type_v=1,
        flash_attn=0,
        n_threads=opts.cross_check_threads,
    )


def _result(model: inputs.ModelRef, spec: ImplSpec) -> dict[str, Any]:
    """A lane's result, named by its spec's label (`impl`, what the gate matches) and spec string (`spec`)."""
    return {
        "model_sha256": model.sha256,
        "impl": spec.label,
        "spec": spec.text,
        "status": "ok",
        "reason": None,
        "pp": None,
        "tg": None,
    }


def _run_options(opts: BenchOptions) -> Any:
    from parity.options import RunOptions

    return RunOptions(threads=opts.threads)


def ratios(
    model: inputs.ModelRef,
    samples: dict[str, dict[str, list[float]]],
    cpu_wait: dict[str, dict[str, float | None]] | None = None,
    cpu_pressure: dict[str, dict[str, float | None]] | None = None,
) -> list[dict[str, Any]]:
    """Same-run ratios lane ÷ llama.cpp (the `llama` lane) per metric, from per-repetition pairs; every other
    lane in order, the cross-check lane excepted (default: numpy/llama, bitnet/llama). A ratio's cpu_wait
    combines both lanes' (either side's waiting moves it): 1 - (1 - w_lane)(1 - w_llama)."""
    out: list[dict[str, Any]] = []
    if "llama" not in samples:
        return out
    for impl in samples:
        if impl in ("llama", XCHECK_LABEL):
            continue
        for metric in bench_gate.METRICS:
            if impl in samples and samples[impl][metric] and samples["llama"][metric]:
                qs = bench_gate.ratio_samples(samples[impl][metric], samples["llama"][metric])
                stats = bench_gate.summarize(qs)
                waits = [(cpu_wait or {}).get(lane, {}).get(metric) for lane in (impl, "llama")]
                if None not in waits:
                    stats["cpu_wait"] = 1 - (1 - waits[0]) * (1 - waits[1])  # type: ignore[operator]
                pressures = [(cpu_pressure or {}).get(lane, {}).get(metric) for lane in (impl, "llama")]
                if None not in pressures:
                    stats["cpu_pressure"] = max(pressures)  # type: ignore[type-var]
                out.append({"model_sha256": model.sha256, "name": f"{impl}/llama", "metric": metric, "stats": stats})
    return out


def run_bench(opts: BenchOptions, open_lane: bench_lanes.LaneOpener = bench_lanes.open_lane) -> dict[str, Any]:
    """Measure everything, cross-check with llama-bench, gate against the baseline; returns the receipt.

    `open_lane` opens each implementation's lane (bench_lanes.open_lane); a caller may wrap what it returns,
    e.g. a test that slows one engine down inside its timed region to see the gate fail.
    """
    opts.validate()
    out_dir = Path(opts.out_dir)
    from parity.check.inputs import ensure_out_dir

    ensure_out_dir(out_dir)
    models = [inputs.resolve_model(m) for m in dict.fromkeys(opts.models)]
    impls = inputs.select_impls(opts.impls, opts.verbose)
    tools: build_tools.ToolsPlan | None = None
    xlane = llama_lane(impls)
    if xlane is not None and opts.llama_bench:
        spec = lock.get_spec("llama")
        source = lock.source_override(spec, xlane.spec.get("source"))
        tools = build_tools.ensure_llama_bench(spec, source, verbose=opts.verbose)
    receipt: dict[str, Any] = {
        "kind": "parity-bench",
        "version": BENCH_VERSION,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": host.machine_info(),
        "settings": {
            "prompt_tokens": opts.prompt_tokens,
            "gen_tokens": opts.gen_tokens,
            "reps": opts.reps,
            "min_sample_s": opts.min_sample_s,
            "threads": opts.threads,
            "cross_check_threads": opts.cross_check_threads,
            "numpy_dtype": "float32",
            "threshold": opts.max_drop,
        },
        "models": [],
        "results": [],
        "ratios": [],
        "llama_bench": [],
        "cross_check": [],
    }
    with host.blas_threads(opts.threads) as blas:
        receipt["settings"]["numpy_blas_threads"] = blas
        for model in models:
            bench_one(receipt, model, impls, opts, tools, open_lane)
    if tools is not None:
        receipt["settings"]["llama_bench_binary"] = str(tools.binary)
    if opts.protocol_probe:
        log(
            f"bench: protocol overhead: {protocol_probe.SAMPLES} logits replies of "
            f"{protocol_probe.POSITIONS} x {protocol_probe.VOCAB} float32 through protocol v2"
        )
        receipt["protocol_overhead"] = protocol_probe.measure(log_dir=out_dir / "logs")
    if opts.suite_rate:
        from parity.bench import suite_rate

        base, other = (inputs.resolve_model(m).path for m in opts.suite_rate)
        receipt["suite_rate"] = suite_rate.measure(
            base, other, suite_rate.TEXT, out_dir / "suite_rate", ctx=opts.suite_rate_ctx, threads=opts.threads
        )
    if opts.suite_ray:
        from parity.bench import suite_ray

        base, other = (inputs.resolve_model(m).path for m in opts.suite_ray)
        receipt["suite_ray"] = suite_ray.measure(
            base, other, suite_ray.TEXT, out_dir / "suite_ray", ctx=opts.suite_rate_ctx, chunks=suite_ray.CHUNKS
        )
    return receipt


def bench_one(
    receipt: dict[str, Any],
    model: inputs.ModelRef,
    impls: dict[str, inputs.Impl],
    opts: BenchOptions,
    tools: build_tools.ToolsPlan | None,
    open_lane: bench_lanes.LaneOpener = bench_lanes.open_lane,
) -> None:
    """Benchmark one model and add its figures to the receipt."""
    log(f"bench: {model.name} ({model.path}) x {', '.join(i.spec.text for i in impls.values())}: {opts.reps} reps")
    results, extra = bench_model(model, impls, opts, tools, open_lane)
    receipt["models"].append({**model.to_dict(), "architecture": extra["architecture"]})
    receipt["results"] += results
    receipt["ratios"] += ratios(model, extra["samples"], extra["cpu_wait"], extra["cpu_pressure"])
    runs = extra["llama_bench"]
    receipt["llama_bench"] += [{"model_sha256": model.sha256, **r} for r in runs]
    if extra["xcheck"] is not None and runs:
        receipt["cross_check"] += llama_bench.cross_check(model.sha256, extra["xcheck"], runs)
    ok = {r["impl"] for r in results if r["status"] == "ok"}
    if opts.harness_overhead and {"numpy", "llama"} <= ok:
        from parity.bench import overhead

        out = Path(opts.out_dir) / "overhead" / bench_gate.slugify(model.name)
        record = overhead.measure(model, impls["llama"], out, opts.gen_tokens, opts.threads, open_lane)
        receipt.setdefault("harness_overhead", []).append(record)


def finish(receipt: dict[str, Any], opts: BenchOptions) -> int:
    """Write the receipt (and the baseline), apply the gate, write the report; return the exit code."""
    from parity.bench import report as bench_report

    out_dir = Path(opts.out_dir)
    gate: dict[str, Any] = {"baseline": None, "note": "", "threshold": opts.max_drop, "rows": []}
    if opts.baseline:
        directory = bench_gate.baseline_dir()
        path = directory / bench_gate.baseline_name(time.strftime("%Y%m%d"), receipt["machine"]["slug"])
        gate.update(baseline=str(path), note=f"baseline written: {path}")
        status = "baseline-written"
    else:
        path_found, note = bench_gate.find_baseline(receipt)
        gate["note"] = note
        if path_found is None:
            gate["note"] += "; create one with `parity bench --baseline` (same flags)"
            status = "no-baseline"
        else:
            rows = bench_gate.compare(bench_gate.load_baseline(path_found), receipt, opts.max_drop)
            gate.update(baseline=str(path_found), rows=[r.to_dict() for r in rows])
            status = "fail" if bench_gate.gate_failed(rows) else "too-noisy" if bench_gate.gate_noisy(rows) else "pass"
    receipt["gate"] = gate
    receipt["status"] = status
    if bench_gate.failure_reasons(receipt):
        receipt["exit_code"] = 1
    elif bench_gate.noisy_reasons(receipt):
        receipt["exit_code"] = TooNoisy.exit_code
    else:
        receipt["exit_code"] = 0
    write_receipt(out_dir / "bench.json", receipt)
    if opts.baseline:
        write_receipt(Path(gate["baseline"]), receipt)
    atomic_write_text(out_dir / "report.html", bench_report.render_html(receipt))
    print(json.dumps(receipt, indent=2) if opts.format == "json" else bench_report.render_text(receipt))
    return int(receipt["exit_code"])
