"""SIMD building blocks for the int8 GEMM: ISA tags and the tile intrinsic.

LLVM's auto-vectorizer does not emit ``vpdpbusd``, so the inner loop of the
GEMM is generated here as LLVM IR through ``numba.extending.intrinsic``.
One intrinsic, ``tile_s32``, computes an ``mr x tile_cols`` int32 tile of
``A (uint8, rows of K padded to 4) x B (packed int8)`` for one ISA:

- ``avx512_vnni``: 6 x 64 tile, 4 zmm accumulators per row, ``vpdpbusd.512``
- ``avx_vnni``:    4 x 16 tile, 2 ymm accumulators per row, ``vpdpbusd.256``
- ``avx2``:        2 x 16 tile, u8/s8 widened to int16 and multiplied with
  ``vpmaddwd`` (exact; ``vpmaddubsw`` would saturate int16 pairs)
- ``portable``:    no intrinsic; gemm.py uses plain Numba loops.
- ``amx_int8``:    the avx512_vnni tiles here, and AMX tiles (amx.py) for the
  blocks gemm.py can give them.

``tile_f32`` and ``tile_u8`` run the same K loop and finish the tile in
registers: dequantized and activated, then stored as float32 (a residual
added) or requantized to uint8; ``staged_f32`` and ``staged_u8`` do the same
on an int32 tile already in memory (an AMX block).

A is uint8 rows, or for ``avx2`` preferably uint16 rows holding the same
values (``A_DTYPES``): the 4 k of a row's k-group are then one 8-byte
broadcast, where uint8 rows need a broadcast and a widening per row and
k-group. On Zen 3 that widening was the bottleneck: 2 x 16 tile at K=768,
one thread, 15.2 MAC/cycle with uint8 A, 22.7 with uint16 A (the
vpmaddwd + vpaddd peak measured ~24).

The ISA is chosen at compile time by an ``IsaTag`` constant (a closure
variable of the calling kernel's entry, see gemm._entries), so one driver
source compiles to one machine-code variant per ISA and nothing is looked up
per call.

Packed B layout (see pack.py): 64-column blocks; inside a block, k-group g
(4 consecutive k) holds 256 bytes ``[col 0..63][k 0..3]``. A vector of
``vbytes`` bytes therefore covers ``vbytes / 4`` columns for 4 k.
"""
import llvmlite.ir as ir
import numpy as np
from numba import types
from numba.core import cgutils
from numba.core.imputils import lower_constant
from numba.extending import (intrinsic, models,
                             register_model, typeof_impl)

from . import epilogue as _ep
from .rowops import IntrinsicArgs as _Args, call_llvm as _call, emit_prefetch, splat as _splat

KERNEL_VERSION = "simd-13"

ISAS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx2", "portable")
# amx_int8 is avx512_vnni plus AMX tiles for the large blocks (amx.py, gemm.py): every
# table below gives it avx512_vnni's entry
# isa -> (rows per tile, columns per tile)
GEOMETRY = {"avx512_vnni": (6, 64), "avx_vnni": (4, 16), "avx2": (2, 16),
            "portable": (4, 64)}
# element type of the A rows each path reads fastest (any path reads uint8)
A_DTYPES = {"avx512_vnni": np.uint8, "avx_vnni": np.uint8, "avx2": np.uint16,
            "portable": np.uint8}
BLOCK_COLS = 64
GROUP_BYTES = 4 * BLOCK_COLS

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


class IsaTag:
    """Compile-time marker naming an ISA; a constant of the compiled function
    (a closure variable, as in gemm._entries, or a module global)."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"IsaTag({self.name!r})"


class IsaType(types.Type):
    def __init__(self, isa):
        self.isa = isa
        super().__init__(name=f"IsaTag({isa})")


register_model(IsaType)(models.OpaqueModel)


@typeof_impl.register(IsaTag)
def _typeof_tag(val, c):
    return IsaType(val.name)


@lower_constant(IsaType)
def _lower_tag(context, builder, ty, pyval):
    return context.get_constant_null(ty)


TAGS = {name: IsaTag(name) for name in ISAS}
AMX_ISAS = ("amx_int8",)


def _vec(t, n):
    return ir.VectorType(t, n)


def _const_vec(values):
    return ir.Constant(_vec(_i32, len(values)), list(values))


def _dot_vnni512(builder, acc, a, b):
    return _call(builder, "llvm.x86.avx512.vpdpbusd.512", acc.type, [acc, a, b])


def _dot_vnni256(builder, acc, a, b):
    return _call(builder, "llvm.x86.avx512.vpdpbusd.256", acc.type, [acc, a, b])


def _dot_avx2(builder, acc, a, b):
    # acc holds 16 pair sums for 8 columns: [c0 k01, c0 k23, c1 k01, ...];
    # a is the row's 4 k as 32 bytes or as 16 int16 (a0..a3 four times)
    bs = builder.sext(b, _vec(_i16, 32))
    lo, hi = _const_vec(range(16)), _const_vec(range(16, 32))
    if a.type.element == _i16:
        az, a_masks = a, (None, None)
    else:
        az, a_masks = builder.zext(a, _vec(_i16, 32)), (lo, hi)
    halves = []
    for mask, a_mask in zip((lo, hi), a_masks):
        x = az if a_mask is None else builder.shuffle_vector(az, az, a_mask)
        y = builder.shuffle_vector(bs, bs, mask)
        halves.append(_call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [x, y]))
    both = builder.shuffle_vector(halves[0], halves[1], _const_vec(range(16)))
    return builder.add(acc, both)


def _finish_pairs(builder, acc):
    even = builder.shuffle_vector(acc, acc, _const_vec(range(0, 16, 2)))
    odd = builder.shuffle_vector(acc, acc, _const_vec(range(1, 16, 2)))
    return builder.add(even, odd)


class _Spec:
    def __init__(self, vbytes, acc_lanes, dot, finish=None):
        self.vbytes = vbytes              # bytes of B per vector (4 k x cols)
        self.acc_ty = _vec(_i32, acc_lanes)
        self.byte_ty = _vec(_i8, vbytes)
        self.dot = dot
        self.finish = finish or (lambda builder, acc: acc)


_SPECS = {
    "avx512_vnni": _Spec(64, 16, _dot_vnni512),
    "avx_vnni": _Spec(32, 8, _dot_vnni256),
    "avx2": _Spec(32, 16, _dot_avx2, _finish_pairs),
}


def _splat_bytes(builder, word, vbytes):
    n = vbytes // 4
    v = builder.insert_element(ir.Constant(_vec(_i32, n), ir.Undefined), word,
                               ir.Constant(_i32, 0))
    v = builder.shuffle_vector(v, v, _const_vec([0] * n))
    return builder.bitcast(v, _vec(_i8, vbytes))


def _splat_k_group(builder, row, k4, vbytes):
    """A row's 4 k from element k4 on, repeated to fill a B vector: 4 bytes of a
    uint8 row as <vbytes x i8>, or 4 values of a uint16 row as <vbytes/2 x i16>."""
    p = builder.gep(row, [k4])
    if row.type.pointee == _i8:
        return _splat_bytes(builder, builder.load(builder.bitcast(p, _i32.as_pointer()), align=1), vbytes)
    i64 = ir.IntType(64)
    word = builder.load(builder.bitcast(p, i64.as_pointer()), align=2)
    n = vbytes // 8
    v = builder.insert_element(ir.Constant(_vec(i64, n), ir.Undefined), word, ir.Constant(_i32, 0))
    v = builder.shuffle_vector(v, v, _const_vec([0] * n))
    return builder.bitcast(v, _vec(_i16, vbytes // 2))


def _a_type_ok(isa, a):
    """uint8 A on every path; uint16 A (values 0..255) where A_DTYPES says so."""
    if not isinstance(a, types.Array):
        return False
    return a.dtype == types.uint8 or (a.dtype == types.uint16 and A_DTYPES.get(isa) == np.uint16)


# independent accumulator chains a tile keeps in flight: a tile with fewer
# (rows x vectors) splits its K loop over sets of accumulators, each taking every
# sets-th k-group, summed at the end (int32 sums: the same bits). A 1-row avx512
# tile has 4 vpdpbusd chains, each waiting on the last: with B in L1, 4 sets took it
# from 1.15 to 0.68 ns a k-group, 2 sets a 2-row tile from 1.29 to 1.06 (Zen 5).
# avx_vnni keeps to 8: without AVX-512 it has 16 vector registers.
MIN_CHAINS = {"avx512_vnni": 16, "avx_vnni": 8, "avx2": 1}


def k_sets(isa, mr, cols=None):
    """Accumulator sets the K loop of an mr-row tile (cols columns, default the
    ISA's tile width) is split over."""
    chains = mr * (cols or GEOMETRY[isa][1]) * 4 // _SPECS[isa].vbytes
    return max(1, min(4, MIN_CHAINS[isa] // chains))


def _plain_load(builder, ptr, ty, keep):
    """A vector load LLVM does not fold into the instruction using it: masked, by the
    all-ones mask `keep` that the compiler cannot see is constant. A 1-row tile uses
    each B vector once, so LLVM folds the loads into the vpdpbusd; so folded, B came
    from L2 at 2.17 ns a k-group, as separate loads at 1.88 (Zen 5); 1x768x768
    linear, 2 threads: 7.1 -> 5.9 us with the K split."""
    n = ty.count
    fnty = ir.FunctionType(ty, [ty.as_pointer(), ir.IntType(32), _vec(ir.IntType(1), n), ty])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.v{n}i8.p0")
    return builder.call(fn, [builder.bitcast(ptr, ty.as_pointer()), ir.Constant(ir.IntType(32), 1),
                             keep, ir.Constant(ty, None)])


def _emit_accumulate(ar, isa, mr, a_ix, b_ix, kg_ix, cols=None):
    """K loop of one tile (cols columns, default the ISA's tile width); returns
    mr x nvec accumulator values."""
    builder, spec = ar.b, _SPECS[isa]
    a_ptr, b_ptr = ar.ptr(a_ix, a_ix + 1), ar.ptr(b_ix, b_ix + 1)
    lda, kg = ar.int(a_ix + 2), ar.int(kg_ix)
    nvec = (cols or GEOMETRY[isa][1]) * 4 // spec.vbytes
    nsets = k_sets(isa, mr, cols)
    zero = ir.Constant(spec.acc_ty, None)
    sets = [[[cgutils.alloca_once_value(builder, zero) for _ in range(nvec)]
             for _ in range(mr)] for _ in range(nsets)]
    rows = [builder.gep(a_ptr, [builder.mul(lda, ar.cst(r))]) for r in range(mr)]
    unfold = mr == 1 and isa != "avx2"  # see _plain_load
    if unfold:
        nb = spec.vbytes
        keep = builder.bitcast(builder.sext(builder.icmp_signed(">=", kg, ar.cst(0)), ir.IntType(nb)),
                               _vec(ir.IntType(1), nb))

    def k_group(g, accs):
        # load the B vectors of k-group g once, broadcast 4 bytes of each A row
        # and accumulate mr x nvec independent chains
        bg = builder.gep(b_ptr, [builder.mul(g, ar.cst(GROUP_BYTES))])
        bvecs = []
        for c in range(nvec):
            p = builder.gep(bg, [ar.cst(c * spec.vbytes)])
            if unfold:
                bvecs.append(_plain_load(builder, p, spec.byte_ty, keep))
            else:
                bvecs.append(builder.load(builder.bitcast(p, spec.byte_ty.as_pointer()), align=1))
        k4 = builder.mul(g, ar.cst(4))
        for r in range(mr):
            av = _splat_k_group(builder, rows[r], k4, spec.vbytes)
            for c in range(nvec):
                acc = builder.load(accs[r][c])
                builder.store(spec.dot(builder, acc, av, bvecs[c]), accs[r][c])

    whole = builder.sdiv(kg, ar.cst(nsets)) if nsets > 1 else kg
    with cgutils.for_range(builder, whole) as loop:
        for s, accs in enumerate(sets):
            k_group(builder.add(builder.mul(loop.index, ar.cst(nsets)), ar.cst(s)), accs)
    if nsets > 1:  # the last kg % nsets k-groups, into the first set
        done = builder.mul(whole, ar.cst(nsets))
        with cgutils.for_range(builder, builder.sub(kg, done)) as loop:
            k_group(builder.add(done, loop.index), sets[0])
    out = []
    for r in range(mr):
        row = []
        for c in range(nvec):
            v = builder.load(sets[0][r][c])
            for other in sets[1:]:
                v = builder.add(v, builder.load(other[r][c]))
            row.append(spec.finish(builder, v))
        out.append(row)
    return out


def _load_vec(builder, ptr, off, ty):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), ty.as_pointer()), align=1)


def _store_vec(builder, value, ptr, off):
    builder.store(value, builder.bitcast(builder.gep(ptr, [off]), value.type.as_pointer()), align=1)


def _tile_s32_intrinsic(narrow):
    """tile_s32, or with narrow (QUARTER_COLS) its narrower tile for a block's column tail."""
    @intrinsic(prefer_literal=True)
    def tile(typingctx, tag, mr, a, a_off, lda, b, b_off, kg, t, t_off, ldt):
        return _tile_s32_typer(narrow, tag, mr, a, a_off, lda, b, b_off, kg, t, t_off, ldt)
    return tile


def _tile_s32_typer(narrow, tag, mr, a, a_off, lda, b, b_off, kg, t, t_off, ldt):
    """T[t_off + r*ldt + j] = sum_k A[a_off + r*lda + k] * B(packed)[k, j], j below the
    tile's width (the ISA's, or what the table narrow gives; none there: nothing emitted).

    ``mr`` must be a literal; ``kg`` counts k-groups of 4; ``b_off`` is the
    byte offset of the tile's first column inside its packed block; A is
    uint8, or uint16 on the paths A_DTYPES names (a_off, lda in elements).
    """
    if (not isinstance(tag, IsaType) or not isinstance(mr, types.IntegerLiteral)
            or not _a_type_ok(tag.isa, a)):
        return None
    sig = types.void(tag, mr, a, a_off, lda, b, b_off, kg, t, t_off, ldt)
    isa, nrows = tag.isa, mr.literal_value
    width = narrow.get(isa, 0) if narrow is not None else GEOMETRY.get(isa, (0, 0))[1]

    def codegen(context, builder, sig, args):
        # portable, or more rows than the ISA's tile: unreachable, emit nothing
        if isa not in _SPECS or nrows > GEOMETRY[isa][0] or not width:
            return context.get_dummy_value()
        ar = _Args(context, builder, sig, args)
        accs = _emit_accumulate(ar, isa, nrows, 2, 5, 7, width)
        t_ptr, ldt_v = ar.ptr(8, 9), ar.int(10)
        for r, row in enumerate(accs):
            base = builder.mul(ldt_v, ar.cst(r))
            for c, v in enumerate(row):
                _store_vec(builder, v, t_ptr, builder.add(base, ar.cst(c * v.type.count)))
        return context.get_dummy_value()
    return sig, codegen


def _tile_intrinsic(narrow, u8):
    """tile_f32, or with u8 tile_u8 (the ISA's tile width), or with the columns of its
    first vectors that the table `narrow` gives (HALF_COLS, QUARTER_COLS: a block's column
    tail in registers instead of staged). The last two arguments: the residual (float32 or
    uint8, out's rows; an empty array for none) and the epilogue's parameter vector ep
    (epilogue.py)."""
    @intrinsic(prefer_literal=True)
    def tile(typingctx, tag, mr, a, a_off, lda, b, b_off, kg, colsum, wscale, bias,
             n0, ascale, azp, m0, out, act, p0, p1, e0, e1):
        return _tile_typer(narrow, u8, tag, mr, a, a_off, lda, b, b_off, kg, colsum, wscale, bias,
                           n0, ascale, azp, m0, out, act, p0, p1, e0, e1)
    return tile


# columns of a half-width tile, per ISA (none: it has none; whole vectors)
HALF_COLS = {"avx512_vnni": 32}
# columns of a quarter-width tile: in registers for uint8 output (a chained conv of 16 or
# 24 channels: MobileNetV2's 32->16 1x1 at 112x112 staged its one 16-column tail, 4x the
# GEMM's work and a staged epilogue; float output keeps staging those, as the sparse
# kernel does), and the int32 tile of a staged tail of at most that many columns
QUARTER_COLS = {"avx512_vnni": 16}


def _out_type_ok(out, u8):
    """uint8 out for the uint8 epilogue; any array for the float one (a kernel may type a
    tile_f32 call for other outputs on a branch it never takes, as sparse.py does)."""
    return isinstance(out, types.Array) and (out.dtype == types.uint8 or not u8)


def _res_ep_ok(res, ep):
    """A residual of float32 or uint8 rows, and the float32 parameter vector."""
    return (isinstance(res, types.Array) and res.ndim == 2 and res.dtype in (types.float32, types.uint8)
            and isinstance(ep, types.Array) and ep.dtype == types.float32)


def _tile_typer(narrow, u8, tag, mr, a, a_off, lda, b, b_off, kg, colsum, wscale, bias,
                n0, ascale, azp, m0, out, act, p0, p1, e0, e1):
    """A tile (the ISA's width; with narrow, the columns that table gives) with the dequantizing
    epilogue done in registers:

    out[m0 + r, n0 + j] = act(float32(acc - azp[m0+r] * colsum[n0+j])
                              * (ascale[m0+r] * wscale[n0+j]) + bias[n0+j])

    for r < mr, j < tile columns (all columns must exist in out and bias).
    A residual res = e0 (out's rows; an empty array for none) is added in registers
    too: act(y) + res, or act(y + res) when ep = e1 says residual first; uint8 codes
    stand for (code - res_zp) * res_scale (_Residual). tile_f32 (float32 out): the
    formulas of epilogue.dequant_row, with scale and bias one fused multiply-add
    (within an ulp of the staged path); act (an
    epilogue.ACTIVATIONS code) is applied in registers for relu (1),
    clamp(p0, p1) (2) and erf GELU (3), the formulas of epilogue.py (GELU's
    reciprocal an estimate and a Newton step, ~2^-23), and left to the
    caller otherwise. Every vector operation here costs about a cycle per
    tile vector on Zen 4, where 512-bit float ops issue once per cycle.
    tile_u8 (uint8 out): that result requantized, clip(rint(y / out_scale) + out_zp, 0, 255)
    with ep's out_scale and out_zp, bit for bit as the staged path
    (epilogue.store_tile_u8) computes it: see _emit_u8_epilogue; act 0 to 3, and the
    residual too. (It added none once, to keep the GEMM's compile short: staging those tiles
    made a MobileNetV2 residual conv, 192 -> 32 channels at 28x28, 67 us where it is 33 now.)
    """
    if (not isinstance(tag, IsaType) or not isinstance(mr, types.IntegerLiteral)
            or not _a_type_ok(tag.isa, a) or not _out_type_ok(out, u8) or not _res_ep_ok(e0, e1)):
        return None
    sig = types.void(tag, mr, a, a_off, lda, b, b_off, kg, colsum, wscale, bias,
                     n0, ascale, azp, m0, out, act, p0, p1, e0, e1)
    isa, nrows = tag.isa, mr.literal_value
    width = narrow.get(isa, 0) if narrow is not None else GEOMETRY[isa][1]
    emit = _emit_u8_epilogue if u8 else _emit_f32_epilogue

    def codegen(context, builder, sig, args):
        if isa not in _SPECS or nrows > GEOMETRY[isa][0] or not width:
            return context.get_dummy_value()
        ar = _Args(context, builder, sig, args)
        emit(context, builder, ar, 8, nrows, width,
             lambda: _emit_accumulate(ar, isa, nrows, 2, 5, 7, width))
        return context.get_dummy_value()
    return sig, codegen


def _staged_intrinsic(u8):
    """staged_f32, or with u8 staged_u8: tile_f32's (tile_u8's) epilogue, in registers, on
    an int32 tile already computed: mr rows of the ISA's tile width from t[t_off + r * ldt]
    (an AMX block, amx.py); the last two arguments as the tile's."""
    @intrinsic(prefer_literal=True)
    def staged(typingctx, tag, mr, t, t_off, ldt, colsum, wscale, bias, n0, ascale, azp, m0, out,
               act, p0, p1, e0, e1):
        if (not isinstance(tag, IsaType) or not isinstance(mr, types.IntegerLiteral)
                or not (isinstance(t, types.Array) and t.dtype == types.int32)
                or not _out_type_ok(out, u8) or not _res_ep_ok(e0, e1)):
            return None
        sig = types.void(tag, mr, t, t_off, ldt, colsum, wscale, bias, n0, ascale, azp, m0, out,
                         act, p0, p1, e0, e1)
        isa, nrows = tag.isa, mr.literal_value
        emit = _emit_u8_epilogue if u8 else _emit_f32_epilogue

        def codegen(context, builder, sig, args):
            if isa not in _SPECS:
                return context.get_dummy_value()
            ar = _Args(context, builder, sig, args)
            spec, width = _SPECS[isa], GEOMETRY[isa][1]
            # the int32 vectors tile_f32 finishes with (one lane a column; avx2's pair
            # accumulators finish to 8 lanes), so the epilogue is tile_f32's own
            n = spec.vbytes // 4
            ty = _vec(_i32, n)

            def accs():
                t_ptr, ldt_v = ar.ptr(2, 3), ar.int(4)
                return [[_load_vec(builder, t_ptr, builder.add(builder.mul(ldt_v, ar.cst(r)), ar.cst(c * n)),
                                   ty) for c in range(width // n)] for r in range(nrows)]
            emit(context, builder, ar, 5, nrows, width, accs)
            return context.get_dummy_value()
        return sig, codegen
    return staged


def _tile_out(context, builder, ar, i0, nrows, width):
    """(pointer to out[m0, n0], out's row stride in elements) of a tile whose arguments from
    colsum on start at i0 (out at i0 + 7), its output lines asked for before the K loop."""
    sig, args = ar.tys, ar.args
    n0v, m0v = ar.int(i0 + 3), ar.int(i0 + 6)
    out_st = cgutils.create_struct_proxy(sig[i0 + 7])(context, builder, value=args[i0 + 7])
    size = sig[i0 + 7].dtype.bitwidth // 8
    ldo = builder.sdiv(builder.extract_value(out_st.strides, 0), ar.cst(size))
    o_ptr = builder.gep(out_st.data, [builder.add(builder.mul(m0v, ldo), n0v)])
    _prefetch_for_write(builder, o_ptr, ldo, nrows, width, size, ar)
    return o_ptr, ldo


def _dequantize(builder, ar, i0, accs, fused):
    """The float32 y of the int32 vectors accs (rows x vectors), as rows of vectors:
    float32(acc - azp[m0+r] * colsum) * (ascale[m0+r] * wscale) + bias. fused: the
    multiply and the add one fma (tile_f32, within an ulp of the staged path); else each
    rounded, epilogue.dequant_row's operations and so its bits."""
    cs_p, ws_p, b_p = ar.ptr(i0, i0 + 3), ar.ptr(i0 + 1, i0 + 3), ar.ptr(i0 + 2, i0 + 3)
    sa_p, zp_p = ar.ptr(i0 + 4, i0 + 6), ar.ptr(i0 + 5, i0 + 6)
    n = accs[0][0].type.count
    fvec, ivec = _vec(ir.FloatType(), n), _vec(_i32, n)
    cols = [(_load_vec(builder, cs_p, ar.cst(c * n), ivec),
             _load_vec(builder, ws_p, ar.cst(c * n), fvec),
             _load_vec(builder, b_p, ar.cst(c * n), fvec)) for c in range(len(accs[0]))]
    ys = []
    for r, row in enumerate(accs):
        zpv = _splat(builder, builder.load(builder.gep(zp_p, [ar.cst(r)])), n)
        sav = _splat(builder, builder.load(builder.gep(sa_p, [ar.cst(r)])), n)
        ys.append([])
        for c, v in enumerate(row):
            cs, ws, bv = cols[c]
            x = builder.sitofp(builder.sub(v, builder.mul(zpv, cs)), fvec)
            if fused:
                ys[r].append(_vcall(builder, "llvm.fma", x, builder.fmul(sav, ws), bv))
            else:
                ys[r].append(builder.fadd(builder.fmul(x, builder.fmul(sav, ws)), bv))
    return ys


def _by_activation(builder, act, cases, otherwise):
    """Emit the first of cases [(ACTIVATIONS code, emit)] whose code is act (an i32 value),
    else otherwise(): one branch per tile, each emit storing the whole tile."""
    if not cases:
        otherwise()
        return
    (code, emit), rest = cases[0], cases[1:]
    with builder.if_else(builder.icmp_signed("==", act, ir.Constant(_i32, code))) as (hit, miss):
        with hit:
            emit()
        with miss:
            _by_activation(builder, act, rest, otherwise)


def _ep_float(builder, ar, i, k):
    """ep[k], ep the float32 vector argument i."""
    return builder.load(builder.gep(ar.ptr(i), [ar.cst(k)]))


class _Residual:
    """The residual argument i of a tile whose arguments from colsum on start at i0 (n0 at
    i0 + 3, m0 at i0 + 6, ep at i0 + 12), as float32 vectors of n lanes: add(y, r, c, fn)
    is fn(y + res) + 0, or fn(y) + res, by ep's residual-first flag."""

    def __init__(self, context, builder, ar, i0, n):
        self.b, self.ar, self.n = builder, ar, n
        ty = ar.tys[i0 + 11]
        self.u8 = ty.dtype == types.uint8
        st = ar.array(i0 + 11)
        self.ld = builder.sdiv(builder.extract_value(st.strides, 0), ar.cst(ty.dtype.bitwidth // 8))
        self.ptr = builder.gep(st.data, [builder.add(builder.mul(ar.int(i0 + 6), self.ld), ar.int(i0 + 3))])
        self.present = builder.icmp_signed(">", builder.extract_value(st.shape, 0), ar.cst(0))
        self.fvec = _vec(ir.FloatType(), n)
        zero = ir.Constant(ir.FloatType(), 0.0)
        self.first = builder.fcmp_unordered("!=", _ep_float(builder, ar, i0 + 12, _ep.EP_RES_FIRST), zero)
        self.scale = _splat(builder, _ep_float(builder, ar, i0 + 12, _ep.EP_RSCALE), n)
        self.zp = _splat(builder, _ep_float(builder, ar, i0 + 12, _ep.EP_RZP), n)

    def vec(self, r, c):
        """res[m0 + r, n0 + c*n ...] as float32 (epilogue.residual_value's operations)."""
        b, off = self.b, self.b.add(self.b.mul(self.ld, self.ar.cst(r)), self.ar.cst(c * self.n))
        if not self.u8:
            return _load_vec(b, self.ptr, off, self.fvec)
        codes = _load_vec(b, self.ptr, off, _vec(_i8, self.n))
        return b.fmul(b.fsub(b.uitofp(codes, self.fvec), self.zp), self.scale)

    def add(self, y, r, c, fn):
        # -0.0 is the exact identity of float addition (x + -0.0 == x, signed zeros too)
        rv, neg0 = self.vec(r, c), _fconst(self.fvec, -0.0)
        before, after = self.b.select(self.first, rv, neg0), self.b.select(self.first, neg0, rv)
        return self.b.fadd(fn(self.b.fadd(y, before)), after)


def _emit_f32_epilogue(context, builder, ar, i0, nrows, width, accumulate):
    """The epilogue of tile_f32 on the int32 vectors accumulate() returns (mr x vectors);
    the arguments from colsum on start at index i0 (colsum, wscale, bias, n0, ascale,
    azp, m0, out, act, p0, p1, res, ep)."""
    sig, args = ar.tys, ar.args
    o_ptr, ldo = _tile_out(context, builder, ar, i0, nrows, width)
    rows = _dequantize(builder, ar, i0, accumulate(), fused=True)
    n = rows[0][0].type.count
    fvec = rows[0][0].type
    ys = [(y, r, c, builder.add(builder.mul(ldo, ar.cst(r)), ar.cst(c * n)))
          for r, row in enumerate(rows) for c, y in enumerate(row)]
    act_v = context.cast(builder, args[i0 + 8], sig[i0 + 8], types.int32)
    p0v = _splat(builder, context.cast(builder, args[i0 + 9], sig[i0 + 9], types.float32), n)
    p1v = _splat(builder, context.cast(builder, args[i0 + 10], sig[i0 + 10], types.float32), n)
    res = _Residual(context, builder, ar, i0, n)

    def store(fn, with_res):
        for y, r, c, off in ys:
            _store_vec(builder, res.add(y, r, c, fn) if with_res else fn(y), o_ptr, off)

    zero = ir.Constant(fvec, None)

    def activations(with_res):
        _by_activation(builder, act_v, [
            (3, lambda: store(lambda y: _gelu_vec(builder, y), with_res)),
            (5, lambda: store(lambda y: _silu_staged(builder, y), with_res)),
            (1, lambda: store(lambda y: _vcall(builder, "llvm.maxnum", y, zero), with_res)),
            (2, lambda: store(lambda y: _vcall(builder, "llvm.minnum", _vcall(builder, "llvm.maxnum", y, p0v),
                                               p1v), with_res))],
            lambda: store(lambda y: y, with_res))

    with builder.if_else(res.present) as (residual, alone):
        with residual:
            activations(True)
        with alone:
            activations(False)


def _emit_u8_epilogue(context, builder, ar, i0, nrows, width, accumulate):
    """The epilogue of tile_u8 on the int32 vectors accumulate() returns (mr x vectors);
    the arguments from colsum on start at index i0 (colsum, wscale, bias, n0, ascale,
    azp, m0, out, act, p0, p1, res, ep).

    epilogue.store_tile_u8's operations in its order, on vectors instead of a staged
    row, so that the bytes are the staged path's on every input: y as dequant_row
    rounds it (no fma), the residual added as store_tile_u8 adds it, the activation as
    apply_activation computes it (Python's max/min compares, _gelu_staged, _silu_staged),
    then clip(rint(y * (1 / out_scale)) + out_zp, 0, 255) and the low byte (_requantize).
    tanh GELU is the caller's to stage (epilogue.in_registers)."""
    sig, args = ar.tys, ar.args
    o_ptr, ldo = _tile_out(context, builder, ar, i0, nrows, width)
    rows = _dequantize(builder, ar, i0, accumulate(), fused=False)
    n = rows[0][0].type.count
    act_v = context.cast(builder, args[i0 + 8], sig[i0 + 8], types.int32)
    p0v, p1v = (_splat(builder, context.cast(builder, args[i], sig[i], types.float32), n)
                for i in range(i0 + 9, i0 + 11))
    one = ir.Constant(ir.FloatType(), 1.0)
    inv = _splat(builder, builder.fdiv(one, _ep_float(builder, ar, i0 + 12, _ep.EP_OSCALE)), n)
    ozp = _splat(builder, _ep_float(builder, ar, i0 + 12, _ep.EP_OZP), n)
    zero = _fconst(rows[0][0].type, 0.0)
    res = _Residual(context, builder, ar, i0, n)

    def store(fn, with_res):
        for r, row in enumerate(rows):
            for c, y in enumerate(row):
                off = builder.add(builder.mul(ldo, ar.cst(r)), ar.cst(c * n))
                v = res.add(y, r, c, fn) if with_res else fn(y)
                _store_vec(builder, _requantize(builder, v, inv, ozp), o_ptr, off)

    def activations(with_res):
        _by_activation(builder, act_v, [
            (3, lambda: store(lambda y: _gelu_staged(builder, y), with_res)),
            (5, lambda: store(lambda y: _silu_staged(builder, y), with_res)),
            (1, lambda: store(lambda y: _py_max(builder, y, zero), with_res)),
            (2, lambda: store(lambda y: _py_min(builder, _py_max(builder, y, p0v), p1v), with_res))],
            lambda: store(lambda y: y, with_res))

    with builder.if_else(res.present) as (added, alone):
        with added:
            activations(True)
        with alone:
            activations(False)


tile_s32 = _tile_s32_intrinsic(None)
tile_s32_quarter = _tile_s32_intrinsic(QUARTER_COLS)
tile_f32 = _tile_intrinsic(None, False)
tile_f32_half = _tile_intrinsic(HALF_COLS, False)
tile_u8 = _tile_intrinsic(None, True)
tile_u8_half = _tile_intrinsic(HALF_COLS, True)
tile_u8_quarter = _tile_intrinsic(QUARTER_COLS, True)
staged_f32 = _staged_intrinsic(False)
staged_u8 = _staged_intrinsic(True)


def _prefetch_for_write(builder, o_ptr, ldo, nrows, ncols, size, ar):
    """Ask for the tile's output lines (owned, for writing) before the K loop, so that
    their misses overlap the arithmetic instead of stalling the epilogue's stores;
    size: bytes of an element of out."""
    for r in range(nrows):
        row = builder.gep(o_ptr, [builder.mul(ldo, ar.cst(r))])
        for line in range(max(1, ncols * size // 64)):
            emit_prefetch(builder, builder.gep(row, [ar.cst(line * 64 // size)]), write=True, locality=3)


def _fconst(ty, v):
    """A constant float vector of type ty, each lane the float32 value v."""
    return ir.Constant(ty, [ir.Constant(ir.FloatType(), float(np.float32(v)))] * ty.count)


def _py_max(builder, a, b):
    """max(a, b) as Numba compiles Python's max on floats (b if b > a else a): the staged
    epilogue's own operation, NaNs and signed zeros alike (llvm.maxnum is not)."""
    return builder.select(builder.fcmp_ordered(">", b, a), b, a)


def _py_min(builder, a, b):
    """min(a, b) as Numba compiles Python's min on floats (b if b < a else a)."""
    return builder.select(builder.fcmp_ordered("<", b, a), b, a)


def _requantize(builder, y, inv, ozp):
    """store_tile_u8's requantization of a float vector y, operation for operation:
    q = rint(y * inv) + ozp (llvm.rint: half to even, as np.rint), q = q if q > 0 else 0,
    q = q if q < 255 else 255 (NaN: 0), then int32 and its low byte (<n x i8>)."""
    fty = y.type
    zero, top = _fconst(fty, 0.0), _fconst(fty, 255.0)
    q = builder.fadd(_vcall(builder, "llvm.rint", builder.fmul(y, inv)), ozp)
    q = builder.select(builder.fcmp_ordered(">", q, zero), q, zero)
    q = builder.select(builder.fcmp_ordered("<", q, top), q, top)
    return builder.trunc(builder.fptosi(q, _vec(_i32, fty.count)), _vec(_i8, fty.count))


def _gelu_staged(builder, x):
    """apply_activation's erf GELU on a float vector, operation for operation:
    0.5 * x * (1 + erf_f32(x * (1 / sqrt 2))), erf_f32's polynomial by multiplies and
    adds, its 1 / p a division, with epilogue.py's float32 constants. The staged path's
    bits, where _gelu_vec (tile_f32's) folds constants and estimates 1 / p (~2^-23)."""
    def k(v):
        return _fconst(x.type, v)
    u = builder.fmul(x, k(_ep._INV_SQRT2))
    z = _py_min(builder, _vcall(builder, "llvm.fabs", u), k(_ep._ERF_ZMAX))
    a = _ep._ERF_A
    p = builder.fmul(z, k(a[5]))
    for i in range(4, -1, -1):        # 1 + z (a1 + z (a2 + ... z (a5 + z a6)))
        p = builder.fmul(z, builder.fadd(k(a[i]), p))
    p = builder.fadd(k(1.0), p)
    for _ in range(4):
        p = builder.fmul(p, p)
    e = builder.fsub(k(1.0), builder.fdiv(k(1.0), p))
    erf = builder.select(builder.fcmp_ordered(">=", u, k(0.0)), e, builder.fsub(k(-0.0), e))
    return builder.fmul(builder.fmul(k(0.5), x), builder.fadd(k(1.0), erf))


def _exp_staged(builder, x):
    """epilogue.exp_f32 on a float vector, operation for operation (its clamps as Python's
    max and min, n = rint(x log2 e), the two-part ln 2, the degree-6 polynomial by
    multiplies and adds, 2^n from the exponent bits): the staged path's bits."""
    def k(v):
        return _fconst(x.type, v)
    n_lanes = x.type.count
    x = _py_min(builder, _py_max(builder, x, k(_ep._EXP_LO)), k(_ep._EXP_HI))
    n = _vcall(builder, "llvm.rint", builder.fmul(x, k(_ep._LOG2E)))
    r = builder.fsub(builder.fsub(x, builder.fmul(n, k(_ep._LN2_HI))), builder.fmul(n, k(_ep._LN2_LO)))
    p = builder.fmul(r, k(1 / 720))
    for c in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0):     # 1 + r (1 + r (1/2 + ... r (1/120 + r / 720)))
        p = builder.fmul(r, builder.fadd(k(c), p))
    p = builder.fadd(k(1.0), p)
    ivec = _vec(_i32, n_lanes)
    bits = builder.shl(builder.add(builder.fptosi(n, ivec), ir.Constant(ivec, [ir.Constant(_i32, 127)] * n_lanes)),
                       ir.Constant(ivec, [ir.Constant(_i32, 23)] * n_lanes))
    return builder.fmul(p, builder.bitcast(bits, x.type))


def _silu_staged(builder, x):
    """apply_activation's SiLU on a float vector, operation for operation:
    x / (1 + exp_f32(-x)), a division (its bits are the staged path's)."""
    one = _fconst(x.type, 1.0)
    return builder.fdiv(x, builder.fadd(one, _exp_staged(builder, builder.fneg(x))))


def _vcall(builder, name, *vecs):
    """Call a float vector LLVM intrinsic (llvm.maxnum, llvm.fma, ...) on <n x float>."""
    n = vecs[0].type.count
    return _call(builder, f"{name}.v{n}f32", vecs[0].type, list(vecs))


# erf GELU, as epilogue.erf_f32 computes it (Abramowitz & Stegun 7.1.28)
_ERF_A = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


def _gelu_vec(builder, x):
    """0.5 * x * (1 + erf(x / sqrt 2)) on a float vector, in registers.

    Written with erfc(|u|) = 1 / p(|u|)^16 (the formula of epilogue.erf_f32),
    u = x / sqrt 2: gelu = x - x r for x >= 0 and x r below, r = erfc(|u|) / 2.
    The 1 / sqrt 2 and a factor 2^(1/16) (so that p^16 doubles) are folded
    into the polynomial's coefficients: 19 vector operations."""
    n, fty = x.type.count, x.type

    def k(v):
        return ir.Constant(fty, [ir.Constant(ir.FloatType(), float(np.float32(v)))] * n)
    t = _vcall(builder, "llvm.minnum", _vcall(builder, "llvm.fabs", x), k(6.0 * np.sqrt(2.0)))
    c, s = 1.0 / np.sqrt(2.0), 2.0 ** (1.0 / 16.0)
    p = k(s * float(_ERF_A[5]) * c ** 6)
    for i in range(4, -1, -1):
        p = _vcall(builder, "llvm.fma", t, p, k(s * float(_ERF_A[i]) * c ** (i + 1)))
    p = _vcall(builder, "llvm.fma", t, p, k(s))
    for _ in range(4):
        p = builder.fmul(p, p)
    h = builder.fmul(x, _reciprocal(builder, p))
    return builder.select(builder.fcmp_ordered(">=", x, k(0.0)), builder.fsub(x, h), h)


def _reciprocal(builder, p):
    """1 / p for p >= 1 (no zeros, infinities or denormals): the hardware estimate
    (rcp14 / rcp, 14 / 12 bits) and one Newton step, ~2^-23 relative; a vdivps
    costs several times more."""
    n, fty = p.type.count, p.type
    if n == 16:
        allones = ir.Constant(ir.IntType(16), 0xFFFF)
        r = _call(builder, "llvm.x86.avx512.rcp14.ps.512", fty, [p, p, allones])
    elif n == 8:
        r = _call(builder, "llvm.x86.avx.rcp.ps.256", fty, [p])
    else:
        return builder.fdiv(ir.Constant(fty, [ir.Constant(ir.FloatType(), 1.0)] * n), p)
    two = ir.Constant(fty, [ir.Constant(ir.FloatType(), 2.0)] * n)
    return builder.fmul(r, _vcall(builder, "llvm.fma", builder.fneg(p), r, two))


@intrinsic
def isa_geometry(typingctx, tag):
    """(rows per tile, columns per tile) of the tag's ISA, as constants."""
    if not isinstance(tag, IsaType):
        return None
    mr, tc = GEOMETRY[tag.isa]
    sig = types.UniTuple(types.intp, 2)(tag)

    def codegen(context, builder, sig, args):
        vals = [context.get_constant(types.intp, v) for v in (mr, tc)]
        return context.make_tuple(builder, sig.return_type, vals)
    return sig, codegen


def tag_flag(test):
    """An intrinsic flag(tag): test(the tag's ISA name) as a compile-time constant, so a
    branch on it leaves no code behind for the ISAs it does not hold for."""
    @intrinsic
    def flag(typingctx, tag):
        if not isinstance(tag, IsaType):
            return None
        value = bool(test(tag.isa))

        def codegen(context, builder, sig, args):
            return context.get_constant(types.boolean, value)
        return types.boolean(tag), codegen
    return flag


is_portable = tag_flag(lambda isa: isa == "portable")


# peak probe: independent chains of the ISA's multiply-accumulate, as many as its
# registers hold (ISA -> (chains, int8 multiply-adds per chain step))
PEAK_CHAINS = {"avx512_vnni": (24, 64), "avx_vnni": (12, 32), "avx2": (12, 16)}
# the instructions each probe chains, for reports
PEAK_OPS = {"avx512_vnni": "vpdpbusd.512", "avx_vnni": "vpdpbusd.256", "avx2": "vpmaddwd+vpaddd"}

for _table in (GEOMETRY, A_DTYPES, _SPECS, MIN_CHAINS, HALF_COLS, QUARTER_COLS, PEAK_CHAINS, PEAK_OPS):
    _table["amx_int8"] = _table["avx512_vnni"]


@intrinsic
def peak_chains(typingctx, tag, n, seed):
    """Peak probe: n iterations of PEAK_CHAINS[isa] independent chains of the
    tile's multiply-accumulate: vpdpbusd (512 or 256-bit), or for avx2
    vpmaddwd + vpaddd, whose int16 operand is the chain's own accumulator so
    that nothing is loop-invariant. Returns a value depending on every chain."""
    if not isinstance(tag, IsaType) or tag.isa not in PEAK_CHAINS:
        return None
    sig = types.int32(tag, n, seed)
    isa = tag.isa
    chains = PEAK_CHAINS[isa][0]

    def codegen(context, builder, sig, args):
        spec = _SPECS[isa]
        cnt = context.cast(builder, args[1], sig.args[1], types.intp)
        word = context.cast(builder, args[2], sig.args[2], types.int32)
        av = _splat_bytes(builder, word, spec.vbytes)
        bv = _splat_bytes(builder, builder.add(word, ir.Constant(_i32, 1)), spec.vbytes)
        acc_ty = spec.acc_ty if isa != "avx2" else _vec(_i32, 8)
        if isa == "avx2":  # chains start apart and non-zero (a zero chain would stay zero)
            start = builder.bitcast(av, acc_ty)
            accs = [cgutils.alloca_once_value(builder, builder.add(start, _splat(builder, ir.Constant(_i32, c), 8)))
                    for c in range(chains)]
        else:
            accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_ty, None)) for _ in range(chains)]
        b16 = builder.bitcast(bv, _vec(_i16, 16)) if isa == "avx2" else None
        with cgutils.for_range(builder, cnt):
            for acc in accs:
                v = builder.load(acc)
                if isa == "avx2":
                    prod = _call(builder, "llvm.x86.avx2.pmadd.wd", acc_ty,
                                 [builder.bitcast(v, _vec(_i16, 16)), b16])
                    builder.store(builder.add(v, prod), acc)
                else:
                    builder.store(spec.dot(builder, v, av, bv), acc)
        total = ir.Constant(_i32, 0)
        for acc in accs:
            lane = builder.extract_element(builder.load(acc), ir.Constant(_i32, 0))
            total = builder.add(total, lane)
        return total
    return sig, codegen
