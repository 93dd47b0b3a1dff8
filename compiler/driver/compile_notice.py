"""Kernel compilation a user can see.

Numba compiles each kernel the first time a process needs it (2-4 minutes for all of them
on a small machine) and keeps the machine code in the cache folder
(fxopt.kernels._cache.cache_dir(): ~/.cache/fxopt, or $FXOPT_CACHE_DIR); later processes
load it in well under a second per kernel. NOTICE, a Numba event listener, tells the user:
one line as the first kernel of a process starts compiling (or as an int8 optimize meets
an empty cache, before it captures), a count as they compile, and a summary.
fxopt.kernel_warmup.warmup() (`fxopt warmup`) compiles them all ahead of time.

    NOTICE.before(pipeline.names); ...; NOTICE.finish()   # what the compile driver does

FXOPT_COMPILE_NOTICE=0 silences the notice.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from numba.core import event

from fxopt.kernels import _cache

# Measured: compiling every kernel (fxopt warmup, 17 kernels) took 2m47s of CPU time on a
# 2-core AMD EPYC (AVX2) with an empty cache; the kernels one int8 model uses take most of it.
ESTIMATE = "2-4 minutes on 2 cores"
_KERNELS = "fxopt.kernels."


def _is_kernel(ev) -> bool:
    dispatcher = (ev.data or {}).get("dispatcher")
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
    return module.startswith(_KERNELS)


class CompileNotice(event.Listener):
    """Tells the user when fxopt's kernels compile: one line as the first one starts (or as
    an optimize that will compile starts: before()), a progress count, and a summary
    (finish()). Compiles of the kernels' own helpers nest inside and are not counted."""

    def __init__(self, stream=None, min_interval_s: float = 10.0):
        self.stream = stream
        self.min_interval_s = min_interval_s
        self.lock = threading.Lock()
        self.depth = 0
        self.compiled = 0        # kernels compiled since the last summary
        self.seconds = 0.0
        self.total = 0           # kernels compiled by this process
        self.hold = False        # held(): warmup() prints one summary of its own
        self.started = None
        self.announced = False
        self.last_line = 0.0

    # ------------------------------------------------------------------ output
    def _out(self):
        return self.stream or sys.stderr

    def _enabled(self) -> bool:
        return os.environ.get("FXOPT_COMPILE_NOTICE", "1") != "0"

    def say(self, text: str, end: str = "\n") -> None:
        out = self._out()
        out.write(text + end)
        out.flush()

    def announce(self) -> None:
        if self.announced or not self._enabled():
            return
        self.announced = True
        where = (f"kept in {_cache.cache_dir()}" if _cache.CACHE
                 else "not kept: no writable cache folder, set FXOPT_CACHE_DIR")
        self.say(f"fxopt: compiling kernels for this CPU, once ({where}); {ESTIMATE}. "
                    "`fxopt warmup` does it ahead of time.")

    def before(self, pipeline_names) -> None:
        """Called as an optimize starts: announce at once when it will compile (an int8
        pipeline and no compiled kernel of this source in the cache yet)."""
        if "lower_to_kernels" in pipeline_names and not cached_kernels():
            self.announce()

    def finish(self) -> None:
        """The summary line, if kernels compiled since the last one."""
        with self.lock:
            if self.hold:
                return
            if not self.compiled or not self._enabled():
                self.compiled, self.seconds = 0, 0.0
                return
            tty = self._tty()
            self.say(("\r" if tty else "") + f"fxopt: compiled {self.compiled} kernels in "
                        f"{self.seconds:.0f} s; later processes load them from the cache.")
            self.compiled, self.seconds = 0, 0.0

    @contextlib.contextmanager
    def held(self):
        """Within: no announcement and no summary (warmup() reports for itself); the kernels
        that compile still count in `total`."""
        self.finish()            # a summary of anything compiled before belongs to that
        self.hold, self.announced = True, True
        try:
            yield
        finally:
            self.hold = False
            self.compiled, self.seconds = 0, 0.0

    def _tty(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    # ------------------------------------------------------------ Numba events
    def on_start(self, ev) -> None:
        if not _is_kernel(ev):
            return
        with self.lock:
            if self.depth == 0:
                self.started = time.perf_counter()
                self.announce()
            self.depth += 1

    def on_end(self, ev) -> None:
        if not _is_kernel(ev):
            return
        with self.lock:
            self.depth -= 1
            if self.depth:
                return
            self.compiled += 1
            self.total += 1
            self.seconds += time.perf_counter() - self.started
            if not self._enabled():
                return
            now = time.perf_counter()
            if self._tty():
                self.say(f"\r  compiled {self.compiled} kernels ({self.seconds:.0f} s)...", end="")
            elif now - self.last_line >= self.min_interval_s:
                self.last_line = now
                self.say(f"  compiled {self.compiled} kernels ({self.seconds:.0f} s)...")


def cached_kernels() -> int:
    """How many kernels of this source the cache folder holds (Numba index files)."""
    try:
        return sum(name.endswith(".nbi") for name in os.listdir(_cache.cache_dir()))
    except OSError:
        return 0


NOTICE = CompileNotice()
event.register("numba:compile", NOTICE)
