"""Input checks of the main job: everything that can be wrong before any lane runs is exit 2 here.

The model file (GGUF pre-flight, the numpy engine's hyperparameters, each lane's tensor formats), the
tokenizer authority, the implementation and reference specs, and whether each backend is built (repair
builds it unless --no-repair or CI). tests/unit/test_gguf_fuzz.py runs mutated files through check_input.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity.backends import build, lock
from parity.backends.bridge import BackendParams
from parity.backends.worker import RemoteModel, Worker
from parity.core.proc import log
from parity.engines import spec as impl_specs
from parity.engines.spec import ImplSpec
from parity.errors import (
    BackendUnavailable,
    ModelFormatError,
    PermissionDenied,
    RepairRecursion,
    UsageError,
    WorkerError,
)
from parity.options import RunOptions
from parity.tokenize.tokenizer import HFTokenizer, apply_template, check_token_parity

if TYPE_CHECKING:
    from parity.engines.numpy.engine import NumpyEngine
    from parity.gguf.reader import GGUFFile

REPAIR_GUARD_ENV = "PARITY_REPAIRING"


def preflight(backend: str, opts: RunOptions, source: str | None = None) -> build.BuildPlan:
    """Make sure `backend` is built (from `source`, a local tree, when given); repair (build it) when allowed,
    else fail with the fixing command."""
    spec = lock.get_spec(backend)
    override = lock.source_override(spec, source)
    what = f"the {backend} backend" + (f" from {override}" if source and override else "")
    fix = f"nox -s setup_cpp -- --backend {backend}" + (f" --source {override}" if source and override else "")
    if spec.default_source == "git" and not source:
        fix += f" (offline: set {spec.override_env} to a local {backend} checkout)"
    why = "CI is set" if os.environ.get("CI") else "--no-repair was given"
    try:
        p = build.plan(spec, override)
    except BackendUnavailable as exc:  # e.g. no compiler for it: it cannot have been built here either
        if opts.repair:
            raise
        raise BackendUnavailable(
            f"{what} is not built and auto-repair is off ({why}); building it needs: {exc.message}",
            fix=f"{fix}, after: {exc.fix}" if exc.fix else fix,
        ) from exc
    if build.is_built(p):
        return p
    if not opts.repair:
        raise BackendUnavailable(f"{what} is not built and auto-repair is off ({why})", fix=fix)
    if os.environ.get(REPAIR_GUARD_ENV) == backend:
        raise RepairRecursion(f"repairing {backend} re-entered itself", fix=f"run `{fix}` by hand and read its output")
    log(f"{what}: not built; repairing (building it now; pass --no-repair to fail instead)")
    os.environ[REPAIR_GUARD_ENV] = backend
    try:
        return build.ensure_built(spec, override, verbose=opts.verbose)
    finally:
        os.environ.pop(REPAIR_GUARD_ENV, None)


def resolve_tokenizer(model_path: Path, tok_path: Path | None, gguf: Any) -> tuple[HFTokenizer | None, str]:
    """The tokenizer authority and the GGUF vocabulary's config hash.

    The authority: --tokenizer (external), a tokenizer.json beside the model (auto_discovered), else the
    vocabulary embedded in the GGUF exported to HF tokenizers (gguf_embedded; cached per model SHA-256 by
    parity.tokenize.cache, so a warm run exports nothing). None only when the GGUF's vocabulary type cannot
    be exported; then llama.cpp's own ids are the authority. A malformed vocabulary is exit 2 here."""
    from parity.tokenize.cache import vocab_facts

    beside = model_path.parent / "tokenizer.json"
    external = tok_path if tok_path is not None else (beside if beside.is_file() else None)
    facts = vocab_facts(gguf.metadata, model_path, gguf.sha256(), export=external is None)
    if external is not None:
        return HFTokenizer.load(external, source="external" if tok_path else "auto_discovered"), facts.gguf_config_hash
    if not facts.exported:
        log(
            f"tokenizer: cannot export the GGUF vocabulary ({facts.export_error}); using llama.cpp's ids as the authority"
        )
        return None, facts.gguf_config_hash
    assert facts.hf_config_hash is not None
    hf = HFTokenizer.from_export(
        facts.tokenizer_json, facts.tokenizer_text, facts.hf_config_hash, path=model_path, file_hash=gguf.sha256()
    )
    return hf, facts.gguf_config_hash


@dataclass(frozen=True)
class Checked:
    """What check_input found: the opened GGUF, the numpy engine (None unless it is the implementation under
    test), the tokenizer authority, the GGUF vocabulary's config hash and the training context length."""

    gguf: GGUFFile
    engine: NumpyEngine | None
    hf: HFTokenizer | None
    vocab_hash: str
    n_ctx_train: int


def check_input(
    opts: RunOptions,
    lane_backends: list[str],
    model_path: Path,
    tok_path: Path | None,
    lane_models: dict[str, Path] | None = None,
) -> Checked:
    """Every check of the input files that needs no backend: bad input is exit 2 here, before any lane.

    The GGUF's header, metadata and tensor table (parity.gguf), its hyperparameters and tensor shapes (the
    numpy engine, built only when it is the implementation under test: another engine may read models numpy
    cannot), each lane's tensor formats, and the tokenizer (tokenizer.json, or the GGUF vocabulary exported).
    tests/unit/test_gguf_fuzz.py runs mutated files through exactly this function.
    """
    from parity.engines.numpy.engine import NumpyEngine
    from parity.gguf.reader import open_gguf

    gguf = open_gguf(model_path)  # missing / non-GGUF / truncated / malformed -> exit 2 before anything runs
    engine = None
    if impl_specs.parse(opts.impl).kind == "numpy":
        engine = NumpyEngine(gguf, dtype=opts.dtype)  # unsupported architecture, bad hyperparameters -> exit 2
        n_ctx_train = engine.n_ctx_train
    else:
        n_ctx_train = gguf.get_int(f"{gguf.architecture}.context_length", min=1)
    check_lane_formats(opts, lane_backends, gguf, lane_models or {})  # unsupported model format -> exit 2
    hf, vocab_hash = resolve_tokenizer(model_path, tok_path, gguf)  # a malformed vocabulary fails here
    return Checked(gguf, engine, hf, vocab_hash, n_ctx_train)


def reference_specs(texts: list[str]) -> list[ImplSpec]:
    """Parse `--reference` specs: C++ engines only (the authority), each lane named once (exit 2 otherwise)."""
    refs = [impl_specs.parse(t) for t in texts]
    for r in refs:
        if not r.bridged:
            raise UsageError(
                f"--reference {r.text}: a reference is a C++ engine ({', '.join(impl_specs.BRIDGED)})",
                fix=f"test {r.text} with --impl {r.text} against --reference llama",
            )
        if r.get("model"):
            raise UsageError(
                f"--reference {r.text}: a reference lane evaluates the run's model (model= is for parity suite)",
                fix="compare two model files with `parity suite --impl KIND:model=A --reference KIND:model=B`",
            )
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--reference given twice: {labels}", fix="name each reference lane once")
    return refs


def open_vocab(w: Worker, backend: str, path: Path) -> RemoteModel:
    """Open `path` vocab-only in the backend. A file the pre-flight accepted but the backend refuses to
    load (or crashes on) is still bad input: exit 2 with the backend's reason on one line, before any lane."""
    try:
        return RemoteModel(w, str(path), BackendParams(vocab_only=1))
    except WorkerError as exc:
        lines = [ln.strip() for ln in exc.message.splitlines() if ln.strip() and not ln.startswith("---")]
        reason = lines[0] if lines else "no reason given"
        if len(lines) > 1:
            reason += f"; last backend log line: {lines[-1]}"
        raise ModelFormatError(
            f"the {backend} backend cannot load {path}: {reason}",
            fix=f"{_REBUILD_MODEL}; {exc.fix}" if exc.fix else _REBUILD_MODEL,
        ) from exc


_REBUILD_MODEL = "re-download or re-convert the model (the backend refuses this file)"


def check_lane_formats(
    opts: RunOptions, lane_backends: list[str], gguf: GGUFFile, lane_models: dict[str, Path]
) -> None:
    """Refuse, before any lane runs, a lane whose backend cannot load its file's tensor types (exit 2)."""
    from parity.gguf import ternary
    from parity.gguf.reader import open_gguf

    for b in lane_backends:
        f = open_gguf(lane_models[b]) if b in lane_models else gguf
        ternary.require_loadable(b, f.path, {name: t.ggml_type for name, t in f.tensors.items()})
    impl = impl_specs.parse(opts.impl)
    if opts.numerics != "exact" and impl.kind != "numpy":  # a mirror is the numpy engine's, never the impl's
        raise UsageError(
            f"--numerics {opts.numerics} mirrors C++ rounding in the numpy engine, not in {impl.text}",
            fix="use --numerics exact with this --impl",
        )
    if opts.numerics != "exact" and gguf.architecture != "bitnet":
        raise UsageError(
            f"--numerics {opts.numerics} is implemented for the bitnet architecture, not {gguf.architecture!r}",
            fix="use --numerics exact",
        )


def tokenize_in_backends(
    opts: RunOptions,
    plans: dict[str, build.BuildPlan],
    by_key: dict[str, ImplSpec],
    spare: dict[str, Worker],
    lane_models: dict[str, Path],
    model_path: Path,
    metadata: dict[str, Any],
    hf: HFTokenizer | None,
    backend_ids: dict[str, list[int]],
    started: dict[str, Future[tuple[Worker, RemoteModel]]] | None = None,
) -> tuple[str, str | None, dict[str, Any] | None]:
    """Format the prompt, tokenize it in every backend (vocabulary only) and check each against the tokenizer
    authority (exit 2 on a mismatch). Fills `backend_ids` and `spare` (the started workers, by plan key).
    `started`: workers with the vocabulary already opened (check/early.py), by plan key; taken from it.
    Returns (template, formatted prompt, chat template record)."""
    formatted: str | None = None
    template = opts.prompt_template  # set with the first backend, which says whether the vocabulary adds BOS
    chat_record: dict[str, Any] | None = None
    for b, p in plans.items():
        kind = by_key[b].kind
        early = (started or {}).pop(b, None)
        if early is not None:
            w, vm = early.result()  # its error (e.g. the backend refuses the file: exit 2) is raised here
            spare[b] = w
        else:
            w = spare[b] = Worker(
                kind,
                p.bridge_path,
                log_dir=Path(opts.out_dir) / "logs",
                log_level=3 if opts.verbose else 1,
                timeout=opts.timeout,
            )
            vm = open_vocab(w, kind, lane_models.get(kind, model_path))
        try:
            if formatted is None:  # a chat template's own leading BOS is dropped when llama.cpp adds one
                template, formatted, chat_record = apply_template(
                    opts.prompt_template,
                    opts.prompt,
                    opts.system_prompt,
                    metadata,
                    model_path,
                    add_bos=bool(vm.info()["add_bos"]),
                )
            ids = vm.tokenize(formatted, True, True)
            if opts.dump_cpp_ids:
                log(f"{b} ids: {ids}")
            if hf is not None:
                ours = hf.encode(formatted)
                if opts.dump_ids:
                    log(f"tokenizer.json ids: {ours}")
                    log(f"{b} ids: {ids}")

                def piece(t: int, vm: RemoteModel = vm) -> str:
                    return vm.piece(t).decode("utf-8", "replace")

                check_token_parity(ours, ids, backend=b, ours_str=hf.token_str, theirs_str=piece)
            backend_ids[b] = ids
        finally:
            vm.close()  # the vocabulary-only model; the worker stays for the lane
    return template, formatted, chat_record


def ensure_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError as exc:
        raise PermissionDenied(f"cannot write to --out-dir {out_dir}", fix="choose a writable directory") from exc
    except OSError as exc:
        raise UsageError(f"cannot use --out-dir {out_dir}: {exc.strerror}", fix="choose another directory") from exc
