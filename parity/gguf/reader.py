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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import GGUFReader, ReaderField, ReaderTensor

from parity.errors import ModelFormatError, UsageError
from parity.gguf import ternary

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# magic (4) + version (u32) + tensor count (u64) + metadata KV count (u64)
HEADER_SIZE = 24

_REDOWNLOAD = "re-download or regenerate the model and compare its SHA-256 with the lock file"
_RECONVERT = "re-convert the model with a current llama.cpp convert script"

# Limits llama.cpp's gguf.cpp (gguf_init_from_file_impl) enforces on every file it reads.
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # a tensor name must be shorter than this
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1

INT_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")
FLOAT_TYPES = ("float32", "float64")


def _value_type_name(types: list[GGUFValueType]) -> str:
    """A GGUF value type as a short name: "uint32", "string", "array of float32"."""
    if not types:
        return "unknown"
    if types[0] == GGUFValueType.ARRAY:
        return "array of " + (types[1].name.lower() if len(types) > 1 else "nothing")
    return types[0].name.lower()


def _python_type_name(value: Any) -> str:
    """The GGUF-like type name of an already-decoded value (metadata built in Python has no GGUF types)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array of " + (_python_type_name(value[0]) if value else "nothing")
    return type(value).__name__


def _show(value: Any) -> str:
    """A value for an error message, cut short (a vocabulary array can have 256k entries)."""
    if isinstance(value, list):
        head = ", ".join(_show(v) for v in value[:3])
        return f"[{head}{', ...' if len(value) > 3 else ''}] ({len(value)} entries)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_Missing = object()


class Metadata(dict[str, Any]):
    """Decoded GGUF metadata (key -> plain Python value) that knows each key's GGUF value type.

    The typed accessors are how every hyperparameter reader and the tokenizer export read metadata: a
    value of the wrong type, out of range or missing raises ModelFormatError naming the key, what was
    expected and what the file holds, never a ValueError/TypeError from `int()` or `float()`. Metadata
    built in Python (tests, plain dicts) has no GGUF types; then the Python type is checked instead.
    """

    def __init__(
        self, values: Mapping[str, Any] | None = None, *, types: Mapping[str, str] | None = None, source: str = "GGUF"
    ) -> None:
        super().__init__(values or {})
        self.types: dict[str, str] = dict(types or {})
        self.source = source

    @classmethod
    def wrap(cls, metadata: Mapping[str, Any], source: str) -> Metadata:
        """`metadata` itself when it already is a Metadata, else a typeless Metadata over a copy of it."""
        return metadata if isinstance(metadata, Metadata) else cls(metadata, source=source)

    def type_of(self, key: str) -> str:
        """The key's GGUF value type ("uint32", "array of string", ...), or its Python type without one."""
        return self.types.get(key) or _python_type_name(self.get(key))

    def error(self, key: str, expected: str, fix: str = _RECONVERT) -> ModelFormatError:
        """ModelFormatError: key X: expected <expected>, got <value> (<type>)."""
        return ModelFormatError(
            f"{self.source}: metadata key '{key}': expected {expected}, got {_show(self.get(key))} ({self.type_of(key)})",
            fix=fix,
        )

    def missing(self, key: str) -> ModelFormatError:
        return ModelFormatError(
            f"{self.source}: required metadata key '{key}' is missing",
            fix="convert the model with a current llama.cpp convert script, which writes this key",
        )

    def _typed(self, key: str, allowed: Iterable[str] | None) -> bool:
        """Whether the key's GGUF type (when known) is one of `allowed` (None: any)."""
        gtype = self.types.get(key)
        return gtype is None or allowed is None or gtype in tuple(allowed)

    def get_int(
        self,
        key: str,
        default: int | None = None,
        *,
        min: int | None = None,
        max: int | None = None,
        gguf_types: Iterable[str] | None = INT_TYPES,
        per_layer: bool = False,
    ) -> int:
        """An integer value (`default` when absent, required when `default` is None).

        `gguf_types` are the GGUF types accepted (llama.cpp reads its hyperparameters as exactly uint32);
        `per_layer` also accepts an array whose entries are all equal (llama.cpp's get_key_or_arr).
        """
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        expected = "an integer" if min is None else ("a positive integer" if min == 1 else f"an integer >= {min}")
        if max is not None:
            expected += f" <= {max}"
        allowed = tuple(gguf_types) if gguf_types is not None else None
        if allowed is not None and len(allowed) == 1:
            expected = f"{expected} of type {allowed[0]}"
        if isinstance(value, list) and per_layer:
            if self.types.get(key) not in (None, "array of int32", "array of uint32"):
                raise self.error(key, expected + " (or a per-layer array of uint32/int32)")
            if not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise self.error(key, expected + " (or a non-empty per-layer array of integers)")
            if any(v != value[0] for v in value):
                raise ModelFormatError(
                    f"{self.source}: '{key}' varies per layer ({_show(value)}), which the numpy engine does not support",
                    fix="use a model with the same value in every layer",
                )
            value = value[0]
        elif isinstance(value, bool) or not isinstance(value, int) or not self._typed(key, allowed):
            raise self.error(key, expected)
        if (min is not None and value < min) or (max is not None and value > max):
            raise self.error(key, expected)
        return int(value)

    def get_float(
        self,
        key: str,
        default: float | None = None,
        *,
        min: float | None = None,
        gguf_types: Iterable[str] | None = ("float32",),
    ) -> float:
        """A finite float value (`default` when absent, required when `default` is None)."""
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        allowed = tuple(gguf_types) if gguf_types is not None else None
        expected = "a finite number" if min is None else f"a finite number >= {min:g}"
        if allowed is not None and len(allowed) == 1:
            expected = f"{expected} of type {allowed[0]}"
        ok_python = isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))
        if not ok_python or not self._typed(key, allowed) or not math.isfinite(value):
            raise self.error(key, expected)
        if min is not None and value < min:
            raise self.error(key, expected)
        return float(value)

    def get_str(self, key: str, default: str | None = None) -> str:
        """A string value (`default` when absent, required when `default` is None)."""
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        if not isinstance(value, str):
            raise self.error(key, "a string")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        """A bool value, `default` when absent."""
        if key not in self:
            return default
        value = self[key]
        if not isinstance(value, bool):
            raise self.error(key, "a bool")
        return value

    def get_array(self, key: str, elem: type, default: list[Any] | None = None) -> list[Any]:
        """An array whose entries are all `elem` (int, float or str; float also accepts ints; bool is not int)."""
        if key not in self:
            if default is None:
                raise self.missing(key)
            return default
        value = self[key]
        what = {int: "integers", float: "numbers", str: "strings"}.get(elem, elem.__name__)
        if not isinstance(value, list):
            raise self.error(key, f"an array of {what}")
        if elem is float:
            ok = all(isinstance(v, float | int) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        elif elem is int:
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = all(isinstance(v, elem) for v in value)
        if not ok:
            raise self.error(key, f"an array of {'finite ' if elem is float else ''}{what}")
        return value


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

    def _build_fields(self, offs: int, count: int) -> int:
        # gguf-py's loop, with llama.cpp's checks (gguf_init_from_file_impl) naming the key: a key that is
        # empty, repeated or not UTF-8, an unknown value type, an array of arrays. Lengths are checked
        # against the file by `_get`, so a huge declared string or array length never allocates.
        previous = "(none: the first key)"
        for index in range(int(count)):
            where = f"metadata key #{index} at offset {offs} (after '{previous}')"
            klen, kdata = self._get_str(offs)
            try:
                key = bytes(kdata).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ModelFormatError(
                    f"{self._path}: {where} is not valid UTF-8 ({exc.reason})", fix=_REDOWNLOAD
                ) from None
            if not key:
                raise ModelFormatError(f"{self._path}: {where} has an empty name", fix=_REDOWNLOAD)
            if key in self.fields:
                raise ModelFormatError(f"{self._path}: metadata key '{key}' appears twice", fix=_REDOWNLOAD)
            orig_offs = offs
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            self._check_value_type(key, int(raw_type[0]))
            if int(raw_type[0]) == GGUFValueType.ARRAY:
                self._check_value_type(key, int(self._get(offs, np.uint32)[0]), in_array=True)
            size, parts, idxs, types = self._get_field_parts(offs, int(raw_type[0]))
            parts = [klen, kdata, raw_type, *parts]
            self._push_field(ReaderField(orig_offs, key, parts, [i + 3 for i in idxs], types), skip_sum=True)
            offs += size
            previous = key
        return offs

    def _check_value_type(self, key: str, raw: int, in_array: bool = False) -> None:
        valid = {int(t) for t in GGUFValueType}
        if raw not in valid or (in_array and raw == GGUFValueType.ARRAY):
            what = "array element type" if in_array else "value type"
            raise ModelFormatError(
                f"{self._path}: metadata key '{key}' has {what} {raw}, which is not a GGUF type"
                + (" (arrays of arrays are not allowed)" if raw == GGUFValueType.ARRAY else ""),
                fix=_REDOWNLOAD,
            )

    def _get_tensor_info_field(self, orig_offs: int) -> ReaderField:
        # gguf-py's reading, with n_dims checked before the dims are read (llama.cpp: n_dims <= GGML_MAX_DIMS)
        offs = orig_offs
        name_len, name_data = self._get_str(offs)
        offs += int(name_len.nbytes + name_data.nbytes)
        try:
            name = bytes(name_data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(
                f"{self._path}: the name of the tensor at offset {orig_offs} is not valid UTF-8 ({exc.reason})",
                fix=_REDOWNLOAD,
            ) from None
        if len(name_data) >= GGML_MAX_NAME:
            raise ModelFormatError(
                f"{self._path}: tensor name {_show(name)} is {len(name_data)} bytes; llama.cpp allows at most "
                f"{GGML_MAX_NAME - 1}",
                fix=_REDOWNLOAD,
            )
        n_dims = self._get(offs, np.uint32)
        offs += int(n_dims.nbytes)
        if int(n_dims[0]) > GGML_MAX_DIMS:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has {int(n_dims[0])} dimensions; GGUF allows at most {GGML_MAX_DIMS}",
                fix=_REDOWNLOAD,
            )
        dims = self._get(offs, np.uint64, int(n_dims[0]))
        offs += int(dims.nbytes)
        raw_dtype = self._get(offs, np.uint32)
        offs += int(raw_dtype.nbytes)
        offset_tensor = self._get(offs, np.uint64)
        return ReaderField(orig_offs, name, [name_len, name_data, n_dims, dims, raw_dtype, offset_tensor], [1, 3, 4, 5])

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[ReaderField]]:
        # Runs right before gguf-py reads general.alignment; check it here so the message names the key.
        align = self.fields.get("general.alignment")
        if align is not None:
            value = int(align.parts[-1][0]) if align.types == [GGUFValueType.UINT32] else None
            if value is None or value == 0 or value & (value - 1):
                shown = _show(align.contents()) if align.types[:1] != [GGUFValueType.ARRAY] else "an array"
                raise ModelFormatError(
                    f"{self._path}: metadata key 'general.alignment': expected a power of two of type uint32, "
                    f"got {shown} ({_value_type_name(align.types)})",
                    fix=_REDOWNLOAD,
                )
        names: set[str] = set()
        fields = []
        for _ in range(int(count)):
            field = self._get_tensor_info_field(offs)
            if field.name in names:
                raise ModelFormatError(f"{self._path}: tensor '{field.name}' appears twice", fix=_REDOWNLOAD)
            names.add(field.name)
            offs += sum(int(part.nbytes) for part in field.parts)
            fields.append(field)
        return offs, fields

    def _tensor_nbytes(self, field: ReaderField) -> int:
        """ggml_nbytes of one tensor after llama.cpp's shape and type checks, which name the tensor."""
        name = field.name
        dims, type_id = field.parts[3], int(field.parts[4][0])
        ne = [int(d) for d in dims]
        for j, d in enumerate(ne):
            if d > INT64_MAX:  # a uint64 that is negative as llama.cpp's int64_t ne[j]
                raise ModelFormatError(
                    f"{self._path}: tensor '{name}' dimension {j} has {d - 2**64} elements (negative)",
                    fix=_REDOWNLOAD,
                )
        n = math.prod(ne)
        if n > INT64_MAX:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has shape {tuple(ne)}, whose element count overflows int64",
                fix=_REDOWNLOAD,
            )
        if type_id == ternary.ForkType.I2_S:
            if not ne or ne[0] % ternary.QK_I2_S != 0:
                raise ModelFormatError(
                    f"{self._path}: I2_S tensor '{name}' has row length {ne[0] if ne else 0}, "
                    f"not a multiple of {ternary.QK_I2_S}",
                    fix=_REDOWNLOAD,
                )
            return ternary.i2_s_nbytes(n)
        try:
            qtype = GGMLQuantizationType(type_id)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has ggml type {type_id}, which gguf-py cannot read",
                fix="convert the model with mainline llama.cpp or bitnet.cpp's I2_S "
                "(other fork-only types such as TL1/TL2 are unsupported)",
            ) from None
        if (ne[0] if ne else 1) % block_size != 0:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has row length {ne[0] if ne else 1}, "
                f"not a multiple of the {qtype.name} block size {block_size}",
                fix=_REDOWNLOAD,
            )
        n_bytes = n // block_size * type_size  # Python ints: corrupt dims cannot overflow
        if n_bytes > UINT64_MAX - (int(self.alignment) - 1):
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' of shape {tuple(ne)} has a size in bytes that overflows",
                fix=_REDOWNLOAD,
            )
        return n_bytes

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        # llama.cpp (gguf_init_from_file_impl) requires each tensor's offset to be the running sum of the
        # previous tensors' sizes, each padded to the alignment; so no overlap, gap, reordering or
        # misalignment, and a relabelled type whose size no longer fits shows up at the next tensor.
        # llama_model_loader then requires every tensor's data to lie within the file.
        fork_only: list[ReaderTensor] = []  # bitnet.cpp's I2_S (type 36): gguf-py has no size for it
        align = int(self.alignment)
        expected = 0
        for field in fields:
            name = field.name
            n_bytes = self._tensor_nbytes(field)
            rel = int(field.parts[5][0])
            if rel != expected:
                raise ModelFormatError(
                    f"{self._path}: tensor '{name}' has data offset {rel}, expected {expected} (each tensor must "
                    f"start where the previous one ends, padded to {align} bytes, as llama.cpp requires)",
                    fix=_REDOWNLOAD,
                )
            end = start_offs + rel + n_bytes
            if end > self._file_size:
                kind = "I2_S tensor" if int(field.parts[4][0]) == ternary.ForkType.I2_S else "tensor"
                raise ModelFormatError(
                    f"{self._path} is truncated: {kind} '{name}' needs bytes up to offset {end} "
                    f"but the file has {self._file_size}",
                    fix=_REDOWNLOAD,
                )
            expected += -(-n_bytes // align) * align
            if int(field.parts[4][0]) == ternary.ForkType.I2_S:
                fork_only.append(self._i2_s_tensor(start_offs, field, name))
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
        self.metadata = Metadata(source=str(path))
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
            self.metadata.types[key] = _value_type_name(field.types)
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
        return self.metadata.get_str("general.architecture")

    def get_int(
        self,
        key: str,
        default: int | None = None,
        *,
        min: int | None = None,
        max: int | None = None,
        gguf_types: Iterable[str] | None = INT_TYPES,
        per_layer: bool = False,
    ) -> int:
        """`Metadata.get_int`: an integer, or ModelFormatError naming the key and what was expected."""
        return self.metadata.get_int(key, default, min=min, max=max, gguf_types=gguf_types, per_layer=per_layer)

    def get_float(
        self,
        key: str,
        default: float | None = None,
        *,
        min: float | None = None,
        gguf_types: Iterable[str] | None = ("float32",),
    ) -> float:
        """`Metadata.get_float`: a finite float, or ModelFormatError naming the key and what was expected."""
        return self.metadata.get_float(key, default, min=min, gguf_types=gguf_types)

    def get_str(self, key: str, default: str | None = None) -> str:
        """`Metadata.get_str`: a string, or ModelFormatError naming the key."""
        return self.metadata.get_str(key, default)

    def get_bool(self, key: str, default: bool) -> bool:
        """`Metadata.get_bool`: a bool, or ModelFormatError naming the key."""
        return self.metadata.get_bool(key, default)

    def get_array(self, key: str, elem: type, default: list[Any] | None = None) -> list[Any]:
        """`Metadata.get_array`: an array of `elem`, or ModelFormatError naming the key."""
        return self.metadata.get_array(key, elem, default)

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
