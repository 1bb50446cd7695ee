"""Receipts for the HTML report tests (unit and headless Chromium), made by parity's own code paths.

The rows come from compare/metrics.py on synthetic logits, the localisation from compare/locate.py on a toy
graph with one planted bug (Qcur-3 scaled), so the report is rendered from what a real receipt holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.compare import calibrate, locate, metrics, receipts

H = "a" * 64
N_PROMPT, N_GEN, VOCAB = 20, 4, 48
LAYERS, OPS = 6, ("attn_norm", "Qcur", "Kcur", "kqv_out", "ffn_inp", "ffn_out", "l_out")
PLANTED = "Qcur-3"
SCRIPT_PIECE = "<script>console.error('injected by a token piece')</script>"


def _logits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ref, ours, and the reference in another configuration (its own variation): (n, VOCAB) each."""
    rng = np.random.default_rng(seed)
    n = N_PROMPT + N_GEN
    ref = rng.standard_normal((n, VOCAB)) * 3
    grow = np.geomspace(1e-7, 3e-1, n)[:, None]  # the error grows over five decades along the sequence
    ours = ref + grow * rng.standard_normal((n, VOCAB))
    other = ref + 1e-4 * rng.standard_normal((n, VOCAB))
    return ref, ours, other


def localisation() -> dict[str, Any]:
    """Replay localisation of a toy graph whose Qcur-3 is 5% off: exactly one op out of tolerance."""
    rng = np.random.default_rng(1)
    names = ["inp_embd"] + [f"{op}-{il}" for il in range(LAYERS) for op in OPS] + ["result_norm", "result_output"]
    ref = {name: rng.standard_normal((N_PROMPT, 32)).astype(np.float32) for name in names}
    other = {k: (v * (1 + 1e-4 * rng.standard_normal(v.shape))).astype(np.float32) for k, v in ref.items()}
    impl = {k: (v * (1 + 1e-4 * rng.standard_normal(v.shape))).astype(np.float32) for k, v in ref.items()}
    impl[PLANTED] = impl[PLANTED] * np.float32(1.05)
    noise = locate.noise_levels(ref, other)
    replay = locate.localise(impl, ref, noise, "replay").to_dict()
    # free-running: the planted error carries on through every later tensor, growing a little per op
    order = locate.graph_order(ref)
    free = dict(impl)
    for i, name in enumerate(order[order.index(PLANTED) + 1 :]):
        free[name] = (impl[name] * np.float32(1 + 0.05 * (1.1**i))).astype(np.float32)
    return {**replay, "free": locate.localise(free, ref, noise, "free").to_dict()}


def lane_receipt(*, floor: bool = True, localised: bool = True, label: str = "llama") -> dict[str, Any]:
    """A version 2 receipt (plus the optional report fields) of one diverging lane."""
    ref, ours, other = _logits()
    ids = [int(t) for t in np.random.default_rng(2).integers(0, VOCAB, N_PROMPT + N_GEN)]
    rows = metrics.position_rows(ours.astype(np.float32), ref.astype(np.float32), ids)
    th = metrics.Thresholds(0.999, 0.01)
    summary = metrics.summarize(rows, th)
    greedy = metrics.greedy_check(ids[N_PROMPT:], [*ids[N_PROMPT : N_PROMPT + 2], 7, 8], ref, N_PROMPT, 0.01)
    text = {str(i): f"t{i}" for i in range(VOCAB)}
    text[str(ids[3])] = SCRIPT_PIECE
    text[str(ids[4])] = ' "quoted" & <b>bold</b>\n'
    r: dict[str, Any] = {
        "version": 2,
        "timestamp": "2026-01-01T00:00:00Z",
        "model": {"path": "/models/m.gguf", "sha256": H},
        "backend": "llama",
        "prompt": "What is <2+2>?",
        "positions": len(rows),
        "thresholds": th.to_dict(),
        "rows": rows,
        "summary": summary,
        "status": "diverged",
        "error": None,
        "greedy": greedy,
        "tokenizer_authority": {
            "source": "external",
            "path": "t.json",
            "file_hash": H,
            "config_hash": H,
            "token_count": N_PROMPT,
        },
        "prompt_template": "raw",
        "formatted_prompt": "What is <2+2>?",
        "determinism_seed": 0,
        "model_sha256": H,
        "backend_info": {"name": "llama", "commit": "0123456789abcdef"},
        "run_config": {
            "threads": 2,
            "n_ctx": 64,
            "n_batch": 64,
            "n_ubatch": 64,
            "type_k": 0,
            "type_v": 0,
            "flash_attn": 0,
            "eval_shape": "batch",
        },
        "token_ids": ids,
        "prompt_tokens": N_PROMPT,
        "generated_tokens": N_GEN,
        "implementation": {"name": "numpy", "spec": "numpy"},
        "token_text": text,
    }
    if label != "llama":
        r["reference"] = {"spec": label, "lane": label}
    if floor:  # the reference against itself in another configuration, judged as check/floor.py does
        eps = calibrate.rounding_epsilon(ref, calibrate.U_F32, 4)
        configs, floor_rows, floor_summary = calibrate.measure_floor(ref, {"stepwise": other}, eps)
        r["floor"] = {
            "configs": [{**c, "status": "measured"} for c in configs],
            "rows": floor_rows,
            "summary": floor_summary,
            "rounding": {"unit_roundoff": calibrate.U_F32, "format": "F32", "n_matmul": 4},
            "cache": {"hit": False, "key": H},
            "seconds": 0.0,
        }
        v = r["verdict"] = calibrate.verdict(ours, ref, floor_rows, floor_summary, 0.01)
        first = None if v["first"] is None else rows[v["first"]]
        r["summary"] = {  # as check/floor.judge: the summary follows the calibrated verdict
            **summary,
            "all_passed": v["passed"],
            "first_divergence": None if first is None else metrics.divergence_record(first),
        }
        r["version"] = 3
    if localised:
        r["localisation"] = localisation()
    return r


def valid(r: dict[str, Any]) -> list[str]:
    """Schema violations of `r` (parity/schema/receipt.schema.json)."""
    return receipts.validation_errors(r)


SUITE_SCRIPT_ID = "<script>console.error('injected by an item id')</script>"


def suite_receipt() -> tuple[dict[str, Any], np.ndarray]:
    """A suite receipt as parity.suite.receipt.build makes it (stats, verdicts), and every position's KLD.

    Six items: KLD spread over decades, one failing its limit, one whose evaluation failed, one whose id is
    markup. The figures come from parity.suite.stats / verdicts on synthetic per-position values."""
    from parity.suite import stats, verdicts

    rng = np.random.default_rng(3)
    th = verdicts.Thresholds(1e-3)
    ids = ["fox", SUITE_SCRIPT_ID, "arith", "story", "broken", "code"]
    rows, parts = [], []
    for i, item_id in enumerate(ids):
        n = 40
        if item_id == "broken":
            rows.append(verdicts.item_row(i, item_id, n, None, "the reference's worker crashed (signal 11) <core>", th))
            continue
        scale = 1e-2 if item_id == "story" else 1e-5
        kld = scale * rng.lognormal(0.0, 1.5, n - 1)
        p_ref = rng.uniform(0.1, 0.9, n - 1)
        p_impl = np.clip(p_ref + rng.normal(0, 1e-3, n - 1), 1e-6, 1)
        values = stats.PositionStats(
            "float64",
            item=np.full(n - 1, i, np.int64),
            position=np.arange(n - 1, dtype=np.int64),
            token=np.arange(n - 1, dtype=np.int64),
            logp_ref=np.log(p_ref),
            logp_impl=np.log(p_impl),
            kld=kld,
            p_ref=p_ref,
            p_impl=p_impl,
            same_top=rng.uniform(size=n - 1) > 0.02,
        )
        parts.append(values)
        rows.append(verdicts.item_row(i, item_id, n, values, None, th))
    everything = stats.concat(parts)
    summary = stats.summarize(everything)
    verdict = verdicts.overall(rows, th)
    side = {"spec": "numpy", "label": "numpy", "model": {"path": "/models/m.gguf", "sha256": H}, "describe": None}
    receipt = {
        "kind": "parity-suite",
        "version": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "parity_version": "0.1.0",
        "suite_key": H,
        "input": {"mode": "prompts", "path": "p.jsonl", "sha256": H, "ctx": None, "n_items": 6, "n_tokens": 240},
        "scoring": {"mode": "all", "description": "every position", "n_positions": len(everything)},
        "implementation": side,
        "reference": {**side, "spec": "llama", "label": "llama"},
        "executor": {"kind": "local", "workers": 1, "shard": None, "seconds": 1.0, "tokens_per_second": 240.0},
        "verdict": verdict,
        "complete": True,
        "n_items": len(rows),
        "n_done": len(parts),
        "missing": [],
        "statistics": summary,
        "statistics_text": stats.format_text(summary),
        "items": rows,
        "worst": verdicts.worst(rows),
        "histogram": verdicts.histogram(np.asarray(everything.kld)),
        "status": verdict["status"],
        "exit_code": verdicts.EXIT_CODES[verdict["status"]],
        "report_html": None,
    }
    return receipt, np.asarray(everything.kld)
