"""Facts about this machine's CPU, read once from `/proc/cpuinfo`: the one reader of that file.

Used by parity.backends.build (the CPU part of a build's cache key: a GGML_NATIVE build is valid only on a CPU
with the same feature flags) and parity.bench.lanes (the machine a benchmark ran on).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU model name (the machine type where none is listed), its feature flags, and the CPU count."""

    model: str
    flags: tuple[str, ...]
    count: int


def cpu_info(text: str | None = None) -> CpuInfo:
    """Parse `/proc/cpuinfo` (or `text`): the first "model name" and "flags" (x86) / "Features" (arm) lines.

    A missing or unreadable file gives no flags and `platform.machine()` as the model name.
    """
    if text is None:
        try:
            text = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value
    return CpuInfo(model or platform.machine(), tuple(flags.split()), os.cpu_count() or 1)
