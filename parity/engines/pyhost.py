"""Serve a Python implementation over protocol v2: `python -m parity.engines.pyhost module:factory|NAME`.

`py:module:factory` (or `py:NAME`, a plugin registered in the `parity.implementations` entry-point group)
runs here, in its own process, so a crash in an engine's native code is a lane error and not a harness crash.
`factory(model_path)` returns an object with `logits(tokens) -> array [n, vocab]` and optionally
`greedy(tokens, n)`, `tokenize(text, add_special, parse_special)`, `tensors(tokens, names, replace)` (the
contract of parity.engines.base.Implementation.tensors; `names` arrives as exact names or None = every tensor
it has), `describe()` (its `name`/`version`) and `close()`. Exceptions become error replies (docs/PROTOCOL.md); the server keeps serving.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import traceback
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from parity.engines import protocol

ENTRY_POINT_GROUP = "parity.implementations"


def load_factory(target: str) -> Callable[..., Any]:
    """`package.module:factory`, or a plugin name from the parity.implementations entry points."""
    if ":" not in target:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == target:
                return ep.load()  # type: ignore[no-any-return]
        names = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        raise LookupError(f"no implementation plugin {target!r} (installed: {names or 'none'})")
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def _reply(out: IO[bytes], header: dict[str, Any], payload: bytes = b"") -> None:
    out.write(protocol.encode(header, payload))
    out.flush()


def serve(target: str, inp: IO[bytes], out: IO[bytes]) -> int:
    """The request loop; returns the exit status."""
    engine: Any = None
    while True:
        msg = protocol.read_blocking(inp)
        if msg is None:
            return 0
        req, body = msg
        rid = req.get("id")
        op = req.get("op")
        try:
            if op == "hello":
                factory = load_factory(target)
                engine = factory(req.get("model"))
                info = engine.describe() if hasattr(engine, "describe") else {}
                caps = [c for c in ("greedy", "tokenize", "tensors") if hasattr(engine, c)]
                mod = sys.modules.get(getattr(factory, "__module__", "") or "")
                _reply(
                    out,
                    {
                        "ok": True,
                        "id": rid,
                        "protocol": protocol.PROTOCOL_VERSION,
                        "name": str(info.get("name", target)),
                        "version": str(info.get("version", "")),
                        "capabilities": caps,
                        "module": getattr(mod, "__file__", None),
                    },
                )
            elif op == "logits":
                fields, payload = protocol.logits_payload(np.asarray(engine.logits(list(req["tokens"]))))
                _reply(out, {"ok": True, "id": rid, **fields}, payload)
            elif op == "greedy":
                ids = [int(t) for t in engine.greedy(list(req["tokens"]), int(req["n"]))]
                _reply(out, {"ok": True, "id": rid, "tokens": ids})
            elif op == "tokenize":
                ids = [
                    int(t) for t in engine.tokenize(req["text"], bool(req["add_special"]), bool(req["parse_special"]))
                ]
                _reply(out, {"ok": True, "id": rid, "tokens": ids})
            elif op == "tensors":
                ids = [int(t) for t in req["tokens"]]
                replace = protocol.decode_tensors(req.get("replace") or [], body, len(ids))
                names = req.get("names")
                got = engine.tensors(ids, None if names is None else list(names), replace or None)
                entries, payload = protocol.tensors_payload({str(k): np.asarray(v) for k, v in got.items()})
                _reply(out, {"ok": True, "id": rid, "tensors": entries}, payload)
            elif op == "bye":
                if hasattr(engine, "close"):
                    engine.close()
                _reply(out, {"ok": True, "id": rid})
                return 0
            else:
                _reply(out, {"ok": False, "id": rid, "error": f"unknown op {op!r}"})
        except Exception as exc:  # an engine's error is a reply, not a crash (docs/PROTOCOL.md)
            traceback.print_exc(file=sys.stderr)
            _reply(out, {"ok": False, "id": rid, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m parity.engines.pyhost module:factory|PLUGIN", file=sys.stderr)
        return 2
    return serve(args[0], sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
