"""Fused int8 attention: softmax(Q K^T * scale + mask) V in one parallel region.

    >>> out = attention_int8(q, k, v, mask)      # q (B, H, Sq, D), k/v (B, H, Sk, D[v])

Each (batch, head) pair is one job; a worker takes jobs from a shared atomic
counter and runs the whole head on its own buffers, serially (the GEMM
micro-kernel of gemm.py, no nested parallel region):

1. Q rows  -> uint8, dynamic asymmetric per row (the formula of quantize.py)
2. K rows  -> int8, symmetric per key, packed as the GEMM's N x K operand
              (N = keys, K = D; pack.py's layout); the softmax scale is folded
              into the per-key scales, the zero point term uses the key sums
3. S = Q K^T (int32 in registers, dequantized to float32 in the epilogue)
4. mask, row max, e = exp(s - max) (epilogue.exp_f32), row sum; e in [0, 1]
   -> uint8 q = rint(255 e): P = e / sum quantized per row with zero point 0
   and scale max(P) / 255 = 1 / (255 sum), as the row max of e is exactly 1
5. V columns -> int8, symmetric per d, packed as the N x K operand (N = D, K = keys)
6. O = P V, dequantized in the epilogue straight into the output.

The steps live in attention_steps.py (their row reductions and raw-memory
intrinsics in rowops.py); this file runs heads on workers, each claiming its
next job one ahead so that job's q/k/v rows can be prefetched meanwhile, and
holds the Python entries.

Masks: None, float32 additive or bool (True = attend), broadcastable to
(B, H, Sq, Sk); ``is_causal`` keeps key j for query i when j <= i (torch's
top-left alignment). A query row whose keys are all masked (bool False, or
-inf) gives zeros, as torch's scaled_dot_product_attention does.

Strided inputs are read in place (any non-negative strides whose last one is
one element); the output is a (B, Sq, H, Dv) buffer returned as its
(B, H, Sq, Dv) view, so the usual ``out.transpose(1, 2).reshape(B, Sq, H*Dv)``
that follows attention costs no copy.
"""
import math
from typing import NamedTuple

import numpy as np
from numba import carray, njit, prange

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .attention_steps import (MASK_BOOL, MASK_FLOAT, MASK_NONE, pack_k, pack_v,
                              quantize_k_rows, quantize_q_rows, softmax_rows, v_scales)
from .dispatch import KernelError
from . import dispatch as _dispatch
from .gemm import _count_add, _job_into, _scratch, _tile_state, a_rows
from .linear import epilogue_params, get_num_threads
from .rowops import borrowed, pointer, prefetch
from .simd import BLOCK_COLS, TAGS

KERNEL_VERSION = "attention-7"
# below this many multiply-adds per call a thread launch costs more than it saves
PARALLEL_MIN_MACS = 1 << 20

# geo vector: operand addresses (q, k, v, mask), spans in elements, strides in
# elements of q, k, v, mask over (batch, head, row), Sk and D
_ADDR, _SPAN, _QS, _KS, _VS, _MS, _SK, _D = 0, 4, 8, 11, 14, 17, 20, 21


# --- one head, one worker ------------------------------------------------------------

@njit
def _gemm(tag, aq, bp, kg, colsum, ascale, azp, wscale, bias, ep, out):
    """out = dequantized aq x packed bp, every column block on this thread."""
    # the caller holds these for the call (gemm._worker says why borrowed)
    aq, bp, colsum, ascale = borrowed(aq), borrowed(bp), borrowed(colsum), borrowed(ascale)
    azp, wscale, bias = borrowed(azp), borrowed(wscale), borrowed(bias)
    ep, out = borrowed(ep), borrowed(out)
    m = aq.shape[0]
    t, y = _scratch(tag)
    no_residual = out[:0]
    _tile_state(tag, True, m, kg)   # AMX tiles where the path has them (gemm._amx_rows)
    for job in range((out.shape[1] + BLOCK_COLS - 1) // BLOCK_COLS):
        _job_into(tag, job, 1, m, False, aq, bp, kg, colsum, ascale, azp, wscale, bias, no_residual, ep, out, t, y)
    _tile_state(tag, False, m, kg)


@njit
def _prefetch_rows(x, base, row_stride, rows, n):
    """Prefetch `rows` rows of n float32 (16 per cache line) of a strided operand."""
    for i in range(rows):
        off = base + i * row_stride
        for c in range(0, n, 16):
            prefetch(x, off + c)
        prefetch(x, off + n - 1)


@njit
def _prefetch_head(job, nh, sq, geo, qf, kf, vf, dv):
    """Start loading job's q/k/v rows while the current head computes: rows of
    a strided (fused QKV) operand lie kilobytes apart, which the hardware
    prefetchers follow poorly."""
    b, h = job // nh, job % nh
    sk, d = geo[_SK], geo[_D]
    _prefetch_rows(qf, b * geo[_QS] + h * geo[_QS + 1], geo[_QS + 2], sq, d)
    _prefetch_rows(kf, b * geo[_KS] + h * geo[_KS + 1], geo[_KS + 2], sk, d)
    _prefetch_rows(vf, b * geo[_VS] + h * geo[_VS + 1], geo[_VS + 2], sk, dv)


@njit
def _buffers(tag, sq, sk, d, dv):
    """One worker's buffers (Q and P rows in the A element type of tag's path).
    Packed operands and padding columns start at zero and only real positions
    are ever written, so they stay zero."""
    kgd, kgs = (d + 3) // 4, (sk + 3) // 4
    nbk = (sk + BLOCK_COLS - 1) // BLOCK_COLS
    nbv = (dv + BLOCK_COLS - 1) // BLOCK_COLS
    qa = a_rows(tag, sq, kgd)
    kt32 = np.zeros((sk, kgd), np.int32)
    kp32 = np.zeros(nbk * kgd * BLOCK_COLS, np.int32)
    pa = a_rows(tag, sq, kgs)
    pa[:] = 0
    vp32 = np.zeros(nbv * kgs * BLOCK_COLS, np.int32)
    # GEMM outputs span whole 64-column blocks: only full blocks take the
    # in-register epilogue (tile_f32); padding keys have scale 0, so score 0
    scores = np.empty((sq, nbk * BLOCK_COLS), np.float32)
    tmp = np.empty((4, max(sq, sk)), np.float32)
    ctx = np.empty((sq if dv % BLOCK_COLS else 0, nbv * BLOCK_COLS), np.float32)
    # per row / column vectors: q scale, q zp, p scale, p zp (0)
    rows_f, rows_i = np.empty((2, sq), np.float32), np.zeros((2, sq), np.int32)
    # per key / column: k scale, v scale, bias (0), v max, v 1/scale; k sums, v sums (0)
    cols_f = np.zeros((5, max(nbk, nbv) * BLOCK_COLS), np.float32)
    cols_i = np.zeros((2, max(nbk, nbv) * BLOCK_COLS), np.int32)
    return qa, kt32, kp32, pa, vp32, scores, ctx, tmp, rows_f, rows_i, cols_f, cols_i


@njit
def _head(tag, b, h, geo, qf, kf, vf, mf, mb, mkind, causal, scale, ep, bufs, out):
    """softmax(q k^T * scale + mask) v of one (batch, head) into out[b, :, h, :]."""
    qa, kt32, kp32, pa, vp32, scores, ctx, tmp, rows_f, rows_i, cols_f, cols_i = bufs
    sq, sk, d, dv = out.shape[1], geo[_SK], geo[_D], out.shape[3]
    kgd, kgs = kt32.shape[1], (sk + 3) // 4
    kscale, vscale, bias, vmax, vinv = cols_f[0], cols_f[1], cols_f[2], cols_f[3], cols_f[4]
    quantize_q_rows(qf, b * geo[_QS] + h * geo[_QS + 1], geo[_QS + 2], sq, d, qa,
                    rows_f[0], rows_i[0], tmp)
    quantize_k_rows(kf, b * geo[_KS] + h * geo[_KS + 1], geo[_KS + 2], sk, d, scale,
                    kt32.view(np.int8), kscale, cols_i[0], tmp)
    pack_k(sk, kt32, kp32)
    _gemm(tag, qa, kp32.view(np.int8), kgd, cols_i[0], rows_f[0], rows_i[0], kscale, bias, ep,
          scores)
    softmax_rows(scores, sk, mkind, mf, mb, b * geo[_MS] + h * geo[_MS + 1], geo[_MS + 2],
                 causal, pa, rows_f[1], tmp[0])
    vbase = b * geo[_VS] + h * geo[_VS + 1]
    v_scales(vf, vbase, geo[_VS + 2], sk, dv, vmax, vscale, vinv)
    pack_v(vf, vbase, geo[_VS + 2], sk, dv, vinv, vp32)
    o = out[b, :, h, :]
    if dv % BLOCK_COLS == 0:
        _gemm(tag, pa, vp32.view(np.int8), kgs, cols_i[1], rows_f[1], rows_i[1], vscale, bias,
              ep, o)
    else:
        _gemm(tag, pa, vp32.view(np.int8), kgs, cols_i[1], rows_f[1], rows_i[1], vscale, bias,
              ep, ctx)
        for i in range(sq):
            for c in range(dv):
                o[i, c] = ctx[i, c]


@njit
def _worker(tag, nxt, geo, mkind, causal, scale, ep, out):
    """Run (batch, head) jobs from the shared counter nxt[0] until none are left."""
    nb, sq, nh, dv = out.shape
    # the operands, as flat views of the caller's memory (alive for the call)
    qf = carray(pointer(geo[_ADDR], np.float32), geo[_SPAN])
    kf = carray(pointer(geo[_ADDR + 1], np.float32), geo[_SPAN + 1])
    vf = carray(pointer(geo[_ADDR + 2], np.float32), geo[_SPAN + 2])
    mf = carray(pointer(geo[_ADDR + 3], np.float32), geo[_SPAN + 3] if mkind == MASK_FLOAT else 0)
    mb = carray(pointer(geo[_ADDR + 3], np.uint8), geo[_SPAN + 3] if mkind == MASK_BOOL else 0)
    bufs = _buffers(tag, sq, geo[_SK], geo[_D], dv)
    jobs = nb * nh
    # claim one job ahead, so its operands can be prefetched during this one
    job = _count_add(nxt, 0, 1)
    while job < jobs:
        ahead = _count_add(nxt, 0, 1)
        if ahead < jobs:
            _prefetch_head(ahead, nh, sq, geo, qf, kf, vf, dv)
        _head(tag, job // nh, job % nh, geo, qf, kf, vf, mf, mb, mkind, causal, scale, ep,
              bufs, out)
        job = ahead


def _entries(tag):
    """The serial and the threaded entry of one ISA, bound to it by the closure's tag
    (a compile-time constant, as for gemm.py's entries; Numba's disk cache keys each
    closure on its tag). geo: addresses, sizes and strides of the operands (layout
    at _ADDR.._D); out: (B, Sq, H, Dv) float32."""
    @njit(cache=CACHE)
    def serial(geo, mkind, causal, scale, ep, out, threads):
        _worker(tag, np.zeros(1, np.int64), geo, mkind, causal, scale, ep, out)

    @njit(cache=CACHE, parallel=True)
    def parallel(geo, mkind, causal, scale, ep, out, threads):
        nxt = np.zeros(1, np.int64)
        for _ in prange(threads):
            _worker(tag, nxt, geo, mkind, causal, scale, ep, out)
    return serial, parallel


ENTRIES = {name: _entries(tag) for name, tag in TAGS.items()}


# --- Python entry ----------------------------------------------------------------------

class Strided(NamedTuple):
    """An operand in memory its caller keeps alive during the call: data address,
    shape and strides in elements (last stride 1 where the last dim is read, none
    negative). A mask may have fewer than 4 dims (leading dims broadcast).

        >>> Strided(t.data_ptr(), tuple(t.shape), t.stride())     # from a torch tensor
    """
    address: int
    shape: tuple
    strides: tuple


def _span(shape, strides):
    """Elements from a 4-D operand's first element to its last one, inclusive."""
    return (1 + (shape[0] - 1) * strides[0] + (shape[1] - 1) * strides[1]
            + (shape[2] - 1) * strides[2] + (shape[3] - 1) * strides[3])


def _check_operand(x, what):
    if len(x.shape) != 4:
        raise KernelError(f"attention_int8: {what} must be 4-D (B, H, S, D), got shape {x.shape}")
    sb, sh, ss, sd = x.strides
    if sd != 1 or sb < 0 or sh < 0 or ss < 0:
        raise KernelError(f"attention_int8: {what} needs a last stride of 1 element and no "
                          f"negative strides, got strides {x.strides}; pass a contiguous copy")


def _mask_geometry(mask, shape):
    """(span, (b, h, row) strides) of a mask read as `shape`: broadcast dims stride 0."""
    dims, steps = tuple(mask.shape), tuple(mask.strides)
    if len(dims) < 4:
        dims, steps = (1,) * (4 - len(dims)) + dims, (0,) * (4 - len(dims)) + steps
    if len(dims) > 4 or any(m != 1 and m != t for m, t in zip(dims, shape)):
        raise KernelError(f"attention_int8: mask of shape {tuple(mask.shape)} does not "
                          f"broadcast to (B, H, Sq, Sk) = {shape}")
    if shape[3] > 1 and (dims[3] == 1 or steps[3] != 1) or min(steps) < 0:
        raise KernelError(f"attention_int8: the mask must be read with stride 1 along the keys, "
                          f"got shape {tuple(mask.shape)}, strides {tuple(mask.strides)}; "
                          "pass a contiguous, key-expanded mask")
    steps = (0 if dims[0] == 1 else steps[0], 0 if dims[1] == 1 else steps[1],
             0 if dims[2] == 1 else steps[2], 1)
    return _span(shape, steps), steps[:3]


def attention_int8_strided(q, k, v, mask=None, mask_bool=True, scale=None, is_causal=False,
                           n_threads=None):
    """attention_int8 on operands given as Strided (address, shape, strides): the
    float32 q/k/v and a bool (mask_bool) or float32 mask, read in place. For callers
    that own the memory in another array library (the graph's op passes torch
    tensors' data pointers); attention_int8 is the numpy form. Returns the same
    (B, H, Sq, Dv) view of a fresh (B, Sq, H, Dv) float32 array.
    """
    for x, what in ((q, "q"), (k, "k"), (v, "v")):
        _check_operand(x, what)
    (nb, nh, sq, d), sk, dv = q.shape, k.shape[2], v.shape[3]
    if tuple(k.shape) != (nb, nh, sk, d) or tuple(v.shape[:3]) != (nb, nh, sk):
        raise KernelError(f"attention_int8: shapes do not match: q {q.shape}, k {k.shape}, "
                          f"v {v.shape} (need k (B, H, Sk, D) and v (B, H, Sk, Dv))")
    if is_causal and mask is not None:
        raise KernelError("attention_int8: pass a mask or is_causal=True, not both")
    out = np.empty((nb, sq, nh, dv), np.float32)
    if out.size == 0:
        return out.transpose(0, 2, 1, 3)
    if sk == 0 or d == 0:
        raise KernelError(f"attention_int8: needs at least one key and D > 0, got k {k.shape}")
    mkind, maddr, mspan, ms = MASK_NONE, 0, 0, (0, 0, 0)
    if mask is not None:
        mkind, maddr = MASK_BOOL if mask_bool else MASK_FLOAT, mask.address
        mspan, ms = _mask_geometry(mask, (nb, nh, sq, sk))
    qs, ks, vs = q.strides, k.strides, v.strides
    geo = np.array([q.address, k.address, v.address, maddr,
                    _span(q.shape, qs), _span(k.shape, ks), _span(v.shape, vs), mspan,
                    qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], *ms, sk, d],
                   np.int64)
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    serial, parallel = ENTRIES[_dispatch._current[0]]
    threads = min(n_threads or get_num_threads(), nb * nh)
    run = parallel if threads > 1 and nb * nh * sq * sk * (d + dv) >= PARALLEL_MIN_MACS else serial
    run(geo, mkind, bool(is_causal), scale, epilogue_params(), out, threads)
    return out.transpose(0, 2, 1, 3)


def _numpy_operand(x, what):
    """(array, Strided) of a 4-D operand as float32; copies only if the last stride
    is not one element or a stride is negative or not a whole element."""
    if type(x) is not np.ndarray:
        x = np.asarray(x)
    if x.dtype != np.float32:
        if x.dtype.kind != "f":
            raise KernelError(f"attention_int8: {what} must be floating point, got {x.dtype}")
        x = x.astype(np.float32)
    if x.ndim != 4:
        raise KernelError(f"attention_int8: {what} must be 4-D (B, H, S, D), got shape {x.shape}")
    sb, sh, ss, sd = x.strides
    if sd != 4 or min(sb, sh, ss) < 0 or (sb | sh | ss) & 3:
        x = np.ascontiguousarray(x)
        sb, sh, ss, sd = x.strides
    return x, Strided(x.ctypes.data, x.shape, (sb >> 2, sh >> 2, ss >> 2, 1))


def _numpy_mask(mask, shape):
    """(array, Strided, is bool) of a bool or float mask; copied (expanded) only if it
    repeats along the keys or has strides the kernel cannot read."""
    if type(mask) is not np.ndarray:
        mask = np.asarray(mask)
    if mask.dtype.kind == "f":
        mask = mask.astype(np.float32, copy=False)
    elif mask.dtype != np.bool_:
        raise KernelError(f"attention_int8: mask must be bool (True = attend) or float "
                          f"(added to the scores), got {mask.dtype}")
    if mask.ndim == 0:
        mask = mask.reshape(1)
    item = mask.itemsize
    if mask.ndim <= 4 and ((mask.shape[-1] == 1 and shape[3] > 1)
                               or any(st < 0 or st % item for st in mask.strides)
                               or (mask.shape[-1] > 1 and mask.strides[-1] != item)):
        mask = np.ascontiguousarray(np.broadcast_to(mask, mask.shape[:-1] + shape[3:]))
    steps = tuple(st // item for st in mask.strides)
    return mask, Strided(mask.ctypes.data, mask.shape, steps), mask.dtype == np.bool_


def attention_int8(q, k, v, mask=None, scale=None, is_causal=False, n_threads=None):
    """softmax(q k^T * scale + mask) v through int8 GEMMs, fused per (batch, head).

    q: float32 (B, H, Sq, D); k: (B, H, Sk, D); v: (B, H, Sk, Dv), any strides.
    mask: None, bool (True = attend) or float (added to the scores),
    broadcastable to (B, H, Sq, Sk); not together with is_causal.
    scale: default 1 / sqrt(D). Returns float32 (B, H, Sq, Dv): a view of a
    C-contiguous (B, Sq, H, Dv) buffer, so ``out.transpose(0, 2, 1, 3)`` is
    contiguous. Fully masked query rows give zeros (as torch does).

        >>> out = attention_int8(q, k, v, mask=key_padding[:, None, None, :])
    """
    q, qv = _numpy_operand(q, "q")
    k, kv = _numpy_operand(k, "k")
    v, vv = _numpy_operand(v, "v")
    mv, is_bool = None, True
    if mask is not None:
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mask, mv, is_bool = _numpy_mask(mask, shape)
    # q, k, v and mask stay referenced here until the kernel returns
    return attention_int8_strided(qv, kv, vv, mv, is_bool, scale, is_causal, n_threads)
