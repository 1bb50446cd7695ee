"""Test helper: GGUF files holding bitnet.cpp's I2_S tensors, written without running bitnet.cpp.

gguf-py cannot write GGML type 36, so each I2_S tensor is first written as a (1, n_bytes) I8 tensor (same
byte count, same two-dimension tensor-info layout), then its dims and type are patched in place to the real
(ne0, ne1) and 36. Offsets do not move: only fixed-width fields change.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

from parity.gguf import ternary
from parity.gguf.reader import open_gguf


def copy_as_i2_s(source: Path, dest: Path, *, nthread: int = 1) -> None:
    """Re-write a ternary F16/F32 bitnet GGUF with every 2-D `blk.*` weight in I2_S (parity's port of
    bitnet.cpp's quantizer; `nthread` >= 2 reproduces what its multi-threaded run stores)."""
    src = open_gguf(source)
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, src.architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        sub = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub)
    patches: dict[str, tuple[int, int]] = {}
    for name, t in src.tensors.items():
        data: npt.NDArray[np.generic] = np.asarray(t.data)
        if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2:
            values = data.astype(np.float32).reshape(t.shape)
            raw = np.frombuffer(ternary.quantize_i2_s_threaded(values, nthread), dtype=np.uint8)
            writer.add_tensor(name, raw.reshape(1, -1), raw_dtype=gguf.GGMLQuantizationType.I8)
            patches[name] = (t.shape[1], t.shape[0])
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    blob = bytearray(dest.read_bytes())
    for name, (ne0, ne1) in patches.items():
        key = struct.pack("<Q", len(name)) + name.encode()
        pos = blob.index(key) + len(key)
        n_dims = struct.unpack_from("<I", blob, pos)[0]
        assert n_dims == 2, name
        struct.pack_into("<QQI", blob, pos + 4, ne0, ne1, int(ternary.ForkType.I2_S))
    dest.write_bytes(bytes(blob))
