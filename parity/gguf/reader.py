"""Memory-mapped GGUF reading with validation that names the offending file, key, offset or tensor.

`open_gguf` checks the header itself before handing the file to gguf-py's `GGUFReader`, so the common
failures (wrong file, truncated download, big-endian export, a fork-only tensor type) produce one line
that says what is wrong and what to do, instead of a numpy reshape error from deep inside the reader.
The checks are in parity.gguf.checks, the typed metadata accessors in parity.gguf.metadata.
Nothing is dequantized here: tensors stay zero-copy views of the memory map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf.constants import GGUFValueType
from gguf.gguf_reader import ReaderField

from parity.core.fs import sha256_file_cached
from parity.core.paths import user_cache_dir
from parity.errors import ModelFormatError, UsageError
from parity.gguf.checks import REDOWNLOAD, CheckedReader, check_header, value_type_name
from parity.gguf.metadata import Metadata
from parity.gguf.types import type_name


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor of a GGUF file, not yet dequantized.

    `shape` is in numpy order (rows, cols), i.e. ggml's `ne` reversed, so a weight ggml stores as
    `[n_in, n_out]` has shape `(n_out, n_in)`. `data` is a read-only view of the memory map: typed
    (float32/float16) for plain float tensors, raw uint8 block bytes for quantized ones.
    """

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: npt.NDArray[Any]
    offset: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        """The ggml type name (e.g. "Q8_0"), or "type N" for ids gguf-py does not know."""
        return type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        """Number of scalar elements (product of the shape)."""
        return int(np.prod(self.shape, dtype=np.int64))


def _decode_field(field: ReaderField) -> Any:
    """Turn a gguf-py field into plain Python values (str, int, float, bool, or lists of them)."""
    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY and len(field.types) == 2 and field.types[1] != GGUFValueType.STRING:
        # One vectorised conversion instead of gguf-py's per-element tolist(): token score and
        # token type arrays have one entry per vocabulary item.
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    return field.contents()


class GGUFFile:
    """An open, validated GGUF file: decoded metadata and zero-copy tensor views."""

    def __init__(self, path: Path, reader: CheckedReader) -> None:
        self.path = path
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(reader.alignment)
        self.metadata = Metadata(source=str(path))
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue  # header pseudo-fields gguf-py adds; not key/value pairs of the file
            if key in reader.string_arrays:  # validated when read (parity.gguf.strings)
                self.metadata[key] = reader.string_arrays[key]
                self.metadata.types[key] = value_type_name(field.types)
                continue
            try:
                self.metadata[key] = _decode_field(field)
            except UnicodeDecodeError as exc:
                raise ModelFormatError(
                    f"{path}: metadata key '{key}' at offset {field.offset} is not valid UTF-8 ({exc.reason})",
                    fix=REDOWNLOAD,
                ) from None
            self.metadata.types[key] = value_type_name(field.types)
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(
                name=t.name,
                ggml_type=int(t.tensor_type),
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                data=t.data,
                offset=int(t.data_offset),
                n_bytes=int(t.n_bytes),
            )
            for t in reader.tensors
        }
        self._sha256: str | None = None
        # Metadata's typed accessors (parity.gguf.metadata): a value of the wrong type, out of range or missing
        # is a ModelFormatError naming the key, what was expected and what the file holds.
        self.get_int = self.metadata.get_int
        self.get_float = self.metadata.get_float
        self.get_str = self.metadata.get_str
        self.get_bool = self.metadata.get_bool
        self.get_array = self.metadata.get_array

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"

    @property
    def architecture(self) -> str:
        """The `general.architecture` value, e.g. "llama"."""
        return self.metadata.get_str("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or `default` when the key is absent."""
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """A metadata value that must be present; raises ModelFormatError naming the key otherwise."""
        if key not in self.metadata:
            raise self.metadata.missing(key)
        return self.metadata[key]

    def arch_key(self, suffix: str) -> str:
        """The architecture-scoped key name, e.g. `arch_key("block_count")` -> "llama.block_count"."""
        return f"{self.architecture}.{suffix}"

    def sha256(self) -> str:
        """Hex SHA-256 of the whole file, remembered per file stamp across runs (core/fs.sha256_file_cached)."""
        if self._sha256 is None:
            self._sha256 = sha256_file_cached(self.path, user_cache_dir() / "sha256")
        return self._sha256


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file, memory-mapped; nothing is dequantized.

    Raises UsageError when the file does not exist and ModelFormatError when it is not a GGUF file,
    has an unsupported version, is truncated or corrupt, or holds a tensor type gguf-py cannot read.
    """
    p = Path(path)
    if not p.is_file():
        what = "model path is a directory, not a file" if p.is_dir() else "model file not found"
        raise UsageError(
            f"{what}: {p}",
            fix="pass the path of an existing .gguf file",
        )
    size = p.stat().st_size
    check_header(p, size)
    try:
        reader = CheckedReader(p, size)
    except ModelFormatError:
        raise
    except Exception as exc:  # gguf-py raises ValueError/IndexError/KeyError/... on damaged files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFormatError(
            f"{p} looks truncated or corrupt: gguf-py could not parse it ({detail})",
            fix=REDOWNLOAD,
        ) from exc
    return GGUFFile(p, reader)
