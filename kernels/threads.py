"""Calling the kernels from several Python threads at once.

Numba's parallel launches go through one threading layer per process: TBB and OpenMP
accept launches from several threads at once; workqueue, which Numba falls back to when
neither is installed, aborts the process ("workqueue threading layer is not threadsafe").
launch_guard() is a lock around a launch when the layer that will run is workqueue, and
nothing otherwise.

    with launch_guard():
        y = linear_f32(x, pw)
"""
import contextlib
import importlib
import threading

import numba

_POOLS = {"tbb": "numba.np.ufunc.tbbpool", "omp": "numba.np.ufunc.omppool"}


def _importable(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def layer_is_threadsafe():
    """Whether the threading layer Numba picks here accepts concurrent launches."""
    layer = numba.config.THREADING_LAYER
    if layer in ("safe", "threadsafe"):
        return True
    if layer in _POOLS:
        return _importable(_POOLS[layer])
    if layer == "workqueue":
        return False
    return any(_importable(m) for m in _POOLS.values())   # default: tbb, then omp, then workqueue


THREADSAFE = layer_is_threadsafe()          # read once: Numba fixes the layer at its first launch
_LOCK = threading.Lock()


def launch_guard():
    """A lock around a kernel call when the threading layer cannot take concurrent launches."""
    return contextlib.nullcontext() if THREADSAFE else _LOCK
