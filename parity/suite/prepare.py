"""Everything a suite checks before any item runs (bad input is exit 2 here): sides, models, builds, items.

Each side is an implementation spec of the registry (parity.engines.spec) with its own model file: a spec's
`model=PATH` (e.g. `--impl llama:model=q4_0.gguf --reference llama:model=f16.gguf`, the quantisation
question), else `--model-gguf`, else the embedded default model. Both files are validated (parity.gguf), a
bridged side's backend is built or repaired (parity.check.inputs.preflight), and text is tokenized by
llama.cpp's tokenizer of the reference's file (vocab only, in a worker). When the two sides load different
files, their vocabularies must agree first: the same vocabulary size and, for every text item, the same ids
from both files' tokenizers (parity.tokenize.tokenizer.check_token_parity; exit 2 on the first difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.backends.worker import Worker
from parity.check import inputs as check_inputs
from parity.check.job import lane_params
from parity.core.fs import sha256_file
from parity.engines import spec as impl_specs
from parity.engines.spec import ImplSpec
from parity.errors import UsageError
from parity.options import RunOptions
from parity.suite import inputs, stats
from parity.suite.sides import Side
from parity.suite.store import suite_key
from parity.tokenize.tokenizer import apply_template, check_token_parity


@dataclass(frozen=True)
class Model:
    path: Path
    sha256: str
    n_ctx_train: int
    metadata: Any


@dataclass
class Prepared:
    impl: Side
    ref: Side
    items: list[inputs.Item]
    manifest: dict[str, Any]
    threads: int  # every side's: C++ threads and numpy's BLAS threads (parity.suite.executors.thread_env)


def parse_side(text: str, role: str) -> ImplSpec:
    s = impl_specs.parse(text)
    if s.kind == "logits":
        raise UsageError(
            f"--{'impl' if role == 'implementation' else 'reference'} {text}: a logits: file holds one sequence's "
            "logits, a suite evaluates many",
            fix="use an engine (numpy, llama, bitnet, cmd:ARGV, py:module:factory)",
        )
    return s


def _model(s: ImplSpec, opts: RunOptions) -> Path:
    given = s.get("model") or opts.model_gguf
    if given is None:
        from parity.models import modelgen

        return modelgen.default_model(opts.variant)[0]
    path = Path(given).expanduser().resolve()
    if not path.is_file():
        flag = f"{s.kind}:model=" if s.get("model") else "--model-gguf "
        raise UsageError(f"{flag}{given}: no such file", fix="pass an existing GGUF file")
    return path


def _open_model(path: Path) -> Model:
    from parity.gguf.reader import open_gguf

    g = open_gguf(path)  # missing / non-GGUF / truncated / malformed -> exit 2
    n_ctx = g.get_int(f"{g.architecture}.context_length", min=1)
    return Model(path, g.sha256(), n_ctx, g.metadata)  # remembered per file stamp: not 500 MB hashed every run


def prepare(
    impl_text: str,
    ref_text: str,
    opts: RunOptions,
    *,
    prompts: Path | None,
    text: Path | None,
    ctx: int | None,
    chunks: int | None,
    mode: str,
    shard: tuple[int, int] | None,
) -> Prepared:
    impl_s, ref_s = parse_side(impl_text, "implementation"), parse_side(ref_text, "reference")
    # the input first: a bad line or file is exit 2 before any model is opened or backend built
    raws = inputs.parse_prompts(prompts) if prompts is not None else None
    corpus = inputs.read_text(text, "--text") if text is not None else None
    paths = {"implementation": _model(impl_s, opts), "reference": _model(ref_s, opts)}
    models = {p: _open_model(p) for p in dict.fromkeys(paths.values())}
    plans = {}
    for s in (impl_s, ref_s):
        if s.bridged and s.plan_key not in plans:
            plans[s.plan_key] = check_inputs.preflight(s.kind, opts, s.get("source"))
    tok_kind = ref_s.kind if ref_s.bridged else impl_s.kind if impl_s.bridged else "llama"
    tok_key = ref_s.plan_key if ref_s.bridged else impl_s.plan_key if impl_s.bridged else "llama"
    if tok_key not in plans:
        plans[tok_key] = check_inputs.preflight("llama", opts)
    ref_model = models[paths["reference"]]

    workers = [
        Worker(f"suite-vocab-{i}", plans[tok_key].bridge_path, log_dir=Path(opts.out_dir) / "logs")
        for i in range(len(models))
    ]
    try:
        vocabs = {p: check_inputs.open_vocab(w, tok_kind, p) for w, p in zip(workers, models, strict=True)}
        infos = {p: vm.info() for p, vm in vocabs.items()}
        ref_vm, ref_info = vocabs[paths["reference"]], infos[paths["reference"]]
        n_vocab = ref_info["n_vocab"]
        for p, info in infos.items():
            if info["n_vocab"] != n_vocab:
                raise UsageError(
                    f"the two model files have different vocabularies: {paths['reference'].name} {n_vocab} tokens, "
                    f"{p.name} {info['n_vocab']}",
                    fix="compare files of one model (e.g. an F16 file and its quantisation)",
                )
        n_ctx = min(m.n_ctx_train for m in models.values())

        def tokenize(t: str, parse_special: bool) -> list[int]:
            ids = ref_vm.tokenize(t, True, parse_special)
            for p, vm in vocabs.items():
                if p != paths["reference"]:
                    check_token_parity(
                        ids,
                        vm.tokenize(t, True, parse_special),
                        backend=f"{p.name}'s tokenizer",
                        ours_str=str,
                        theirs_str=str,
                    )
            return ids

        def fmt(template: str, t: str, system: str | None) -> str:
            return apply_template(
                template, t, system, ref_model.metadata, ref_model.path, add_bos=bool(ref_info["add_bos"])
            )[1]

        if raws is not None:
            assert prompts is not None
            items = inputs.tokenize_prompts(raws, tokenize, fmt, n_vocab, n_ctx)
            source, where_ctx = prompts, None
        else:
            assert text is not None and ctx is not None
            if ctx > n_ctx:
                raise UsageError(
                    f"--ctx {ctx} exceeds the model's context of {n_ctx}", fix=f"use --ctx {n_ctx} or less"
                )
            assert corpus is not None
            ids = tokenize(corpus, False)
            bos = int(ref_info["bos"]) if ref_info["add_bos"] else None
            items = inputs.chunk_text(ids, ctx, bos, chunks)
            source, where_ctx = text, ctx
    finally:
        for w in workers:
            w.close()
    for it in items:
        if not len(stats.scored_positions(len(it.tokens), mode)):
            raise UsageError(
                f"item #{it.index} ({it.id}) has {len(it.tokens)} tokens: no position is scored in mode {mode}",
                fix="give every item at least 3 tokens (--score perplexity scores the second half only)",
            )
    n_max = max(len(it.tokens) for it in items)
    sides = {}
    for role, s in (("implementation", impl_s), ("reference", ref_s)):
        params = lane_params(s.kind, opts, n_max) if s.bridged else None
        sides[role] = Side(
            role,
            s.text,
            str(paths[role]),
            plans.get(s.plan_key) if s.bridged else None,
            params,
            dtype=opts.dtype,
            eval_shape=opts.eval_shape,
            timeout=opts.timeout,
            log_dir=str(Path(opts.out_dir) / "logs"),
            verbose=opts.verbose,
        )
    decided = {
        role: {
            "spec": side.spec,
            "model_sha256": models[Path(side.model)].sha256,
            "params": None if side.params is None else side.params.to_dict(),
            "dtype": side.dtype,
            "eval_shape": side.eval_shape,
            "threads": opts.threads,
        }
        for role, side in sides.items()
    }
    key = suite_key(items, decided, mode)
    manifest = {
        "kind": "parity-suite-manifest",
        "suite_key": key,
        "mode": mode,
        "shard": list(shard) if shard else None,
        "threads": opts.threads,  # each side's, in each slot (in the key too): a --resume without --threads keeps it
        "input": {
            "mode": "prompts" if prompts is not None else "text",
            "path": str(source),
            "sha256": sha256_file(source),
            "ctx": where_ctx,
            "n_items": len(items),
            "n_tokens": sum(len(it.tokens) for it in items),
            "tokenizer": f"llama.cpp ({tok_kind}) vocabulary of {ref_model.path.name}",
        },
        "sides": {
            role: {
                "spec": side.spec,
                "label": impl_specs.parse(side.spec).label,
                "model": {"path": side.model, "sha256": models[Path(side.model)].sha256},
            }
            for role, side in sides.items()
        },
        "items": [[it.id, len(it.tokens)] for it in items],
    }
    return Prepared(sides["implementation"], sides["reference"], items, manifest, opts.threads)
