from __future__ import annotations

import platform

from parity.backends import build
from parity.core import machine

X86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU implementer\t: 0x41\n"


def test_cpu_info_reads_the_first_model_name_and_flags() -> None:
    info = machine.cpu_info(X86)
    assert (info.model, info.flags) == ("AMD EPYC 7B13", ("fpu", "avx2", "fma")) and info.count >= 1


def test_cpu_info_on_arm_and_without_the_file() -> None:
    assert machine.cpu_info(ARM).flags == ("fp", "asimd", "evtstrm")
    assert machine.cpu_info(ARM).model == platform.machine()
    assert machine.cpu_info("") == machine.CpuInfo(platform.machine(), (), machine.cpu_info("").count)


def test_build_fingerprint_uses_the_sorted_flags() -> None:
    import hashlib

    flags = " ".join(sorted(machine.cpu_info().flags))
    assert build.cpu_fingerprint() == f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"
