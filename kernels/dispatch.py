"""CPU feature dispatch: which GEMM path runs.

The path is picked from the host CPU features at import, overridden by the
environment variable ``FXOPT_KERNEL_ISA`` (one of ``ISAS``) or at run time
by ``select_isa(name)`` (tests use it to run every path in one process).

    >>> from fxopt.kernels import isa, available_isas, select_isa
    >>> isa()
    'amx_int8'
    >>> previous = select_isa("portable")   # until select_isa(previous)
"""
import contextlib
import os

import llvmlite.binding as llb

from .amx import os_permits
from .simd import AMX_ISAS, ISAS

KERNEL_VERSION = "isa-2"
ENV_VAR = "FXOPT_KERNEL_ISA"

_REQUIRES = {
    # and the OS's leave to use the tile state (amx.os_permits)
    "amx_int8": (("avx512f", "avx512bw", "avx512vl", "avx512vnni", "amx-tile", "amx-int8"),),
    "avx512_vnni": (("avx512f", "avx512bw", "avx512vl", "avx512vnni"),),
    # AVX-VNNI (VEX) or AVX512-VNNI with VL both run the 256-bit vpdpbusd
    "avx_vnni": (("avx2", "avxvnni"), ("avx2", "avx512vl", "avx512vnni")),
    "avx2": (("avx2",),),
    "portable": ((),),
}


class KernelError(ValueError):
    """A kernel was called with inputs or on a CPU it cannot handle."""


def host_features():
    return {k for k, v in llb.get_host_cpu_features().items() if v}


def supports(name, features=None):
    """True if the host CPU (or the given feature set) can run path ``name``."""
    if name not in _REQUIRES:
        raise KernelError(f"unknown kernel ISA {name!r}; choose one of {ISAS}")
    host = features is None
    feats = host_features() if host else set(features)
    if not any(all(f in feats for f in need) for need in _REQUIRES[name]):
        return False
    return not host or name not in AMX_ISAS or os_permits()


def available_isas():
    """ISA paths this CPU can run, fastest first."""
    feats = host_features()
    return [name for name in ISAS if supports(name, feats)
            and (name not in AMX_ISAS or os_permits())]


def _checked(name):
    if name not in ISAS:
        raise KernelError(f"unknown kernel ISA {name!r} (from {ENV_VAR} or "
                          f"select_isa); choose one of {ISAS}")
    if not supports(name):
        raise KernelError(
            f"kernel ISA {name!r} needs CPU features "
            f"{' or '.join('+'.join(n) for n in _REQUIRES[name])}, which this "
            f"CPU lacks; available here: {available_isas()}")
    return name


_current = [_checked(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR)
            else available_isas()[0]]


def isa():
    """Name of the ISA path kernels use now."""
    return _current[0]


def select_isa(name):
    """Force ISA path ``name`` for later kernel calls; returns the previous one.

    Raises KernelError if the name is unknown or this CPU cannot run it.
    """
    previous = _current[0]
    _current[0] = _checked(name)
    return previous


@contextlib.contextmanager
def use_isa(name):
    """Context manager form of ``select_isa``."""
    previous = select_isa(name)
    try:
        yield name
    finally:
        _current[0] = previous
