"""examples/c_port: a llama forward pass in one C file that reads the GGUF itself and speaks protocol v2.

Compiled here with the system C compiler, once as written and once with `-DPLANTED_BUG=rope` (layer 1 rotates
NEOX pairs). Checked two ways: directly, by a small protocol v2 driver against the numpy engine, and as a
user runs it, `parity run --impl cmd:BINARY` against llama.cpp.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parity.backends import build
from parity.compare import receipts
from parity.engines.numpy.engine import NumpyEngine
from parity.models.modelgen import default_model

from .conftest import ROOT, run_cli

pytestmark = [pytest.mark.compile, pytest.mark.model]

SOURCE = ROOT / "examples" / "c_port" / "c_port.c"
# A fixed prompt: BOS then 47 ids spread over the 512-token vocabulary (48 positions, all RoPE angles used).
TOKENS = [1] + [int(t) for t in np.random.default_rng(7).integers(0, 512, 47)]


def _compile(out: Path, *defines: str) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler: `cc` is not on PATH; fix: apt-get install gcc")
    cmd = [cc, "-O2", "-std=c11", *defines, "-o", str(out), str(SOURCE), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two builds: "ok" (as written) and "rope" (-DPLANTED_BUG=rope)."""
    out = tmp_path_factory.mktemp("c_port")
    return {"ok": _compile(out / "c_port"), "rope": _compile(out / "c_port_rope", "-DPLANTED_BUG=rope")}


@pytest.fixture(scope="module")
def f32_model() -> Path:
    return default_model("f32")[0]


@dataclass
class Reply:
    header: dict[str, Any]
    payload: bytes

    def logits(self) -> np.ndarray:
        shape = self.header["shape"]
        assert self.header["dtype"] == "float32" and self.header["payload_bytes"] == 4 * shape[0] * shape[1]
        return np.frombuffer(self.payload, dtype="<f4").reshape(shape).astype(np.float64)


def converse(binary: Path, requests: list[dict[str, Any]]) -> tuple[list[Reply], subprocess.CompletedProcess[bytes]]:
    """Protocol v2 driver: send every request (ids 0, 1, ...), read one framed reply per request.

    The engine answers strictly in order, so the requests are written at once and the replies parsed from its
    whole standard output; every byte must belong to a header or a payload.
    """
    lines = b"".join(json.dumps({**r, "id": i}).encode() + b"\n" for i, r in enumerate(requests))
    proc = subprocess.run([str(binary)], input=lines, capture_output=True, timeout=300)
    out, pos, replies = proc.stdout, 0, []
    for i in range(len(requests)):
        end = out.find(b"\n", pos)
        assert end >= 0, f"no reply to request {i} ({requests[i]['op']}); stderr:\n{proc.stderr.decode()}"
        header = json.loads(out[pos:end])
        assert header["id"] == i and isinstance(header["ok"], bool), header
        n = header.get("payload_bytes", 0)
        payload = out[end + 1 : end + 1 + n]
        assert len(payload) == n, f"payload of reply {i} is {len(payload)} bytes, header says {n}"
        replies.append(Reply(header, payload))
        pos = end + 1 + n
    assert pos == len(out), f"{len(out) - pos} stray bytes on standard output after the last reply"
    return replies, proc


def hello(model: Path) -> dict[str, Any]:
    return {"op": "hello", "protocol": 2, "model": str(model), "options": {}}


def _session(binary: Path, model: Path) -> tuple[np.ndarray, list[int]]:
    """hello, logits of TOKENS, greedy 4 after the first 8 tokens, bye: (logits, greedy ids)."""
    replies, proc = converse(
        binary,
        [
            hello(model),
            {"op": "logits", "tokens": TOKENS},
            {"op": "greedy", "tokens": TOKENS[:8], "n": 4},
            {"op": "bye"},
        ],
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert all(r.header["ok"] for r in replies), [r.header for r in replies]
    h = replies[0].header
    assert (
        h["protocol"] == 2 and h["name"] == "c_port" and h["version"] and h["capabilities"] == ["greedy", "tensors"]
    ), h
    assert replies[1].header["shape"] == [len(TOKENS), 512]
    assert replies[3].header == {"ok": True, "id": 3}
    return replies[1].logits(), replies[2].header["tokens"]


def test_c_port_matches_numpy_engine(binaries: dict[str, Path], f32_model: Path) -> None:
    engine = NumpyEngine(f32_model)
    logits, greedy = _session(binaries["ok"], f32_model)
    d = float(np.max(np.abs(logits - engine.logits(TOKENS))))
    assert d <= 1e-4, f"max |dlogit| {d:.3g} vs the numpy engine"
    assert greedy == engine.greedy(TOKENS[:8], 4)


def test_planted_rope_bug_differs_from_numpy_engine(binaries: dict[str, Path], f32_model: Path) -> None:
    ref = NumpyEngine(f32_model).logits(TOKENS)
    logits, _ = _session(binaries["rope"], f32_model)
    d = np.max(np.abs(logits - ref), axis=1)  # (n,)
    # position 0 has angle 0 in every pair, so any pairing is the identity there: the bug shows from position 1
    assert d[0] <= 1e-4, d[0]
    assert float(d.max()) > 1e-2, f"the planted RoPE bug changed the logits by only {d.max():.3g}"


def test_c_port_error_replies_keep_serving(binaries: dict[str, Path], f32_model: Path) -> None:
    replies, proc = converse(
        binaries["ok"],
        [
            {"op": "logits", "tokens": [1]},  # before hello
            hello(default_model("f16")[0]),  # F16 weights: refused at hello
            hello(f32_model) | {"protocol": 1},
            hello(f32_model) | {"options": {"threads": "2"}},
            hello(f32_model),
            {"op": "logits", "tokens": [1, 512]},  # outside the vocabulary
            {"op": "logits", "tokens": []},
            {"op": "tokenize", "text": "hi", "add_special": True, "parse_special": False},  # not a capability
            {"op": "greedy", "tokens": [1], "n": 300},  # past the training context (256)
            {"op": "logits", "tokens": [1, 2, 3]},
            {"op": "bye"},
        ],
    )
    ok = [r.header["ok"] for r in replies]
    assert ok == [False, False, False, False, True, False, False, False, False, True, True], [r.header for r in replies]
    for r in replies:
        if not r.header["ok"]:
            assert isinstance(r.header["error"], str) and "\n" not in r.header["error"] and r.payload == b""
    assert "F32" in replies[1].header["error"] and "f16" in replies[1].header["error"]
    assert "512" in replies[5].header["error"]
    assert replies[9].header["shape"] == [3, 512]
    assert proc.returncode == 0, proc.stderr.decode()


def test_c_port_bad_json_line_is_an_error_reply(binaries: dict[str, Path]) -> None:
    proc = subprocess.run(
        [str(binaries["ok"])],
        input=b'{"op": "hello", "id": 0, \n{"op": "bye", "id": 1}\n',
        capture_output=True,
        timeout=60,
    )
    lines = proc.stdout.decode().splitlines()
    assert [json.loads(x)["ok"] for x in lines] == [False, True], lines
    assert json.loads(lines[0])["error"].startswith("bad JSON"), lines[0]
    assert proc.returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# As a user runs it: parity's CLI, `--impl cmd:BINARY`, against the llama.cpp lane.


def _run_cmd(binary: Path, out_dir: Path) -> tuple[int, dict[str, Any], str]:
    proc = run_cli("run", "--impl", f"cmd:{binary}", "--out-dir", str(out_dir), "--format", "json")
    return proc.returncode, receipts.load(out_dir / "receipt_llama.json"), proc.stderr


def test_cli_cmd_c_port_matches_llama_cpp(
    llama_plan: build.BuildPlan, binaries: dict[str, Path], tmp_path: Path
) -> None:
    code, r, err = _run_cmd(binaries["ok"], tmp_path)
    assert code == 0, err
    s = r["summary"]
    assert r["status"] == "pass" and s["all_passed"] and s["first_divergence"] is None, s
    assert s["max_abs"] <= 1e-4, s
    assert r["greedy"]["verdict"] == "identical", r["greedy"]
    assert r["implementation"]["name"] == "c_port" and r["implementation"]["kind"] == "cmd", r["implementation"]


def test_cli_cmd_planted_rope_bug_is_caught(
    llama_plan: build.BuildPlan, binaries: dict[str, Path], tmp_path: Path
) -> None:
    code, r, err = _run_cmd(binaries["rope"], tmp_path)
    assert code == 1, err
    assert r["status"] == "diverged" and not r["summary"]["all_passed"], r["summary"]
    assert r["summary"]["first_divergence"] is not None, r["summary"]


def test_c_port_graph_tensors_against_llama_cpp(
    binaries: dict[str, Path], f32_model: Path, llama_plan: build.BuildPlan
) -> None:
    """`tensors`: the C port's named graph tensors are llama.cpp's (same names, ~1e-6 apart on F32); replayed on
    llama.cpp's own tensors, the planted bug's only out-of-line ops are layer 1's RoPE outputs (Qcur-1, Kcur-1)."""
    from parity.backends.bridge import BackendParams
    from parity.engines import spec as impl_spec
    from parity.engines.bridged import BridgedImplementation
    from parity.engines.external import CommandImplementation

    ids = TOKENS[:16]
    with BridgedImplementation(impl_spec.parse("llama"), llama_plan, f32_model, BackendParams()) as ref:
        theirs = ref.tensors(ids)
    replay = {k: v for k, v in theirs.items() if k != "result_output"}
    for build_name, planted in (("ok", set()), ("rope", {"Qcur-1", "Kcur-1"})):
        with CommandImplementation(impl_spec.parse(f"cmd:{binaries[build_name]}"), f32_model, timeout=60) as port:
            ours = port.tensors(ids)
            assert set(ours) == set(theirs)
            local = port.tensors(ids, replace=replay)
        off = {k for k, v in theirs.items() if np.max(np.abs(local[k] - v)) > 1e-4 * max(1.0, np.max(np.abs(v)))}
        assert off == planted, (build_name, off)
        if not planted:
            assert all(np.max(np.abs(ours[k] - v)) < 1e-4 * max(1.0, np.max(np.abs(v))) for k, v in theirs.items())
