"""Activation quantization: float32 rows -> uint8 with scale and zero point.

Dynamic per-row (asymmetric): the range of each row, widened to contain 0,
maps to [0, 255]:

    lo = min(0, min(x)), hi = max(0, max(x))
    scale = (hi - lo) / 255            (1 if the row is all zero)
    zp = clip(rint(-lo / scale), 0, 255)
    q = clip(rint(x * (1 / scale)) + zp, 0, 255)

all in float32, exactly as reference.quantize_rows_f32_u8 computes it.
The row range uses llvm.minnum/maxnum, which LLVM vectorizes as a
reduction (a compare-and-select min does not vectorize); min and max are
exact under reordering, so the result does not depend on it.
Rows are written with a stride ``Kp >= K`` (K rounded up to 4, the GEMM's
k-group), padding columns set to the zero point (they meet zero weights).
"""
import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .rowops import quantize_u8

KERNEL_VERSION = "quantize-8"

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F255 = np.float32(255.0)
_FMAX = np.float32(np.finfo(np.float32).max)


def _minmax_intrinsic(name):
    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 2)
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            return builder.call(fn, args)
        return types.float32(types.float32, types.float32), codegen
    return op


_fmin = _minmax_intrinsic("llvm.minnum.f32")
_fmax = _minmax_intrinsic("llvm.maxnum.f32")


@njit(fastmath=True, cache=CACHE)
def row_range(x, i):
    """(min(0, min x[i]), max(0, max x[i])) as float32."""
    # unsigned indices, no row view: no wraparound checks, no refcounting
    ui = np.uint64(i)
    lo = _F0
    hi = _F0
    for k in range(x.shape[1]):
        v = x[ui, np.uint64(k)]
        lo = _fmin(lo, v)
        hi = _fmax(hi, v)
    return lo, hi


@njit(cache=CACHE)
def scale_zero_point(lo, hi):
    span = hi - lo
    # a span past float32's range (|x| near 3e38) overflowed to inf, which would quantize
    # the whole row to its zero point; split, the scale stays finite
    scale = span / _F255 if span <= _FMAX else hi / _F255 - lo / _F255
    if scale == _F0:
        scale = _F1
    zp = min(max(np.rint(-lo / scale), _F0), _F255)
    return np.float32(scale), np.float32(zp)


@njit(cache=CACHE)
def quantize_row(x, i, inv, zp, q):
    """q[i, :K] = clip(rint(x[i] * inv) + zp, 0, 255); q[i, K:Kp] = zp, Kp = K rounded
    up to the k-group of 4 (q's columns past Kp are row padding the GEMM never reads).
    Returns 0, or NaN when a value of the row is NaN or +-inf (rowops.quantize_u8).

    q is uint8, or uint16 (the AVX2 GEMM's A rows: the same values, widened)."""
    ui = np.uint64(i)
    K = x.shape[1]
    qsize = q.itemsize
    if (x.strides[1] == 4 and x.strides[0] % 4 == 0 and q.strides[1] == qsize
            and q.strides[0] % qsize == 0):  # the vector intrinsic
        bad = quantize_u8(x, i * (x.strides[0] // 4), K, np.float32(inv), np.int32(zp), q,
                          i * (q.strides[0] // qsize))
    else:
        bad = _F0
        for k in range(K):
            uk = np.uint64(k)
            f = x[ui, uk]
            bad += f - f
            v = np.rint(f * inv) + zp
            v = v if v > _F0 else _F0
            v = v if v < _F255 else _F255
            q[ui, uk] = np.uint8(np.int32(v))
    for k in range(K, min(q.shape[1], (K + 3) & ~3)):
        q[ui, np.uint64(k)] = np.uint8(zp)
    return np.float32(bad)


@njit(cache=CACHE)
def quantize_rows_range(x, q, scales, zps, start, stop):
    """Dynamic per-row quantization of rows start..stop-1 of x into q, scales, zps.
    A row holding NaN or +-inf gets a NaN scale (its GEMM row is NaN, and a caller
    can tell it from the scales: linear.bind_linear's screened call)."""
    for i in range(start, stop):
        lo, hi = row_range(x, i)
        s, zp = scale_zero_point(lo, hi)
        zps[i] = np.int32(zp)
        bad = quantize_row(x, i, _F1 / s, zp, q)
        scales[i] = s if bad == _F0 else np.float32(np.nan)


@njit(cache=CACHE)
def quantize_rows_into(x, q, scales, zps):
    """Dynamic per-row quantization of x (M, K) float32 into q (M, Kp)."""
    quantize_rows_range(x, q, scales, zps, 0, x.shape[0])


@njit(cache=CACHE)
def quantize_tensor_into(x, scale, zp, q):
    """Static quantization of x (M, K) with one scale and zero point; returns 0, or
    NaN when a value of x is NaN or +-inf."""
    inv = _F1 / np.float32(scale)
    z = np.float32(zp)
    bad = _F0
    for i in range(x.shape[0]):
        bad += quantize_row(x, i, inv, z, q)
    return bad


def padded_k(k):
    """K rounded up to the GEMM's k-group of 4."""
    return (k + 3) & ~3


def _check_f32_2d(x, name):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise TypeError(f"{name} must be a 2-D float32 numpy array, got "
                        f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    return x


def quantize_rows_f32_u8(x, pad_k=False):
    """Dynamic per-row asymmetric quantization.

    Returns (q uint8 (M, K or Kp), scales float32 (M,), zero_points int32 (M,))
    with x ~= (q - zp[:, None]) * scale[:, None].

        >>> q, s, zp = quantize_rows_f32_u8(np.random.randn(4, 10).astype(np.float32))
    """
    x = _check_f32_2d(x, "x")
    m, k = x.shape
    q = np.empty((m, padded_k(k) if pad_k else k), np.uint8)
    scales = np.empty(m, np.float32)
    zps = np.empty(m, np.int32)
    quantize_rows_into(x, q, scales, zps)
    return q, scales, zps


def quantize_tensor_f32_u8(x, scale, zero_point, pad_k=False):
    """Static per-tensor quantization with a given scale and zero point.

        >>> q = quantize_tensor_f32_u8(x, 0.05, 128)
    """
    x = _check_f32_2d(x, "x")
    if not (scale > 0 and 0 <= zero_point <= 255):
        raise ValueError(f"need scale > 0 and 0 <= zero_point <= 255, got "
                         f"scale={scale}, zero_point={zero_point}")
    m, k = x.shape
    q = np.empty((m, padded_k(k) if pad_k else k), np.uint8)
    quantize_tensor_into(x, np.float32(scale), np.int32(zero_point), q)
    return q
