"""LayerNorm over the last dimension, on the kernels' own thread pool.

    >>> y = layer_norm_f32(x, weight, bias, eps=1e-12)      # x float32 (..., N)

y = (x - mean) / sqrt(var + eps) * weight + bias per row, mean and (biased)
variance in float32 over 16-lane partial sums, two passes over the row (the
second from L1), as torch's CPU kernel computes it up to float rounding.

Why a kernel for so plain an op: in a lowered graph everything else runs on
Numba's OpenMP pool, and torch's own pool is a second OpenMP runtime. Each
switch between them leaves the idle pool's worker spinning on the core the
other pool needs: torch's LayerNorm took ~400 us between int8 linears in
BERT-base (b8 x s128) against ~120 us alone. Here it runs where its
neighbours run.
"""
import math

import numpy as np
from numba import njit, prange

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .dispatch import KernelError
from .linear import get_num_threads

KERNEL_VERSION = "layernorm-1"
# below this many elements a thread launch costs more than it saves
PARALLEL_MIN_ELEMENTS = 1 << 15


@njit(fastmath={"reassoc", "nsz", "contract"}, error_model="numpy", cache=CACHE)
def _row(x, i, w, b, eps, out):
    n = x.shape[1]
    ui = np.uint64(i)
    total = np.float32(0.0)
    for k in range(n):
        total += x[ui, np.uint64(k)]
    mean = total / np.float32(n)
    sq = np.float32(0.0)
    for k in range(n):
        d = x[ui, np.uint64(k)] - mean
        sq += d * d
    rstd = np.float32(1.0) / np.sqrt(sq / np.float32(n) + eps)
    for k in range(n):
        uk = np.uint64(k)
        out[ui, uk] = (x[ui, uk] - mean) * rstd * w[uk] + b[uk]


@njit(cache=CACHE)
def _serial(x, w, b, eps, out):
    for i in range(x.shape[0]):
        _row(x, i, w, b, eps, out)


@njit(cache=CACHE, parallel=True)
def _parallel(x, w, b, eps, out, threads):
    m = x.shape[0]
    for t in prange(threads):
        for i in range(t * m // threads, (t + 1) * m // threads):
            _row(x, i, w, b, eps, out)


def layer_norm_f32(x, weight=None, bias=None, eps=1e-5, n_threads=None, out=None):
    """LayerNorm of x (float32, (..., N)) over its last dimension; weight and bias
    (N,) or None (1 and 0). Returns a float32 array of x's shape: a new one, or
    `out` (float32 (M, N), C-contiguous, M the rows of x) written in place."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise KernelError(f"layer_norm_f32: x must be float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise KernelError(f"layer_norm_f32: x needs a non-empty last dimension, got shape {x.shape}")
    n = x.shape[-1]
    w = np.ones(n, np.float32) if weight is None else np.ascontiguousarray(weight, np.float32)
    b = np.zeros(n, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    if w.shape != (n,) or b.shape != (n,):
        raise KernelError(f"layer_norm_f32: weight and bias must have shape ({n},), "
                          f"got {w.shape} and {b.shape}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise KernelError(f"layer_norm_f32: eps must be finite and >= 0, got {eps}")
    rows = np.ascontiguousarray(x).reshape(-1, n)
    if out is None:
        out = np.empty_like(rows)
    elif (type(out) is not np.ndarray or out.dtype != np.float32 or out.shape != rows.shape
          or not out.flags.c_contiguous):
        raise KernelError(f"layer_norm_f32: out must be C-contiguous float32 {rows.shape}, got "
                          f"{getattr(out, 'dtype', type(out))} {getattr(out, 'shape', '')}")
    threads = min(n_threads or get_num_threads(), rows.shape[0])
    if threads > 1 and rows.size >= PARALLEL_MIN_ELEMENTS:
        _parallel(rows, w, b, np.float32(eps), out, threads)
    else:
        _serial(rows, w, b, np.float32(eps), out)
    return out.reshape(x.shape)
