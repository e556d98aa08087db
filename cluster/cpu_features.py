"""Which CPU kernels vLLM's CPU backend will run on a node, decided from the node's CPU flags.

Pure functions (no vLLM or torch import): preflight feeds them the flags read from a node's
``/proc/cpuinfo``, the platform plugin (serve/platform.py) acts on the same decision inside every
vLLM process, and the tests feed them the flags of machines with and without AMX.

Why it matters: vLLM's CPU attention picks its AMX kernel for bf16 whenever the CPU lists
``amx_tile``, but Linux hands out the AMX tile state per process, on request
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``). A process that never asked dies with
SIGILL on its first tile instruction, and vLLM 0.32 never asks.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

#: The CPU flags that decide vLLM's CPU kernels (the rest of /proc/cpuinfo is not recorded).
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
X86 = ("x86_64", "amd64", "i686", "i386")

# arch_prctl(2) codes and the tile-data feature number (linux/arch/x86/include/uapi/asm/prctl.h).
_SYS_ARCH_PRCTL_X86_64 = 158
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


@dataclass(frozen=True)
class CpuKernels:
    """What vLLM's CPU backend will run on a CPU with these flags."""

    arch: str
    #: vLLM's compiled op library: ``_C`` (AVX-512 with BF16), ``_C_AVX512``, ``_C_AVX2``, or
    #: ``_C`` on other architectures.
    library: str
    #: Attention kernel for bf16 models: ``amx`` or ``vec`` (x86), ``native`` elsewhere.
    attention: str
    #: True when the process must ask Linux for the AMX tile state before the first forward.
    needs_amx_grant: bool
    #: One line when the engine cannot run here at all (vLLM's x86 kernels need AVX2), else None.
    problem: str | None = None
    #: One line for a person when something is worse than the CPU could do, else None.
    note: str | None = None

    def describe(self) -> str:
        """A short phrase for `up` and `status`: ``x86_64, kernels _C, attention amx``."""
        return f"{self.arch}, kernels {self.library}, attention {self.attention}"


def parse_flags(text: str) -> set[str]:
    """The relevant flags from a ``flags`` line of /proc/cpuinfo (or any whitespace list)."""
    return {word for word in text.split() if word in RELEVANT_FLAGS}


def engine_kernels(
    flags: set[str] | frozenset[str], *, arch: str = "x86_64", amx_grant: bool | None = None
) -> CpuKernels:
    """The kernels vLLM 0.32's CPU backend picks for bf16 on a CPU with ``flags``.

    ``amx_grant`` is whether Linux granted the AMX tile state when asked (None: not asked). When
    the CPU has AMX and the grant was refused (a kernel older than 5.16), the platform plugin turns
    AMX off in that process, so attention runs the ``vec`` kernel instead of dying.
    """
    arch = arch.lower()
    if arch not in X86:
        return CpuKernels(arch=arch, library="_C", attention="native", needs_amx_grant=False)
    if "avx512f" in flags:
        library = "_C" if "avx512_bf16" in flags else "_C_AVX512"
    elif "avx2" in flags:
        library = "_C_AVX2"
    else:
        return CpuKernels(
            arch=arch,
            library="-",
            attention="-",
            needs_amx_grant=False,
            problem="the CPU has no AVX2, which vLLM's x86 CPU kernels need",
        )
    if "amx_tile" not in flags:
        return CpuKernels(arch=arch, library=library, attention="vec", needs_amx_grant=False)
    if amx_grant is False:
        return CpuKernels(
            arch=arch,
            library=library,
            attention="vec",
            needs_amx_grant=True,
            note="the CPU has AMX but Linux refused the AMX tile state (kernel older than "
            "5.16?): attention runs the slower AVX kernel",
        )
    return CpuKernels(arch=arch, library=library, attention="amx", needs_amx_grant=True)


def _arch_prctl(code: int, arg: int) -> int:
    """arch_prctl(2) through libc's syscall(); returns the syscall's result (-1 on error)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(_SYS_ARCH_PRCTL_X86_64, code, ctypes.c_ulong(arg)))


def amx_permitted() -> bool | None:
    """Whether this process may run AMX tile instructions now (None: not Linux on x86_64)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    mask = ctypes.c_uint64(0)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(_SYS_ARCH_PRCTL_X86_64, ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
    if rc != 0:
        return False
    return bool(mask.value & (1 << XFEATURE_XTILEDATA))


def request_amx() -> bool | None:
    """Ask Linux for the AMX tile state for this process (idempotent).

    True when granted, False when refused, None when not Linux on x86_64. The grant is per process
    and lasts for its life; a forked child inherits it, an exec'd program does not.
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    return _arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def local_flags() -> set[str]:
    """The relevant flags of this machine's CPU (empty when /proc/cpuinfo has none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return parse_flags(line.partition(":")[2])
    except OSError:
        pass
    return set()


def local_arch() -> str:
    """This machine's architecture as ``uname -m`` prints it."""
    return os.uname().machine
