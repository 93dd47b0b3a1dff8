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

import llvmlite.ir as ir
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .dispatch import KernelError
from . import dispatch as _dispatch
from .epilogue import exp_f32
from .gemm import _fetch_add, _job_into, _scratch, a_stride
from .linear import epilogue_params, get_num_threads
from .quantize import scale_zero_point
from .simd import BLOCK_COLS, TAGS

KERNEL_VERSION = "attention-2"
# below this many multiply-adds per call a thread launch costs more than it saves
PARALLEL_MIN_MACS = 1 << 20
MASK_NONE, MASK_FLOAT, MASK_BOOL = 0, 1, 2

_AVX512_VNNI = TAGS["avx512_vnni"]
_AVX_VNNI = TAGS["avx_vnni"]
_AVX2 = TAGS["avx2"]
_PORTABLE = TAGS["portable"]
_F0, _F1, _F127, _F255 = (np.float32(v) for v in (0.0, 1.0, 127.0, 255.0))
_NEG_INF = np.float32(-np.inf)
# geo vector: operand addresses (q, k, v, mask), spans in elements, strides in
# elements of q, k, v, mask over (batch, head, row), Sk and D
_ADDR, _SPAN, _QS, _KS, _VS, _MS, _SK, _D = 0, 4, 8, 11, 14, 17, 20, 21
_S8, _S16, _S24 = np.int32(8), np.int32(16), np.int32(24)


# --- one head: quantize and pack the operands ----------------------------------

_LANES = 16
_f32 = ir.FloatType()
_v16 = ir.VectorType(_f32, _LANES)


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    # no NaNs: lets the horizontal reductions be a shuffle tree, not a lane-by-lane chain
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args,
                        fastmath=("nnan", "nsz"))


def _array_ptr(context, builder, ty, value, off_ty, off):
    data = cgutils.create_struct_proxy(ty)(context, builder, value=value).data
    return builder.gep(data, [context.cast(builder, off, off_ty, types.intp)])


def _emit_minmax(context, builder, base, count, keep=None):
    """(min, max) of `count` float32 from pointer `base`, skipping elements
    whose byte in `keep` (a uint8 pointer, optional) is 0."""
    intp = context.get_value_type(types.intp)
    i8 = ir.IntType(8)

    def kept(v, p, ty, lanes):
        if keep is None:
            return v, v
        m = builder.load(builder.bitcast(builder.gep(keep, [p]), ty.as_pointer()), align=1)
        on = builder.icmp_unsigned("!=", m, ir.Constant(ty, None))
        inf = ir.Constant(v.type, [float("inf")] * lanes if lanes else float("inf"))
        ninf = ir.Constant(v.type, [float("-inf")] * lanes if lanes else float("-inf"))
        return builder.select(on, v, inf), builder.select(on, v, ninf)

    lo_v = cgutils.alloca_once_value(builder, ir.Constant(_v16, [float("inf")] * _LANES))
    hi_v = cgutils.alloca_once_value(builder, ir.Constant(_v16, [float("-inf")] * _LANES))
    nvec = builder.udiv(count, ir.Constant(intp, _LANES))
    with cgutils.for_range(builder, nvec) as loop:
        i = builder.mul(loop.index, ir.Constant(intp, _LANES))
        v = builder.load(builder.bitcast(builder.gep(base, [i]), _v16.as_pointer()), align=4)
        for_min, for_max = kept(v, i, ir.VectorType(i8, _LANES), _LANES)
        builder.store(_call(builder, "llvm.minnum.v16f32", _v16, [builder.load(lo_v), for_min]), lo_v)
        builder.store(_call(builder, "llvm.maxnum.v16f32", _v16, [builder.load(hi_v), for_max]), hi_v)
    lo = cgutils.alloca_once_value(
        builder, _call(builder, "llvm.vector.reduce.fmin.v16f32", _f32, [builder.load(lo_v)]))
    hi = cgutils.alloca_once_value(
        builder, _call(builder, "llvm.vector.reduce.fmax.v16f32", _f32, [builder.load(hi_v)]))
    tail = builder.mul(nvec, ir.Constant(intp, _LANES))
    with cgutils.for_range(builder, builder.sub(count, tail)) as loop:
        i = builder.add(tail, loop.index)
        for_min, for_max = kept(builder.load(builder.gep(base, [i])), i, i8, 0)
        builder.store(_call(builder, "llvm.minnum.f32", _f32, [builder.load(lo), for_min]), lo)
        builder.store(_call(builder, "llvm.maxnum.f32", _f32, [builder.load(hi), for_max]), hi)
    return builder.load(lo), builder.load(hi)


# Reductions written as 16-lane llvm.minnum/maxnum: LLVM, as Numba drives it,
# turns a scalar min/max loop into an in-loop (per iteration horizontal)
# reduction that runs at scalar speed. NaN inputs give an undefined result.
@intrinsic
def _minmax(typingctx, x, off, n):
    """(min, max) of the n float32 values from element `off` of x's data
    ((+inf, -inf) if n == 0); x must be C-contiguous from there on."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32):
        return None
    sig = types.UniTuple(types.float32, 2)(x, off, n)

    def codegen(context, builder, sig, args):
        base = _array_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        count = context.cast(builder, args[2], sig.args[2], types.intp)
        lo, hi = _emit_minmax(context, builder, base, count)
        return context.make_tuple(builder, sig.return_type, [lo, hi])
    return sig, codegen


@intrinsic
def _masked_max(typingctx, x, off, n, m, moff):
    """max of x[off + j] over j < n where the byte m[moff + j] != 0 (-inf if none)."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32
            and isinstance(m, types.Array) and m.dtype == types.uint8):
        return None
    sig = types.float32(x, off, n, m, moff)

    def codegen(context, builder, sig, args):
        base = _array_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        keep = _array_ptr(context, builder, sig.args[3], args[3], sig.args[4], args[4])
        count = context.cast(builder, args[2], sig.args[2], types.intp)
        return _emit_minmax(context, builder, base, count, keep)[1]
    return sig, codegen


@intrinsic
def _prefetch(typingctx, x, off):
    """Hint the cache line holding element `off` of x's data into L2 (prefetcht1)."""
    if not isinstance(x, types.Array):
        return None
    sig = types.void(x, off)

    def codegen(context, builder, sig, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        p = _array_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, locality 2, data cache
        builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always")
def _range(x, off, n):
    """(min(0, x[off:off+n]), max(0, ...)), as quantize.row_range."""
    lo, hi = _minmax(x, off, n)
    return min(lo, _F0), max(hi, _F0)


@njit(inline="always")
def _abs_max(x, off, n):
    lo, hi = _minmax(x, off, n)
    return max(-lo, hi, _F0)


@njit(error_model="numpy")
def _quantize_q_rows(qf, base, row_stride, sq, d, qa, qscale, qzp):
    """Rows of Q (flat, from `base`) -> uint8 rows of qa with per-row scale/zp;
    columns d..(d rounded up to 4) get the zero point (they meet zero keys)."""
    kp = (d + 3) // 4 * 4
    for i in range(sq):
        off = np.uint64(base + i * row_stride)
        lo, hi = _range(qf, off, d)
        s, zp = scale_zero_point(lo, hi)
        qscale[i] = s
        qzp[i] = np.int32(zp)
        inv = _F1 / s
        ui = np.uint64(i)
        for c in range(d):
            v = np.rint(qf[off + np.uint64(c)] * inv) + zp
            v = min(max(v, _F0), _F255)
            qa[ui, np.uint64(c)] = np.uint8(np.int32(v))
        for c in range(d, kp):
            qa[ui, np.uint64(c)] = np.uint8(zp)


@njit(error_model="numpy")
def _quantize_k_rows(kf, base, row_stride, sk, d, scale, kt, kscale, ksum):
    """Keys -> int8 rows of kt, symmetric per key; kscale gets the key's scale
    times the softmax scale, ksum the key's sum (for the zero point term)."""
    for j in range(sk):
        off = np.uint64(base + j * row_stride)
        amax = _abs_max(kf, off, d)
        s = amax / _F127 if amax > _F0 else _F1
        inv = _F1 / s
        uj = np.uint64(j)
        total = np.int32(0)
        for c in range(d):
            v = np.rint(kf[off + np.uint64(c)] * inv)
            qv = np.int32(min(max(v, -_F127), _F127))
            kt[uj, np.uint64(c)] = np.int8(qv)
            total += qv
        kscale[j] = s * scale
        ksum[j] = total


@njit
def _pack_k(sk, kt32, kp32):
    """Quantized keys (rows of kt32, 4-byte k-groups) into the packed N x K
    operand (N = keys): block nb, k-group g holds the words of keys
    64 nb .. 64 nb + 63 side by side. Written as contiguous stores with
    strided loads: the other loop order vectorizes into scatters, which
    are microcoded and slow on AMD."""
    kg = kt32.shape[1]
    for nb in range((sk + BLOCK_COLS - 1) // BLOCK_COLS):
        j0 = nb * BLOCK_COLS
        n = min(BLOCK_COLS, sk - j0)
        for g in range(kg):
            dst = np.uint64((nb * kg + g) * BLOCK_COLS)
            ug = np.uint64(g)
            for c in range(n):
                kp32[dst + np.uint64(c)] = kt32[np.uint64(j0 + c), ug]


@njit(error_model="numpy")
def _v_scales(vf, base, row_stride, sk, dv, vmax, vscale, vinv):
    """Per-column (d) symmetric int8 scales of V and their inverses."""
    for c in range(dv):
        vmax[c] = _F0
    for j in range(sk):
        off = np.uint64(base + j * row_stride)
        for c in range(dv):
            uc = np.uint64(c)
            vmax[uc] = max(vmax[uc], abs(vf[off + uc]))
    for c in range(dv):
        s = vmax[c] / _F127 if vmax[c] > _F0 else _F1
        vscale[c] = s
        vinv[c] = _F1 / s


@njit(inline="always")
def _q8(x, inv):
    """One value to int8 (as the low byte of an int32)."""
    v = min(max(np.rint(x * inv), -_F127), _F127)
    return np.int32(v) & np.int32(0xFF)


@njit(fastmath={"nnan", "nsz"}, error_model="numpy")
def _pack_v(vf, base, row_stride, sk, dv, vinv, vp32):
    """V (keys x dv) -> int8 packed as the N x K operand (N = dv, K = keys).

    A k-group holds 4 consecutive keys: the packed word of column c is the
    4 quantized bytes V[4g..4g+3, c], built with shifts so the loop over c
    vectorizes. Keys past sk (the last group's tail) stay zero.
    """
    kg = (sk + 3) // 4
    for g in range(kg):
        o0 = base + 4 * g * row_stride
        nk = min(4, sk - 4 * g)
        for nb in range((dv + BLOCK_COLS - 1) // BLOCK_COLS):
            c0 = nb * BLOCK_COLS
            dst = np.uint64((nb * kg + g) * BLOCK_COLS)
            n = min(BLOCK_COLS, dv - c0)
            if nk == 4:
                r0, r1 = np.uint64(o0 + c0), np.uint64(o0 + row_stride + c0)
                r2, r3 = np.uint64(o0 + 2 * row_stride + c0), np.uint64(o0 + 3 * row_stride + c0)
                for c in range(n):
                    u = np.uint64(c)
                    inv = vinv[np.uint64(c0) + u]
                    vp32[dst + u] = (_q8(vf[r0 + u], inv) | (_q8(vf[r1 + u], inv) << _S8)
                                     | (_q8(vf[r2 + u], inv) << _S16)
                                     | (_q8(vf[r3 + u], inv) << _S24))
            else:
                for c in range(n):
                    inv = vinv[c0 + c]
                    w = np.int32(0)
                    for kk in range(nk):
                        w |= _q8(vf[o0 + kk * row_stride + c0 + c], inv) << np.int32(8 * kk)
                    vp32[dst + np.uint64(c)] = w


# --- one head: masked softmax, quantized to uint8 ----------------------------------

@njit
def _add_mask_float(s, ui, n, mf, moff):
    for j in range(n):
        u = np.uint64(j)
        s[ui, u] += mf[moff + u]


@njit(fastmath={"reassoc", "nsz", "contract"}, error_model="numpy")
def _exp_quantize_row(s, ui, n, mx, pa):
    """pa[i, j] = rint(255 exp(s - mx)) for j < n; returns the float sum of exp."""
    total = _F0
    for j in range(n):
        u = np.uint64(j)
        e = exp_f32(s[ui, u] - mx)
        total += e
        pa[ui, u] = np.uint8(np.int32(min(np.rint(e * _F255), _F255)))
    return total


@njit(fastmath={"reassoc", "nsz", "contract"}, error_model="numpy")
def _exp_quantize_row_kept(s, ui, n, mx, mb, moff, pa):
    """_exp_quantize_row with e = 0 where the bool mask byte is 0."""
    total = _F0
    for j in range(n):
        u = np.uint64(j)
        e = exp_f32(s[ui, u] - mx) if mb[moff + u] != 0 else _F0
        total += e
        pa[ui, u] = np.uint8(np.int32(min(np.rint(e * _F255), _F255)))
    return total


@njit(error_model="numpy")
def _softmax_rows(s, sk, mkind, mf, mb, moff, mrow, causal, pa, pscale):
    """Scaled scores s (Sq, Sk) -> uint8 P rows in pa and their scales.

    Keys a row may not see (causal tail) and the columns up to the k-group
    boundary are 0 in pa; a fully masked row gets scale 0, so its output is
    exactly 0.
    """
    kp = (sk + 3) // 4 * 4
    ld = np.uint64(s.shape[1])
    for i in range(s.shape[0]):
        ui = np.uint64(i)
        n = min(sk, i + 1) if causal else sk
        roff = np.uint64(moff + i * mrow)
        if mkind == MASK_BOOL:
            mx = _masked_max(s, ui * ld, n, mb, roff)
        else:
            if mkind == MASK_FLOAT:
                _add_mask_float(s, ui, n, mf, roff)
            mx = _minmax(s, ui * ld, n)[1]
        if mx == _NEG_INF or n == 0:
            n = 0
            pscale[i] = _F0
        else:
            if mkind == MASK_BOOL:
                total = _exp_quantize_row_kept(s, ui, n, mx, mb, roff, pa)
            else:
                total = _exp_quantize_row(s, ui, n, mx, pa)
            pscale[i] = _F1 / (_F255 * total)
        for j in range(n, kp):
            pa[ui, np.uint64(j)] = np.uint8(0)


# --- one head, one worker ------------------------------------------------------------

@njit
def _gemm(tag, aq, bp, kg, colsum, ascale, azp, wscale, bias, ep, out):
    """out = dequantized aq x packed bp, every column block on this thread."""
    m = aq.shape[0]
    t, y = _scratch(tag)
    no_residual = out[:0]
    for job in range((out.shape[1] + BLOCK_COLS - 1) // BLOCK_COLS):
        _job_into(tag, job, 1, m, aq, bp, kg, colsum, ascale, azp, wscale, bias, no_residual, ep, out, t, y)


@njit
def _prefetch_rows(x, base, row_stride, rows, n):
    """Prefetch `rows` rows of n float32 (16 per cache line) of a strided operand."""
    for i in range(rows):
        off = base + i * row_stride
        for c in range(0, n, 16):
            _prefetch(x, off + c)
        _prefetch(x, off + n - 1)


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
def _buffers(sq, sk, d, dv):
    """One worker's buffers. Packed operands and padding columns start at zero
    and only real positions are ever written, so they stay zero."""
    kgd, kgs = (d + 3) // 4, (sk + 3) // 4
    nbk = (sk + BLOCK_COLS - 1) // BLOCK_COLS
    nbv = (dv + BLOCK_COLS - 1) // BLOCK_COLS
    qa = np.empty((sq, a_stride(kgd)), np.uint8)
    kt32 = np.zeros((sk, kgd), np.int32)
    kp32 = np.zeros(nbk * kgd * BLOCK_COLS, np.int32)
    pa = np.zeros((sq, a_stride(kgs)), np.uint8)
    vp32 = np.zeros(nbv * kgs * BLOCK_COLS, np.int32)
    # GEMM outputs span whole 64-column blocks: only full blocks take the
    # in-register epilogue (tile_f32); padding keys have scale 0, so score 0
    scores = np.empty((sq, nbk * BLOCK_COLS), np.float32)
    ctx = np.empty((sq if dv % BLOCK_COLS else 0, nbv * BLOCK_COLS), np.float32)
    # per row / column vectors: q scale, q zp, p scale, p zp (0)
    rows_f, rows_i = np.empty((2, sq), np.float32), np.zeros((2, sq), np.int32)
    # per key / column: k scale, v scale, bias (0), v max, v 1/scale; k sums, v sums (0)
    cols_f = np.zeros((5, max(nbk, nbv) * BLOCK_COLS), np.float32)
    cols_i = np.zeros((2, max(nbk, nbv) * BLOCK_COLS), np.int32)
    return qa, kt32, kp32, pa, vp32, scores, ctx, rows_f, rows_i, cols_f, cols_i


@njit
def _head(tag, b, h, geo, qf, kf, vf, mf, mb, mkind, causal, scale, ep, bufs, out):
    """softmax(q k^T * scale + mask) v of one (batch, head) into out[b, :, h, :]."""
    qa, kt32, kp32, pa, vp32, scores, ctx, rows_f, rows_i, cols_f, cols_i = bufs
    sq, sk, d, dv = out.shape[1], geo[_SK], geo[_D], out.shape[3]
    kgd, kgs = kt32.shape[1], (sk + 3) // 4
    kscale, vscale, bias, vmax, vinv = cols_f[0], cols_f[1], cols_f[2], cols_f[3], cols_f[4]
    _quantize_q_rows(qf, b * geo[_QS] + h * geo[_QS + 1], geo[_QS + 2], sq, d, qa,
                     rows_f[0], rows_i[0])
    _quantize_k_rows(kf, b * geo[_KS] + h * geo[_KS + 1], geo[_KS + 2], sk, d, scale,
                     kt32.view(np.int8), kscale, cols_i[0])
    _pack_k(sk, kt32, kp32)
    _gemm(tag, qa, kp32.view(np.int8), kgd, cols_i[0], rows_f[0], rows_i[0], kscale, bias, ep,
          scores)
    _softmax_rows(scores, sk, mkind, mf, mb, b * geo[_MS] + h * geo[_MS + 1], geo[_MS + 2],
                  causal, pa, rows_f[1])
    vbase = b * geo[_VS] + h * geo[_VS + 1]
    _v_scales(vf, vbase, geo[_VS + 2], sk, dv, vmax, vscale, vinv)
    _pack_v(vf, vbase, geo[_VS + 2], sk, dv, vinv, vp32)
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


@intrinsic
def _pointer(typingctx, addr, dtype):
    """The address `addr` (an int) as a pointer to `dtype`."""
    if not isinstance(dtype, types.NumberClass):
        return None
    sig = types.CPointer(dtype.dtype)(addr, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
    return sig, codegen


@njit
def _worker(tag, nxt, geo, mkind, causal, scale, ep, out):
    """Run (batch, head) jobs from the shared counter nxt[0] until none are left."""
    nb, sq, nh, dv = out.shape
    # the operands, as flat views of the caller's memory (alive for the call)
    qf = carray(_pointer(geo[_ADDR], np.float32), geo[_SPAN])
    kf = carray(_pointer(geo[_ADDR + 1], np.float32), geo[_SPAN + 1])
    vf = carray(_pointer(geo[_ADDR + 2], np.float32), geo[_SPAN + 2])
    mf = carray(_pointer(geo[_ADDR + 3], np.float32), geo[_SPAN + 3] if mkind == MASK_FLOAT else 0)
    mb = carray(_pointer(geo[_ADDR + 3], np.uint8), geo[_SPAN + 3] if mkind == MASK_BOOL else 0)
    bufs = _buffers(sq, geo[_SK], geo[_D], dv)
    jobs = nb * nh
    # claim one job ahead, so its operands can be prefetched during this one
    job = _fetch_add(nxt, 0)
    while job < jobs:
        ahead = _fetch_add(nxt, 0)
        if ahead < jobs:
            _prefetch_head(ahead, nh, sq, geo, qf, kf, vf, dv)
        _head(tag, job // nh, job % nh, geo, qf, kf, vf, mf, mb, mkind, causal, scale, ep,
              bufs, out)
        job = ahead


# One serial and one threaded entry per ISA, each bound to its ISA by a
# compile-time tag (see gemm.py). geo: addresses, sizes and strides of the
# operands (layout at _ADDR.._D); out: (B, Sq, H, Dv) float32.
@njit(cache=True)
def avx512_vnni_serial(geo, mkind, causal, scale, ep, out, threads):
    _worker(_AVX512_VNNI, np.zeros(1, np.int64), geo, mkind, causal, scale, ep, out)


@njit(cache=True, parallel=True)
def avx512_vnni_parallel(geo, mkind, causal, scale, ep, out, threads):
    nxt = np.zeros(1, np.int64)
    for _ in prange(threads):
        _worker(_AVX512_VNNI, nxt, geo, mkind, causal, scale, ep, out)


@njit(cache=True)
def avx_vnni_serial(geo, mkind, causal, scale, ep, out, threads):
    _worker(_AVX_VNNI, np.zeros(1, np.int64), geo, mkind, causal, scale, ep, out)


@njit(cache=True, parallel=True)
def avx_vnni_parallel(geo, mkind, causal, scale, ep, out, threads):
    nxt = np.zeros(1, np.int64)
    for _ in prange(threads):
        _worker(_AVX_VNNI, nxt, geo, mkind, causal, scale, ep, out)


@njit(cache=True)
def avx2_serial(geo, mkind, causal, scale, ep, out, threads):
    _worker(_AVX2, np.zeros(1, np.int64), geo, mkind, causal, scale, ep, out)


@njit(cache=True, parallel=True)
def avx2_parallel(geo, mkind, causal, scale, ep, out, threads):
    nxt = np.zeros(1, np.int64)
    for _ in prange(threads):
        _worker(_AVX2, nxt, geo, mkind, causal, scale, ep, out)


@njit(cache=True)
def portable_serial(geo, mkind, causal, scale, ep, out, threads):
    _worker(_PORTABLE, np.zeros(1, np.int64), geo, mkind, causal, scale, ep, out)


@njit(cache=True, parallel=True)
def portable_parallel(geo, mkind, causal, scale, ep, out, threads):
    nxt = np.zeros(1, np.int64)
    for _ in prange(threads):
        _worker(_PORTABLE, nxt, geo, mkind, causal, scale, ep, out)


ENTRIES = {
    "avx512_vnni": (avx512_vnni_serial, avx512_vnni_parallel),
    "avx_vnni": (avx_vnni_serial, avx_vnni_parallel),
    "avx2": (avx2_serial, avx2_parallel),
    "portable": (portable_serial, portable_parallel),
}


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
    item = mask.itemsize
    if 0 < mask.ndim <= 4 and ((mask.shape[-1] == 1 and shape[3] > 1)
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
