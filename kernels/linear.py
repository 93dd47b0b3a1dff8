"""Public GEMM and linear entry points (numpy in, numpy out).

    >>> pw = pack_weights_s8(*quantize_weights_s8(w))          # once
    >>> y = linear_f32(x, pw, bias, act="gelu")                  # per call

Threading: a threaded call runs ``n_threads`` workers (default
``get_num_threads()``: Numba's configured count capped at os.cpu_count(),
changed by ``set_num_threads``) on Numba's pool; graph code passes torch's
count, ``n_threads=torch.get_num_threads()``, so the two pools never use
more cores than torch is allowed. Workers beyond Numba's pool size (the
NUMBA_NUM_THREADS cap) just queue. Problems under PARALLEL_MIN_MACS run on
the calling thread (a parallel launch costs a few microseconds).
"""
import os

import numba
import numpy as np
from numba import carray, njit, types
from numba.extending import overload

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from . import dispatch as _dispatch
from .epilogue import ACTIVATIONS
from .gemm import ENTRIES, _parallel_jobs, _serial_jobs, a_stride
from .dispatch import KernelError
from .pack import PackedWeights, aligned_empty
from .finite import _nonfinite_sum
from .quantize import padded_k, quantize_rows_f32_u8, quantize_tensor_f32_u8, quantize_tensor_into
from .rowops import borrowed, pointer
from .simd import A_DTYPES, TAGS

KERNEL_VERSION = "linear-4"
# below this many multiply-adds a thread launch costs more than it saves
PARALLEL_MIN_MACS = 1 << 18

_threads = [max(1, min(numba.config.NUMBA_NUM_THREADS, os.cpu_count() or 1))]
_NO_X = np.empty((0, 0), np.float32)
# "no quantized rows" per path, in its A element type (one compiled entry body)
_NO_Q = {name: np.empty((0, 0), dtype) for name, dtype in A_DTYPES.items()}
_A_DTYPES = {name: np.dtype(dtype) for name, dtype in A_DTYPES.items()}
_NO_F = np.empty(0, np.float32)
_NO_I = np.empty(0, np.int32)
_F32, _U8 = np.dtype(np.float32), np.dtype(np.uint8)
_NO_U8 = np.empty((0, 0), np.uint8)
_EP_CACHE = {}
_EP_PLAIN = {}  # act -> epilogue_params(act), linear_f32's common case
_ZERO_BIAS = {}


def set_num_threads(n):
    """Worker count of later threaded kernel calls (capped at Numba's pool)."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _threads[0] = n


def get_num_threads():
    return _threads[0]


def epilogue_params(act="none", act_args=(), out_scale=1.0, out_zero_point=0, residual_first=False,
                    res_scale=1.0, res_zero_point=0):
    """float32 vector [act, p0, p1, out_scale, out_zp, residual first, res_scale, res_zp]
    (epilogue.py; cached by value). res_scale, res_zero_point: what a uint8 residual's
    codes stand for."""
    key = (act, tuple(act_args), out_scale, out_zero_point, bool(residual_first), res_scale, res_zero_point)
    ep = _EP_CACHE.get(key)
    if ep is None:
        if act not in ACTIVATIONS:
            raise KernelError(f"unknown activation {act!r}; choose one of "
                              f"{sorted(ACTIVATIONS)}")
        if act == "relu6":
            act_args = act_args or (0.0, 6.0)
        elif act == "hardtanh":
            act_args = act_args or (-1.0, 1.0)
        p0, p1 = (tuple(act_args) + (0.0, 0.0))[:2]
        if not out_scale > 0:
            raise KernelError(f"out_scale must be > 0, got {out_scale}")
        if not res_scale > 0:
            raise KernelError(f"res_scale must be > 0, got {res_scale}")
        ep = np.array([ACTIVATIONS[act], p0, p1, out_scale, out_zero_point, float(bool(residual_first)),
                       res_scale, res_zero_point], np.float32)
        _EP_CACHE[key] = ep
        if key[1:] == ((), 1.0, 0, False, 1.0, 0):
            _EP_PLAIN[act] = ep
    return ep


def _run(x, aq, ascale, azp, pw, bias, ep, out, n_threads, res=_NO_X):
    serial, parallel = ENTRIES[_dispatch._current[0]]
    threads = n_threads or _threads[0]
    if threads > 1 and out.shape[0] * pw.n * pw.k >= PARALLEL_MIN_MACS:
        parallel(x, aq, ascale, azp, pw.data, pw.k_groups, pw.col_sums, pw.scales,
                 bias, res, ep, out, threads)
    else:
        serial(x, aq, ascale, azp, pw.data, pw.k_groups, pw.col_sums, pw.scales,
               bias, res, ep, out, 1)
    return out


def _residual(res, m, n):
    """The residual added after the epilogue: float32 (m, n), C-contiguous."""
    if res is None:
        return _NO_X
    if type(res) is not np.ndarray or res.dtype is not _F32 or not res.flags.c_contiguous:
        res = np.ascontiguousarray(res, np.float32)
    if res.shape != (m, n):
        raise KernelError(f"residual must have the output's shape ({m}, {n}), got {res.shape}")
    return res


def _bias(bias, n):
    if bias is None:
        # the in-register epilogue always adds a bias vector
        zeros = _ZERO_BIAS.get(n)
        if zeros is None:
            zeros = _ZERO_BIAS[n] = np.zeros(n, np.float32)
        return zeros
    if type(bias) is not np.ndarray or bias.dtype != np.float32 or not bias.flags.c_contiguous:
        bias = np.ascontiguousarray(bias, np.float32)
    if bias.shape != (n,):
        raise KernelError(f"bias must have shape ({n},), got {bias.shape}")
    return bias


def _check_packed(pw):
    if not isinstance(pw, PackedWeights):
        raise KernelError("weights must be a PackedWeights from pack_weights_s8")


def linear_f32(x, pw, bias=None, act="none", act_args=(), n_threads=None, residual=None):
    """y = act(x @ W.T * scales + bias) (+ residual) with x quantized per row on the fly.

    x: float32 (..., K), any leading shape; returns float32 (..., N).
    act: one of ACTIVATIONS; act_args: (min, max) for hardtanh/relu6.
    residual: optional float32 (..., N), added after the activation while
    the tile is in cache (a transformer's `dense(x) + hidden` in one pass).
    The hot path of lowered graphs: keep x float32 and C-contiguous and
    bias float32 (N,) to skip every conversion.

        >>> y = linear_f32(x, pw, bias, act="relu")
    """
    if type(x) is not np.ndarray or x.dtype is not _F32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, np.float32)
    shape = x.shape
    if len(shape) != 2 or shape[1] != pw.k:
        if x.ndim < 1 or x.shape[-1] != pw.k:
            _check_packed(pw)
            raise KernelError(f"linear_f32: input has shape {x.shape}, weights expect "
                              f"K={pw.k} in the last dimension")
        if residual is not None:
            residual = np.asarray(residual).reshape(-1, pw.n)
        return linear_f32(x.reshape(-1, pw.k), pw, bias, act, act_args,
                          n_threads, residual).reshape(x.shape[:-1] + (pw.n,))
    # the per-call path of a lowered graph: each step here is ~0.05-0.3 us
    m, n = shape[0], pw.n
    ep = _EP_PLAIN.get(act) if act_args == () else None
    if ep is None:
        _check_packed(pw)
        ep = epilogue_params(act, act_args)
    if bias is None:
        bias = _ZERO_BIAS.get(n)
        if bias is None:
            bias = _bias(None, n)
    elif type(bias) is not np.ndarray or bias.dtype is not _F32 or bias.ndim != 1 or bias.shape[0] != n:
        bias = _bias(bias, n)
    res = _NO_X if residual is None else _residual(residual, m, n)
    out = np.empty((m, n), _F32)
    isa = _dispatch._current[0]
    threads = n_threads or _threads[0]
    if threads > 1 and m * n * pw.k >= PARALLEL_MIN_MACS:
        ENTRIES[isa][1](x, _NO_Q[isa], _NO_F, _NO_I, pw.data, (pw.k + 3) >> 2, pw.col_sums, pw.scales,
                        bias, res, ep, out, threads)
    else:
        ENTRIES[isa][0](x, _NO_Q[isa], _NO_F, _NO_I, pw.data, (pw.k + 3) >> 2, pw.col_sums, pw.scales,
                        bias, res, ep, out, 1)
    return out


def rows_share_l1_set(stride_bytes):
    """True if two of any 6 consecutive rows (one tile) start in different lines of the
    same L1 set (4 KiB apart modulo the line): the B stream would evict them. Rows under
    a line apart share lines, not sets: K = 16, 24 or 32 is read in place (copying
    12544 rows of 32 into 128-byte rows took 86 us, a MobileNetV2 1x1 conv's GEMM 220)."""
    for j in range(1, 6):
        d = j * stride_bytes
        r = d & 4095
        if d >= 64 and (r < 64 or r > 4032):
            return True
    return False


def new_a_rows(m, kg):
    """Fresh (m, a_stride) A rows for k-groups kg, in the current path's element type
    (producers such as im2col write them, the GEMM reads them in place). uint8 rows under
    a cache line are as wide as K, as those the GEMM reads in place (rows_share_l1_set):
    an RGB 3x3 stem's im2col (K = 28) wrote 128-byte rows, 101 bytes of them padding."""
    dtype = _A_DTYPES[_dispatch._current[0]]
    if dtype == np.uint8 and 4 * kg < 64:
        return aligned_empty((m, 4 * kg), dtype)
    return aligned_empty((m, a_stride(kg, dtype.itemsize)), dtype)  # as gemm.a_rows


def pad_rows_u8(a, isa=None):
    """uint8 A (M, K) in the GEMM's own row layout for path `isa` (default: the current
    one): an (M, K) view of rows a_stride elements apart, which gemm_u8s8_* read in place
    (any other A is copied into that layout on every call). On avx2 the view is uint16,
    holding the same values. Quantize once, pad once, multiply many times:

        >>> aq = pad_rows_u8(quantize_rows_f32_u8(x)[0])
    """
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 2:
        raise KernelError("pad_rows_u8: A must be a 2-D uint8 numpy array")
    dtype = _A_DTYPES[isa or _dispatch._current[0]]
    m, k = a.shape
    padded = np.zeros((m, a_stride((k + 3) // 4, dtype.itemsize)), dtype)
    padded[:, :k] = a
    return padded[:, :k]


def _padded_rows(a, kg, dtype):
    """The whole padded rows behind a pad_rows_u8 view of element type dtype, or None
    if a is not one."""
    base = a.base
    if type(base) is not np.ndarray or a.dtype != dtype or base.dtype != dtype:
        return None
    stride = _a_strides.get((kg, dtype.itemsize))
    if stride is None:
        stride = _a_strides[(kg, dtype.itemsize)] = a_stride(kg, dtype.itemsize)
    if (a.strides != (stride * dtype.itemsize, dtype.itemsize) or base.shape != (a.shape[0], stride)
            or not base.flags.c_contiguous or not _same_start(a, base)):
        return None
    return base


_a_strides = {}  # (k-groups, element bytes) -> a_stride


@numba.njit(cache=CACHE)
def _same_start(a, b):
    # from Python, .ctypes.data costs ~2.7 us per array
    return a.ctypes.data == b.ctypes.data


def _prepare_u8(a, pw):
    """A as the current path reads it: uint8 rows (contiguous, whole k-groups, no L1
    aliasing) read in place, else copied into pad_rows_u8's layout."""
    _check_packed(pw)
    isa = _dispatch._current[0]
    dtype = _A_DTYPES[isa]
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.type not in (np.uint8, np.uint16):
        raise KernelError(f"A must be a 2-D uint8 numpy array (or a pad_rows_u8 view), got "
                          f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    if a.shape[1] != pw.k:
        raise KernelError(f"A has K={a.shape[1]}, weights expect K={pw.k}")
    rows = _padded_rows(a, (pw.k + 3) // 4, dtype)
    if rows is not None:
        return rows
    if a.dtype.type is not np.uint8:  # a uint16 pad_rows_u8 view, made for the avx2 path
        if a.size and a.max() > 255:
            raise KernelError("A is uint16 with values above 255: pass uint8 A (uint16 only "
                              "as pad_rows_u8 returns it)")
        a = a.astype(np.uint8)
    if (dtype != np.uint8 or padded_k(pw.k) != pw.k or not a.flags.c_contiguous
            or (a.shape[0] > 1 and rows_share_l1_set(a.strides[0]))):
        # rows must be contiguous, whole 4-byte k-groups, not alias in L1, in the path's type
        a = pad_rows_u8(a, isa).base
    return a


def _per_row(v, m, dtype, name):
    if type(v) is np.ndarray and v.dtype == dtype and v.shape == (m,) and v.flags.c_contiguous:
        return v
    if np.ndim(v) == 0:
        return np.full(m, v, dtype)
    v = np.ascontiguousarray(v, dtype)
    if v.shape != (m,):
        raise KernelError(f"{name} must be a scalar or have shape ({m},), got {v.shape}")
    return v


def gemm_u8s8_s32(a, pw, n_threads=None):
    """Raw int32 product: out[i, n] = sum_k a[i, k] * W[n, k] (no zero point).

        >>> acc = gemm_u8s8_s32(a_u8, pw)
    """
    a = _prepare_u8(a, pw)
    out = np.empty((a.shape[0], pw.n), np.int32)
    return _run(_NO_X, a, _NO_F, _NO_I, pw, _NO_F, epilogue_params(), out, n_threads)


def gemm_u8s8_f32(a, a_scales, a_zero_points, pw, bias=None, act="none",
                  act_args=(), n_threads=None, residual=None):
    """Dequantizing GEMM: act((a - zp) @ W.T * a_scale * w_scale + bias) (+ residual).

    a_scales / a_zero_points: per row (M,) or one scalar for the tensor;
    residual: optional float32 (M, N) added after the activation.
    """
    a = _prepare_u8(a, pw)
    m = a.shape[0]
    s = _per_row(a_scales, m, np.float32, "a_scales")
    z = _per_row(a_zero_points, m, np.int32, "a_zero_points")
    out = np.empty((m, pw.n), np.float32)
    return _run(_NO_X, a, s, z, pw, _bias(bias, pw.n), epilogue_params(act, act_args),
                out, n_threads, _residual(residual, m, pw.n))


def gemm_u8s8_u8(a, a_scales, a_zero_points, pw, out_scale, out_zero_point,
                 bias=None, act="none", act_args=(), n_threads=None):
    """Requantizing GEMM: the float result of gemm_u8s8_f32 mapped to uint8
    as clip(rint(y / out_scale) + out_zero_point, 0, 255), without a float
    round trip through memory.
    """
    a = _prepare_u8(a, pw)
    m = a.shape[0]
    s = _per_row(a_scales, m, np.float32, "a_scales")
    z = _per_row(a_zero_points, m, np.int32, "a_zero_points")
    if not 0 <= out_zero_point <= 255:
        raise KernelError(f"out_zero_point must be in [0, 255], got {out_zero_point}")
    ep = epilogue_params(act, act_args, float(out_scale), int(out_zero_point))
    out = np.empty((m, pw.n), np.uint8)
    return _run(_NO_X, a, s, z, pw, _bias(bias, pw.n), ep, out, n_threads)


def bound_constants(n, bias, act, act_args, a_scale, a_zero_point, out_scale, out_zero_point):
    """What a bound linear (bind_linear, bind_linear_sparse, bind_linear_int4) fixes once, checked:
    (bias vector, epilogue params, output dtype, static activation scale?, uint8 output?)."""
    b = _bias(bias, n)
    static, chained_out = a_scale > 0, out_scale > 0
    if chained_out:
        if not 0 <= out_zero_point <= 255:
            raise KernelError(f"out_zero_point must be in [0, 255], got {out_zero_point}")
        ep, out_dtype = epilogue_params(act, act_args, float(out_scale), int(out_zero_point)), _U8
    else:
        ep, out_dtype = epilogue_params(act, act_args), _F32
    if static and not 0 <= a_zero_point <= 255:
        raise KernelError(f"need 0 <= a_zero_point <= 255, got {a_zero_point}")
    return b, ep, out_dtype, static, chained_out


def call_arrays(name, x, k, n, static, chained_out, out_dtype, out, residual):
    """The arrays one call of a bound sparse or int4 linear hands its kernel, checked: (float
    rows or an empty array, uint8 rows or an empty array, out, residual or an empty array).
    Float rows are quantized by the kernel's workers; uint8 rows come quantized with the
    static scale the layer was bound with."""
    if type(x) is not np.ndarray or x.ndim != 2 or x.shape[1] != k:
        raise KernelError(f"{name}: x must be a 2-D (M, {k}) array, got "
                          f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    m = x.shape[0]
    if x.dtype is _F32 and x.flags.c_contiguous:
        xf, aq = x, _NO_U8
    elif x.dtype == np.uint8:
        if not static:
            raise KernelError(f"{name}: uint8 x needs the static a_scale it was quantized with")
        xf, aq = _NO_X, np.ascontiguousarray(x)
    else:
        raise KernelError(f"{name}: x must be C-contiguous float32 or uint8, got {x.dtype}")
    if out is None:
        out = np.empty((m, n), out_dtype)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.flags.c_contiguous:
        raise KernelError(f"{name}: out must be C-contiguous {out_dtype.name} ({m}, {n}), got {out.dtype} {out.shape}")
    if residual is None:
        res = _NO_X
    elif chained_out:
        raise KernelError(f"{name}: a residual needs float output (out_scale=0)")
    else:
        res = _residual(residual, m, n)
    return xf, aq, out, res


def bind_linear(pw, bias=None, act="none", act_args=(), a_scale=0.0, a_zero_point=0,
                out_scale=0.0, out_zero_point=0):
    """One layer's GEMM with all but its input bound once, for a runtime that calls the
    layer many times. Returns call(x, out=None, residual=None, n_threads=None) -> out:

    x: float32 (M, K), C-contiguous, quantized per row in the workers (a_scale 0) or with
    the static (a_scale, a_zero_point); or uint8 (M, K) already quantized with them.
    out: float32 (M, N), or with out_scale > 0 uint8 requantized to (out_scale,
    out_zero_point); given, it is written in place (C-contiguous, that dtype and shape).
    residual: float32 (M, N), added after the activation (float output only).
    The results are those of linear_f32, gemm_u8s8_f32 and gemm_u8s8_u8 given the same
    arguments, bit for bit.

        >>> call = bind_linear(pw, bias, act="gelu")
        >>> y = call(x)                     # as linear_f32(x, pw, bias, act="gelu")
    """
    _check_packed(pw)
    n, k = pw.n, pw.k
    b, ep, out_dt, static, chained_out = bound_constants(n, bias, act, act_args, a_scale, a_zero_point,
                                                         out_scale, out_zero_point)
    scale, zero_point = np.float32(a_scale), np.int32(a_zero_point)
    per_row = {}                                  # m -> (scales, zero points) of a static scale
    rows_in_workers = not static and not chained_out
    current = _dispatch._current

    def checked_out(out, m):
        if out is None:
            return np.empty((m, n), out_dt)
        if out.shape != (m, n) or out.dtype is not out_dt or not out.flags.c_contiguous:
            raise KernelError(f"bind_linear: out must be C-contiguous {out_dt.name} ({m}, {n}), "
                              f"got {out.dtype} {out.shape}")
        return out

    def call(x, out=None, residual=None, n_threads=None):
        m = x.shape[0]
        out = checked_out(out, m)
        res = _NO_X if residual is None else _residual(residual, m, n)
        if res is not _NO_X and chained_out:
            raise KernelError("bind_linear: a residual needs float output (out_scale=0)")
        if x.dtype is _F32 and rows_in_workers:      # the common case, kept short: the workers quantize rows
            if x.ndim != 2 or x.shape[1] != k or not x.flags.c_contiguous:
                raise KernelError(f"bind_linear: x must be C-contiguous (M, {k}), got {x.shape}")
            return _run(x, _NO_Q[current[0]], _NO_F, _NO_I, pw, b, ep, out, n_threads, res)
        if x.dtype is not _F32 and not static:
            raise KernelError("bind_linear: uint8 x needs the static a_scale it was quantized with")
        if not static:                                               # dynamic rows, uint8 out
            q, s, z = quantize_rows_f32_u8(x)
        else:
            q = quantize_tensor_f32_u8(x, scale, zero_point) if x.dtype is _F32 else x
            rows = per_row.get(m)
            if rows is None:
                if len(per_row) > 64:             # many batch sizes: keep the table small
                    per_row.clear()
                rows = per_row[m] = (np.full(m, scale, np.float32), np.full(m, zero_point, np.int32))
            s, z = rows
        return _run(_NO_X, _prepare_u8(q, pw), s, z, pw, b, ep, out, n_threads, res)

    def screened(x, out=None, n_threads=None):
        """call(x, out) on float32 (M, K) x, and whether x is finite, found by the pass
        that quantizes it (no pass of its own): (y, 0.0), or (y, NaN) when a value of x
        is NaN or +-inf (y's rows for those are then not to be used)."""
        if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 2 or not x.flags.c_contiguous:
            return call(x, out, None, n_threads), _nonfinite_sum(np.asarray(x, np.float32).reshape(-1))
        m = x.shape[0]
        if x.shape[1] != k:
            raise KernelError(f"bind_linear: x must be C-contiguous (M, {k}), got {x.shape}")
        if rows_in_workers:                 # the workers write each row's scale: NaN for a bad row
            scales, zps = np.empty(m, np.float32), np.empty(m, np.int32)
            return (_run(x, _NO_Q[current[0]], scales, zps, pw, b, ep, checked_out(out, m), n_threads),
                    _nonfinite_sum(scales))
        if static:
            q = np.empty((m, k), np.uint8)
            bad = quantize_tensor_into(x, scale, zero_point, q)
            return call(q, out, None, n_threads), bad
        return call(x, out, None, n_threads), _nonfinite_sum(x.reshape(-1))
    call.screened = screened
    if static or rows_in_workers:       # not per-row scales with uint8 output: quantized apart
        call.rows, call.rows_screened_at = lean_calls(call, pw, b, ep, scale, zero_point, out_dt)
    return call


def on_rows(name, x, k, n, bind, residual=None, n_threads=None):
    """A bound linear, made by bind(), on x float32 (..., k) of any leading shape as its
    (rows, k): the result (..., n), the residual (..., n) taken as rows alike. x's K is
    checked before binding (a bad input is named first)."""
    if x.ndim < 1 or x.shape[-1] != k:
        raise KernelError(f"{name}: input has shape {x.shape}, weights expect K={k} in the last dimension")
    res = None if residual is None else np.asarray(residual).reshape(-1, n)
    return bind()(x.reshape(-1, k), residual=res, n_threads=n_threads).reshape(x.shape[:-1] + (n,))


def compiled_entry(dispatcher, args):
    """The compiled code `dispatcher` runs for arguments of args' Numba types (compiled or
    loaded from the cache now if need be): called directly it skips the dispatcher's typing
    of every argument, 0.2-0.3 us a call (AMX Xeon, AMD EPYC). The caller must pass
    arguments of exactly those types (arrays: dtype, rank, layout, alignment,
    writeability) and no other."""
    return dispatcher.compile(tuple(numba.typeof(a) for a in args))


def lean_calls(call, pw, bias, ep, a_scale, a_zp, out_dt):
    """A bound linear's calls in one Python frame around one compiled call (LEAN_ENTRIES,
    its compiled code called directly: compiled_entry), threaded from PARALLEL_MIN_MACS
    on as the kernel's own _run; out None or a buffer to reuse (one of another shape or
    dtype, or not C-contiguous, aligned and writeable, is not written: a fresh one is):

    rows(x, out, n_threads) -> out, for (M, K) rows x of float32, or of uint8 quantized with
    the layer's static a_scale (> 0); rows that are not C-contiguous, aligned and writeable
    are copied, any other x goes to call(x, out, None, n_threads).
    rows_screened_at(addr, m, out, n_threads) -> (out, bad), bad as screened's, on float32
    C-contiguous (m, K) rows at address addr, which the caller holds (the plan's call for
    a tensor input: its data_ptr())."""
    n, k = pw.n, pw.k
    static = a_scale > 0
    table = lean_table(pw, bias, ep, a_scale, a_zp)
    current = _dispatch._current
    codes = {}                  # (isa, x's dtype or "at") -> the lean entry's compiled code
    # both calls check out and choose the threads inline: each is every dense layer's call

    def rows(x, out, n_threads):
        if x.ndim != 2 or x.shape[1] != k or not (x.dtype is _F32 or (static and x.dtype is _U8)):
            return call(x, out, None, n_threads)
        if not x.flags.carray:          # strided, unaligned or readonly rows: a copy that is
            x = x.copy()
        m = x.shape[0]
        if out is None or out.shape != (m, n) or out.dtype is not out_dt or not out.flags.carray:
            out = np.empty((m, n), out_dt)
        threads = n_threads if n_threads > 1 and m * n * k >= PARALLEL_MIN_MACS else 1
        code = codes.get((current[0], x.dtype))
        if code is None:
            code = codes[current[0], x.dtype] = compiled_entry(LEAN_ENTRIES[current[0]][0], (x, table, out, threads))
        code(x, table, out, threads)
        return out

    def rows_screened_at(addr, m, out, n_threads):
        if out is None or out.shape != (m, n) or out.dtype is not out_dt or not out.flags.carray:
            out = np.empty((m, n), out_dt)
        threads = n_threads if n_threads > 1 and m * n * k >= PARALLEL_MIN_MACS else 1
        code = codes.get((current[0], "at"))
        if code is None:
            code = codes[current[0], "at"] = compiled_entry(LEAN_ENTRIES[current[0]][1],
                                                            (addr, m, k, table, out, threads))
        return out, code(addr, m, k, table, out, threads)
    rows.keep = rows_screened_at.keep = (pw, bias, ep)      # the arrays the table holds the addresses of
    return rows, rows_screened_at


# --- the lean entries: rows (or rows at an address), the layer's arrays in one table -----
#
# One compiled call that quantizes the rows (static or per-row scales; uint8 rows as they
# are) and runs the jobs, the layer's arrays read from a table of their addresses (8-9
# arrays less to unbox, 45 ns each, and no reference counts: views at an address have no
# owner). The plan's call of a linear reading a graph input hands it the torch tensor's
# address (kernel_ops' screened_tensor): no numpy array made of it (0.55 us). sparse.py's
# lean and lean_at do the same.

# lean_table's slots: the packed weights' address and bytes, the addresses of the column
# sums, weight scales, bias and epilogue params, the static activation scale (float32 bits;
# 0: per row) and zero point
_BP, _BP_BYTES, _COLSUM, _WSCALE, _BIAS, _EP, _A_SCALE, _A_ZP = range(8)
_EP_LEN = 8     # epilogue_params' values


def lean_table(pw, bias, ep, a_scale, a_zp):
    """The int64 table the lean entries read the layer from: the addresses of pw's arrays, bias and
    ep (which the caller keeps alive as long as the table), and the static activation
    scale (0: per row) and zero point."""
    if ep.shape != (_EP_LEN,) or ep.dtype != np.float32 or bias.dtype != np.float32 or bias.shape != (pw.n,):
        raise KernelError("lean_table: bias must be float32 (N,) and ep epilogue_params' vector")
    table = np.zeros(8, np.int64)
    table[_BP], table[_BP_BYTES] = pw.data.ctypes.data, pw.data.nbytes
    for i, arr in ((_COLSUM, pw.col_sums), (_WSCALE, pw.scales), (_BIAS, bias), (_EP, ep)):
        if not arr.flags.c_contiguous:
            raise KernelError("lean_table: the layer's arrays must be C-contiguous")
        table[i] = arr.ctypes.data
    table[_A_SCALE] = np.array([a_scale, 0], np.float32).view(np.int64)[0]
    table[_A_ZP] = a_zp
    return table


def _lean_rows(tag, buf, m, kg):
    raise NotImplementedError  # compiled through the overload below


@overload(_lean_rows, inline="always")
def _lean_rows_impl(tag, buf, m, kg):
    """(quantized rows (m, a_stride) on a 64-byte boundary, as gemm.a_rows, their scales,
    their zero points): views of buf, which the caller holds (None for its bytes)."""
    dtype = A_DTYPES[tag.isa]
    size = np.dtype(dtype).itemsize
    if isinstance(buf, types.NoneType):
        return lambda tag, buf, m, kg: m * a_stride(kg, size) * size + 64 + 8 * m

    def impl(tag, buf, m, kg):
        stride = a_stride(kg, size)
        at = buf.ctypes.data
        at += -at % 64
        rows = m * stride * size
        return (carray(pointer(at, dtype), (m, stride)), carray(pointer(at + rows, np.float32), m),
                carray(pointer(at + rows + 4 * m, np.int32), m))
    return impl


_rows_share_l1_set = njit(inline="always")(rows_share_l1_set)


@njit(inline="always")
def _copied_rows(x, aq, s, z, a_scale, a_zp):
    """_lean_quantize's uint8 rows x copied into aq, their k-group padding the zero point."""
    m, k = x.shape
    for i in range(m):
        s[i], z[i] = a_scale, a_zp
        for c in range(k):
            aq[i, c] = x[i, c]
        for c in range(k, (k + 3) & ~3):
            aq[i, c] = a_zp
    return aq, carray(pointer(aq.ctypes.data, np.float32), (0, 0)), np.float32(0)


def _lean_quantize(x, aq, s, z, a_scale, a_zp):
    raise NotImplementedError  # compiled through the overload below


@overload(_lean_quantize, inline="always")
def _lean_quantize_impl(x, aq, s, z, a_scale, a_zp):
    """x's rows into aq for the jobs, by x's dtype: float32 quantized with the static scale
    (a_scale > 0; per row by the workers: nothing here), uint8 (quantized with it
    already) read in place where the path can (as _prepare_u8), else copied.
    Returns (the rows the jobs read: aq, or uint8 x read in place,
    the float rows the workers quantize: x, or none, bad: 0, or NaN where a value of float
    x is NaN or +-inf)."""
    if x.dtype == types.uint8 and aq.dtype == types.uint8:        # a path that reads uint8 rows
        def impl(x, aq, s, z, a_scale, a_zp):
            m, k = x.shape
            if k % 4 == 0 and not (m > 1 and _rows_share_l1_set(x.strides[0])):
                for i in range(m):
                    s[i], z[i] = a_scale, a_zp
                return x, carray(pointer(aq.ctypes.data, np.float32), (0, 0)), np.float32(0)   # where they are
            return _copied_rows(x, aq, s, z, a_scale, a_zp)
        return impl
    if x.dtype == types.uint8:
        return lambda x, aq, s, z, a_scale, a_zp: _copied_rows(x, aq, s, z, a_scale, a_zp)

    def impl(x, aq, s, z, a_scale, a_zp):
        if not a_scale > 0:
            return aq, x, np.float32(0)
        for i in range(x.shape[0]):
            s[i], z[i] = a_scale, a_zp
        return aq, carray(pointer(x.ctypes.data, np.float32), (0, 0)), quantize_tensor_into(x, a_scale, a_zp, aq)
    return impl


@njit
def _lean_jobs(tag, buf, x, table, out, threads):
    """The lean entries' call on rows x (float32, or uint8 quantized with the static
    scale) in buf (_lean_rows' bytes): the caller holds all of them."""
    x, out, table = borrowed(x), borrowed(out), borrowed(table)
    (m, k), n = x.shape, out.shape[1]
    kg = (k + 3) // 4
    bp = carray(pointer(table[_BP], np.int8), table[_BP_BYTES])
    colsum = carray(pointer(table[_COLSUM], np.int32), n)
    wscale = carray(pointer(table[_WSCALE], np.float32), n)
    bias = carray(pointer(table[_BIAS], np.float32), n)
    ep = carray(pointer(table[_EP], np.float32), _EP_LEN)
    a_scale = carray(pointer(table.ctypes.data + 8 * _A_SCALE, np.float32), 1)[0]
    aq, s, z = _lean_rows(tag, buf, m, kg)
    aq, rows, bad = _lean_quantize(x, aq, s, z, a_scale, np.int32(table[_A_ZP]))
    none = carray(pointer(out.ctypes.data, np.float32), (0, 0))      # no residual
    if threads > 1:
        _parallel_jobs(tag, rows, aq, s, z, bp, kg, colsum, wscale, bias, none, ep, out, threads)
    else:
        _serial_jobs(tag, rows, aq, s, z, bp, kg, colsum, wscale, bias, none, ep, out)
    if rows.shape[1] > 0:           # the workers quantized them, a row holding NaN or inf with a NaN scale
        return _nonfinite_sum(s)
    return bad


def _lean_entry(tag):
    """The lean entries of one ISA (a compile-time tag, as gemm._entries), with
    lean_table's layer, into out, -> bad: 0, or NaN where a value of float rows is NaN or
    +-inf (bind_linear's screened):
    lean(x, table, out, threads) on C-contiguous (m, k) rows x: float32, or uint8 quantized
    with the layer's static scale; lean_at(addr, m, k, table, out, threads) on float32
    C-contiguous rows at address addr, which the caller holds (a tensor's data_ptr())."""
    @njit(cache=CACHE)
    def lean(x, table, out, threads):
        buf = np.empty(_lean_rows(tag, None, x.shape[0], (x.shape[1] + 3) // 4), np.uint8)
        return _lean_jobs(tag, buf, x, table, out, threads)

    @njit(cache=CACHE)
    def lean_at(addr, m, k, table, out, threads):
        buf = np.empty(_lean_rows(tag, None, m, (k + 3) // 4), np.uint8)
        return _lean_jobs(tag, buf, carray(pointer(addr, np.float32), (m, k)), table, out, threads)
    return lean, lean_at


LEAN_ENTRIES = {name: _lean_entry(tag) for name, tag in TAGS.items()}
