"""bf16 linear: y = act(bf16(x) @ bf16(W)^T + bias) (+ residual), fp32 accumulation.

    >>> pw = pack_bf16(w)                                # w float32 (N, K): rounded to bf16 once
    >>> y = linear_bf16_f32(x, pw, bias, act="gelu")     # x float32 (..., K)

bf16(.) is round to nearest even (torch's .to(torch.bfloat16), vcvtneps2bf16; a NaN becomes
the quiet NaN 0x7fc0). The activations are rounded on every path, whatever the CPU, so a
model's accuracy does not depend on the machine; only the order of the fp32 sums differs
between paths (the avx2 path uses fused multiply-adds, the portable one does not).

Packed layout: columns in blocks of COLS = 16 (N padded with zero columns), a block holds
K steps of 16 uint16 (the bf16 bits), the order the tile streams them. Inside a step, 32-bit
lane j holds column j in its low half and column 8 + j in its high half: one 32-byte load
gives both halves as fp32 vectors with one shift (lane << 16: columns 0..7) and one mask
(lane & 0xffff0000: columns 8..15), the widening the CPU would otherwise do with
zero-extension and a shift.

AVX2 path (bf16_tile): mr rows x nv blocks of 16 columns, 2 * mr * nv ymm accumulators
(at most 12 of the 16 registers): 6 x 16 for many rows, 1 x 64 at M = 1 (four weight
streams, eight independent FMA chains, so the weight stream is the limit: half the bytes
of an fp32 linear), 2 x 32 at M = 2. Column blocks split over the threads from shared counters as int4.py.
The portable path runs the same layout in plain loops.
"""
import llvmlite.ir as ir
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from . import dispatch as _dispatch
from .dispatch import KernelError
from .epilogue import _bits_to_f32, store_float_tile
from .gemm import _COUNTER_STRIDE, _count_add, _starts
from .linear import bound_constants, call_arrays, get_num_threads, on_rows
from .rowops import IntrinsicArgs, borrowed, call_llvm

KERNEL_VERSION = "bf16-1"
COLS = 16            # columns of a packed block
PARALLEL_MIN_MACS = 1 << 18      # as linear.py: below this a thread launch costs more than it saves
PARALLEL_PREP = 1 << 16          # activation elements from which the threads round the rows too
_F0 = np.float32(0)
_NO_SCALE = np.empty(0, np.float32)     # store_float_tile: no row scale
_i16, _i32, _f32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


# --- bf16 rounding and packing (numpy) ------------------------------------------------

def to_bf16_bits(x) -> np.ndarray:
    """uint16 bf16 bits of float32 x, round to nearest even; NaN -> 0x7fc0."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint16(0x7FC0), r)


def from_bf16_bits(b) -> np.ndarray:
    return (np.asarray(b, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class PackedBf16:
    """bf16 weights in the tile's layout: data uint16 (ceil(N / 16) * K * 16,), n, k."""
    __slots__ = ("data", "n", "k")

    def __init__(self, data, n, k):
        n, k = int(n), int(k)
        if n < 1 or k < 1:
            raise KernelError(f"PackedBf16: n and k must be positive, got n={n}, k={k}")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint16 and data.ndim == 1
                and data.flags.c_contiguous and data.shape[0] == packed_size(n, k)):
            raise KernelError(f"PackedBf16: data must be C-contiguous uint16 of {packed_size(n, k)} elements "
                              f"for n={n}, k={k} (N padded to {COLS}), got "
                              f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
        self.data, self.n, self.k = data, n, k

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def packed_size(n: int, k: int) -> int:
    return -(-n // COLS) * COLS * k


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """The packed uint16 layout of a (N, K) matrix of bf16 bits."""
    n, k = bits.shape
    nb = -(-n // COLS)
    full = np.zeros((nb * COLS, k), np.uint16)
    full[:n] = bits
    blocks = full.reshape(nb, 2, 8, k)                    # [block, half, lane, k]
    return np.ascontiguousarray(blocks.transpose(0, 3, 2, 1)).reshape(-1)   # [block, k, lane, half]


def pack_bf16(w) -> PackedBf16:
    """Round float32 weights (N, K) to bf16 and pack them."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype != np.float32:
        raise KernelError(f"pack_bf16: weights must be a 2-D float32 array (N, K), got {w.dtype} {w.shape}")
    return PackedBf16(pack_bits(to_bf16_bits(w)), w.shape[0], w.shape[1])


def unpack_bits(pw: PackedBf16) -> np.ndarray:
    """The (N, K) bf16 bits of packed weights (pack_bits undone)."""
    nb = -(-pw.n // COLS)
    blocks = pw.data.reshape(nb, pw.k, 8, 2).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(blocks.reshape(nb * COLS, pw.k)[:pw.n])


# --- the tile -------------------------------------------------------------------------

@intrinsic(prefer_literal=True)
def bf16_tile(typingctx, mr, nv, a, m0, w, w_off, bstride, k, f):
    """f[r * 16nv + 16v + c] = sum_k a[m0 + r, k] * W(block v)[k, c] (fp32 FMAs in k order) for
    rows m0..m0+mr-1 of a (float32, C-contiguous, already bf16) and nv blocks of w (uint16)
    starting at element w_off, bstride elements apart."""
    if not (isinstance(mr, types.IntegerLiteral) and isinstance(nv, types.IntegerLiteral)):
        return None
    sig = types.void(mr, nv, a, m0, w, w_off, bstride, k, f)
    nrows, nvec = mr.literal_value, nv.literal_value

    def codegen(context, builder, sig, args):
        ar = IntrinsicArgs(context, builder, sig, args)
        arr, num, cst = ar.array, ar.int, ar.cst
        v8i, v8f = ir.VectorType(_i32, 8), ir.VectorType(_f32, 8)
        a_st = arr(2)
        lda = builder.extract_value(a_st.strides, 0)
        a_bytes = builder.bitcast(a_st.data, ir.IntType(8).as_pointer())
        rows = [builder.bitcast(builder.gep(a_bytes, [builder.mul(builder.add(num(3), cst(r)), lda)]),
                                _f32.as_pointer()) for r in range(nrows)]
        wbase = builder.gep(arr(4).data, [num(5)])
        bstride = num(6)
        streams = [builder.gep(wbase, [builder.mul(bstride, cst(v))]) for v in range(nvec)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, None)) for _ in range(2 * nvec)]
                for _ in range(nrows)]
        shift = ir.Constant(v8i, [16] * 8)
        high = ir.Constant(v8i, [-65536] * 8)        # 0xffff0000
        with cgutils.for_range(builder, num(7)) as loop:
            kk = loop.index
            halves = []
            for v in range(nvec):
                p = builder.bitcast(builder.gep(streams[v], [builder.mul(kk, cst(COLS))]), v8i.as_pointer())
                lanes = builder.load(p, align=2)
                halves.append(builder.bitcast(builder.shl(lanes, shift), v8f))
                halves.append(builder.bitcast(builder.and_(lanes, high), v8f))
            for r in range(nrows):
                xv = builder.load(builder.gep(rows[r], [kk]))
                vec = builder.insert_element(ir.Constant(v8f, None), xv, ir.Constant(_i32, 0))
                xb = builder.shuffle_vector(vec, vec, ir.Constant(v8i, [0] * 8))
                for j, wv in enumerate(halves):
                    acc = accs[r][j]
                    builder.store(call_llvm(builder, "llvm.fma.v8f32", v8f, [xb, wv, builder.load(acc)]), acc)
        f_p = arr(8).data
        for r in range(nrows):
            for j in range(2 * nvec):
                dst = builder.bitcast(builder.gep(f_p, [cst(r * COLS * nvec + 8 * j)]), v8f.as_pointer())
                builder.store(builder.load(accs[r][j]), dst, align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit
def _tile_portable(mr, nv, a, m0, w, w_off, bstride, k, f):
    """bf16_tile in plain loops (any CPU): the same products, multiply then add."""
    width = nv * COLS
    for r in range(mr):
        for c in range(width):
            f[r * width + c] = _F0
    for v in range(nv):
        base = w_off + v * bstride
        for r in range(mr):
            i = m0 + r
            o = r * width + v * COLS
            for kk in range(k):
                x = a[i, kk]
                s = base + kk * COLS
                for j in range(8):
                    lanes = np.uint32(w[s + 2 * j]) | (np.uint32(w[s + 2 * j + 1]) << np.uint32(16))
                    lo = _bits_to_f32(lanes << np.uint32(16))
                    hi = _bits_to_f32(lanes & np.uint32(0xFFFF0000))
                    f[o + j] = f[o + j] + x * lo
                    f[o + 8 + j] = f[o + 8 + j] + x * hi


@njit(inline="always")
def _tile(simd, mr, nv, a, m0, w, w_off, bstride, k, f):
    if not simd:
        _tile_portable(mr, nv, a, m0, w, w_off, bstride, k, f)
    elif nv == 4:
        bf16_tile(1, 4, a, m0, w, w_off, bstride, k, f)
    elif nv == 2:
        bf16_tile(2, 2, a, m0, w, w_off, bstride, k, f)
    elif mr == 6:
        bf16_tile(6, 1, a, m0, w, w_off, bstride, k, f)
    elif mr == 5:
        bf16_tile(5, 1, a, m0, w, w_off, bstride, k, f)
    elif mr == 4:
        bf16_tile(4, 1, a, m0, w, w_off, bstride, k, f)
    elif mr == 3:
        bf16_tile(3, 1, a, m0, w, w_off, bstride, k, f)
    elif mr == 2:
        bf16_tile(2, 1, a, m0, w, w_off, bstride, k, f)
    else:
        bf16_tile(1, 1, a, m0, w, w_off, bstride, k, f)


# blocks per tile by M: M = 1 and 2 take all rows and several blocks (more independent FMA
# chains per weight load: 1 x 64, 2 x 32), more rows take 6 x 16 tiles. Accumulators, the
# widened weights and the broadcast row values must fit the 16 ymm registers: a 2 x 48 tile
# (12 + 6 + 1) spilled in every k step.
_NV = (1, 4, 2)
MR = 6
JOB_BLOCKS = 2       # blocks a worker takes from the shared counter at once (M > 2)
CHUNK_BYTES = 384 << 10   # activation rows a job keeps in L2 (Zen 3: 512 KiB a core); past it each
                          # column block would stream every row again (3 MiB at BERT-base 8 x 128)
TILE_F = 96          # float32 scratch of the largest tile (6 x 16; 1 x 64, 2 x 32)


@njit(inline="always")
def _span(simd, nb0, nb1, r0, r1, nv, a, w, bias, res, ep, out, f, y):
    """Output column blocks nb0..nb1-1 for rows r0..r1-1 of a (nv blocks a tile where they fit)."""
    m, n, k = r1 - r0, out.shape[1], a.shape[1]
    bstride = k * COLS
    nb = nb0
    while nb < nb1:
        span = nv if nb + nv <= nb1 else 1
        n0 = nb * COLS
        ncols = min(span * COLS, n - n0)
        rt = m if span > 1 else MR
        for m0 in range(r0, r1, rt):
            mr = min(rt, r1 - m0)
            _tile(simd, mr, span, a, m0, w, nb * bstride, bstride, k, f)
            store_float_tile(mr, m0, n0, ncols, f, span * COLS, _NO_SCALE, bias, res, ep, out, y)
        nb += span


@njit(inline="always")
def _round_rows(x, a, i0, i1):
    """a[i0:i1] = bf16(x[i0:i1]) as float32 (round to nearest even; NaN -> quiet NaN)."""
    xu, au = x.view(np.uint32), a.view(np.uint32)
    for i in range(i0, i1):
        for c in range(x.shape[1]):
            u = xu[i, c]
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                au[i, c] = np.uint32(0x7FC00000)
            else:
                au[i, c] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)


@njit(inline="always")
def _worker(simd, wk, threads, nxt, njobs, jb, nv, nblocks, mc, a, w, bias, res, ep, out):
    """Worker wk's jobs (jb blocks of one chunk of mc rows each, row chunk major), then what is
    left of the others' (as int4._worker)."""
    a, w, bias, res, ep, out = borrowed(a), borrowed(w), borrowed(bias), borrowed(res), borrowed(ep), borrowed(out)
    f, y = np.empty(TILE_F, np.float32), np.empty((1, 4 * COLS), np.float32)
    for v in range(threads):
        owner = (wk + v) % threads
        hi = (owner + 1) * njobs // threads
        while True:
            j = _count_add(nxt, owner * _COUNTER_STRIDE, 1)
            if j >= hi:
                break
            per_chunk = (nblocks + jb - 1) // jb
            c, r = j % per_chunk, j // per_chunk * mc
            _span(simd, c * jb, min(nblocks, (c + 1) * jb), r, min(a.shape[0], r + mc), nv, a, w, bias, res, ep,
                  out, f, y)


def _entries(simd):
    """Serial and threaded entries of one path (simd: the AVX2 intrinsic, else plain loops)."""
    @njit(cache=CACHE)
    def serial(x, w, bias, res, ep, out, mc, threads):
        m = x.shape[0]
        a = np.empty(x.shape, np.float32)
        _round_rows(x, a, 0, m)
        f, y = np.empty(TILE_F, np.float32), np.empty((1, 4 * COLS), np.float32)
        nv = _NV[m] if m < len(_NV) else 1
        for r in range(0, m, mc):
            _span(simd, 0, (out.shape[1] + COLS - 1) // COLS, r, min(m, r + mc), nv, a, w, bias, res, ep, out, f, y)

    @njit(cache=CACHE, parallel=True)
    def parallel(x, w, bias, res, ep, out, mc, threads):
        m = x.shape[0]
        a = np.empty(x.shape, np.float32)
        if x.size >= PARALLEL_PREP:
            for t in prange(threads):
                _round_rows(x, a, t * m // threads, (t + 1) * m // threads)
        else:                                  # a few rows: not worth a launch of their own
            _round_rows(x, a, 0, m)
        nv = _NV[m] if m < len(_NV) else 1
        jb = nv if nv > 1 else JOB_BLOCKS
        nblocks = (out.shape[1] + COLS - 1) // COLS
        njobs = (nblocks + jb - 1) // jb * ((m + mc - 1) // mc)
        nxt = _starts(njobs, threads)
        for wk in prange(threads):
            _worker(simd, wk, threads, nxt, njobs, jb, nv, nblocks, mc, a, w, bias, res, ep, out)
    return serial, parallel


ENTRIES = {True: _entries(True), False: _entries(False)}


# --- numpy entry points --------------------------------------------------------------

def _check_packed(pw):
    if not isinstance(pw, PackedBf16):
        raise KernelError("weights must be a PackedBf16 from pack_bf16")


def _run(pw, x, bias, res, ep, out, n_threads):
    serial, parallel = ENTRIES[_dispatch._current[0] != "portable"]
    threads = n_threads or get_num_threads()
    m = out.shape[0]
    # rows per chunk: a chunk's bf16-rounded rows stay in L2 while its column blocks pass
    mc = m if m < len(_NV) else max(MR, min(m, CHUNK_BYTES // (4 * pw.k)) // MR * MR)
    if threads > 1 and m * pw.n * pw.k >= PARALLEL_MIN_MACS:
        parallel(x, pw.data, bias, res, ep, out, mc, threads)
    else:
        serial(x, pw.data, bias, res, ep, out, mc, 1)
    return out


def linear_bf16_f32(x, pw, bias=None, act="none", act_args=(), n_threads=None, residual=None):
    """y = act(bf16(x) @ bf16(W).T + bias) (+ residual), x float32 (..., K).

        >>> y = linear_bf16_f32(x, pack_bf16(w), bias, act="relu")
    """
    _check_packed(pw)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise KernelError(f"linear_bf16_f32: x must be float32, got {x.dtype} (cast it with .astype(np.float32))")
    x = np.ascontiguousarray(x)
    return on_rows("linear_bf16_f32", x, pw.k, pw.n, lambda: bind_linear_bf16(pw, bias, act, act_args),
                   residual, n_threads)


def bind_linear_bf16(pw, bias=None, act="none", act_args=(), a_scale=0.0, a_zero_point=0,
                     out_scale=0.0, out_zero_point=0):
    """bind_linear (linear.py) for PackedBf16 weights: the same arguments and the same
    call(x, out=None, residual=None, n_threads=None) -> out. x is float32 (rounded to bf16
    here, never quantized: a_scale must be 0); out_scale > 0 gives uint8 output for a next
    int8 op, as bind_linear.

        >>> call = bind_linear_bf16(pw, bias, act="gelu")
        >>> y = call(x)
    """
    _check_packed(pw)
    if a_scale != 0:
        raise KernelError(f"bind_linear_bf16: a_scale={a_scale}: the bf16 linear rounds float32 activations "
                          f"to bf16 and takes no quantized input; bind it with a_scale=0")
    n, k = pw.n, pw.k
    b, ep, out_dtype, static, chained_out = bound_constants(n, bias, act, act_args, 0.0, 0,
                                                            out_scale, out_zero_point)

    def call(x, out=None, residual=None, n_threads=None):
        if type(x) is np.ndarray and x.dtype != np.float32:
            raise KernelError(f"bind_linear_bf16: x must be float32 (M, {k}), got {x.dtype}")
        xf, _, out, res = call_arrays("bind_linear_bf16", x, k, n, static, chained_out, out_dtype, out, residual)
        if x.shape[0] == 0:
            return out
        return _run(pw, xf, b, res, ep, out, n_threads)
    return call
