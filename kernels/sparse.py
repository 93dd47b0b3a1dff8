"""Sparse int8 linear: uint8 activations x sparse int8 weights, exactly the dense GEMM's result.

    >>> ps = pack_sparse_s8(q, scales)        # q: int8 (N, K), mostly zeros
    >>> y = linear_sparse_f32(x, ps, bias, act="relu")   # == linear_f32(x, pack_weights_s8(q, scales), ...)

Why this format ("shuffle slots"): on Zen 3 (AVX2) a scalar CSR loop runs at ~1 nonzero a
cycle (three loads and an imul each) and vpgatherdd at ~30 cycles a gather, so at 90 %
sparsity neither is 2x the dense kernel. Here the gather is a byte shuffle: a step reads a
window of 32 k of an activation row, its two halves each broadcast to both 128-bit lanes,
and looks them up with two ``vpshufb`` of 32 byte indices at once (an index's bit 7 picks
the half: vpshufb gives 0 where it is set, so one table answers and the other gives 0).

Layout, per slice of 8 output rows (slice s = rows 8s..8s+7): a list of steps,
``slice_ptr[s]..slice_ptr[s+1]``. Step j reads the window from k = ``starts[j]`` and holds
32 byte slots, ``idx[32j + 4r + b]`` (k - starts[j], as k % 16 plus 0x80 for the window's
second 16) and ``val[32j + 4r + b]`` (the int8 weight, 0 for an empty slot), 4 slots for
row r of the slice. A window starts wherever the slice's rows have their next nonzero
(sparse_pack._pack), not on a grid of chunks: at 90 % random sparsity 1024 x 1024 that is
5255 steps where chunks of 32 took 7668.

The wide layout (sparse_pack.WideSteps), on CPUs with AVX512-VBMI and VNNI (amx_int8 and
avx512_vnni there): slices of 16 rows, 4 slots a row, windows of 64 k. A step is one
``vpermb`` (the 64 slot indexes looked up in the 64 activation bytes from the step's start)
and one 512-bit ``vpdpbusd`` a row. 1024 x 1024 at 90 %: 2183 steps of 64 slots (288 KB,
74 % of the slots filled) where the 8-row layout takes 5255 of 32 (358 KB, 62 %); at M=1 the
loop then streams its steps from L2 at about 1 ns a step (idx and val aligned on cache
lines). PackedSparse keeps both layouts; artifacts hold only the 8-row one, and loading
rebuilds the wide one.

On CPUs with VNNI and no VBMI (avx512_vnni on Cascade Lake, avx_vnni) a step of the 8-row
layout is one ``vpdpbusd`` a row: the gathered uint8 activations times the int8 slots, four
into each row's int32 lane, exact as they are. vpdpbusd waits ~5 cycles on its
accumulator, so both VNNI loops keep CHAINS of them (rows x sets of accumulators taken in
turn): one chain ran an 8-row step in 1.2 ns, four in 0.75 ns.

On AVX2, exactness whatever the weights: ``vpmaddubsw`` multiplies unsigned by signed bytes
and adds pairs in saturating int16, so uint8 activations (<= 255) times int8 weights (|w| <= 127)
could saturate. The unsigned operand is |w| instead, and the signed one the activation
shifted, a - 128 (the rows are stored xor 0x80), for w > 0, or its complement
~(a - 128) = 127 - a for w < 0 (an xor with the weight's sign): every pair is then at most
2 * 127 * 128 < 2^15, any two weights can share a pair, and each slot adds
w * (a - 128) + min(w, 0). A row's lane starts from PackedSparse.offsets
= 128 * sum(w) - sum(min(w, 0)), so it ends at sum(w * a). (Before, the packer kept
|w_a| + |w_b| <= 128 per pair, and magnitude-pruned layers, whose weights are all large,
took a pair per weight: 12765 steps for the figure's layer, now 5270.) ``vpmaddwd`` by ones
adds the pairs into row r's int32 lane. The int32 sums are the dense kernel's, bit for bit,
and so is everything after them: the same activation quantization (quantize.py) and the
same epilogue code (epilogue.py / simd.staged_f32, routed column by column as
gemm._job_into routes them).

Cost: 8-row steps of 68 bytes (1024 x 1024 at 90 %: 358 KB against 1 MB dense, for 104 K
nonzeros), 9 instructions each at M=1 with VNNI, 15 on AVX2 (the sign and |w| once a step
for all rows); wide steps of 132 bytes, 4 instructions and 4 loads each.
Jobs are 64-column blocks (8 slices) x row groups of 4, each group size its own compiled
variant; over Numba's pool (prange), each worker its own share of blocks first, then
helping the others. The portable path runs the same layout with plain loops on the
unshifted rows.
"""
import llvmlite.ir as ir
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from . import amx, dispatch as _dispatch
from .dispatch import KernelError
from .epilogue import EP_ACT, EP_P0, EP_P1, EP_RES_FIRST, add_residual_rows, apply_activation, in_registers
from .gemm import _COUNTER_STRIDE, _count_add, _is_float32, _staged, _starts
from .linear import _bias, bound_constants, call_arrays, compiled_entry, epilogue_params, get_num_threads, on_rows
from .quantize import quantize_rows_range, quantize_tensor_into
from .pack import aligned_empty
from .rowops import IntrinsicArgs, borrowed, call_llvm, pointer
from .simd import AMX_ISAS, BLOCK_COLS, GEOMETRY, TAGS, IsaType, is_portable, isa_geometry, staged_f32, tag_flag
from .sparse_pack import (HIGH, SLICE, SLOTS, STEP, WIDE_HOST, WIDE_SLICE, WIDE_STEP, WIDE_WINDOW,  # noqa: F401
                          PackedSparse, density, pack_sparse_s8, unpack_sparse_s8)

KERNEL_VERSION = "sparse-9"
ROWS = 4            # activation rows a job computes at once (they share the weight loads)
VNNI_ISAS = ("amx_int8", "avx512_vnni", "avx_vnni")     # step loops on vpdpbusd (ymm)
CHAINS = 4          # vpdpbusd accumulators a step loop keeps going (rows x sets)
# the ISAs whose kernels run the wide layout (sparse_pack.WideSteps) on a CPU with AVX512-VBMI
WIDE_ISAS = ("amx_int8", "avx512_vnni") if WIDE_HOST else ()

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


# --- the step loop -------------------------------------------------------------------

def _step_args(context, builder, sig, args, nrows):
    """(args without the tag, the nrows activation row pointers from row m0, the starts,
    idx and val pointers) of a step loop (tag, mr, a, m0, starts, idx, val, ...)."""
    ar = IntrinsicArgs(context, builder, types.void(*sig.args[1:]), args[1:])
    a = ar.array(1)
    lda = builder.extract_value(a.strides, 0)
    rows = [builder.gep(a.data, [builder.mul(builder.add(ar.int(2), ar.cst(r)), lda)]) for r in range(nrows)]
    return ar, rows, (ar.array(3).data, ar.array(4).data, ar.array(5).data)


def _chains(builder, cst, j0, j1, step, accs):
    """step(j, accs[u]) for j = j0..j1-1, the accumulator sets taken in turn (u = (j - j0) % sets)."""
    sets, count = len(accs), builder.sub(j1, j0)
    rounds = builder.udiv(count, cst(sets))
    with cgutils.for_range(builder, rounds) as loop:
        j = builder.add(j0, builder.mul(loop.index, cst(sets)))
        for u in range(sets):
            step(builder.add(j, cst(u)), accs[u])
    with cgutils.for_range(builder, builder.sub(count, builder.mul(rounds, cst(sets)))) as loop:
        step(builder.add(j0, builder.add(builder.mul(rounds, cst(sets)), loop.index)), accs[0])


def _store_sums(builder, cst, accs, t, t_off, ldt):
    """Row r's sets summed into t[t_off + r * ldt ...] (int32 lanes, unaligned)."""
    for r in range(len(accs[0])):
        total = builder.load(accs[0][r])
        for acc in accs[1:]:
            total = builder.add(total, builder.load(acc[r]))
        p = builder.gep(t, [builder.add(t_off, builder.mul(ldt, cst(r)))])
        builder.store(total, builder.bitcast(p, total.type.as_pointer()), align=4)


# whether the tag's step loop reads the activation rows as a ^ 0x80 (AVX2's vpmaddubsw
# path) rather than as they are (vpdpbusd and the portable loops)
shifted_rows = tag_flag(lambda isa: isa not in VNNI_ISAS and isa != "portable")


@intrinsic(prefer_literal=True)
def steps_s32(typingctx, tag, mr, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off, ldt):
    """t[t_off + r*ldt + lane] = int32 sums of steps j0..j1-1 (one slice) for activation
    rows m0..m0+mr-1 of a (rows padded by a window), lane = row of the slice. VNNI ISAs:
    a as it is, each lane from 0, one vpdpbusd a step and row. AVX2: a ^ 0x80 as int8, each
    lane from offsets[o_off + lane] (the module docstring: why)."""
    if not isinstance(tag, IsaType) or not isinstance(mr, types.IntegerLiteral) or not isinstance(a, types.Array):
        return None
    sig = types.void(tag, mr, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off, ldt)
    nrows = mr.literal_value
    vnni = tag.isa in VNNI_ISAS

    def codegen(context, builder, sig, args):
        ar, rows, (st_p, ix_p, va_p) = _step_args(context, builder, sig, args, nrows)
        arr, num, cst, intp = ar.array, ar.int, ar.cst, ar.intp
        v32, v16, acc_ty = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16), ir.VectorType(_i32, 8)
        ones = ir.Constant(v16, [1] * 16)
        flip = ir.Constant(v32, [HIGH - 256] * 32)
        zero = ir.Constant(v32, None)
        if vnni:
            start = ir.Constant(acc_ty, None)
        else:
            start = builder.load(builder.bitcast(builder.gep(arr(8).data, [num(9)]), acc_ty.as_pointer()), align=4)
        # vpdpbusd waits ~5 cycles on its accumulator: CHAINS independent ones a step
        # round (each row its own, and sets of them taken by turns) keep the ports busy
        sets = max(1, CHAINS // nrows) if vnni else 1
        accs = [[cgutils.alloca_once_value(builder, start if u == 0 else ir.Constant(acc_ty, None))
                 for _ in range(nrows)] for u in range(sets)]
        bcast = ir.Constant(ir.VectorType(_i32, 32), list(range(16)) * 2)

        def step(j, acc):
            k0 = builder.sext(builder.load(builder.gep(st_p, [j])), intp)
            o = builder.mul(j, cst(STEP))
            iv = builder.load(builder.bitcast(builder.gep(ix_p, [o]), v32.as_pointer()), align=1)
            vv = builder.load(builder.bitcast(builder.gep(va_p, [o]), v32.as_pointer()), align=1)
            iv_high = builder.xor(iv, flip)
            if not vnni:
                # |w| (unsigned, <= 127) times a - 128 (w > 0) or ~(a - 128) = 127 - a (w < 0):
                # a pair's int16 sum is at most 2 * 127 * 128 < 2^15, whatever the weights
                neg = builder.sext(builder.icmp_signed("<", vv, zero), v32)
                wabs = builder.select(builder.icmp_signed("<", vv, zero), builder.sub(zero, vv), vv)
            for r in range(nrows):
                halves = []
                for h, ix in ((0, iv), (16, iv_high)):
                    p = builder.gep(rows[r], [builder.add(k0, cst(h))])
                    xs = builder.load(builder.bitcast(p, ir.VectorType(_i8, 16).as_pointer()), align=1)
                    xb = builder.shuffle_vector(xs, xs, bcast)
                    halves.append(call_llvm(builder, "llvm.x86.avx2.pshuf.b", v32, [xb, ix]))
                g = builder.or_(halves[0], halves[1])
                if vnni:    # uint8 a times int8 w, four slots into the row's int32 lane: exact
                    s32 = call_llvm(builder, "llvm.x86.avx512.vpdpbusd.256", acc_ty, [builder.load(acc[r]), g, vv])
                    builder.store(s32, acc[r])
                    continue
                p16 = call_llvm(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [wabs, builder.xor(g, neg)])
                p32 = call_llvm(builder, "llvm.x86.avx2.pmadd.wd", acc_ty, [p16, ones])
                builder.store(builder.add(builder.load(acc[r]), p32), acc[r])

        _chains(builder, cst, num(6), num(7), step, accs)
        _store_sums(builder, cst, accs, arr(10).data, num(11), num(12))
        return context.get_dummy_value()
    return sig, codegen


# whether the tag's kernels run the wide layout (where the packer made one)
wide_isa = tag_flag(lambda isa: isa in WIDE_ISAS)


@intrinsic(prefer_literal=True)
def steps_wide(typingctx, tag, mr, a, m0, starts, idx, val, j0, j1, t, t_off, ldt):
    """steps_s32 for the wide layout (sparse_pack.WideSteps): a step's 64 slots are 16 rows
    of 4; a vpermb looks them up in the 64 bytes of an activation row from the step's start,
    and one 512-bit vpdpbusd adds them into the 16 rows' int32 lanes. Compiles to nothing
    for a tag without the wide layout (its callers never get there)."""
    if not isinstance(tag, IsaType) or not isinstance(mr, types.IntegerLiteral) or not isinstance(a, types.Array):
        return None
    sig = types.void(tag, mr, a, m0, starts, idx, val, j0, j1, t, t_off, ldt)
    nrows = mr.literal_value
    emit = tag.isa in WIDE_ISAS

    def codegen(context, builder, sig, args):
        if not emit:
            return context.get_dummy_value()
        ar, rows, (st_p, ix_p, va_p) = _step_args(context, builder, sig, args, nrows)
        arr, num, cst, intp = ar.array, ar.int, ar.cst, ar.intp
        v64, acc_ty = ir.VectorType(_i8, 64), ir.VectorType(_i32, 16)
        sets = max(1, CHAINS // nrows)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(acc_ty, None)) for _ in range(nrows)]
                for _ in range(sets)]

        def step(j, acc):
            k0 = builder.sext(builder.load(builder.gep(st_p, [j])), intp)
            o = builder.mul(j, cst(WIDE_STEP))
            iv = builder.load(builder.bitcast(builder.gep(ix_p, [o]), v64.as_pointer()), align=1)
            vv = builder.load(builder.bitcast(builder.gep(va_p, [o]), v64.as_pointer()), align=1)
            for r in range(nrows):
                xw = builder.load(builder.bitcast(builder.gep(rows[r], [k0]), v64.as_pointer()), align=1)
                g = call_llvm(builder, "llvm.x86.avx512.permvar.qi.512", v64, [xw, iv])
                builder.store(call_llvm(builder, "llvm.x86.avx512.vpdpbusd.512", acc_ty, [builder.load(acc[r]), g, vv]),
                              acc[r])

        _chains(builder, cst, num(6), num(7), step, accs)
        _store_sums(builder, cst, accs, arr(8).data, num(9), num(10))
        return context.get_dummy_value()
    return sig, codegen


@njit
def _steps_portable(mr, a, m0, starts, idx, val, j0, j1, t, t_off, ldt):
    """steps_s32 in plain loops (any CPU), on the plain uint8 rows: the exact sums directly."""
    for r in range(mr):
        for lane in range(SLICE):
            t[t_off + r * ldt + lane] = 0
    for j in range(j0, j1):
        k0 = np.int64(starts[j])
        for r in range(mr):
            for lane in range(SLICE):
                s = np.int32(0)
                for b in range(SLOTS):
                    o = j * STEP + lane * SLOTS + b
                    kk = (idx[o] & 15) + 16 * (idx[o] >> 7)
                    s += np.int32(a[m0 + r, k0 + kk]) * np.int32(val[o])
                t[t_off + r * ldt + lane] += s


@njit(inline="always")
def _slice(tag, mr, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off):
    if is_portable(tag):
        _steps_portable(mr, a, m0, starts, idx, val, j0, j1, t, t_off, BLOCK_COLS)
    elif mr == 4:
        steps_s32(tag, 4, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off, BLOCK_COLS)
    elif mr == 3:
        steps_s32(tag, 3, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off, BLOCK_COLS)
    elif mr == 2:
        steps_s32(tag, 2, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off, BLOCK_COLS)
    else:
        steps_s32(tag, 1, a, m0, starts, idx, val, j0, j1, offsets, o_off, t, t_off, BLOCK_COLS)


@njit(inline="always")
def _slice_wide(tag, mr, a, m0, starts, idx, val, j0, j1, t, t_off):
    if mr == 4:
        steps_wide(tag, 4, a, m0, starts, idx, val, j0, j1, t, t_off, BLOCK_COLS)
    elif mr == 3:
        steps_wide(tag, 3, a, m0, starts, idx, val, j0, j1, t, t_off, BLOCK_COLS)
    elif mr == 2:
        steps_wide(tag, 2, a, m0, starts, idx, val, j0, j1, t, t_off, BLOCK_COLS)
    else:
        steps_wide(tag, 1, a, m0, starts, idx, val, j0, j1, t, t_off, BLOCK_COLS)


@njit(inline="always")
def _staged_regs(tag, mr, t, t_off, colsum, wscale, bias, n0, ascale, azp, m0, out, act, p0, p1, res, ep):
    # staged_f32 needs mr as a literal
    if mr == 4:
        staged_f32(tag, 4, t, t_off, BLOCK_COLS, colsum, wscale, bias, n0, ascale, azp, m0, out, act, p0, p1,
                   res, ep)
    elif mr == 3:
        staged_f32(tag, 3, t, t_off, BLOCK_COLS, colsum, wscale, bias, n0, ascale, azp, m0, out, act, p0, p1,
                   res, ep)
    elif mr == 2:
        staged_f32(tag, 2, t, t_off, BLOCK_COLS, colsum, wscale, bias, n0, ascale, azp, m0, out, act, p0, p1,
                   res, ep)
    else:
        staged_f32(tag, 1, t, t_off, BLOCK_COLS, colsum, wscale, bias, n0, ascale, azp, m0, out, act, p0, p1,
                   res, ep)


@njit(inline="always")
def _epilogue(tag, mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y, amx_m):
    """The int32 tile t (mr rows of 64) into out's rows m0.. and columns n0..n0+ncols, each
    column by the code the dense kernel (gemm._job_into) gives it: its whole ISA tiles in
    registers (the staged form of tile_f32), the rest and the portable path staged; rows
    the dense kernel runs in AMX blocks (below amx_m, _dense_amx_rows) staged where its
    AMX epilogue stages them (a column block under 64 wide, a block's last rows under 4).
    One case differs from the dense kernel by at most an ulp (a fused multiply-add against
    a multiply and an add), on AVX-512 machines only: a block's 32-column half tile
    (simd.HALF_COLS), staged here."""
    fast = bias.shape[0] > 0 and not is_portable(tag) and _is_float32(out)
    tc = isa_geometry(tag)[1]
    width = ncols - ncols % tc if fast else 0
    if m0 < amx_m and (ncols < BLOCK_COLS or m0 >= amx_m - amx_m % ROWS):
        width = 0
    act = np.int32(ep[EP_ACT])
    in_regs = in_registers(act)
    first = ep[EP_RES_FIRST] != 0
    for cs in range(0, width, tc):
        _staged_regs(tag, mr, t, cs, colsum, wscale, bias, n0 + cs, ascale, azp, m0, out,
                     act if in_regs else 0, ep[EP_P0], ep[EP_P1], res if in_regs or first else res[:0], ep)
    if width > 0 and not in_regs:   # as gemm._stored_tile
        for r in range(mr):
            apply_activation(out, m0 + r, n0, width, act, ep[EP_P0], ep[EP_P1])
        if res.shape[0] > 0 and not first:
            add_residual_rows(out, res, m0, mr, n0, width, 0, ep)
    if width < ncols:
        # the tail's int32 columns moved to the tile's start, where _staged reads them
        for r in range(mr):
            for c in range(ncols - width):
                t[r * BLOCK_COLS + c] = t[r * BLOCK_COLS + width + c]
        _staged(mr, m0, n0 + width, ncols - width, colsum, ascale, azp, wscale, bias, res, ep, out, t, y)


@njit(inline="always")
def _rows(tag, mr, m0, nb, n0, ncols, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale, bias,
          res, ep, out, t, y, amx_m):
    """Rows m0..m0+mr-1 (mr a literal: no branch on it left, which at M=1 saved 4.5 us a
    1024-column call) of column block nb (output columns n0..n0+ncols-1): its slices in
    the layout (ptr, starts, idx, val) given, the wide one where wide is set (the tag runs it)."""
    if wide_isa(tag) and wide:
        s0 = nb * (BLOCK_COLS // WIDE_SLICE)
        for s in range(s0, min(ptr.shape[0] - 1, s0 + BLOCK_COLS // WIDE_SLICE)):
            _slice_wide(tag, mr, a, m0, starts, idx, val, ptr[s], ptr[s + 1], t, (s - s0) * WIDE_SLICE)
    else:
        s0 = nb * (BLOCK_COLS // SLICE)
        for s in range(s0, min(ptr.shape[0] - 1, s0 + BLOCK_COLS // SLICE)):
            _slice(tag, mr, a, m0, starts, idx, val, ptr[s], ptr[s + 1], offsets, s * SLICE, t, (s - s0) * SLICE)
    _epilogue(tag, mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y, amx_m)


@njit(inline="always")
def _block(tag, nb, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale, bias, res, ep, out, t, y,
           amx_m):
    """Output columns of block nb (8 slices, or 4 wide ones) for every row of a, ROWS rows at a time."""
    m, n = a.shape[0], out.shape[1]
    n0 = nb * BLOCK_COLS
    ncols = min(BLOCK_COLS, n - n0)
    for m0 in range(0, m - ROWS + 1, ROWS):
        _rows(tag, 4, m0, nb, n0, ncols, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale,
              bias, res, ep, out, t, y, amx_m)
    m0 = m - m % ROWS
    if m % ROWS == 3:
        _rows(tag, 3, m0, nb, n0, ncols, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale,
              bias, res, ep, out, t, y, amx_m)
    elif m % ROWS == 2:
        _rows(tag, 2, m0, nb, n0, ncols, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale,
              bias, res, ep, out, t, y, amx_m)
    elif m % ROWS == 1:
        _rows(tag, 1, m0, nb, n0, ncols, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale,
              bias, res, ep, out, t, y, amx_m)


@njit
def _quantized(tag, x, aq, a_scale, a_zp):
    """(rows, scales, zero points, bad): the activation rows as the kernel reads them, uint8,
    each padded by a wide window (a step's window may reach past K, onto zero weights),
    their per-row scales, and 0, or NaN where a value of x is NaN or +-inf. From float x per
    row (a_scale 0) or with the static (a_scale, a_zp), as the dense kernel does; uint8 aq
    as given. The AVX2 step loop reads a ^ 0x80 = a - 128 as int8 (steps_s32: why), flipped
    here once per call (shifted_rows).
    Not inlined: in the parallel entry, Numba made each of its np.zeros/np.full a parallel
    loop of its own (three more launches: the threaded call at M=1 took 38 us on one
    thread against 24 serial)."""
    m = x.shape[0] if x.shape[1] > 0 else aq.shape[0]
    k = x.shape[1] if x.shape[1] > 0 else aq.shape[1]
    buf = np.empty(_scratch_bytes(m, k, False), np.uint8)       # one allocation for the three
    a, ascale, azp = _rows_in(buf, m, k)
    return a, ascale, azp, _quantize_into(tag, x, aq, a_scale, a_zp, a, ascale, azp)


# quantize.quantize_rows_range inlined: its call counted its arrays in and out, as _worker's (_worker_inline)
_quantize_rows = njit(inline="always")(quantize_rows_range.py_func)


@njit(inline="always")
def _padded(k):
    return (k + WIDE_WINDOW + 15) // 16 * 16


@njit(inline="always")
def _scratch_bytes(m, k, tiles):
    """Bytes of _rows_in's arrays for m rows of k, and with tiles of _tiles_in's after them."""
    return m * _padded(k) + 8 * m + (ROWS * BLOCK_COLS * 8 + 64 if tiles else 0)


@njit(inline="always")
def _at(buf, start, shape, dtype):
    """The bytes of uint8 buf from `start` as a C array of `shape` and dtype, without an
    owner: for a buf the caller holds until the view's last use (an argument of the
    function, not a local). buf[...].view(dtype) is a call of Numba's (_change_dtype: two
    integer divisions and a reference count in and out) and a reshape another: the lean
    entry made 14 of them a call, a sixth of its time on a 16 x 64 layer (perf, AMD EPYC)."""
    return carray(pointer(np.int64(buf.ctypes.data) + np.int64(start), dtype), shape)


@njit(inline="always")
def _rows_in(buf, m, k, owned=True):
    """The quantized rows (m, padded k), their scales and zero points, as views of buf
    (owned False: _at's views, for a buf the caller holds)."""
    kp = _padded(k)
    if not owned:
        return (_at(buf, 0, (m, kp), np.uint8), _at(buf, m * kp, m, np.float32),
                _at(buf, m * kp + 4 * m, m, np.int32))
    return (buf[:m * kp].reshape((m, kp)), buf[m * kp:m * kp + 4 * m].view(np.float32),
            buf[m * kp + 4 * m:m * kp + 8 * m].view(np.int32))


@njit(inline="always")
def _tiles_in(buf, m, k, owned=True):
    """A worker's int32 tile t, float tile y and its block counter (at 0), after _rows_in's
    arrays in buf (owned as there)."""
    o = m * _padded(k) + 8 * m
    if owned:
        t = buf[o:o + ROWS * BLOCK_COLS * 4].view(np.int32)
        y = buf[o + ROWS * BLOCK_COLS * 4:o + ROWS * BLOCK_COLS * 8].view(np.float32).reshape((ROWS, BLOCK_COLS))
        nxt = buf[o + ROWS * BLOCK_COLS * 8:o + ROWS * BLOCK_COLS * 8 + 8].view(np.int64)
    else:
        t = _at(buf, o, ROWS * BLOCK_COLS, np.int32)
        y = _at(buf, o + ROWS * BLOCK_COLS * 4, (ROWS, BLOCK_COLS), np.float32)
        nxt = _at(buf, o + ROWS * BLOCK_COLS * 8, 1, np.int64)
    nxt[0] = 0
    return t, y, nxt


@njit(inline="always")
def _quantize_into(tag, x, aq, a_scale, a_zp, a, ascale, azp):
    """_quantized's work into the given rows, scales and zero points; returns its bad."""
    m, k = a.shape[0], (x.shape[1] if x.shape[1] > 0 else aq.shape[1])
    for i in range(m):
        ascale[i], azp[i] = a_scale, a_zp
        for c in range(k, a.shape[1]):
            a[i, c] = 0
    bad = np.float32(0)
    if x.shape[1] == 0:
        for i in range(m):
            for c in range(k):
                a[i, c] = aq[i, c]
    elif a_scale > 0:
        bad = quantize_tensor_into(x, a_scale, a_zp, a)
    else:
        _quantize_rows(x, a, ascale, azp, 0, m)
        for i in range(m):          # a bad row's scale is NaN
            bad += ascale[i] * np.float32(0)
    if shifted_rows(tag):
        flat = a.reshape(-1)
        for i in range(flat.shape[0]):
            flat[i] ^= np.uint8(HIGH)
    return bad


@njit
def _lean_rows(tag, buf, x, table, out):
    """The lean entry's call, in buf (_scratch_bytes with tiles). Every array here is an
    argument, alive until this returns, so all are taken as borrowed views: with their
    owners the call counted ~35 references with atomic instructions, a third of the time
    of a call on zero weights (perf, AMD EPYC)."""
    x, out = borrowed(x), borrowed(out)
    ptr, starts, offsets, colsum, wscale, bias, ep, wide = _sections(table)
    idx, val, a_scale, a_zp = _steps_of(table)
    m, k = x.shape
    a, ascale, azp = _rows_in(buf, m, k, False)
    t, y, nxt = _tiles_in(buf, m, k, False)
    bad = _quantize_into(tag, x, a[:0, :0], a_scale, a_zp, a, ascale, azp)
    nblocks = (out.shape[1] + BLOCK_COLS - 1) // BLOCK_COLS
    _worker_inline(tag, 0, 1, nxt, nblocks, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp,
                   wscale, bias, x[:0, :0], ep, out, t, y, _dense_amx_rows(tag, m, k))
    return bad


# --- the arrays of a bound layer -------------------------------------------------------
#
# Numba unboxes every array argument on every call, about 45 ns each (AMX Xeon). The
# entries took 20 arguments, 16 of them arrays: a bound call of 1024 x 1024 at 90 % and
# M=1 took 4.5 us, 3.8 us with the small arrays as sections of one uint8 table, made once
# when the layer is bound. The steps' idx and val stay arrays of their own (no copy).

TABLE_SECTIONS = ("ptr", "starts", "offsets", "colsum", "wscale", "bias", "ep")
_NSEC = len(TABLE_SECTIONS)
_HEAD = 24          # int64s before the first section (see kernel_table)
# head slots after each section's first byte and bytes: the wide flag, the steps' idx and
# val (their addresses and length), the static activation scale (float32 bits) and zero point
_WIDE, _IDX, _VAL, _SLOTS, _A_SCALE, _A_ZP = range(2 * _NSEC, 2 * _NSEC + 6)


def kernel_table(ptr, starts, offsets, colsum, wscale, bias, ep, wide, idx=None, val=None, a_scale=0.0, a_zp=0):
    """The table the entries read, on a 64-byte boundary: a head of int64s (each section's
    first byte and bytes, then the slots named above), then each array in TABLE_SECTIONS'
    order at an offset that is a multiple of 64. (ptr, starts): the layout's slices and
    steps (wide: sparse_pack.WideSteps'), offsets: PackedSparse's. idx and val (the steps'
    slots) are not copied: the head holds their addresses, for the lean entry, and the
    caller keeps them alive as long as the table."""
    arrays = [np.ascontiguousarray(arr, dt).reshape(-1) for arr, dt in
              zip((ptr, starts, offsets, colsum, wscale, bias, ep), (np.int32,) * 4 + (np.float32,) * 3)]
    head = np.zeros(_HEAD, np.int64)
    parts, end = [head.view(np.uint8)], _HEAD * 8
    for i, arr in enumerate(arrays):
        head[i], head[_NSEC + i] = end, arr.nbytes
        pad = -arr.nbytes % 64
        parts += [arr.view(np.uint8), np.zeros(pad, np.uint8)]
        end += arr.nbytes + pad
    head[_WIDE] = wide
    if idx is not None:
        head[_IDX], head[_VAL], head[_SLOTS] = idx.ctypes.data, val.ctypes.data, idx.shape[0]
    head[_A_SCALE] = np.array([a_scale, 0], np.float32).view(np.int64)[0]
    head[_A_ZP] = a_zp
    table = aligned_empty((end,), np.uint8)
    table[:] = np.concatenate(parts)
    return table


@njit(inline="always")
def _section(table, h, i, dtype):
    return _at(table, h[i], h[_NSEC + i] // 4, dtype)       # every section's values are 4 bytes


@njit(inline="always")
def _sections(table):
    """The arrays kernel_table put in table (_at's views: the caller holds the table for
    the whole call), in TABLE_SECTIONS' order, and its wide flag."""
    h = _at(table, 0, _HEAD, np.int64)
    return (_section(table, h, 0, np.int32), _section(table, h, 1, np.int32),
            _section(table, h, 2, np.int32), _section(table, h, 3, np.int32),
            _section(table, h, 4, np.float32), _section(table, h, 5, np.float32),
            _section(table, h, 6, np.float32), h[_WIDE] != 0)


@njit(inline="always")
def _steps_of(table):
    """(idx, val, static activation scale, zero point) of kernel_table's head: the steps'
    slots as views of the arrays at the addresses it holds."""
    h = _at(table, 0, _HEAD, np.int64)
    return (carray(pointer(h[_IDX], np.uint8), h[_SLOTS]), carray(pointer(h[_VAL], np.int8), h[_SLOTS]),
            _at(table, _A_SCALE * 8, 1, np.float32)[0], np.int32(h[_A_ZP]))


@njit
def _worker(tag, w, threads, nxt, nblocks, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale, bias,
            res, ep, out, t, y, amx_m):
    """Worker w's share of the column blocks (the same blocks call after call, so their
    weights stay in its core's L2), then what is left of the others' (taken from the same
    atomic counters, as gemm._worker does): a worker the OS delays holds up nobody.
    t, y: the worker's own scratch. Not inlined, as gemm._worker: the caller holds every
    argument until it returns, which the borrowed views need (an inlined borrower's local
    owner is freed before the loops: Numba drops a variable after its last use)."""
    # borrowed views: no reference counting in the loop. With the owners, the calls in the
    # loop counted references with atomic increments and decrements: half of a 1024-column
    # call at M=1 and 99.9 % sparsity (9.4 -> 5.4 us on one thread; perf: NRT_incref/decref).
    a, ptr, starts, idx, val = borrowed(a), borrowed(ptr), borrowed(starts), borrowed(idx), borrowed(val)
    offsets, colsum, ascale, azp = borrowed(offsets), borrowed(colsum), borrowed(ascale), borrowed(azp)
    wscale, bias, res, ep, out = borrowed(wscale), borrowed(bias), borrowed(res), borrowed(ep), borrowed(out)
    t, y = borrowed(t), borrowed(y)
    for v in range(threads):
        owner = (w + v) % threads
        hi = (owner + 1) * nblocks // threads
        while True:
            if threads == 1:            # no one to share with: no atomic instruction
                nb = nxt[0]
                nxt[0] = nb + 1
            else:
                nb = _count_add(nxt, owner * _COUNTER_STRIDE, 1)
            if nb >= hi:
                break
            _block(tag, nb, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp, wscale, bias, res, ep, out,
                   t, y, amx_m)


# _worker inlined, for _lean_rows, whose arrays are all borrowed views of its arguments:
# a call of _worker counted each of its 17 arrays in and out (NRT_incref/decref calls,
# 0.1 us a call, AMD EPYC)
_worker_inline = njit(inline="always")(_worker.py_func)


def _dense_amx_rows(tag, m, k):
    raise NotImplementedError  # compiled through the overload below


@overload(_dense_amx_rows, inline="always")
def _dense_amx_rows_impl(tag, m, k):
    """The rows of an (m, k) product the dense kernel runs in AMX blocks (gemm._amx_rows),
    whose epilogue the sparse one follows: all of them under amx.ROWS rows, else the
    whole blocks of amx.ROWS; 0 off AMX, or where K is not whole tiles, or under MIN_ROWS.
    That is the dense routing for float and int32 output. With uint8 output the dense kernel
    also keeps narrow blocks of small K off AMX; it does not matter here: the sparse
    epilogue stages every uint8 column, which is what the dense register tiles write."""
    if tag.isa not in AMX_ISAS:
        return lambda tag, m, k: 0

    def impl(tag, m, k):
        if not amx.suits(m, (k + 3) // 4):
            return 0
        return m if m < amx.ROWS else m - m % amx.ROWS
    return impl


@njit(inline="always")
def _scratch():
    """A worker's int32 tile t and float tile y (one allocation), and its block counter."""
    buf = np.empty(ROWS * BLOCK_COLS * 8 + 64, np.uint8)
    return _tiles_in(buf, 0, 0)


def _entries(tag):
    """Serial and threaded entries of one ISA (a compile-time tag, as gemm._entries):
    (x, aq, a_scale, a_zp, table, idx, val, res, out, threads) -> bad, with the layer's
    kernel_table and its layout's idx and val; bad as _quantized's. And the lean entry,
    (x, table, out) -> bad: serial's for float rows x and no residual, the rest from the
    table (three arguments to unbox instead of ten: 0.10 against 0.22 us a call, AMD EPYC),
    and lean_at, (address, m, k, table, out) -> bad, the same on rows at an address."""
    @njit(cache=CACHE)
    def serial(x, aq, a_scale, a_zp, table, idx, val, res, out, threads):
        # the table is the caller's for the whole call: its sections as views without its
        # owner count no references (16 atomic increments and decrements less a call)
        ptr, starts, offsets, colsum, wscale, bias, ep, wide = _sections(table)
        a, ascale, azp, bad = _quantized(tag, x, aq, a_scale, a_zp)
        nblocks = (out.shape[1] + BLOCK_COLS - 1) // BLOCK_COLS
        t, y, nxt = _scratch()
        _worker(tag, 0, 1, nxt, nblocks, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp,
                wscale, bias, res, ep, out, t, y, _dense_amx_rows(tag, out.shape[0], max(x.shape[1], aq.shape[1])))
        return bad

    @njit(cache=CACHE)
    def lean(x, table, out):
        return _lean_rows(tag, np.empty(_scratch_bytes(x.shape[0], x.shape[1], True), np.uint8), x, table, out)

    @njit(cache=CACHE)
    def lean_at(addr, m, k, table, out):
        # lean for float32 (m, k) C-contiguous rows at address addr, which the caller holds
        # (a torch tensor's data_ptr(): no numpy array made of it, 0.55 us a call)
        x = carray(pointer(addr, np.float32), (m, k))
        return _lean_rows(tag, np.empty(_scratch_bytes(m, k, True), np.uint8), x, table, out)

    @njit(cache=CACHE, parallel=True)
    def parallel(x, aq, a_scale, a_zp, table, idx, val, res, out, threads):
        ptr, starts, offsets, colsum, wscale, bias, ep, wide = _sections(table)
        a, ascale, azp, bad = _quantized(tag, x, aq, a_scale, a_zp)
        nblocks = (out.shape[1] + BLOCK_COLS - 1) // BLOCK_COLS
        nxt = _starts(nblocks, threads)
        amx_m = _dense_amx_rows(tag, out.shape[0], max(x.shape[1], aq.shape[1]))
        for w in prange(threads):
            t, y = np.empty(ROWS * BLOCK_COLS, np.int32), np.empty((ROWS, BLOCK_COLS), np.float32)
            _worker(tag, w, threads, nxt, nblocks, a, ptr, starts, idx, val, offsets, wide, colsum, ascale, azp,
                    wscale, bias, res, ep, out, t, y, amx_m)
        return bad
    return serial, parallel, lean, lean_at


ENTRIES = {name: _entries(tag) for name, tag in TAGS.items()}
assert all(GEOMETRY[name][1] <= BLOCK_COLS for name in GEOMETRY)


# --- numpy entry points --------------------------------------------------------------

# below this many slot multiply-adds (steps * 32 * rows, in the 8-row layout whichever runs)
# a thread launch costs more than it saves. 2 threads against 1, rows() calls, AMX Xeon:
# 8-row VNNI steps: 168 K slots 8.6 / 7.9 us, 258 K 9.6 / 10.1, 336 K 11.3 / 13.6;
# wide steps: 336 K 9.6 / 9.1 (1 x 2048 x 1024 at 90 %), 668 K 12.4 / 14.1 (1 x 2048 x 2048),
# 673 K 10.9 / 9.4 (4 x 1024 x 1024)
PARALLEL_MIN_SLOTS = 1 << 19
_NO_X = np.empty((0, 0), np.float32)
_NO_U8 = np.empty((0, 0), np.uint8)
_F32 = np.dtype(np.float32)
_F0, _I0 = np.float32(0), np.int32(0)


def _check_packed(ps):
    if not isinstance(ps, PackedSparse):
        raise KernelError("weights must be a PackedSparse from pack_sparse_s8")


class Kernels(dict):
    """isa -> (serial entry, parallel entry, table, idx, val, slot products a row): what a
    call of one layer (PackedSparse, bias, epilogue, static activation scale and zero point)
    hands the kernel of that ISA, made at its first call there (the lean entries read the
    same table). The wide layout where the ISA runs it and the packer made it."""

    def __init__(self, ps, bias, ep, a_scale=0.0, a_zp=0):
        super().__init__()
        self.ps, self.bias, self.ep, self.a_scale, self.a_zp = ps, bias, ep, a_scale, a_zp

    def __reduce__(self):       # copies and pickles start empty: a table holds its idx's and val's addresses
        return (Kernels, (self.ps, self.bias, self.ep, self.a_scale, self.a_zp))

    def __missing__(self, isa):
        ps = self.ps
        wide = isa in WIDE_ISAS and ps.wide.starts.shape[0] > 0
        ptr, starts, idx, val = ps.wide if wide else (ps.slice_ptr, ps.starts, ps.idx, ps.val)
        table = kernel_table(ptr, starts, ps.offsets, ps.col_sums, ps.scales, self.bias, self.ep, wide, idx, val,
                             self.a_scale, self.a_zp)
        self[isa] = ENTRIES[isa][:2] + (table, idx, val, ps.starts.shape[0] * STEP)
        return self[isa]


def _run(kernel, x, aq, a_scale, a_zp, res, out, n_threads):
    """kernel (a Kernels value) on float rows x or uint8 rows aq (the other empty);
    a_scale 0: per row. Returns _quantized's bad."""
    serial, parallel, table, idx, val, slots = kernel
    threads = n_threads or get_num_threads()
    rows = x.shape[0] if x.shape[1] else aq.shape[0]
    if threads > 1 and slots * rows >= PARALLEL_MIN_SLOTS:
        return parallel(x, aq, a_scale, a_zp, table, idx, val, res, out, threads)
    return serial(x, aq, a_scale, a_zp, table, idx, val, res, out, 1)


def gemm_sparse_s32(a, ps, n_threads=None):
    """Raw int32 product of uint8 rows a (M, K) and the sparse weights: out[i, n] =
    sum_k a[i, k] * W[n, k] (no zero point), as gemm_u8s8_s32 computes it.

        >>> acc = gemm_sparse_s32(a_u8, ps)
    """
    _check_packed(ps)
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != np.uint8:
        raise KernelError(f"A must be a 2-D uint8 numpy array, got {getattr(a, 'dtype', type(a))} "
                          f"{getattr(a, 'shape', '')}")
    if a.shape[1] != ps.k:
        raise KernelError(f"A has K={a.shape[1]}, weights expect K={ps.k}")
    out = np.empty((a.shape[0], ps.n), np.int32)
    kernel = Kernels(ps, _bias(None, ps.n), epilogue_params())[_dispatch._current[0]]
    _run(kernel, _NO_X, np.ascontiguousarray(a), _F0, _I0, _NO_X, out, n_threads)
    return out


def linear_sparse_f32(x, ps, bias=None, act="none", act_args=(), n_threads=None, residual=None):
    """linear_f32 with sparse weights: y = act(x @ W.T * scales + bias) (+ residual), x float32
    (..., K) quantized per row; the same result as linear_f32 on the dense packing, bit for bit.

        >>> y = linear_sparse_f32(x, pack_sparse_s8(q, scales), bias, act="relu")
    """
    _check_packed(ps)
    x = np.ascontiguousarray(x, np.float32)
    return on_rows("linear_sparse_f32", x, ps.k, ps.n, lambda: bind_linear_sparse(ps, bias, act, act_args),
                   residual, n_threads)


def bind_linear_sparse(ps, bias=None, act="none", act_args=(), a_scale=0.0, a_zero_point=0,
                       out_scale=0.0, out_zero_point=0):
    """bind_linear (linear.py) for PackedSparse weights: the same arguments, the same
    call(x, out=None, residual=None, n_threads=None), the same results bit for bit, and the
    same call.rows and call.screened; call.rows_screened(x, out, n_threads) -> (y, bad) is
    call.screened in one frame for float32 (M, K) rows (any other x: call.screened), and
    call.rows_screened_at(address, m, out, n_threads) the same on rows at an address.

        >>> call = bind_linear_sparse(ps, bias, act="gelu")
        >>> y = call(x)
    """
    _check_packed(ps)
    n, k = ps.n, ps.k
    b, ep, out_dtype, static, chained_out = bound_constants(n, bias, act, act_args, a_scale, a_zero_point,
                                                            out_scale, out_zero_point)
    scale, zero_point = (np.float32(a_scale), np.int32(a_zero_point)) if static else (_F0, _I0)
    kernels = Kernels(ps, b, ep, scale, zero_point)
    current = _dispatch._current
    kernels[current[0]]                   # the table now: a bad layer fails here, not at its first call
    slots = ps.starts.shape[0] * STEP
    lean = {}                             # isa -> (the lean entry's compiled code for rows_screened's types, table)
    lean_at = {}                          # the same for rows_screened_at

    def call(x, out=None, residual=None, n_threads=None):
        return screened(x, out, n_threads, residual)[0]

    def screened(x, out=None, n_threads=None, residual=None):
        """(call(x, out, residual), 0.0 or NaN: whether x was finite, from its quantization)."""
        if (out is None and residual is None and type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 2
                and x.shape[1] == k and x.flags.c_contiguous):    # the common case, kept short
            out = np.empty((x.shape[0], n), out_dtype)
            return out, _run(kernels[current[0]], x, _NO_U8, scale, zero_point, _NO_X, out, n_threads)
        xf, aq, out, res = call_arrays("bind_linear_sparse", x, k, n, static, chained_out, out_dtype, out, residual)
        return out, _run(kernels[current[0]], xf, aq, scale, zero_point, res, out, n_threads)

    def rows_screened(x, out, n_threads):
        # x and out as carray (C-contiguous, aligned, writeable): the types the lean entry
        # was compiled for, so that its compiled code is called without Numba's dispatch
        if type(x) is not np.ndarray or x.dtype is not _F32 or x.ndim != 2 or x.shape[1] != k:
            return screened(x, None, n_threads)
        if not x.flags.carray:          # strided, unaligned or readonly rows: a copy that is
            x = x.copy()
        m = x.shape[0]
        if out is None or out.shape != (m, n) or out.dtype is not out_dtype or not out.flags.carray:
            out = np.empty((m, n), out_dtype)
        if n_threads > 1 and m * slots >= PARALLEL_MIN_SLOTS:
            _, parallel, table, idx, val, _ = kernels[current[0]]
            return out, parallel(x, _NO_U8, scale, zero_point, table, idx, val, _NO_X, out, n_threads)
        entry = lean.get(current[0])
        if entry is None:
            table = kernels[current[0]][2]
            entry = lean[current[0]] = (compiled_entry(ENTRIES[current[0]][2], (x, table, out)), table)
        return out, entry[0](x, entry[1], out)

    def rows_screened_at(addr, m, out, n_threads):
        """rows_screened for float32 (m, K) C-contiguous rows at address addr, which the
        caller holds for the call (a torch tensor's data_ptr()), and out as there; None
        where the threaded entry would run (then: rows_screened on an array of them)."""
        if n_threads > 1 and m * slots >= PARALLEL_MIN_SLOTS:
            return None
        if out is None or out.shape != (m, n) or out.dtype is not out_dtype or not out.flags.carray:
            out = np.empty((m, n), out_dtype)
        entry = lean_at.get(current[0])
        if entry is None:
            table = kernels[current[0]][2]
            code = compiled_entry(ENTRIES[current[0]][3], (addr, m, k, table, out))
            entry = lean_at[current[0]] = (code, table)
        return out, entry[0](addr, m, k, entry[1], out)

    def rows(x, out, n_threads):
        return rows_screened(x, out, n_threads)[0]
    call.screened, call.rows, call.rows_screened = screened, rows, rows_screened
    call.rows_screened_at = rows_screened_at
    return call
