"""Calling the kernels from several Python threads at once.

Numba's parallel launches go through one threading layer per process: TBB and OpenMP
accept launches from several threads at once; workqueue, which Numba falls back to when
neither is installed (or when NUMBA_THREADING_LAYER=forksafe, or a priority order puts it
first), aborts the process ("workqueue threading layer is not threadsafe").
launch_guard() is a lock around a launch when the layer Numba loaded is not one of the
thread-safe ones, and nothing otherwise.

    with launch_guard():
        y = linear_f32(x, pw)
"""
import contextlib
import threading

import numba

THREADSAFE_LAYERS = ("tbb", "omp")
# None until the first guarded call; then whether Numba's layer takes concurrent launches
THREADSAFE = None
_LOCK = threading.Lock()


def layer():
    """The threading layer Numba runs parallel kernels on in this process ('tbb', 'omp'
    or 'workqueue'). Loads it if no parallel kernel has run yet, as the first launch would:
    Numba's own choice (NUMBA_THREADING_LAYER, its priority order, what is installed and
    loads) is the only reliable answer, so it is asked rather than predicted."""
    numba.get_num_threads()          # loads the layer (once per process, under Numba's lock)
    return numba.threading_layer()


def launch_guard():
    """A lock around a kernel call when the threading layer cannot take concurrent launches."""
    global THREADSAFE
    if THREADSAFE is None:
        THREADSAFE = layer() in THREADSAFE_LAYERS
    return contextlib.nullcontext() if THREADSAFE else _LOCK
