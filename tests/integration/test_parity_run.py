"""The main job end to end on the embedded default model: real numpy engine, real llama.cpp lane."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from parity.backends import build
from parity.check import job
from parity.compare import receipts

from .conftest import run_cli

pytestmark = [pytest.mark.compile, pytest.mark.model]


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    proc = run_cli("run", "--out-dir", str(tmp_path), "--format", "json", *args, env=env)
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, summary, proc.stderr


def _receipt(tmp_path: Path) -> dict[str, Any]:
    return receipts.load(tmp_path / "receipt_llama.json")


def test_default_f32_matches_llama_cpp(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, summary, err = _run(tmp_path)
    assert code == 0, err
    r = _receipt(tmp_path)
    s = r["summary"]
    assert r["status"] == "pass" and s["all_passed"]
    assert s["max_abs"] <= 1e-4, s  # F32 weights, F32 KV cache, flash attention off
    assert r["verdict"]["mode"] == "calibrated" and r["verdict"]["passed"], r["verdict"]  # the default verdict
    assert s["decisive_positions"] > 0 and s["top1_agreement_decisive"] == 1.0, s
    assert r["run_config"]["type_k"] == 0 and r["run_config"]["type_v"] == 0 and r["run_config"]["flash_attn"] == 0
    assert r["greedy"]["first_difference"] is None and r["greedy"]["verdict"] == "identical"
    assert r["tokenizer_authority"]["source"] == "external"
    assert r["positions"] == r["prompt_tokens"] + 4 == len(r["token_ids"])
    assert summary["overall"]["exit_code"] == 0 and summary["lanes"]["llama"]["status"] == "pass"
    assert summary["overall"]["tokenizer_consistent"] is True


def test_default_f16_variant(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "--variant", "f16")
    assert code == 0, err
    assert _receipt(tmp_path)["verdict"]["mode"] == "calibrated"
    s = _receipt(tmp_path)["summary"]
    assert 1 - s["min_cosine"] <= 1e-6 and s["mean_kl"] <= 1e-5, s


def test_default_q8_0_variant(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "--variant", "q8_0")
    assert code == 0, err
    r = _receipt(tmp_path)
    # Q8_0 x Q8_0 dot products are exact integers (llama.cpp was bit-identical in every evaluation order here), so
    # the floor is at least the rounding model of its 8-bit activations (compare/calibrate.py), never 0
    assert r["verdict"]["mode"] == "calibrated" and r["floor"]["rounding"]["format"] == "Q8_0", r["floor"]["rounding"]
    assert all(c["floor"] > 0 for c in r["verdict"]["checks"]), r["verdict"]["checks"]
    s = r["summary"]
    assert 1 - s["min_cosine"] <= 1e-3 and s["mean_kl"] <= 5e-3, s


def test_text_summary_layout(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    proc = run_cli("run", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for part in (
        "Tokenizer Authority",
        "Lane llama",
        "status        PASS",
        "Overall Status: PASS",
        "receipt_llama.json",
    ):
        assert part in out, out


def test_impossible_tolerance_diverges_with_exit_1(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, summary, _ = _run(tmp_path, "--variant", "q8_0", "--cos-tol", "0.9999999999")
    assert code == 1
    r = _receipt(tmp_path)
    assert r["status"] == "diverged" and r["summary"]["first_divergence"]["pos"] >= 0
    assert summary["lanes"]["llama"]["first_divergence"] is not None


def test_worker_abort_is_a_failed_lane(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, summary, err = _run(tmp_path, env={"PARITY_FAULT_INJECT": "abort:eval"})
    assert code == 1, err
    assert "Traceback" not in err
    lane = summary["lanes"]["llama"]
    assert lane["status"] == "error" and "SIGABRT" in lane["error"]
    r = _receipt(tmp_path)
    assert r["status"] == "error" and not r["summary"]["all_passed"]


def test_mismatched_tokenizer_exits_2_before_logits(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    from parity.models.modelgen import default_model

    _, tok = default_model("f32")
    data = json.loads(tok.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # swap two merged tokens' ids: same shape, wrong ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "out"
    code, _, err = _run(out, "--tokenizer", str(bad), "--prompt", "the weather is " + a.replace("Ġ", " ") + b)
    assert code == 2, err
    assert "token mismatch" in err and "position" in err
    assert not (out / "receipt_llama.json").exists()


def _gguf_with_arch(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    from parity.models.modelgen import default_model

    model, _ = default_model("f32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am not a model\n" * 20)
    return [
        (["--model-gguf", str(tmp_path / "missing.gguf")], "not found"),
        (["--model-gguf", str(truncated)], "truncated"),
        (["--model-gguf", str(text)], "not a GGUF file"),
        (["--model-gguf", str(_gguf_with_arch(tmp_path / "rwkv.gguf", "rwkv6"))], "unsupported architecture"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "word " * 400], "exceeds the model's context"),
        (["--cos-tol", "1.5"], "--cos-tol"),
    ]


def test_bad_input_one_line_exit_2_no_receipt(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    for i, (args, expected) in enumerate(_bad_inputs(tmp_path)):
        out = tmp_path / f"out{i}"
        proc = run_cli("run", "--out-dir", str(out), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("parity: error:")]
        assert len(lines) == 1 and expected in lines[0], (args, proc.stderr)
        assert "fix:" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
        assert not list(out.glob("receipt_*.json")), args


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = run_cli("--debug", "run", "--model-gguf", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_no_repair_and_ci_fail_with_the_fix_command(tmp_path: Path) -> None:
    empty_cache = {"PARITY_CACHE": str(tmp_path / "empty-cache")}
    for extra_args, env in ((["--no-repair"], {}), ([], {"CI": "true"})):
        out = tmp_path / ("o" + str(len(env)))
        proc = run_cli("run", "--out-dir", str(out), *extra_args, env={**empty_cache, **env})
        assert proc.returncode == 2, proc.stderr
        assert "not built" in proc.stderr and "nox -s setup_cpp" in proc.stderr
        assert not list(out.glob("receipt_*.json"))


def test_receipts_verify_command(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, _, err = _run(tmp_path)
    assert code == 0, err
    ok = run_cli("receipts", "verify", str(tmp_path / "receipt_llama.json"))
    assert ok.returncode == 0 and ok.stdout.startswith("ok")
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 2}')
    bad = run_cli("receipts", "verify", str(broken))
    assert bad.returncode == 2 and "FAIL" in bad.stdout


def _planted_greedy(tmp_path: Path, tie_margin: float) -> tuple[Any, Any, int, float]:
    """A run whose numpy continuation takes the reference's second choice at its most decisive step.

    The numpy logits are recomputed on the planted sequence, so the logits agree and only the greedy
    decode differs: the lane's verdict then rests on the greedy rule alone (metrics.greedy_check).
    """
    import numpy as np

    from parity import options
    from parity.check import inputs, job
    from parity.engines.numpy.engine import NumpyEngine

    opts = options.resolve({"out_dir": str(tmp_path), "tie_margin": tie_margin, "repair": False})
    shared, plans = job.prepare(opts, inputs.reference_specs(["llama"]))
    n = len(shared.prompt_ids)
    engine = NumpyEngine(shared.model_path, dtype=opts.dtype)
    probs = [np.sort(np.exp(r - r.max()) / np.exp(r - r.max()).sum())[-2:] for r in shared.logits[n - 1 : -1]]
    gaps = [float(p[1] - p[0]) for p in probs]  # (steps,) top-1 minus top-2 probability per greedy step
    k = int(np.argmax(gaps))
    second = int(np.argsort(shared.logits[n - 1 + k])[-2])
    shared.generated = [*shared.generated[:k], second]
    shared.logits = engine.logits(shared.sequence)
    return job.run_lane("llama", plans["llama"], shared, opts, tmp_path), shared, k, gaps[k]


def test_planted_greedy_mismatch_at_a_decisive_step_fails_the_lane(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    from parity.check import summary

    lane, shared, k, gap = _planted_greedy(tmp_path, 0.01)
    assert gap > 0.01, f"the default prompt has no greedy step with a top-2 gap above 0.01 (best {gap})"
    assert lane.summary is not None and lane.summary["all_passed"]  # the logits agree ...
    assert lane.status == "diverged"  # ... and the greedy mismatch alone fails the lane
    g = _receipt(tmp_path)["greedy"]
    assert g["verdict"] == "mismatch" and g["first_difference"] == k and abs(g["ref_prob_gap"] - gap) < 1e-3
    text = summary.as_text(shared, [lane], job.exit_code([lane]))
    assert f"MISMATCH at step {k}" in text and "exit 1" in text


def test_planted_tie_flip_passes_and_is_reported(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    from parity.check import summary

    lane, shared, k, gap = _planted_greedy(tmp_path, 0.99)  # every flip below 0.99 counts as a tie
    assert lane.status == "pass", lane
    g = _receipt(tmp_path)["greedy"]
    assert g["verdict"] == "tie_flip" and g["first_difference"] == k and g["ref_prob_gap"] < 0.99
    text = summary.as_text(shared, [lane], job.exit_code([lane]))
    assert f"tie flip at step {k} (gap {gap:.3g}" in text and "exit 0" in text


def test_impl_and_reference_specs_are_recorded(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    code, summary, err = _run(tmp_path, "--impl", "numpy:dtype=float64", "--reference", "llama:type_k=f16")
    assert code == 0, err
    r = receipts.load(tmp_path / "receipt_llama-type_k-f16.json")
    assert r["implementation"] == {"name": "numpy", "dtype": "float64", "spec": "numpy:dtype=float64"}
    assert r["reference"] == {"spec": "llama:type_k=f16", "lane": "llama-type_k-f16"}
    assert r["run_config"]["type_k"] == 1 and r["run_config"]["type_v"] == 0 and r["options"]["dtype"] == "float64"
    assert summary["lanes"]["llama-type_k-f16"]["status"] == "pass"


def test_a_cpp_engine_as_the_implementation_under_test(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    """llama.cpp with an F16 K cache and flash attention, checked against llama.cpp's most precise lane.

    Calibrated, it fails: F16 rounding of K is far above what the F32 reference moves by itself. With the
    fixed tolerances (what a user asks for when a lower precision is the point) it passes."""
    code, summary, err = _run(
        tmp_path / "calibrated", "--impl", "llama:type_k=f16,flash_attn=on", "--reference", "llama", "--no-locate"
    )
    assert code == 1, err
    assert summary["lanes"]["llama"]["status"] == "diverged"
    code, _, err = _run(
        tmp_path, "--impl", "llama:type_k=f16,flash_attn=on", "--reference", "llama", "--verdict", "fixed"
    )
    assert code == 0, err
    r = _receipt(tmp_path)
    impl = r["implementation"]
    assert impl["name"] == "llama" and impl["spec"] == "llama:type_k=f16,flash_attn=on"
    assert impl["run_config"]["type_k"] == 1 and impl["run_config"]["flash_attn"] == 1
    assert r["run_config"]["type_k"] == 0 and r["run_config"]["flash_attn"] == 0  # the reference: most precise
    s = r["summary"]
    assert 0 < s["max_abs"] < 0.05 and s["decisive_positions"] > 0, s  # F16 K rounding: small, never zero


def test_bad_impl_or_reference_spec_exits_2_before_anything_runs(tmp_path: Path) -> None:
    for args in (
        ["--impl", "llama:typek=f16"],
        ["--reference", "numpy"],
        ["--reference", "llama", "--reference", "llama"],
    ):
        proc = run_cli("run", "--out-dir", str(tmp_path), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("parity: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not list(tmp_path.glob("receipt_*.json"))
