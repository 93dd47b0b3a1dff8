"""Row reductions and raw-memory helpers for the kernels, as LLVM intrinsics.

    lo, hi = minmax_f32(x, off, n)          # min and max of x[off:off+n]
    mx = masked_max_f32(x, off, n, m, moff)  # max where the uint8 mask m is not 0
    f = quantize_u8(x, off, n, inv, zp, q, qoff) # q[qoff:qoff+n] = uint8 of x[off:off+n]; f: NaN if one is not finite
    absmax_cols(x, off, stride, rows, n, out)  # out[c] = max_r |x[off + r*stride + c]|
    prefetch(x, off)                         # cache hint for element off
    p = pointer(address, np.float32)         # an integer address as a typed pointer
    a = borrowed(a)                          # a view of a that does no reference counting

LLVM, as Numba drives it, turns a scalar min/max loop into an in-loop (per
iteration horizontal) reduction that runs at scalar speed, so the reductions
are written here as 16-lane llvm.minnum/maxnum with one horizontal step at the
end. NaN inputs give an undefined result. x must be contiguous from `off` on.
quantize_u8 is written out for the same reason: Numba's loop rounds, adds the
zero point and clamps in float32 (8 vector operations per 16 values); here the
rounding is the conversion to int32 itself (round to nearest even, as np.rint)
and the clamp a saturating narrow (5 operations), with identical results.
"""
import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

KERNEL_VERSION = "rowops-6"

_LANES = 16
_f32 = ir.FloatType()
_v16 = ir.VectorType(_f32, _LANES)
_i8, _i32 = ir.IntType(8), ir.IntType(32)


def _call(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    # no NaNs: lets the horizontal reductions be a shuffle tree, not a lane-by-lane chain
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args,
                        fastmath=("nnan", "nsz"))


class IntrinsicArgs:
    """Typed access to an intrinsic's array and integer arguments in its codegen.

        ar = IntrinsicArgs(context, builder, sig, args)
        ar.array(1).strides, ar.ptr(1, 2), ar.int(2), ar.cst(16)   # struct, data (+ offset arg 2), intp, constant
    """

    def __init__(self, context, builder, sig, args):
        self.c, self.b, self.tys, self.args = context, builder, sig.args, args
        self.intp = context.get_value_type(types.intp)

    def array(self, i):
        return cgutils.create_struct_proxy(self.tys[i])(self.c, self.b, value=self.args[i])

    def ptr(self, i, off=None):
        p = self.array(i).data
        return p if off is None else self.b.gep(p, [self.int(off)])

    def int(self, i):
        return self.c.cast(self.b, self.args[i], self.tys[i], types.intp)

    def cst(self, v):
        return ir.Constant(self.intp, v)


def call_llvm(builder, name, ret, args):
    """Call the LLVM intrinsic `name` returning type `ret` (no fast-math flags)."""
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


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


@intrinsic
def minmax_f32(typingctx, x, off, n):
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
def masked_max_f32(typingctx, x, off, n, m, moff):
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


def _emit_quantize(builder, v, inv, zp, lo, hi, suffix, out_ty=_i8):
    """clamp(lrint(v * inv) + zp, lo, hi) narrowed to out_ty (bytes, or 16-bit lanes),
    for a float or a float vector."""
    n = v.type.count if isinstance(v.type, ir.VectorType) else 0
    ity = ir.VectorType(_i32, n) if n else _i32
    i = call_llvm(builder, f"llvm.lrint.{suffix[0]}.{suffix[1]}", ity, [builder.fmul(v, inv)])
    i = call_llvm(builder, f"llvm.smax.{suffix[0]}", ity, [builder.add(i, zp), lo])
    i = call_llvm(builder, f"llvm.smin.{suffix[0]}", ity, [i, hi])
    return builder.trunc(i, ir.VectorType(out_ty, n) if n else out_ty)


def splat(builder, scalar, n):
    """An n-lane vector of the LLVM scalar value `scalar`."""
    v = builder.insert_element(ir.Constant(ir.VectorType(scalar.type, n), ir.Undefined), scalar,
                               ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), [0] * n))


@intrinsic
def quantize_u8(typingctx, x, off, n, inv, zp, q, qoff):
    """q[qoff + j] = clip(rint(x[off + j] * inv) + zp, 0, 255) for j < n: float32 x,
    uint8 q (or uint16 q, the AVX2 GEMM's A rows: the same values, widened), both
    contiguous from their offsets; inv float32, zp an integer in [0, 255].
    Exactly quantize.quantize_row's float formula (|x * inv| < 2**31).
    Returns the sum of x - x over the values (finite.py): 0, or NaN when one is NaN
    or +-inf, so the pass that quantizes an input also screens it. A caller that
    ignores it pays nothing: the sum is dead code once the intrinsic is inlined."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32
            and isinstance(q, types.Array) and q.dtype in (types.uint8, types.uint16)):
        return None
    out_ty = ir.IntType(q.dtype.bitwidth)
    sig = types.float32(x, off, n, types.float32, types.int32, q, qoff)

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        src = _array_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        dst = _array_ptr(context, builder, sig.args[5], args[5], sig.args[6], args[6])
        count = context.cast(builder, args[2], sig.args[2], types.intp)
        inv, zp = args[3], args[4]
        vi = ir.VectorType(_i32, _LANES)
        vb = ir.VectorType(out_ty, _LANES)
        lanes = (splat(builder, inv, _LANES), splat(builder, zp, _LANES),
                 ir.Constant(vi, [0] * _LANES), ir.Constant(vi, [255] * _LANES))
        # x - x, summed: no fast-math flags, so LLVM keeps it (it is not 0 for NaN and inf)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_v16, None))
        nvec = builder.udiv(count, ir.Constant(intp, _LANES))
        with cgutils.for_range(builder, nvec) as loop:
            i = builder.mul(loop.index, ir.Constant(intp, _LANES))
            v = builder.load(builder.bitcast(builder.gep(src, [i]), _v16.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fsub(v, v)), acc)
            b = _emit_quantize(builder, v, *lanes, ("v16i32", "v16f32"), out_ty)
            builder.store(b, builder.bitcast(builder.gep(dst, [i]), vb.as_pointer()), align=1)
        total = cgutils.alloca_once_value(
            builder, _call(builder, "llvm.vector.reduce.fadd.v16f32", _f32, [ir.Constant(_f32, 0.0),
                                                                             builder.load(acc)]))
        tail = builder.mul(nvec, ir.Constant(intp, _LANES))
        scalars = (inv, zp, ir.Constant(_i32, 0), ir.Constant(_i32, 255))
        with cgutils.for_range(builder, builder.sub(count, tail)) as loop:
            i = builder.add(tail, loop.index)
            v = builder.load(builder.gep(src, [i]))
            builder.store(builder.fadd(builder.load(total), builder.fsub(v, v)), total)
            b = _emit_quantize(builder, v, *scalars, ("i32", "f32"), out_ty)
            builder.store(b, builder.gep(dst, [i]))
        return builder.load(total)
    return sig, codegen


@intrinsic
def absmax_cols(typingctx, x, off, stride, rows, n, out):
    """out[c] = max(0, max over r < rows of |x[off + r * stride + c]|) for c < n:
    the per-column range of a block of float32 rows, 16 columns in registers at a
    time (a loop over out[c] in memory would chain every row through a store)."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32
            and isinstance(out, types.Array) and out.dtype == types.float32):
        return None
    sig = types.void(x, off, stride, rows, n, out)

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        base = _array_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        dst = _array_ptr(context, builder, sig.args[5], args[5], sig.args[4], ir.Constant(intp, 0))
        stride = context.cast(builder, args[2], sig.args[2], types.intp)
        nrows = context.cast(builder, args[3], sig.args[3], types.intp)
        count = context.cast(builder, args[4], sig.args[4], types.intp)

        def column_block(c0, ty, suffix):
            acc = cgutils.alloca_once_value(builder, ir.Constant(ty, None))
            with cgutils.for_range(builder, nrows) as rows:
                p = builder.gep(base, [builder.add(builder.mul(rows.index, stride), c0)])
                v = builder.load(builder.bitcast(p, ty.as_pointer()), align=4)
                a = _call(builder, f"llvm.fabs.{suffix}", ty, [v])
                builder.store(_call(builder, f"llvm.maxnum.{suffix}", ty, [builder.load(acc), a]), acc)
            builder.store(builder.load(acc), builder.bitcast(builder.gep(dst, [c0]), ty.as_pointer()),
                          align=4)
        nvec = builder.udiv(count, ir.Constant(intp, _LANES))
        with cgutils.for_range(builder, nvec) as blocks:
            column_block(builder.mul(blocks.index, ir.Constant(intp, _LANES)), _v16, "v16f32")
        tail = builder.mul(nvec, ir.Constant(intp, _LANES))
        with cgutils.for_range(builder, builder.sub(count, tail)) as cols:
            column_block(builder.add(tail, cols.index), _f32, "f32")
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def prefetch(typingctx, x, off):
    """Hint the cache line holding element `off` of x's data into L2 (prefetcht1)."""
    if not isinstance(x, types.Array):
        return None
    sig = types.void(x, off)

    def codegen(context, builder, sig, args):
        p = _array_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        emit_prefetch(builder, p, write=False, locality=2)
        return context.get_dummy_value()
    return sig, codegen


def emit_prefetch(builder, ptr, write, locality):
    """A cache hint (llvm.prefetch, data cache) for the line holding *ptr; for writing
    asks for the line owned. locality 3 keeps it in L1, 2 in L2."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, int(write)), ir.Constant(i32, locality),
                      ir.Constant(i32, 1)])



@intrinsic
def pointer(typingctx, addr, dtype):
    """The address `addr` (an int) as a pointer to `dtype`."""
    if not isinstance(dtype, types.NumberClass):
        return None
    sig = types.CPointer(dtype.dtype)(addr, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
    return sig, codegen


@intrinsic
def borrowed(typingctx, a):
    """A view of array a without its memory owner, so that passing it on (to an inlined
    function, whose argument copies Numba counts with atomic increments and decrements
    on the owner's count) costs nothing. Only for an array the caller keeps alive for
    as long as the view is used, such as a function's own argument: Numba frees a
    local array after its last use, and the view does not count as a use."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        view = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()
    return a(a), codegen
