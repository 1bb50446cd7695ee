#!/usr/bin/env python3
"""The shortest complete protocol v2 engine (docs/PROTOCOL.md): parity's numpy engine behind stdin/stdout.

    parity run --impl "cmd:python3 examples/protocol_v2/echo_numpy.py"
    PYTHONPATH=examples/protocol_v2 parity run --impl py:echo_numpy:create     # the same object, via py:

Written against the protocol document only (no parity protocol helpers), so it doubles as a template for
an engine in another language: read a JSON line, maybe answer with a payload, flush.
"""

from __future__ import annotations

import json
import sys

import numpy as np


class Engine:
    """What `py:echo_numpy:create` returns: logits, greedy, describe (and tokenize if you have one)."""

    def __init__(self, model_path: str) -> None:
        from parity.engines.numpy.engine import NumpyEngine  # your engine goes here

        self.engine = NumpyEngine(model_path)

    def describe(self) -> dict[str, str]:
        return {"name": "echo_numpy", "version": "1"}

    def logits(self, tokens: list[int]) -> np.ndarray:
        return np.asarray(self.engine.logits(tokens), dtype="<f4")  # (n, vocab)

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        return [int(t) for t in self.engine.greedy(tokens, n)]

    def capabilities(self) -> list[str]:
        return ["greedy", "tensors"] if hasattr(self.engine, "tensors") else ["greedy"]

    def tensors(
        self, tokens: list[int], names: list[str] | None, replace: dict[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """Named graph tensors (n, width) of one forward pass; `replace` = teacher forcing (docs/PROTOCOL.md)."""
        return dict(self.engine.tensors(tokens, names, replace))


def create(model_path: str) -> Engine:
    return Engine(model_path)


def send(header: dict, payload: bytes = b"") -> None:
    if payload:
        header["payload_bytes"] = len(payload)
    sys.stdout.buffer.write(json.dumps(header).encode() + b"\n" + payload)
    sys.stdout.buffer.flush()


def read_tensors(entries: list[dict], payload: bytes, n: int) -> dict[str, np.ndarray]:
    """The arrays a `tensors` list describes: float32 slices [offset, offset + bytes) of the payload."""
    out = {}
    for e in entries:
        rows, width = e["shape"]
        assert rows == n and e["bytes"] == 4 * rows * width, f"bad replacement {e['name']}"
        out[e["name"]] = np.frombuffer(payload, "<f4", rows * width, e["offset"]).reshape(rows, width)
    return out


def main() -> int:
    engine: Engine | None = None
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        req = json.loads(line)
        body = stdin.read(req.get("payload_bytes", 0))  # only a `tensors` request with replacements has one
        op, rid = req["op"], req["id"]
        try:
            if op == "hello":
                engine = create(req["model"])
                caps = engine.capabilities()
                send({"ok": True, "id": rid, "protocol": 2, **engine.describe(), "capabilities": caps})
            elif op == "logits":
                rows = engine.logits(req["tokens"])
                send({"ok": True, "id": rid, "shape": list(rows.shape), "dtype": "float32"}, rows.tobytes())
            elif op == "greedy":
                send({"ok": True, "id": rid, "tokens": engine.greedy(req["tokens"], req["n"])})
            elif op == "tensors":
                replace = read_tensors(req.get("replace") or [], body, len(req["tokens"]))
                got = engine.tensors(req["tokens"], req["names"], replace or None)
                entries, chunks, offset = [], [], 0
                for name, value in got.items():
                    data = np.ascontiguousarray(value, dtype="<f4").tobytes()
                    entries.append({"name": name, "shape": list(value.shape), "dtype": "float32",
                                    "offset": offset, "bytes": len(data)})  # fmt: skip
                    chunks.append(data)
                    offset += len(data)
                send({"ok": True, "id": rid, "tensors": entries}, b"".join(chunks))
            elif op == "bye":
                send({"ok": True, "id": rid})
                return 0
            else:
                send({"ok": False, "id": rid, "error": f"unknown op {op}"})
        except Exception as exc:  # an error is a reply, not a crash
            send({"ok": False, "id": rid, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
