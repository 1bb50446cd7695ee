"""The one summary a run prints: text for people, JSON (--format json) for machines."""

from __future__ import annotations

import json
from typing import Any

from parity.check.job import LaneResult, Shared
from parity.compare import locate


def as_dict(shared: Shared, results: list[LaneResult], code: int) -> dict[str, Any]:
    """The JSON summary: tokenizer_authority, lanes.<backend>, overall."""
    lanes = {}
    for r in results:
        s = r.summary or {}
        lanes[r.backend] = {
            "backend": r.backend,
            "commit": r.commit,
            "status": r.status,
            "error": r.error,
            "first_divergence": s.get("first_divergence"),
            "min_cosine": s.get("min_cosine"),
            "mean_cosine": s.get("mean_cosine"),
            "mean_mse": s.get("mean_mse"),
            "max_abs": s.get("max_abs"),
            "mean_kl": s.get("mean_kl"),
            "top1_agreement_decisive": s.get("top1_agreement_decisive"),
            "greedy": r.greedy,
            "verdict": _verdict_brief(r.verdict),
            "localisation": None if r.localisation is None else locate.summary_line(r.localisation),
            "receipt": str(r.receipt_path) if r.receipt_path else None,
        }
    return {
        "model": {"path": str(shared.model_path), "sha256": shared.model_sha256},
        "tokenizer_authority": shared.authority,
        "prompt_template": shared.template,
        "chat_template": shared.chat_template,
        "prompt_tokens": len(shared.prompt_ids),
        "generated_tokens": len(shared.generated),
        "lanes": lanes,
        "overall": {
            "status": "pass" if code == 0 else "fail",
            "tokenizer_consistent": tokenizer_consistent(shared),
            "tokenizer_checked_against": shared.authority.get("checked_against", []),
            "lanes_passed": sum(r.passed for r in results),
            "lanes": len(results),
            "exit_code": code,
            "report": str(shared.report) if shared.report else None,
        },
    }


def _verdict_brief(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """The receipt's verdict without its per-flip lists (those stay in the receipt)."""
    if v is None:
        return None
    return {k: v.get(k) for k in ("mode", "statistic", "k", "value", "floor", "ratio", "margin", "passed", "reason")}


def verdict_line(v: dict[str, Any]) -> str:
    """Why the lane passed or failed, in one line (floor units for a calibrated verdict)."""
    if v["mode"] == "fixed":
        return f"fixed tolerances: {v['reason']}"
    margin = v.get("margin")
    tail = "" if margin is None else f" - margin {margin:.2g} floor units"
    return f"{v['reason']}{tail}"


def _g(x: Any, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def greedy_line(g: dict[str, Any], backend: str) -> str:
    """The greedy verdict in words (metrics.greedy_check): identical, tie flip at step k (gap g), or MISMATCH."""
    k = g["first_difference"]
    if k is None:
        return f"identical ({len(g['ours'])} tokens)"
    what = "tie flip" if g.get("verdict") == "tie_flip" else "MISMATCH"
    rel = "<" if what == "tie flip" else ">="
    gap = g.get("ref_prob_gap")
    gap_s = "n/a" if gap is None else f"{gap:.3g}"
    why = f"gap {gap_s} {rel} tie margin {g.get('tie_margin')}"
    if g.get("floor_tie"):  # calibrate.greedy_with_floor: the reference's own lead movement covers it
        why = f"gap {gap_s}, within the reference's own movement"
    return f"{what} at step {k} ({why}): ours {g['ours']} vs {backend} {g['theirs']}"


def tokenizer_consistent(shared: Shared) -> bool:
    """True when every backend's tokenizer produced exactly the prompt ids the run used (False if none ran)."""
    return bool(shared.backend_ids) and all(ids == shared.prompt_ids for ids in shared.backend_ids.values())


def as_text(shared: Shared, results: list[LaneResult], code: int) -> str:
    """Human summary: Tokenizer Authority, one section per lane, Overall Status."""
    a = shared.authority
    out = [
        f"parity: {shared.model_path.name} (sha256 {shared.model_sha256[:12]}) - {len(shared.prompt_ids)} prompt tokens"
        f" + {len(shared.generated)} generated - template {shared.template}",
        "",
        "Tokenizer Authority",
        f"  source        {a['source']}  ({a['path']})",
        f"  config hash   {a['config_hash'][:16]}   file hash {a['file_hash'][:16]}   tokens {a['token_count']}",
    ]
    for r in results:
        s = r.summary or {}
        commit = r.commit[:12] if all(c in "0123456789abcdef" for c in r.commit) else r.commit
        out += ["", f"Lane {r.backend}  (commit {commit})", f"  status        {r.status.upper()}"]
        if r.error:
            out += [
                f"  error         {line}" if i == 0 else f"                {line}"
                for i, line in enumerate(r.error.splitlines())
            ]
        if s:
            fd = s["first_divergence"]
            out.append(
                "  first div.    none"
                if fd is None
                else f"  first div.    position {fd['pos']}: cosine {fd['cosine']:.8f}, MSE {fd['mse']:.3g}, "
                f"token {fd['token_id']} (ours top-1 {fd['ours_top1']}, theirs {fd['ref_top1']})"
            )
            out.append(f"  cosine        min {_g(s['min_cosine'], '.10f')}  mean {_g(s['mean_cosine'], '.10f')}")
            out.append(
                f"  error         mean MSE {_g(s['mean_mse'], '.3g')}  max |Δ| {_g(s['max_abs'], '.3g')}  mean KL"
                f" {_g(s['mean_kl'], '.3g')}  top-1 {_pct(s['top1_agreement_decisive'])} "
                f"({s['decisive_positions']} decisive positions)"
            )
        if r.verdict is not None:
            out.append(f"  verdict       {verdict_line(r.verdict)}")
        if r.localisation is not None:
            out.append(f"  localisation  {locate.summary_line(r.localisation)}")
        if r.greedy is not None:
            out.append(f"  greedy        {greedy_line(r.greedy, r.backend)}")
        if r.receipt_path:
            out.append(f"  receipt       {r.receipt_path}")
    status = "PASS" if code == 0 else "FAIL"
    checked = ", ".join(a.get("checked_against", []))
    same_vocab = (
        "same vocabulary as the GGUF"
        if a.get("gguf_config_hash") == a["config_hash"]
        else "vocabulary hash differs from the GGUF's"
    )
    out += [
        "",
        f"Overall Status: {status} - {sum(r.passed for r in results)}/{len(results)} lanes pass (exit {code})",
        f"  tokenizer     consistent: {a['source']} tokenizer and {checked} gave identical ids ({same_vocab})"
        if tokenizer_consistent(shared)
        else f"  tokenizer     NOT consistent: {a['source']} tokenizer vs {checked} ({same_vocab})",
    ]
    if shared.report:
        out.append(f"  report        {shared.report}")
    return "\n".join(out)


def render(fmt: str, shared: Shared, results: list[LaneResult], code: int) -> str:
    return json.dumps(as_dict(shared, results, code), indent=2) if fmt == "json" else as_text(shared, results, code)
