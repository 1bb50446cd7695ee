"""The validating half of reading a GGUF file: the header check and gguf-py's reader with llama.cpp's checks.

`check_header` looks at the first bytes before gguf-py does (wrong file, big-endian export, unknown version);
`CheckedReader` is gguf-py's `GGUFReader` with bounds checks on every read and the checks llama.cpp's gguf.cpp
(gguf_init_from_file_impl) makes on every file it reads, each naming the offending file, key, offset or tensor.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf.constants import GGUFValueType
from gguf.gguf_reader import GGUFReader, ReaderField, ReaderTensor

from parity.errors import ModelFormatError
from parity.gguf import strings, ternary
from parity.gguf.metadata import show
from parity.gguf.types import QK_I2_S, TYPES, ForkType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# magic (4) + version (u32) + tensor count (u64) + metadata KV count (u64)
HEADER_SIZE = 24

REDOWNLOAD = "re-download or regenerate the model and compare its SHA-256 with the lock file"

# Limits llama.cpp's gguf.cpp (gguf_init_from_file_impl) enforces on every file it reads.
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # a tensor name must be shorter than this
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1


def value_type_name(types: list[GGUFValueType]) -> str:
    """A GGUF value type as a short name: "uint32", "string", "array of float32"."""
    if not types:
        return "unknown"
    if types[0] == GGUFValueType.ARRAY:
        return "array of " + (types[1].name.lower() if len(types) > 1 else "nothing")
    return types[0].name.lower()


class CheckedReader(GGUFReader):
    """GGUFReader with bounds checks that name the offending offset or tensor, and faster numeric arrays.

    gguf-py slices the memory map without checking lengths; on a truncated file that fails later with
    an anonymous IndexError or reshape error. The three overridden hooks are gguf-py's internal parsing
    steps (stable across gguf 0.1x); each still delegates the actual parsing to gguf-py.
    """

    def __init__(self, path: Path, file_size: int) -> None:
        self._path = path
        self._file_size = file_size
        # arrays of strings (the vocabulary): read by parity.gguf.strings, not one gguf-py view per entry
        self.string_arrays: dict[str, strings.StringArray] = {}
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
                fix=REDOWNLOAD,
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
                    f"{self._path}: {where} is not valid UTF-8 ({exc.reason})", fix=REDOWNLOAD
                ) from None
            if not key:
                raise ModelFormatError(f"{self._path}: {where} has an empty name", fix=REDOWNLOAD)
            if key in self.fields:
                raise ModelFormatError(f"{self._path}: metadata key '{key}' appears twice", fix=REDOWNLOAD)
            orig_offs = offs
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            self._check_value_type(key, int(raw_type[0]))
            item_type = -1
            if int(raw_type[0]) == GGUFValueType.ARRAY:
                item_type = int(self._get(offs, np.uint32)[0])
                self._check_value_type(key, item_type, in_array=True)
            if int(raw_type[0]) == GGUFValueType.ARRAY and item_type == GGUFValueType.STRING:
                size, parts = self._string_array(key, orig_offs, offs)
                idxs: list[int] = []
                types = [GGUFValueType.ARRAY, GGUFValueType.STRING]
            else:
                size, parts, idxs, types = self._get_field_parts(offs, int(raw_type[0]))
            parts = [klen, kdata, raw_type, *parts]
            self._push_field(ReaderField(orig_offs, key, parts, [i + 3 for i in idxs], types), skip_sum=True)
            offs += size
            previous = key
        return offs

    def _string_array(self, key: str, key_offs: int, offs: int) -> tuple[int, list[npt.NDArray[Any]]]:
        """An array of strings at `offs` (its item type): kept in `string_arrays`, size and header parts returned."""
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        count = int(alen[0])
        if count > (self._file_size - offs - 12) // 8:  # each entry needs at least its 8-byte length
            raise ModelFormatError(
                f"{self._path} is truncated or corrupt: metadata key '{key}' declares {count} strings at offset "
                f"{offs + 12}, more than the rest of the file ({self._file_size} bytes) can hold",
                fix=REDOWNLOAD,
            )
        try:
            array, end = strings.scan(self.data, offs + 12, count)
        except strings.StringArrayError as exc:
            truncated = "past the end" in str(exc)
            raise ModelFormatError(
                f"{self._path}"
                + (" is truncated or corrupt: " if truncated else ": ")
                + f"metadata key '{key}' at offset {key_offs}: {exc}",
                fix=REDOWNLOAD,
            ) from None
        self.string_arrays[key] = array
        return end - offs, [raw_itype, alen]

    def _check_value_type(self, key: str, raw: int, in_array: bool = False) -> None:
        valid = {int(t) for t in GGUFValueType}
        if raw not in valid or (in_array and raw == GGUFValueType.ARRAY):
            what = "array element type" if in_array else "value type"
            raise ModelFormatError(
                f"{self._path}: metadata key '{key}' has {what} {raw}, which is not a GGUF type"
                + (" (arrays of arrays are not allowed)" if raw == GGUFValueType.ARRAY else ""),
                fix=REDOWNLOAD,
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
                fix=REDOWNLOAD,
            ) from None
        if len(name_data) >= GGML_MAX_NAME:
            raise ModelFormatError(
                f"{self._path}: tensor name {show(name)} is {len(name_data)} bytes; llama.cpp allows at most "
                f"{GGML_MAX_NAME - 1}",
                fix=REDOWNLOAD,
            )
        n_dims = self._get(offs, np.uint32)
        offs += int(n_dims.nbytes)
        if int(n_dims[0]) > GGML_MAX_DIMS:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has {int(n_dims[0])} dimensions; GGUF allows at most {GGML_MAX_DIMS}",
                fix=REDOWNLOAD,
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
                shown = show(align.contents()) if align.types[:1] != [GGUFValueType.ARRAY] else "an array"
                raise ModelFormatError(
                    f"{self._path}: metadata key 'general.alignment': expected a power of two of type uint32, "
                    f"got {shown} ({value_type_name(align.types)})",
                    fix=REDOWNLOAD,
                )
        names: set[str] = set()
        fields = []
        for _ in range(int(count)):
            field = self._get_tensor_info_field(offs)
            if field.name in names:
                raise ModelFormatError(f"{self._path}: tensor '{field.name}' appears twice", fix=REDOWNLOAD)
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
                    fix=REDOWNLOAD,
                )
        n = math.prod(ne)
        if n > INT64_MAX:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has shape {tuple(ne)}, whose element count overflows int64",
                fix=REDOWNLOAD,
            )
        if type_id == ForkType.I2_S:
            if not ne or ne[0] % QK_I2_S != 0:
                raise ModelFormatError(
                    f"{self._path}: I2_S tensor '{name}' has row length {ne[0] if ne else 0}, "
                    f"not a multiple of {QK_I2_S}",
                    fix=REDOWNLOAD,
                )
            return ternary.i2_s_nbytes(n)
        known = TYPES.get(type_id)
        if known is None:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has ggml type {type_id}, which gguf-py cannot read",
                fix="convert the model with mainline llama.cpp or bitnet.cpp's I2_S "
                "(other fork-only types such as TL1/TL2 are unsupported)",
            )
        block_size, type_size = known.block_size, known.type_size
        if (ne[0] if ne else 1) % block_size != 0:
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' has row length {ne[0] if ne else 1}, "
                f"not a multiple of the {known.name} block size {block_size}",
                fix=REDOWNLOAD,
            )
        n_bytes = n // block_size * type_size  # Python ints: corrupt dims cannot overflow
        if n_bytes > UINT64_MAX - (int(self.alignment) - 1):
            raise ModelFormatError(
                f"{self._path}: tensor '{name}' of shape {tuple(ne)} has a size in bytes that overflows",
                fix=REDOWNLOAD,
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
                    fix=REDOWNLOAD,
                )
            end = start_offs + rel + n_bytes
            if end > self._file_size:
                kind = "I2_S tensor" if int(field.parts[4][0]) == ForkType.I2_S else "tensor"
                raise ModelFormatError(
                    f"{self._path} is truncated: {kind} '{name}' needs bytes up to offset {end} "
                    f"but the file has {self._file_size}",
                    fix=REDOWNLOAD,
                )
            expected += -(-n_bytes // align) * align
            if int(field.parts[4][0]) == ForkType.I2_S:
                fork_only.append(self._i2_s_tensor(start_offs, field, n_bytes))
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) != ForkType.I2_S])
        self.tensors = [*self.tensors, *fork_only]

    def _i2_s_tensor(self, start_offs: int, field: ReaderField, n_bytes: int) -> ReaderTensor:
        """A raw-byte view of an I2_S tensor whose shape, offset and size `_build_tensors` has checked."""
        dims = field.parts[3]
        rel = int(field.parts[5][0])
        return ReaderTensor(
            name=field.name,
            tensor_type=ForkType.I2_S,  # type: ignore[arg-type]  # an id gguf-py does not know
            shape=dims,
            n_elements=math.prod(int(d) for d in dims),
            n_bytes=n_bytes,
            data_offset=start_offs + rel,
            data=self._get(start_offs + rel, np.uint8, n_bytes),
            field=field,
        )


def check_header(path: Path, size: int) -> None:
    """ModelFormatError unless `path` starts with a little-endian GGUF header of a supported version."""
    if size < HEADER_SIZE:
        raise ModelFormatError(
            f"{path} is not a GGUF file: {size} bytes is shorter than the {HEADER_SIZE}-byte header",
            fix=REDOWNLOAD,
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
