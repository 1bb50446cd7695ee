"""Stepwise parity of N implementations, window by window (`parity windows run|resume|status|report`).

A run checks steps [start, end) in windows of W steps. Per window, the reference implementation computes its
steps first; every alternate then computes the same steps (for LLM engines teacher-forced on the reference's
tokens) and is compared field by field. Verified windows are never recomputed: the run's state is a JSON file,
written atomically with backup generations, validated on load, guarded by a lock.

Modules: `config` (the implementations TOML), `compare` (per-field tolerances), `impls` (the interface; the
numpy, llama and bitnet engines and the protocol v2 kinds cmd, py, logits), `external` (the external command protocol v1), `registry` (kind ->
implementation), `state` (persisted state, recovery), `journal` (the append-only journal: records, replay,
pruning), `lock` (the run directory's lock), `runner` (passes: run, resume, regression), `window` (one
window: compute, compare, persist), `reports` (divergence reports, archives), `status` (Markdown + HTML
page), `cli` (the `windows` subcommand), `windows_bench` (the harness's own cost).
"""

from __future__ import annotations
