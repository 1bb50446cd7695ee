"""`llama:source=PATH`: a patched llama.cpp tree, built with the same cache and bridge, compared with the
pinned one in the same run. The patch scales attention by 1.25: the patched lane must diverge, the pinned pass.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from parity.backends import build, lock
from parity.compare import receipts
from parity.engines import spec

from .conftest import run_cli

pytestmark = [pytest.mark.compile, pytest.mark.model]

PATCH = (
    "1.0f/sqrtf(float(n_embd_head)) : hparams.f_attention_scale;",
    "1.25f/sqrtf(float(n_embd_head)) : hparams.f_attention_scale;",
)


def test_a_patched_llama_cpp_tree_is_built_and_compared(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    pinned = lock.acquire(lock.get_spec("llama"), None)
    tree = tmp_path / "llama.cpp-patched"
    shutil.copytree(pinned.path, tree, ignore=shutil.ignore_patterns(".git", "*.gguf"))
    graph = tree / "src" / "models" / "llama.cpp"
    text = graph.read_text(encoding="utf-8")
    assert PATCH[0] in text, f"the pinned llama.cpp moved the attention scale line in {graph}"
    original = graph.stat()
    graph.write_text(text.replace(PATCH[0], PATCH[1]), encoding="utf-8")
    # A tree that is no git checkout is identified by its files' sizes and mtimes (lock.describe_source): the
    # patched file keeps the pinned file's mtime, so this identical tree in the next test run is the build the
    # per-user cache already holds (as it would be for a user re-running the same tree); its size still differs.
    os.utime(graph, ns=(original.st_atime_ns, original.st_mtime_ns))
    plan = build.plan(lock.get_spec("llama"), tree)
    assert plan.lib_key != llama_plan.lib_key

    patched = f"llama:source={tree}"
    out = tmp_path / "out"
    if os.environ.get("CI"):  # no auto-repair in CI: a tree not built yet is refused with the command that builds it
        unbuilt = tree
        if build.is_built(plan):  # (a warm cache): a copy with a newer mtime is another tree, never built
            unbuilt = tmp_path / "llama.cpp-unbuilt"
            shutil.copytree(tree, unbuilt)
            (unbuilt / "src" / "models" / "llama.cpp").touch()
            assert not build.is_built(build.plan(lock.get_spec("llama"), unbuilt))
        refused = run_cli("run", "--reference", f"llama:source={unbuilt}", "--out-dir", str(tmp_path / "refused"))
        assert refused.returncode == 2 and f"--backend llama --source {unbuilt}" in refused.stderr, refused.stderr
        assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").glob("receipt_*.json"))
        if unbuilt == tree:  # ... which a user then runs
            built = run_cli("setup-cpp", "--backend", "llama", "--source", str(tree))
            assert built.returncode == 0, built.stderr[-3000:]
    proc = run_cli("run", "--reference", "llama", "--reference", patched, "--out-dir", str(out), "--format", "json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lanes = json.loads(proc.stdout)["lanes"]
    label = spec.parse(patched).label
    assert lanes["llama"]["status"] == "pass" and lanes[label]["status"] == "diverged", lanes
    r = receipts.load(out / f"receipt_{label}.json")
    assert r["backend_info"]["source_kind"] == "local" and r["reference"]["spec"] == patched
    assert r["summary"]["first_divergence"] is not None
