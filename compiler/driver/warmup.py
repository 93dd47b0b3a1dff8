"""Kernel compilation a user can see, and can do ahead of time.

Numba compiles each kernel the first time a process needs it (a minute or two for all of
them on a small machine) and keeps the machine code in the cache folder
(fxopt.kernels._cache.cache_dir(): ~/.cache/fxopt, or $FXOPT_CACHE_DIR); later processes
load it in well under a second per kernel. Two things here:

    NOTICE     a Numba event listener: the first kernel compile of a process prints one line
               saying what happens and for how long, then progress, then a summary
    warmup()   compiles every kernel for this CPU now (`fxopt warmup`), e.g. in a Docker
               build step, by optimizing and calling a few small models that use them all

    fxopt.warmup()   # -> {"compiled": 41, "seconds": 96.0, "cache": "/root/.cache/fxopt/kernels-..."}

FXOPT_COMPILE_NOTICE=0 silences the notice.
"""
from __future__ import annotations

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
        self.hold = False        # warmup() prints one summary of its own
        self.started = None
        self.announced = False
        self.last_line = 0.0

    # ------------------------------------------------------------------ output
    def _out(self):
        return self.stream or sys.stderr

    def _enabled(self) -> bool:
        return os.environ.get("FXOPT_COMPILE_NOTICE", "1") != "0"

    def _print(self, text: str, end: str = "\n") -> None:
        out = self._out()
        out.write(text + end)
        out.flush()

    def announce(self) -> None:
        if self.announced or not self._enabled():
            return
        self.announced = True
        where = (f"kept in {_cache.cache_dir()}" if _cache.CACHE
                 else "not kept: no writable cache folder, set FXOPT_CACHE_DIR")
        self._print(f"fxopt: compiling kernels for this CPU, once ({where}); {ESTIMATE}. "
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
            self._print(("\r" if tty else "") + f"fxopt: compiled {self.compiled} kernels in "
                        f"{self.seconds:.0f} s; later processes load them from the cache.")
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
                self._print(f"\r  compiled {self.compiled} kernels ({self.seconds:.0f} s)...", end="")
            elif now - self.last_line >= self.min_interval_s:
                self.last_line = now
                self._print(f"  compiled {self.compiled} kernels ({self.seconds:.0f} s)...")


def cached_kernels() -> int:
    """How many kernels of this source the cache folder holds (Numba index files)."""
    try:
        return sum(name.endswith(".nbi") for name in os.listdir(_cache.cache_dir()))
    except OSError:
        return 0


NOTICE = CompileNotice()
event.register("numba:compile", NOTICE)


# ------------------------------------------------------------------- warmup

def _workloads():
    """(name, model, example_inputs, calls, target) that together use every kernel: linear
    (dynamic and static scales, activations, residual, M=1 and many rows), conv (strided,
    depthwise, grouped, 1x1, residual), pooling, int8 embedding, layer norm and attention
    (with and without a mask)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from fxopt.core.pipeline import TARGETS

    class Encoder(nn.Module):
        def __init__(self, vocab=64, d=32, heads=4):
            super().__init__()
            self.heads = heads
            self.embed = nn.Embedding(vocab, d)
            self.norm1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d)
            self.up = nn.Linear(d, 4 * d)
            self.down = nn.Linear(4 * d, d)

        def forward(self, ids, mask):
            x = self.embed(ids)
            b, s, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
            heads = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            keep = mask[:, None, None, :].bool()
            a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep)
            causal = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
            x = x + self.out((a + causal).transpose(1, 2).reshape(b, s, d))
            return x + self.down(F.gelu(self.up(self.norm2(x))))

    class CNN(nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6())
            self.pw = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.Hardswish())
            self.grouped = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=2), nn.SiLU())
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Linear(c, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(self.conv(self.grouped(self.pw(self.dw(x)))) + x)
            x = F.avg_pool2d(self.pool(x), 2)
            return self.head(x.mean((2, 3)))

    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(0)
    ids = lambda b, s: torch.randint(0, 64, (b, s), generator=g)  # noqa: E731
    mask = lambda b, s: torch.ones(b, s, dtype=torch.long)        # noqa: E731
    image = lambda b, hw: torch.randn(b, 3, hw, hw, generator=g)  # noqa: E731
    rows = lambda b: torch.randn(b, 64, generator=g)              # noqa: E731
    def int8(options):     # cpu-int8 with quantize_int8 options
        return TARGETS["cpu-int8"].replace("quantize_int8", f"quantize_int8{{{options}}}")

    # static linear and dynamic conv activations, int8 depthwise: the options' paths; the
    # larger calls take the threaded entries (layer norm from 32K floats, attention from
    # 1M MACs, ...)
    mlp_calls, cnn_calls = [(rows(1),), (rows(512),)], [(image(1, 32),), (image(8, 32),)]
    return [
        ("mlp", mlp, (rows(8),), mlp_calls, "cpu-int8"),
        ("mlp, static activations", mlp, (rows(8),), mlp_calls, int8("activations='static'")),
        ("cnn", CNN(), (image(2, 32),), cnn_calls, "cpu-int8"),
        ("cnn, dynamic activations, int8 depthwise", CNN(), (image(2, 32),), cnn_calls,
         int8("activations='dynamic',depthwise='int8'")),
        ("encoder", Encoder(), (ids(2, 8), mask(2, 8)), [(ids(1, 8), mask(1, 8)), (ids(8, 128), mask(8, 128))],
         "cpu-int8"),
    ]


def warmup(progress: bool = True) -> dict:
    """Compile every kernel fxopt uses on this CPU into the cache folder, so that later
    processes start without compiling. Returns {"compiled", "seconds", "cache"}.

    It optimizes a few small models with cpu-int8 (dynamic and calibrated static scales)
    and calls each on both runtimes at a few shapes."""
    import warnings

    import torch

    from fxopt.api import optimize

    NOTICE.finish()          # a summary of anything compiled before belongs to that
    before, start = NOTICE.total, time.perf_counter()
    NOTICE.hold, NOTICE.announced = True, True
    work = _workloads()
    try:
        for i, (name, model, example, calls, target) in enumerate(work):
            if progress:
                NOTICE._print(f"fxopt warmup: {name} ({i + 1}/{len(work)}), "
                              f"{time.perf_counter() - start:.0f} s")
            model.eval()
            for calibration in (None, [example, *calls]):
                for runtime in ("plan", "graph"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fast = optimize(model, example, target, calibration_data=calibration,
                                        runtime=runtime, report_layers=False, latency_repeats=0, drift=False)
                    with torch.no_grad():
                        for inputs in (example, *calls):
                            fast(*inputs)
    finally:
        NOTICE.hold = False
        NOTICE.compiled, NOTICE.seconds = 0, 0.0
    return {"compiled": NOTICE.total - before, "seconds": round(time.perf_counter() - start, 1),
            "cache": _cache.cache_dir()}
