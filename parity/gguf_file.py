"""Memory-mapped GGUF reading with validation that names the offending file, key, offset or tensor.

`open_gguf` checks the header itself before handing the file to gguf-py's `GGUFReader`, so the common
failures (wrong file, truncated download, big-endian export, a fork-only tensor type) produce one line
that says what is wrong and what to do, instead of a numpy reshape error from deep inside the reader.
Nothing is dequantized here: tensors stay zero-copy views of the memory map.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import GGUFReader, ReaderField, ReaderTensor

from parity import ternary
from parity.errors import ModelFormatError, UsageError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# magic (4) + version (u32) + tensor count (u64) + metadata KV count (u64)
HEADER_SIZE = 24

_REDOWNLOAD = "re-download or regenerate the model and compare its SHA-256 with the lock file"


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
        return _type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        """Number of scalar elements (product of the shape)."""
        return int(np.prod(self.shape, dtype=np.int64))


def _type_name(ggml_type: int) -> str:
    if ggml_type == ternary.ForkType.I2_S:
        return "I2_S"
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


class _CheckedReader(GGUFReader):
    """GGUFReader with bounds checks that name the offending offset or tensor, and faster numeric arrays.

    gguf-py slices the memory map without checking lengths; on a truncated file that fails later with
    an anonymous IndexError or reshape error. The three overridden hooks are gguf-py's internal parsing
    steps (stable across gguf 0.1x); each still delegates the actual parsing to gguf-py.
    """

    def __init__(self, path: Path, file_size: int) -> None:
        self._path = path
        self._file_size = file_size
        super().__init__(path, "r")

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: Literal["I", "S", "<"] | None = None,
    ) -> npt.NDArray[Any]:
        # gguf-py slices the memmap without a bounds check, so a short file surfaces later as an
        # unrelated IndexError; checking every read here names the offset instead. The check only
        # compares lengths on the hot path because this runs several times per vocabulary entry.
        try:
            arr = super()._get(offset, dtype, count, override_order)
        except ValueError:  # a partial trailing element cannot be viewed as `dtype`
            arr = None
        if arr is None or arr.shape[0] != int(count):
            raise ModelFormatError(
                f"{self._path} is truncated or corrupt: reading {int(count)} x {np.dtype(dtype).name} "
                f"at offset {int(offset)} runs past the end of the file ({self._file_size} bytes)",
                fix=_REDOWNLOAD,
            )
        return arr

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[GGUFValueType]]:
        # gguf-py parses a numeric array one element at a time (slow for a vocabulary-sized token score
        # array); one view of the whole array is the same data, laid out as a single part.
        if raw_type == GGUFValueType.ARRAY:
            raw_itype = self._get(orig_offs, np.uint32)
            item_type = GGUFValueType(int(raw_itype[0]))
            nptype = self.gguf_scalar_to_np.get(item_type)
            if nptype is not None:
                alen = self._get(orig_offs + 4, np.uint64)
                values = self._get(orig_offs + 12, nptype, int(alen[0]))
                size = 12 + int(values.nbytes)
                return size, [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, item_type]
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        fork_only: list[ReaderTensor] = []  # bitnet.cpp's I2_S (type 36): gguf-py has no size for it
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            type_id = int(raw_dtype[0])
            if type_id == ternary.ForkType.I2_S:
                fork_only.append(self._i2_s_tensor(start_offs, field, name))
                continue
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise ModelFormatError(
                    f"{self._path}: tensor '{name}' has ggml type {type_id}, which gguf-py cannot read",
                    fix="convert the model with mainline llama.cpp or bitnet.cpp's I2_S "
                    "(other fork-only types such as TL1/TL2 are unsupported)",
                ) from None
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            ne = [int(d) for d in dims]
            if ne and ne[0] % block_size != 0:
                raise ModelFormatError(
                    f"{self._path}: tensor '{name}' has row length {ne[0]}, "
                    f"not a multiple of the {qtype.name} block size {block_size}",
                    fix=_REDOWNLOAD,
                )
            rel = int(offset_tensor[0])
            if rel % self.alignment != 0:
                raise ModelFormatError(
                    f"{self._path}: tensor '{name}' data offset {rel} is not aligned to {self.alignment} bytes",
                    fix=_REDOWNLOAD,
                )
            n_bytes = math.prod(ne) * type_size // block_size  # Python ints: corrupt dims cannot overflow
            end = start_offs + rel + n_bytes
            if end > self._file_size:
                raise ModelFormatError(
                    f"{self._path} is truncated: tensor '{name}' needs bytes up to offset {end} "
                    f"but the file has {self._file_size}",
                    fix=_REDOWNLOAD,
                )
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) != ternary.ForkType.I2_S])
        self.tensors = [*self.tensors, *fork_only]

    def _i2_s_tensor(self, start_offs: int, field: ReaderField, name: str) -> ReaderTensor:
        """A raw-byte view of an I2_S tensor: n/4 code bytes + 32 (scale, padding), the fork's ggml_nbytes."""
        dims = field.parts[3]
        n = math.prod(int(d) for d in dims)
        if not dims.size or int(dims[0]) % ternary.QK_I2_S != 0:
            raise ModelFormatError(
                f"{self._path}: I2_S tensor '{name}' has row length {int(dims[0]) if dims.size else 0}, "
                f"not a multiple of {ternary.QK_I2_S}",
                fix=_REDOWNLOAD,
            )
        n_bytes = ternary.i2_s_nbytes(n)
        rel = int(field.parts[5][0])
        end = start_offs + rel + n_bytes
        if rel % self.alignment != 0 or end > self._file_size:
            raise ModelFormatError(
                f"{self._path}: I2_S tensor '{name}' at data offset {rel} ({n_bytes} bytes) is misaligned "
                f"or runs past the end of the file ({self._file_size} bytes)",
                fix=_REDOWNLOAD,
            )
        return ReaderTensor(
            name=name,
            tensor_type=ternary.ForkType.I2_S,  # type: ignore[arg-type]  # an id gguf-py does not know
            shape=dims,
            n_elements=n,
            n_bytes=n_bytes,
            data_offset=start_offs + rel,
            data=self._get(start_offs + rel, np.uint8, n_bytes),
            field=field,
        )


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

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(reader.alignment)
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue  # header pseudo-fields gguf-py adds; not key/value pairs of the file
            try:
                self.metadata[key] = _decode_field(field)
            except UnicodeDecodeError as exc:
                raise ModelFormatError(
                    f"{path}: metadata key '{key}' at offset {field.offset} is not valid UTF-8 ({exc.reason})",
                    fix=_REDOWNLOAD,
                ) from None
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

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"

    @property
    def architecture(self) -> str:
        """The `general.architecture` value, e.g. "llama"."""
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or `default` when the key is absent."""
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """A metadata value that must be present; raises ModelFormatError naming the key otherwise."""
        if key not in self.metadata:
            raise ModelFormatError(
                f"{self.path}: required metadata key '{key}' is missing",
                fix="convert the model with a current llama.cpp convert script, which writes this key",
            )
        return self.metadata[key]

    def arch_key(self, suffix: str) -> str:
        """The architecture-scoped key name, e.g. `arch_key("block_count")` -> "llama.block_count"."""
        return f"{self.architecture}.{suffix}"

    def sha256(self) -> str:
        """Hex SHA-256 of the whole file, streamed in 1 MiB chunks and cached."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256


def _check_header(path: Path, size: int) -> None:
    if size < HEADER_SIZE:
        raise ModelFormatError(
            f"{path} is not a GGUF file: {size} bytes is shorter than the {HEADER_SIZE}-byte header",
            fix=_REDOWNLOAD,
        )
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path} is not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})",
            fix="pass a .gguf model; convert safetensors/PyTorch checkpoints with llama.cpp's convert_hf_to_gguf.py",
        )
    (version,) = struct.unpack("<I", head[4:8])
    if version in SUPPORTED_VERSIONS:
        return
    if struct.unpack(">I", head[4:8])[0] in SUPPORTED_VERSIONS:
        raise ModelFormatError(
            f"{path} is a big-endian GGUF file, which llama.cpp and parity do not read on this host",
            fix="convert the model again without --bigendian",
        )
    raise ModelFormatError(
        f"{path} has GGUF version {version}; supported versions are {', '.join(map(str, SUPPORTED_VERSIONS))}",
        fix="convert the model with a current llama.cpp",
    )


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
    _check_header(p, size)
    try:
        reader = _CheckedReader(p, size)
    except ModelFormatError:
        raise
    except Exception as exc:  # gguf-py raises ValueError/IndexError/KeyError/... on damaged files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFormatError(
            f"{p} looks truncated or corrupt: gguf-py could not parse it ({detail})",
            fix=_REDOWNLOAD,
        ) from exc
    return GGUFFile(p, reader)
