"""A protocol v2 engine that misbehaves on purpose: `faulty.py FAULT` (tests/integration/test_external_impl.py).

It is the example engine (examples/protocol_v2/echo_numpy.py) until the request FAULT names, then it crashes,
hangs, prints garbage, answers the wrong shape, and so on. "none" behaves.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "protocol_v2"))
import echo_numpy

FAULT = sys.argv[1]


def send(header: dict, payload: bytes = b"") -> None:
    echo_numpy.send(header, payload)


def main() -> int:
    engine = None
    for line in sys.stdin.buffer:
        req = json.loads(line)
        op, rid = req["op"], req["id"]
        if op == "hello":
            if FAULT == "close_after_hello_request":
                return 0
            engine = echo_numpy.create(req["model"])
            caps = ["tokenize"] if FAULT == "own_tokenizer_differs" else []
            send({"ok": True, "id": rid, "protocol": 2, "name": "faulty", "version": FAULT, "capabilities": caps})
        elif op == "tokenize":
            send({"ok": True, "id": rid, "tokens": [1, 2, 3]})
        elif op == "logits":
            rows = engine.logits(req["tokens"])
            if FAULT == "crash":
                print("faulty: about to crash", file=sys.stderr, flush=True)
                os._exit(3)
            if FAULT == "abort":
                os.kill(os.getpid(), signal.SIGABRT)
            if FAULT == "hang":
                time.sleep(600)
            if FAULT == "garbage":
                sys.stdout.buffer.write(b"this is not a protocol frame\n")
                sys.stdout.buffer.flush()
                continue
            if FAULT == "wrong_shape":
                rows = rows[:, :-1].copy()
            if FAULT == "nan":
                rows[0, 0] = float("nan")
            if FAULT == "short_payload":
                data = rows.tobytes()
                sys.stdout.buffer.write(
                    json.dumps({"ok": True, "id": rid, "shape": list(rows.shape), "payload_bytes": len(data)}).encode()
                    + b"\n"
                    + data[:100]
                )
                sys.stdout.buffer.flush()
                return 0
            if FAULT == "error_reply":
                send({"ok": False, "id": rid, "error": "out of GPU memory (planted)"})
                continue
            send({"ok": True, "id": rid, "shape": list(rows.shape), "dtype": "float32"}, rows.tobytes())
        elif op == "bye":
            send({"ok": True, "id": rid})
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
