"""int4-weight linear: uint8 activations x grouped int4 weights (int4_pack.py's layout).

    >>> pw = pack_int4(q, scales, 32)                   # q, scales: quantize_weight_groups's
    >>> y = linear_int4_f32(x, pw, bias, act="gelu")    # x (..., K) float32

    y[i, n] = act(sa[i] * sum_g float32(acc[i, g, n]) * s[n, g] + bias[n]) (+ residual)
    acc[i, g, n] = sum over group g of (a[i, k] - zp[i]) * q[n, k]   (int32, exact)

The activations are quantized as the int8 linear does (quantize.py: uint8 asymmetric,
dynamic per row or static per tensor). The float sum runs over the groups in order, each
term rounded as written (no fused multiply-add), so every path and the numpy twin
(reference.linear_int4_f32) give the same bits.

AVX2 path (int4_s32): one 32-byte load holds 8 k of 8 columns; masking the low nibbles and
shifting the high ones gives two vectors in the dense kernel's order (4 k of a column in a
32-bit lane), multiplied by the row's broadcast activations with vpmaddubsw (uint8 x 0..15,
two pairs summed in int16: 4 * 255 * 15 < 2^15, no saturation) and vpmaddwd. Nibbles are
q + 8, so a group's sum is corrected by 8 * (the row's activation sum over the group) and
zp * (the column's sum of q). Up to ROWS rows share each weight load; at M = 1 every weight
byte is read once, half the int8 kernel's stream. Columns split over the threads in blocks
of 8; the portable path runs the same layout in plain loops.
"""
import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from . import dispatch as _dispatch
from .dispatch import KernelError
from .epilogue import store_float_tile
from .int4_pack import COLS, STEP_BYTES, STEP_K, PackedInt4, pack_int4, unpack_int4  # noqa: F401
from .linear import bound_constants, call_arrays, get_num_threads, on_rows
from .quantize import quantize_rows_range, quantize_tensor_into
from .gemm import _COUNTER_STRIDE, _count_add, _starts
from .rowops import IntrinsicArgs, borrowed, call_llvm

KERNEL_VERSION = "int4-2"
ROWS = 4            # activation rows a tile computes at once (they share each weight load)
# below this many multiply-adds a thread launch costs more than it saves (as linear.py)
PARALLEL_MIN_MACS = 1 << 18
JOB_BLOCKS = 4      # column blocks (of COLS) a worker takes from the shared counter at once
# activation elements from which the threads quantize the rows too (a launch of its own)
PARALLEL_PREP = 1 << 16

_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_F0 = np.float32(0)


@intrinsic(prefer_literal=True)
def int4_s32(typingctx, mr, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f):
    """f[r*8 + c] = sum over groups g of float32(acc[r, g, c]) * scales[cs_off + 8g + c] for
    rows m0..m0+mr-1 of a (uint8, C-contiguous) and the block of weights at w[w_off:]
    (groups * steps steps of 32 bytes)."""
    if not isinstance(mr, types.IntegerLiteral) or not isinstance(a, types.Array):
        return None
    sig = types.void(mr, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f)
    nrows = mr.literal_value

    def codegen(context, builder, sig, args):
        ar = IntrinsicArgs(context, builder, sig, args)
        arr, num, cst = ar.array, ar.int, ar.cst
        v32, v16, acc_ty, f_ty = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16), ir.VectorType(_i32, 8), \
            ir.VectorType(_f32, 8)
        a_st, xs_st = arr(1), arr(7)
        lda, ldx = builder.extract_value(a_st.strides, 0), builder.extract_value(xs_st.strides, 0)
        m0v = num(2)
        rows = [builder.gep(a_st.data, [builder.mul(builder.add(m0v, cst(r)), lda)]) for r in range(nrows)]
        xs_rows = [builder.bitcast(builder.gep(builder.bitcast(xs_st.data, _i8.as_pointer()),
                                               [builder.mul(builder.add(m0v, cst(r)), ldx)]), _i32.as_pointer())
                   for r in range(nrows)]
        azp_p = arr(8).data
        zps = [builder.load(builder.gep(azp_p, [builder.add(m0v, cst(r))])) for r in range(nrows)]
        wbase = builder.gep(arr(3).data, [num(4)])
        cs_p, sc_p, f_p = arr(9).data, arr(10).data, arr(12).data
        ones = ir.Constant(v16, [1] * 16)
        low = ir.Constant(v32, [15] * 32)
        facc = [cgutils.alloca_once_value(builder, ir.Constant(f_ty, None)) for _ in range(nrows)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_ty, None)) for _ in range(nrows)]
        nsteps = num(5)

        def splat(v, ty):
            vec = builder.insert_element(ir.Constant(ty, None), v, ir.Constant(_i32, 0))
            return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, ty.count), [0] * ty.count))

        with cgutils.for_range(builder, num(6)) as gl:
            g = gl.index
            for r in range(nrows):
                builder.store(ir.Constant(acc_ty, None), accs[r])
            with cgutils.for_range(builder, nsteps) as sl:
                t = builder.add(builder.mul(g, nsteps), sl.index)
                p = builder.gep(wbase, [builder.mul(t, cst(STEP_BYTES))])
                wv = builder.load(builder.bitcast(p, v32.as_pointer()), align=1)
                w_lo = builder.and_(wv, low)
                w_hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(wv, v16), ir.Constant(v16, [4] * 16)),
                                                    v32), low)
                k0 = builder.mul(t, cst(STEP_K))
                for r in range(nrows):
                    xq = []
                    for h in (0, 4):
                        xp = builder.bitcast(builder.gep(rows[r], [builder.add(k0, cst(h))]), _i32.as_pointer())
                        xq.append(builder.bitcast(splat(builder.load(xp, align=1), acc_ty), v32))
                    p16 = builder.add(call_llvm(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [xq[0], w_lo]),
                                      call_llvm(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [xq[1], w_hi]))
                    p32 = call_llvm(builder, "llvm.x86.avx2.pmadd.wd", acc_ty, [p16, ones])
                    builder.store(builder.add(builder.load(accs[r]), p32), accs[r])
            off = builder.add(num(11), builder.mul(g, cst(COLS)))
            cs = builder.load(builder.bitcast(builder.gep(cs_p, [off]), acc_ty.as_pointer()), align=4)
            sc = builder.load(builder.bitcast(builder.gep(sc_p, [off]), f_ty.as_pointer()), align=4)
            for r in range(nrows):
                x8 = builder.shl(builder.load(builder.gep(xs_rows[r], [g])), ir.Constant(_i32, 3))
                corr = builder.add(builder.mul(splat(zps[r], acc_ty), cs), splat(x8, acc_ty))
                v = builder.sitofp(builder.sub(builder.load(accs[r]), corr), f_ty)
                builder.store(builder.fadd(builder.load(facc[r]), builder.fmul(v, sc)), facc[r])
        for r in range(nrows):
            dst = builder.bitcast(builder.gep(f_p, [cst(r * COLS)]), f_ty.as_pointer())
            builder.store(builder.load(facc[r]), dst, align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit
def _int4_portable(mr, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f):
    """int4_s32 in plain loops (any CPU): the same integers, the same float order."""
    for r in range(mr):
        for c in range(COLS):
            f[r * COLS + c] = _F0
    for g in range(groups):
        for r in range(mr):
            i = m0 + r
            for c in range(COLS):
                acc = np.int32(0)
                for s in range(steps):
                    t = g * steps + s
                    o = w_off + t * STEP_BYTES + 4 * c
                    for j in range(4):
                        byte = np.int32(w[o + j])
                        acc += np.int32(a[i, t * STEP_K + j]) * (byte & 15)
                        acc += np.int32(a[i, t * STEP_K + 4 + j]) * (byte >> 4)
                corr = azp[i] * colsum[cs_off + g * COLS + c] + (xsum[i, g] << 3)
                v = np.float32(acc - corr)
                f[r * COLS + c] = f[r * COLS + c] + v * scales[cs_off + g * COLS + c]


@njit(inline="always")
def _tile(simd, mr, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f):
    if not simd:
        _int4_portable(mr, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f)
    elif mr == 4:
        int4_s32(4, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f)
    elif mr == 3:
        int4_s32(3, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f)
    elif mr == 2:
        int4_s32(2, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f)
    else:
        int4_s32(1, a, m0, w, w_off, steps, groups, xsum, azp, colsum, scales, cs_off, f)


@njit(inline="always")
def _blocks(simd, b0, b1, a, ascale, azp, xsum, w, colsum, scales, group, bias, res, ep, out, f, y):
    """Output column blocks b0..b1-1 for every row of a, ROWS rows at a time; f (ROWS * COLS)
    and y (1, COLS) are the caller's float32 scratch."""
    m, n = a.shape[0], out.shape[1]
    k = a.shape[1]
    groups = k // group
    steps = group // STEP_K
    for nb in range(b0, b1):
        n0 = nb * COLS
        ncols = min(COLS, n - n0)
        for m0 in range(0, m, ROWS):
            mr = min(ROWS, m - m0)
            _tile(simd, mr, a, m0, w, nb * (k // 2) * COLS, steps, groups, xsum, azp, colsum, scales,
                  nb * groups * COLS, f)
            store_float_tile(mr, m0, n0, ncols, f, COLS, ascale, bias, res, ep, out, y)


@njit(inline="always")
def _prepare_rows(x, aq, a_scale, a_zp, a, ascale, azp, xsum, group, i0, i1):
    """Rows i0..i1-1: quantized into a (from float x per row, a_scale 0, or with the static
    scale; uint8 aq copied), their scales, zero points and activation sums per group."""
    if x.shape[1] == 0:
        for i in range(i0, i1):
            for c in range(a.shape[1]):
                a[i, c] = aq[i, c]
    elif a_scale > 0:
        quantize_tensor_into(x[i0:i1], a_scale, a_zp, a[i0:i1])
    else:
        quantize_rows_range(x, a, ascale, azp, i0, i1)
    for i in range(i0, i1):
        if a_scale > 0:
            ascale[i], azp[i] = a_scale, a_zp
        for g in range(xsum.shape[1]):
            s = np.int32(0)
            for c in range(g * group, (g + 1) * group):
                s += np.int32(a[i, c])
            xsum[i, g] = s


@njit(inline="always")
def _worker(simd, wk, threads, nxt, njobs, nblocks, a, ascale, azp, xsum, w, colsum, scales, group, bias, res,
            ep, out):
    """Worker wk's share of the jobs (JOB_BLOCKS column blocks each), then what is left of the
    others', from the same atomic counters (as gemm._worker): a worker the OS delays on a
    shared machine holds up nobody, and in the common case each keeps its columns' weights."""
    a, ascale, azp, xsum, w = borrowed(a), borrowed(ascale), borrowed(azp), borrowed(xsum), borrowed(w)
    colsum, scales, bias, res, ep, out = borrowed(colsum), borrowed(scales), borrowed(bias), borrowed(res), \
        borrowed(ep), borrowed(out)
    f, y = np.empty(ROWS * COLS, np.float32), np.empty((1, COLS), np.float32)
    for v in range(threads):
        owner = (wk + v) % threads
        hi = (owner + 1) * njobs // threads
        while True:
            j = _count_add(nxt, owner * _COUNTER_STRIDE, 1)
            if j >= hi:
                break
            _blocks(simd, j * JOB_BLOCKS, min(nblocks, (j + 1) * JOB_BLOCKS), a, ascale, azp, xsum, w, colsum,
                    scales, group, bias, res, ep, out, f, y)


def _entries(simd):
    """Serial and threaded entries of one path (simd: the AVX2 intrinsic, else plain loops)."""
    @njit(cache=CACHE)
    def serial(x, aq, a_scale, a_zp, w, colsum, scales, group, bias, res, ep, out, threads):
        m, k = out.shape[0], max(x.shape[1], aq.shape[1])
        a = np.empty((m, k), np.uint8)
        ascale, azp = np.empty(m, np.float32), np.empty(m, np.int32)
        xsum = np.empty((m, k // group), np.int32)
        _prepare_rows(x, aq, a_scale, a_zp, a, ascale, azp, xsum, group, 0, m)
        f, y = np.empty(ROWS * COLS, np.float32), np.empty((1, COLS), np.float32)
        _blocks(simd, 0, (out.shape[1] + COLS - 1) // COLS, a, ascale, azp, xsum, w, colsum, scales, group,
                bias, res, ep, out, f, y)

    @njit(cache=CACHE, parallel=True)
    def parallel(x, aq, a_scale, a_zp, w, colsum, scales, group, bias, res, ep, out, threads):
        m, k = out.shape[0], max(x.shape[1], aq.shape[1])
        a = np.empty((m, k), np.uint8)
        ascale, azp = np.empty(m, np.float32), np.empty(m, np.int32)
        xsum = np.empty((m, k // group), np.int32)
        if m * k >= PARALLEL_PREP:
            for t in prange(threads):
                _prepare_rows(x, aq, a_scale, a_zp, a, ascale, azp, xsum, group, t * m // threads,
                              (t + 1) * m // threads)
        else:                                  # a few rows: not worth a launch of their own
            _prepare_rows(x, aq, a_scale, a_zp, a, ascale, azp, xsum, group, 0, m)
        nblocks = (out.shape[1] + COLS - 1) // COLS
        njobs = (nblocks + JOB_BLOCKS - 1) // JOB_BLOCKS
        nxt = _starts(njobs, threads)
        for wk in prange(threads):
            _worker(simd, wk, threads, nxt, njobs, nblocks, a, ascale, azp, xsum, w, colsum, scales, group, bias,
                    res, ep, out)
    return serial, parallel


ENTRIES = {True: _entries(True), False: _entries(False)}


# --- numpy entry points --------------------------------------------------------------

def _check_packed(pw):
    if not isinstance(pw, PackedInt4):
        raise KernelError("weights must be a PackedInt4 from pack_int4")


def _run(pw, x, aq, a_scale, a_zp, bias, res, ep, out, n_threads):
    serial, parallel = ENTRIES[_dispatch._current[0] != "portable"]
    threads = n_threads or get_num_threads()
    rows = out.shape[0]
    args = (x, aq, a_scale, a_zp, pw.data, pw.col_sums.reshape(-1), pw.scales.reshape(-1), pw.group, bias, res,
            ep, out)
    if threads > 1 and rows * pw.n * pw.k >= PARALLEL_MIN_MACS:
        parallel(*args, threads)
    else:
        serial(*args, 1)
    return out


def linear_int4_f32(x, pw, bias=None, act="none", act_args=(), n_threads=None, residual=None):
    """y = act(x @ dequant(W).T + bias) (+ residual), x float32 (..., K) quantized per row.

        >>> y = linear_int4_f32(x, pack_int4(q, scales, 32), bias, act="relu")
    """
    _check_packed(pw)
    x = np.ascontiguousarray(x, np.float32)
    return on_rows("linear_int4_f32", x, pw.k, pw.n, lambda: bind_linear_int4(pw, bias, act, act_args),
                   residual, n_threads)


def bind_linear_int4(pw, bias=None, act="none", act_args=(), a_scale=0.0, a_zero_point=0,
                     out_scale=0.0, out_zero_point=0):
    """bind_linear (linear.py) for PackedInt4 weights: the same arguments and the same
    call(x, out=None, residual=None, n_threads=None) -> out.

        >>> call = bind_linear_int4(pw, bias, act="gelu")
        >>> y = call(x)
    """
    _check_packed(pw)
    n, k = pw.n, pw.k
    b, ep, out_dtype, static, chained_out = bound_constants(n, bias, act, act_args, a_scale, a_zero_point,
                                                            out_scale, out_zero_point)
    scale, zero_point = (np.float32(a_scale), np.int32(a_zero_point)) if static else (_F0, np.int32(0))

    def call(x, out=None, residual=None, n_threads=None):
        xf, aq, out, res = call_arrays("bind_linear_int4", x, k, n, static, chained_out, out_dtype, out, residual)
        if x.shape[0] == 0:
            return out
        return _run(pw, xf, aq, scale, zero_point, b, res, ep, out, n_threads)
    return call
