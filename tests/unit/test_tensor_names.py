"""What a tensors() request means (engines/tensor_names.py) and the protocol's tensor slices (engines/protocol.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parity.engines import protocol, tensor_names
from parity.errors import UsageError

GRAPH = ["embd", "norm-0", "attn_norm-0", "Qcur-0", "ffn_gate-0", "l_out-0", "attn_norm-1", "l_out-1", "result_output"]


def test_default_names_are_the_base_lists_the_graph_has() -> None:
    assert tensor_names.default_names(GRAPH) == ["embd", "attn_norm-0", "Qcur-0", "l_out-0", "attn_norm-1", "l_out-1",
                                                 "result_output"]  # fmt: skip
    assert tensor_names.split_name("attn_norm-12") == ("attn_norm", 12)
    assert tensor_names.split_name("result_output") == ("result_output", None)


def test_select_exact_and_patterns_in_graph_order() -> None:
    assert tensor_names.select(["l_out-1", "attn_norm-*"], GRAPH, "x") == ["attn_norm-0", "attn_norm-1", "l_out-1"]
    assert tensor_names.select(["l_out-[1]"], GRAPH, "x") == ["l_out-1"]
    assert tensor_names.select([], GRAPH, "x") == []
    with pytest.raises(UsageError, match="tensor 'kqv_out-0' names no per-token tensor"):
        tensor_names.select(["l_out-0", "kqv_out-0"], GRAPH, "x")
    with pytest.raises(UsageError, match="pattern 'L_out-\\*'"):  # case-sensitive, as llama.cpp's names are
        tensor_names.select(["L_out-*"], GRAPH, "x")
    with pytest.raises(UsageError, match="must be a list"):
        tensor_names.select("l_out-0", GRAPH, "x")


def test_check_replace_shapes_and_names() -> None:
    ok = tensor_names.check_replace({"l_out-0": np.ones((3, 4), np.float64)}, 3, "x", GRAPH)
    assert ok["l_out-0"].dtype == np.float32 and ok["l_out-0"].flags.c_contiguous
    with pytest.raises(UsageError, match=r"must be \(3, width\)"):
        tensor_names.check_replace({"l_out-0": np.ones((2, 4))}, 3, "x")
    with pytest.raises(UsageError, match="exact names"):
        tensor_names.check_replace({"l_out-*": np.ones((3, 4))}, 3, "x")
    with pytest.raises(UsageError, match="cannot replace 'kqv_out-0'"):
        tensor_names.check_replace({"kqv_out-0": np.ones((3, 4))}, 3, "x", GRAPH)


def test_tensor_slices_round_trip_and_refuse_what_does_not_fit() -> None:
    arrays = {"a-0": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.full((3, 5), -1.5, np.float32)}
    entries, payload = protocol.tensors_payload(arrays)
    assert [e["offset"] for e in entries] == [0, 24] and len(payload) == 24 + 60
    back = protocol.decode_tensors(entries, payload, 3)
    assert list(back) == ["a-0", "b"] and all(np.array_equal(back[k], v) for k, v in arrays.items())
    bad = [
        ({**entries[0], "shape": [2, 3]}, "has 2 rows, 3 tokens"),
        ({**entries[0], "bytes": 20}, "do not describe shape"),
        ({**entries[0], "offset": 80}, "ends at byte 104"),
        ({**entries[0], "dtype": "float16"}, "dtype 'float16'"),
        ({"shape": [3, 2]}, "has no name"),
    ]
    for entry, says in bad:
        with pytest.raises(protocol.FrameError, match=says):
            protocol.decode_tensors([entry], payload, 3)
    with pytest.raises(protocol.FrameError, match="sent twice"):
        protocol.decode_tensors([entries[0], entries[0]], payload, 3)
    with pytest.raises(protocol.FrameError, match="a list"):
        protocol.decode_tensors({"a": 1}, payload, 3)


def test_reader_refuses_a_payload_over_the_limit_before_allocating() -> None:
    import os
    import time

    r, w = os.pipe()
    try:
        os.write(w, b'{"ok": true, "id": 1, "payload_bytes": 1099511627776}\n')
        with pytest.raises(protocol.FrameError, match="1099511627776 bytes announced, more than the 1024"):
            protocol.Reader(r).read(time.monotonic() + 5, max_payload=1024)
    finally:
        os.close(r)
        os.close(w)


def test_a_logits_file_cannot_capture(tmp_path: Path) -> None:
    from parity.engines.external import LogitsFileImplementation
    from parity.engines.spec import parse
    from parity.errors import Unsupported

    path = tmp_path / "l.npz"
    np.savez(path, tokens=np.array([1, 2]), logits=np.zeros((2, 4), np.float32))
    impl = LogitsFileImplementation(parse(f"logits:{path}"))
    assert not tensor_names.can_capture(impl)
    with pytest.raises(Unsupported, match="cannot capture graph tensors"):
        impl.tensors([1, 2])
