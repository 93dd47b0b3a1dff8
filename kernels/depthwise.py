"""int8 depthwise 2-D convolution of uint8 NHWC images, as pairs of int16 multiply-adds.

    pairs, tap_sums = pack_taps(q)          # q (C, kh, kw) int8 taps
    depthwise_u8(xq, zps, scales, pairs, tap_sums, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow,
                 ws, bias, ep, out, codes)   # float32 rows `out` or uint8 rows `codes`

A depthwise conv has no reduction over channels to hand a GEMM: each channel sums its own
kh x kw taps. With channels innermost (NHWC), a vector holds 16 channels of one pixel, and
a multiply-add per tap would be a 32-bit multiply (vpmulld: two uops on the one port
512-bit integer multiplies use, 2.5 cycles per 16 multiply-adds measured here). Instead
each input row is rewritten once as "pair rows": lane (column q, channel c) holds the codes
of columns q and q + dilation as two int16 halves of an int32. One pmaddwd of a pair-row
vector with a vector of tap pairs (tap 2j, tap 2j + 1) is then 32 multiply-adds, and LLVM
emits vpmaddwd / vpdpwssd for it (AVX-512 BW / VNNI), or its AVX2 and generic forms on
other CPUs: the intrinsic below is plain LLVM IR, no ISA-specific code. A 3-wide kernel
row is one full pair and one pair with a zero tap.

The zero point: outside the image the pair rows hold the zero point itself, so every
output pixel sums all its taps over codes, sum (x) * t, and the sum of zp * t over the taps
is taken off once per channel (tap_sums): exact, and no border case in the inner loop.
Products fit int16 pairs (|x * t| <= 255 * 128) and their sums int32.

The epilogue: float32(acc) * (scale * ws) + bias, then the activation, then (uint8 output)
clip(rint(y * (1 / out_scale)) + out_zp, 0, 255), the GEMM's uint8 epilogue's operations.
With no activation, relu, a clamp (ReLU6) or SiLU, and whole 16-channel vectors, it runs
in registers on each sum (pair_outputs); else on a row of sums staged in memory.
"""
import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .epilogue import ACTIVATIONS, EP_ACT, EP_P0, EP_P1, apply_activation, requant_params, requantize_rows
from .rowops import IntrinsicArgs, splat
from .simd import _py_max, _py_min, _requantize, _silu_staged

KERNEL_VERSION = "depthwise-3"
_F0, _INF = np.float32(0.0), np.float32(np.inf)
_SILU = ACTIVATIONS["silu"]

# a job takes up to BAND_ROWS output rows, their input rows made pair rows once (a 3x3 stride-1
# row reads 3, a band of 8 reads 10); as many as leave BAND_JOBS jobs to spread
BAND_ROWS, BAND_JOBS = 8, 8
# (tap rows, tap pairs) whose loops pair_sums unrolls: 3x3 and 5x5 kernels (every output
# row reads all kh tap rows: outside the image the pair rows hold the zero point)
UNROLLED = ((3, 2), (5, 3))

LANES = 16
_i16, _i32 = ir.IntType(16), ir.IntType(32)
_V16 = ir.VectorType(_i32, LANES)
_EVEN = ir.Constant(ir.VectorType(_i32, LANES), list(range(0, 2 * LANES, 2)))
_ODD = ir.Constant(ir.VectorType(_i32, LANES), list(range(1, 2 * LANES, 2)))


def _madd_pairs(builder, a, b):
    """Lane l: lo(a) * lo(b) + hi(a) * hi(b), the int16 halves of int32 lanes (pmaddwd)."""
    wide = ir.VectorType(_i32, 2 * LANES)
    halves = ir.VectorType(_i16, 2 * LANES)
    p = builder.mul(builder.sext(builder.bitcast(a, halves), wide), builder.sext(builder.bitcast(b, halves), wide))
    return builder.add(builder.shuffle_vector(p, p, _EVEN), builder.shuffle_vector(p, p, _ODD))


def _emit_sums(builder, ar, finish):
    """pair_sums' loops over pixels and channel vectors (its arguments 0-11), the taps
    unrolled for the UNROLLED shapes, looped over for others; finish(total, pixel, lane0)
    stores each pixel's 16 sums."""
    xp, tp, cp = ar.ptr(0), ar.ptr(4), ar.ptr(11)
    xpix_, xrow_, xpair_, trow_, tpair_ = (ar.int(k) for k in (1, 2, 3, 5, 6))
    nrows, npairs = ar.int(7), ar.int(8)
    total = cgutils.alloca_once(builder, _V16)

    def tap(x_v, t_v, i, j):
        return _madd_pairs(builder, _load(builder, x_v, builder.add(builder.mul(i, xrow_), builder.mul(j, xpair_))),
                           _load(builder, t_v, builder.add(builder.mul(i, trow_), builder.mul(j, tpair_))))

    def pixels(shape):
        with cgutils.for_range(builder, ar.int(10)) as px:
            x_px = builder.gep(xp, [builder.mul(px.index, xpix_)])
            with cgutils.for_range(builder, ar.int(9)) as v:
                lane0 = builder.mul(v.index, ar.cst(LANES))
                x_v, t_v = builder.gep(x_px, [lane0]), builder.gep(tp, [lane0])
                if shape:
                    acc = _load(builder, cp, lane0)
                    for i in range(shape[0]):
                        for j in range(shape[1]):
                            acc = builder.add(acc, tap(x_v, t_v, ar.cst(i), ar.cst(j)))
                else:
                    builder.store(_load(builder, cp, lane0), total)
                    with cgutils.for_range(builder, nrows) as i:
                        with cgutils.for_range(builder, npairs) as j:
                            builder.store(builder.add(builder.load(total), tap(x_v, t_v, i.index, j.index)), total)
                    acc = builder.load(total)
                finish(acc, px.index, lane0)

    def by_shape(shapes):
        if not shapes:
            pixels(None)
            return
        rows, pairs = shapes[0]
        known = builder.and_(builder.icmp_signed("==", nrows, ar.cst(rows)),
                             builder.icmp_signed("==", npairs, ar.cst(pairs)))
        with builder.if_else(known) as (then, otherwise):
            with then:
                pixels(shapes[0])
            with otherwise:
                by_shape(shapes[1:])
    by_shape(UNROLLED)


def _load(builder, ptr, off, ty=_V16):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=4)


def _store(builder, value, ptr, off):
    builder.store(value, builder.bitcast(builder.gep(ptr, [off]), value.type.as_pointer()), align=1)


@intrinsic
def pair_sums(typingctx, x2, xpix, xrow, xpair, taps, trow, tpair, nrows, npairs, nvec, npix, corr, acc, aoff,
              apix):
    """For pixel p < npix and channel vector v < nvec (16 lanes):
    acc[aoff + p*apix + 16v + l] = corr[16v + l] + the sum over i < nrows, j < npairs of
    madd(x2[p*xpix + i*xrow + j*xpair + 16v + l], taps[i*trow + j*tpair + 16v + l]);
    x2, taps, corr and acc int32, each sum in one register over all the taps."""
    sig = types.void(x2, xpix, xrow, xpair, taps, trow, tpair, nrows, npairs, nvec, npix, corr, acc, aoff, apix)

    def codegen(context, builder, sig, args):
        ar = IntrinsicArgs(context, builder, sig, args)
        ap, apix_ = ar.ptr(12, 13), ar.int(14)
        _emit_sums(builder, ar, lambda total, px, lane0: _store(builder, total, ap,
                                                                  builder.add(builder.mul(px, apix_), lane0)))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def pair_outputs(typingctx, x2, xpix, xrow, xpair, taps, trow, tpair, nrows, npairs, nvec, npix, corr, cs, bias,
                 lo, hi, silu, inv, ozp, out, ooff, opix):
    """pair_sums finished in registers, straight into out (float32, or uint8 codes) at
    out[ooff + p*opix + 16v + l]: y = float32(sum) * cs + bias (cs: scale * ws, float32),
    clamped to [lo, hi] (no activation: -inf, inf; relu: 0, inf; a clamp: its bounds), then
    if silu (a bool) y / (1 + exp(-y)), then for uint8 clip(rint(y * inv) + ozp, 0, 255):
    depthwise_u8's epilogue, operation for operation (simd's _py_max, _py_min, _silu_staged
    and _requantize: the staged epilogue's compares, polynomial and rounding; max(y, -inf)
    and min(y, inf) are y, NaN too)."""
    if not (isinstance(out, types.Array) and out.dtype in (types.uint8, types.float32)):
        return None
    sig = types.void(x2, xpix, xrow, xpair, taps, trow, tpair, nrows, npairs, nvec, npix, corr, cs, bias,
                     types.float32, types.float32, types.boolean, types.float32, types.float32, out, ooff, opix)
    codes = out.dtype == types.uint8

    def codegen(context, builder, sig, args):
        ar = IntrinsicArgs(context, builder, sig, args)
        cs_p, b_p, o_p, opix_ = ar.ptr(12), ar.ptr(13), ar.ptr(19, 20), ar.int(21)
        fvec = ir.VectorType(ir.FloatType(), LANES)
        lo_v, hi_v, inv, ozp = (splat(builder, args[k], LANES) for k in (14, 15, 17, 18))

        def finish(total, px, lane0, silu):
            y = builder.fadd(builder.fmul(builder.sitofp(total, fvec), _load(builder, cs_p, lane0, fvec)),
                             _load(builder, b_p, lane0, fvec))
            y = _py_min(builder, _py_max(builder, y, lo_v), hi_v)
            if silu:
                y = _silu_staged(builder, y)
            off = builder.add(builder.mul(px, opix_), lane0)
            _store(builder, _requantize(builder, y, inv, ozp) if codes else y, o_p, off)
        with builder.if_else(args[16]) as (with_silu, clamped):     # one loop nest each
            with with_silu:
                _emit_sums(builder, ar, lambda total, px, lane0: finish(total, px, lane0, True))
            with clamped:
                _emit_sums(builder, ar, lambda total, px, lane0: finish(total, px, lane0, False))
        return context.get_dummy_value()
    return sig, codegen


def pack_taps(q):
    """Taps q (C, kh, kw) int8 -> (pairs, tap_sums): pairs (kh, ceil(kw / 2), C) int32, lane
    (i, j, c) the int16 pair (q[c, i, 2j], q[c, i, 2j + 1] or 0), low half first; tap_sums (C,)
    int32, each channel's sum of taps."""
    c, kh, kw = q.shape
    npairs = (kw + 1) // 2
    t = np.zeros((kh, 2 * npairs, c), np.int16)
    t[:, :kw] = q.transpose(1, 2, 0)
    pairs = np.ascontiguousarray(np.stack([t[:, 0::2], t[:, 1::2]], axis=-1))    # (kh, npairs, C, lo/hi)
    return pairs.view(np.int32).reshape(kh, npairs, c), q.reshape(c, -1).sum(1, dtype=np.int32)


@njit(inline="always")
def _pair_row(src, row_off, w, c, pl, dw, zp, inside, wp, dst, d_off):
    """dst[d_off + q*c + l] = code (column q - pl) | code (column q - pl + dw) << 16 of the
    image row at src[row_off] (C channels), the zero point where a column is outside the
    image or the whole row is (inside False), for q < wp. Indices are unsigned: Numba's
    wraparound of negative ones would keep the loops scalar (6 us a 114 x 32 row, 0.4 us so)."""
    z = np.int32(zp)
    for q in range(wp):
        x0 = q - pl
        x1 = x0 + dw
        d = np.uint64(d_off + q * c)
        in0, in1 = inside and 0 <= x0 < w, inside and 0 <= x1 < w
        if in0 and in1:
            a0, a1 = np.uint64(row_off + x0 * c), np.uint64(row_off + x1 * c)
            for l in range(c):
                ul = np.uint64(l)
                dst[d + ul] = np.int32(src[a0 + ul]) | (np.int32(src[a1 + ul]) << 16)
        else:
            for l in range(c):
                ul = np.uint64(l)
                lo = np.int32(src[np.uint64(row_off + x0 * c) + ul]) if in0 else z
                hi = np.int32(src[np.uint64(row_off + x1 * c) + ul]) if in1 else z
                dst[d + ul] = lo | (hi << 16)


@njit(cache=CACHE, parallel=True)
def depthwise_u8(xq, zps, scales, pairs, tap_sums, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, ws, bias, ep, out,
                 codes):
    """Depthwise conv of uint8 NHWC images xq (N, H, W, C), image n with zero point zps[n]
    and scale scales[n], taps (pairs, tap_sums) from pack_taps with channel scales ws:
    act(sum over taps of (x - zp) * tap * scale * ws + bias) for output rows (N*OH*OW, C),
    into float32 `out`, or into uint8 `codes` requantized as ep says when codes has rows
    (out then has none). Padding pt rows above and pl columns left; oh, ow give the rest.
    Jobs of up to BAND_ROWS output rows, spread over the threads."""
    n, h, w, c = xq.shape
    to_codes = codes.shape[0] > 0
    src, tf, of = xq.reshape(-1), pairs.reshape(-1), out.reshape(-1)
    act = np.int32(ep[EP_ACT])
    inv, ozp = requant_params(ep)
    npairs = (kw + 1) // 2
    wp = (ow - 1) * sw + 2 * (npairs - 1) * dw + 1        # pair-row columns the outputs read
    nvec = c // LANES
    band = max(1, min(BAND_ROWS, (n * oh) // BAND_JOBS))   # output rows a job, sharing their input rows
    nbands = (oh + band - 1) // band
    span = (band - 1) * sh + (kh - 1) * dh + 1             # input rows a band reads
    for job in prange(n * nbands):
        i, b = job // nbands, job % nbands
        oy0, oy1 = b * band, min(oh, (b + 1) * band)
        x2 = np.empty(span * wp * c, np.int32)
        acc = np.empty(ow * c, np.int32)
        y = np.empty((1, ow * c), np.float32)
        corr = np.empty(c, np.int32)
        cs = np.empty(c, np.float32)
        zp = np.int32(zps[i])
        for l in range(c):
            corr[l] = -zp * tap_sums[l]
            cs[l] = scales[i] * ws[l]
        top = oy0 * sh - pt
        for r in range((oy1 - oy0 - 1) * sh + (kh - 1) * dh + 1):
            yy = top + r
            _pair_row(src, (i * h + min(max(yy, 0), h - 1)) * w * c, w, c, pl, dw, zp, 0 <= yy < h, wp,
                      x2, r * wp * c)
        for oy in range(oy0, oy1):
            _output_row(x2, (oy - oy0) * sh * wp * c, tf, corr, kh, kw, sw, dh, dw, wp, c, nvec, npairs, ow,
                        acc, y, cs, bias, ep, act, inv, ozp, to_codes, codes, of, ((i * oh) + oy) * ow * c)


@njit(inline="always")
def _output_row(x2, x_off, tf, corr, kh, kw, sw, dh, dw, wp, c, nvec, npairs, ow, acc, y, cs, bias, ep, act,
                inv, ozp, to_codes, codes, of, r0):
    """One output row of depthwise_u8 from the pair rows in x2 from x_off (its first tap row),
    written at r0: finished in registers (pair_outputs) where the channels are whole vectors
    and the activation is none, relu, a clamp or SiLU; else the sums staged in acc, then y."""
    silu = act == _SILU
    if (act <= 2 or silu) and nvec * LANES == c:
        lo = -_INF if act == 0 or silu else (_F0 if act == 1 else ep[EP_P0])
        hi = _INF if act < 2 or silu else ep[EP_P1]
        if to_codes:
            pair_outputs(x2[x_off:], sw * c, dh * wp * c, 2 * dw * c, tf, npairs * c, c, kh, npairs, nvec, ow, corr,
                         cs, bias, lo, hi, silu, inv, ozp, codes, r0, c)
        else:
            pair_outputs(x2[x_off:], sw * c, dh * wp * c, 2 * dw * c, tf, npairs * c, c, kh, npairs, nvec, ow, corr,
                         cs, bias, lo, hi, silu, inv, ozp, of, r0, c)
        return
    pair_sums(x2[x_off:], sw * c, dh * wp * c, 2 * dw * c, tf, npairs * c, c, kh, npairs, nvec, ow, corr, acc, 0, c)
    for ox in range(ow):           # channels past the last whole vector
        for l in range(nvec * LANES, c):
            s = corr[l]
            for r in range(kh):
                for j in range(npairs):
                    xv = x2[x_off + (r * dh * wp + ox * sw + 2 * j * dw) * c + l]
                    tv = tf[(r * npairs + j) * c + l]
                    s += (xv & 0xFFFF) * np.int32(np.int16(tv & 0xFFFF)) + (xv >> 16) * (tv >> 16)
            acc[ox * c + l] = s
    for ox in range(ow):
        a = np.uint64(ox * c)
        for l in range(c):
            ul = np.uint64(l)
            y[0, a + ul] = np.float32(acc[a + ul]) * cs[ul] + bias[l]
    if act != 0:
        apply_activation(y, 0, 0, ow * c, act, ep[EP_P0], ep[EP_P1])
    if to_codes:
        requantize_rows(y.reshape(ow, c), ow, r0 // c, 0, c, ep, codes)
    else:
        for k in range(ow * c):
            of[np.uint64(r0 + k)] = y[0, np.uint64(k)]
