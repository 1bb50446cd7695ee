"""parity.compare.locate: the metric, noise per op type, tolerances and the first op out of tolerance.

The "reference" here is a tiny float64 two-layer network; its second configuration is the same network in
float32 (another rounding of the same function), and planted bugs change one op.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from parity.compare import locate

Tensors = dict[str, np.ndarray]


def net(
    x: np.ndarray,
    dtype: type[np.floating],
    bug: Callable[[str, np.ndarray], np.ndarray] | None = None,
    replace: Tensors | None = None,
) -> Tensors:
    """attn_norm -> Qcur -> l_out per layer, then result_norm; `replace` teacher-forces named tensors."""
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((16, 16)) / 4 for _ in range(2)]
    out: Tensors = {}

    def tap(name: str, v: np.ndarray) -> np.ndarray:
        if bug is not None:
            v = bug(name, v)
        out[name] = v.astype(np.float32)
        if replace and name in replace:
            return replace[name].astype(dtype)
        return v

    h = x.astype(dtype)
    for il in range(2):
        n = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + dtype(1e-5))
        n = tap(f"attn_norm-{il}", n)
        q = tap(f"Qcur-{il}", n @ w[il].astype(dtype))
        h = tap(f"l_out-{il}", h + q)
    tap("result_norm", h / np.sqrt((h * h).mean(axis=1, keepdims=True)))
    return out


X = np.random.default_rng(1).standard_normal((6, 16)) * 3


def test_split_name_and_order() -> None:
    assert locate.split_name("attn_norm-12") == ("attn_norm", 12)
    assert locate.split_name("result_output") == ("result_output", None)
    assert locate.split_name("ffn_moe_out-a") == ("ffn_moe_out-a", None)
    names = ["result_norm", "Qcur-1", "attn_norm-1", "attn_norm-0", "Qcur-0", "embd"]
    assert locate.graph_order(names) == ["embd", "attn_norm-0", "Qcur-0", "Qcur-1", "attn_norm-1", "result_norm"]


def test_row_errors_relative_per_token_and_nonfinite() -> None:
    ref = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    x = np.array([[3.0, 4.5], [0.0, 0.0], [np.nan, 0.0]])
    e = locate.row_errors(x, ref)
    assert e[0] == pytest.approx(0.1) and e[1] == 0.0 and np.isinf(e[2])
    err, pos = locate.op_error(x[:2], ref[:2])
    assert (round(err, 12), pos) == (0.1, 0)
    with pytest.raises(ValueError, match="shape"):
        locate.row_errors(x[:, :1], ref)


def test_float32_rounding_is_within_tolerance_everywhere() -> None:
    a, b = net(X, np.float64), net(X, np.float32)
    noise = locate.noise_levels(a, b)
    assert set(noise) == {"attn_norm", "Qcur", "l_out", "result_norm"}
    assert all(0 < v["noise"] < 1e-6 for v in noise.values())
    loc = locate.localise(b, a, noise, "free")
    assert loc.first is None and loc.status == "ok" and len(loc.rows) == 7
    assert "every op within tolerance" in locate.summary_line(loc.to_dict())


def test_a_planted_bug_is_named_in_replay_and_grows_in_free_running() -> None:
    a, b = net(X, np.float64), net(X, np.float32)
    replay_b = net(X, np.float32, replace=a)
    noise_free, noise_replay = locate.noise_levels(a, b), locate.noise_levels(a, replay_b)

    def bug(name: str, v: np.ndarray) -> np.ndarray:  # one layer's weights scaled by 1%
        return v * 1.01 if name == "Qcur-1" else v

    free = locate.localise(net(X, np.float32, bug), a, noise_free, "free")
    assert free.first is not None and free.first["name"] == "Qcur-1"
    assert free.next == ["l_out-1", "result_norm"]  # the error's path downstream
    replay = locate.localise(net(X, np.float32, bug, replace=a), a, noise_replay, "replay")
    assert replay.first is not None and replay.first["name"] == "Qcur-1" and replay.next == []  # local only
    assert replay.first["error"] == pytest.approx(0.01, rel=1e-3)
    line = locate.summary_line(replay.to_dict())
    assert line.startswith("first op out of tolerance: Qcur-1 (replay error 0.01 = ")
    assert "the reference's own" in line and "for Qcur); next: none" in line


def test_zero_noise_uses_the_float32_epsilon() -> None:
    a = net(X, np.float32)
    noise = locate.noise_levels(a, a)  # bit-identical configurations: noise 0
    assert all(v["noise"] == 0.0 for v in noise.values())
    nudged = {k: v * np.float32(1 + 1e-7) for k, v in a.items()}  # ~1 ulp: rounding, not a bug
    assert locate.localise(nudged, a, noise, "replay").first is None
    bumped = {k: v * np.float32(1 + 1e-4) if k == "attn_norm-0" else v for k, v in a.items()}
    loc = locate.localise(bumped, a, noise, "replay")
    assert loc.first is not None and loc.first["name"] == "attn_norm-0" and loc.first["noise"] == 0.0
    assert "float32 rounding" in locate.summary_line(loc.to_dict())


def test_missing_and_misshapen_tensors() -> None:
    a = net(X, np.float32)
    noise = locate.noise_levels(a, a)
    impl = {k: v for k, v in a.items() if k != "Qcur-0"}
    impl["l_out-1"] = impl["l_out-1"][:, :4]
    loc = locate.localise(impl, a, noise, "free")
    assert loc.missing == ["Qcur-0"]
    assert loc.first is not None and loc.first["name"] == "l_out-1" and loc.first["error"] is None
    with pytest.raises(ValueError, match="mode"):
        locate.localise(impl, a, noise, "both")
