#!/usr/bin/env python3
"""parity's numpy engine as an external command of the windows protocol (README.md, section Stepwise parity).

Reads the window request (one JSON object) on stdin, evaluates the model with parity's numpy reference
engine and prints one step record per line:

    {"step": i, "position": p, "token": t, "top_ids": [...], "top_logits": [...], "logits_digest": "sha256:..."}

As an alternate it is teacher-forced: it evaluates prompt + the reference's tokens up to the window's last
step in one forward pass and keeps the window's rows. As a reference it decodes greedily from the tokens it
was given. Any engine can take this script's place: it only has to print the same fields.

Request `params` (from the implementations file): `dtype` (float32 | float64), and a deliberate bug for
demonstrations and tests: `bug_step` / `bug_field` perturb that one field of that one step (`token` +1,
a number +0.01, a list's first element likewise).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

try:
    import parity  # noqa: F401
except ImportError:  # running from a checkout: use the parity next to this example
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from parity.engines.numpy.engine import NumpyEngine
from parity.workflow.impls import persistable, step_record


def perturb(value: Any, field: str) -> Any:
    if isinstance(value, list):
        return [perturb(value[0], field), *value[1:]]
    if field == "token" or isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.01
    return f"{value}!"


def main() -> int:
    req = json.load(sys.stdin)
    inp, params = req["input"], req.get("params", {})
    start, count = int(req["start"]), int(req["count"])
    prompt, tokens, k = list(inp["prompt_ids"]), list(req["tokens"]), int(inp["top_k"])
    engine = NumpyEngine(inp["model"], dtype=str(params.get("dtype", "float32")))
    records = []
    if req["role"] == "reference":
        seq = prompt + tokens[:start]
        for j in range(count):
            rec = step_record(start + j, len(seq) - 1, engine.logits(seq)[-1], k)
            records.append(rec)
            seq.append(rec["token"])
    else:
        first = len(prompt) - 1 + start
        rows = engine.logits(prompt + tokens[: start + count - 1])[first : first + count]
        records = [step_record(start + j, first + j, rows[j], k) for j in range(len(rows))]
    for rec in records:
        out = persistable(rec)
        if params.get("bug_step") == out["step"]:
            field = str(params.get("bug_field", "top_logits"))
            out[field] = perturb(out[field], field)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
