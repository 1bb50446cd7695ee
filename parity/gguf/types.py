"""The ggml tensor types parity reads: mainline ggml's (gguf-py's table) plus bitnet.cpp's fork-only I2_S.

Data only: every type's name, block size (values per block) and type size (bytes per block), and which type
ids each backend's loader accepts. The reader (sizes, checks), the dequantizers and the ternary formats all
read these one table instead of keeping their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # values per super-block of the K-quants and of TQ1_0 / TQ2_0 (ggml-common.h QK_K)
QK_I2_S = 128  # values per I2_S code block (bitnet.cpp's ggml-bitnet-mad.cpp QK_I2_S)
I2_S_TRAILER = 32  # bytes after an I2_S tensor's codes: the float32 scale plus padding (the fork's ggml_nbytes)


class ForkType(IntEnum):
    """GGML type ids that exist only in bitnet.cpp's llama.cpp fork (ggml/include/ggml.h, 406a5036).

    An IntEnum so that it hashes and compares like the plain id, next to gguf-py's GGMLQuantizationType.
    Mainline reuses 36-38 for removed types and 39 for MXFP4, so these ids mean I2_S/TL1/TL2 only in
    files written by the fork; parity reads 36 as I2_S (the only one of them the fork's CPU build uses).
    """

    I2_S = 36


@dataclass(frozen=True)
class GGMLType:
    """One ggml type: its name, values per block and bytes per block (ggml's type_traits blck_size, type_size)."""

    name: str
    block_size: int
    type_size: int


# Every type gguf-py knows the block layout of, plus I2_S. The fork registers I2_S with block size 1 and
# type size 1 (so its row size is n_per_row bytes), but stores a tensor as n/4 code bytes + I2_S_TRAILER
# (its ggml_nbytes special-cases the type): use `i2_s_nbytes` in parity.gguf.ternary for its size.
TYPES: dict[int, GGMLType] = {
    **{int(t): GGMLType(t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES},
    int(ForkType.I2_S): GGMLType("I2_S", 1, 1),
}

# Which stored tensor types each backend's loader accepts; anything else is "unsupported model format".
# Mainline: 0-42 minus the removed ids (ggml.h: 4, 5, 31-33, 36-38). Fork: 0-36 minus 4, 5; its TL1/TL2
# (38/39) need a TL build, which parity's lock does not make, and 37 (I8_S) is an activation-only type.
_MAINLINE_REMOVED = {4, 5, 31, 32, 33, 36, 37, 38}
LOADABLE_TYPES: dict[str, frozenset[int]] = {
    "llama": frozenset(t for t in range(43) if t not in _MAINLINE_REMOVED),
    "bitnet": frozenset(t for t in range(37) if t not in (4, 5)),
}


def type_name(ggml_type: int) -> str:
    """Name of a ggml type id as parity reads it (gguf-py's names, plus the fork's I2_S), or "type N"."""
    known = TYPES.get(int(ggml_type))
    return known.name if known is not None else f"type {ggml_type}"
