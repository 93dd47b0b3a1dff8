"""Intel AMX (AMX-INT8) tiles for the GEMM's large blocks.

AMX has eight tile registers of up to 16 rows x 64 bytes and one instruction,
``tdpbusd``, that adds a (16 x 64 uint8) x (16 k-groups x 16 columns x 4 int8)
product into a 16 x 16 int32 tile: 16384 multiply-adds, against 64 for a
512-bit ``vpdpbusd``. Measured here (Xeon with AMX, one thread, 4 tiles in
flight): 6.4 TOP/s against 0.93 for the vpdpbusd.512 probe.

The packed B layout (pack.py) is already what ``tdpbusd`` reads: in a 64-column
block, k-group g holds 256 bytes [column][4 k], so 16 k-groups of 16 columns
are one tile of 16 rows x 64 bytes with a row stride of 256 bytes. A is uint8
rows, 64 k (16 k-groups) a tile row.

``block_s32`` computes 32 rows x one 64-column block as two halves of 2 x 2
int32 tiles (tmm0-3), with A in tmm4-5 and B in tmm6-7. It needs whole tiles in
K (k-groups a multiple of 16: ``K % 64 == 0``); a GEMM of fewer than 32 rows
configures tiles of its own row count, a larger one runs 32-row blocks and
gemm.py gives their row tail (and any other K) to the avx512 vpdpbusd tiles.

Linux hands AMX's tile state to a process only on request
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); ``os_permits`` asks
once, and dispatch.py offers the path only where the CPU has the features and
the request succeeded. Each thread loads the tile configuration (``configure``)
before its first tile and releases it after (``release``).
"""
import ctypes
import functools

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .rowops import call_llvm as _call

KERNEL_VERSION = "amx-2"

ROWS = 32          # rows of A one block_s32 covers (2 tiles of 16)
K_GROUPS = 16      # k-groups (64 k) per tile step
# fewest rows a GEMM gives AMX tiles: below, a tile's B load (1 KiB) feeds too few
# multiply-adds. 2 threads, linear 768x768: M=1 9.1 us on AMX against 8.0 on vpdpbusd,
# M=2 9.8 / 8.9, M=4 9.4 / 10.5, M=8 11.6 / 14.8
MIN_ROWS = 4

_i8, _i64 = ir.IntType(8), ir.IntType(64)
_void = ir.VoidType()

_SYS_ARCH_PRCTL = 158          # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@functools.cache
def os_permits():
    """True once the kernel has granted this process AMX tile data (asked once)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@njit(inline="always")
def suits(m, kg):
    """True if a GEMM of m rows and kg k-groups runs on AMX tiles (gemm._amx_rows): whole
    tiles in K, at least MIN_ROWS rows. The tile state is loaded exactly then."""
    return (kg % K_GROUPS == 0) & (m >= MIN_ROWS)  # no short circuit: inlined, no phi


def _byte_ptr(context, builder, ty, value, off):
    data = cgutils.create_struct_proxy(ty)(context, builder, value=value).data
    return builder.gep(builder.bitcast(data, _i8.as_pointer()), [off])


def _tiles(*args):
    return all(isinstance(a, types.IntegerLiteral) for a in args)


@intrinsic
def _ldtilecfg(typingctx, cfg):
    if not isinstance(cfg, types.Array):
        return None

    def codegen(context, builder, sig, args):
        p = _byte_ptr(context, builder, sig.args[0], args[0], ir.Constant(_i64, 0))
        _call(builder, "llvm.x86.ldtilecfg", _void, [p])
        return context.get_dummy_value()
    return types.void(cfg), codegen


@intrinsic
def release(typingctx):
    """tilerelease: hand the tile state back (the thread's AMX registers go idle)."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", _void, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _tilezero(typingctx, tile):
    if not _tiles(tile):
        return None
    t = tile.literal_value

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilezero", _void, [ir.Constant(_i8, t)])
        return context.get_dummy_value()
    return types.void(tile), codegen


def _tile_memory_op(llvm_name):
    """An intrinsic (tile, arr, off, stride) calling tileloadd64 or tilestored64: tile
    `tile` and the rows of 64 bytes of arr from byte off, rows stride bytes apart."""
    @intrinsic
    def op(typingctx, tile, arr, off, stride):
        if not (_tiles(tile) and isinstance(arr, types.Array)):
            return None
        t = tile.literal_value

        def codegen(context, builder, sig, args):
            o = context.cast(builder, args[2], sig.args[2], types.int64)
            s = context.cast(builder, args[3], sig.args[3], types.int64)
            p = _byte_ptr(context, builder, sig.args[1], args[1], o)
            _call(builder, llvm_name, _void, [ir.Constant(_i8, t), p, s])
            return context.get_dummy_value()
        return types.void(tile, arr, off, stride), codegen
    return op


_tileload = _tile_memory_op("llvm.x86.tileloadd64")     # tile <- memory
_tilestore = _tile_memory_op("llvm.x86.tilestored64")   # memory <- tile


@intrinsic
def _tdpbusd(typingctx, c, a, b):
    """tile c += tile a (uint8) x tile b (int8, VNNI order)."""
    if not _tiles(c, a, b):
        return None
    cv, av, bv = c.literal_value, a.literal_value, b.literal_value

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tdpbusd", _void, [ir.Constant(_i8, v) for v in (cv, av, bv)])
        return context.get_dummy_value()
    return types.void(c, a, b), codegen


@njit(inline="always")
def _tile_shape(cfg, tile, rows):
    """Tile `tile` of rows x 64 bytes in the configuration cfg (0 rows: unused)."""
    if rows > 0:
        cfg[16 + 2 * tile] = 64     # bytes per row (little-endian uint16)
        cfg[48 + tile] = rows


@njit
def configure(rows0, rows1):
    """Load the tile configuration (palette 1, 64-byte rows): C tiles 0-1 and A tile 4
    of rows0 rows, C tiles 2-3 and A tile 5 of rows1 (0: unused), B tiles 6-7 of 16.
    Whole blocks take 16 and 16; a GEMM of fewer than 32 rows takes its own rows."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    _tile_shape(cfg, 0, rows0)
    _tile_shape(cfg, 1, rows0)
    _tile_shape(cfg, 4, rows0)
    _tile_shape(cfg, 2, rows1)
    _tile_shape(cfg, 3, rows1)
    _tile_shape(cfg, 5, rows1)
    _tile_shape(cfg, 6, 16)
    _tile_shape(cfg, 7, 16)
    _ldtilecfg(cfg)


# byte offsets of a GEMM's A tile steps in a row: 64 k each (K up to 64 * 4096)
K_STEPS = np.arange(4096, dtype=np.int64) * 64


@njit(inline="always")
def block_s32(a, a_off, lda, b, b_off, kg, t, two):
    """t[r * 64 + c] = sum over k of A[r, k] * B[k, c] (int32), for the rows of A the
    configuration gives (uint8, from byte a_off, lda bytes a row; tiles 4 and, with two,
    5) and one 64-column block of packed B (int8, the block from byte b_off); kg, the
    block's k-groups, a multiple of 16. Two 32-column halves, each 2 x 2 int32 tiles
    (1 x 2 without two)."""
    block_s32_steps(a, a_off, lda, K_STEPS, b, b_off, kg, t, two)


@njit(inline="always")
def block_s32_steps(a, a_off, lda, steps, b, b_off, kg, t, two):
    """block_s32 with the A tile of k-step s (64 k) read from byte a_off + steps[s]
    instead of a_off + 64 * s: an implicit-GEMM convolution's taps, each a shifted
    window of the image's rows (conv_amx.py)."""
    step_b = K_GROUPS * 256
    for cs in range(0, 64, 32):
        _tilezero(0)
        _tilezero(1)
        if two:
            _tilezero(2)
            _tilezero(3)
        bo = b_off + 4 * cs
        for s in range(kg // K_GROUPS):
            ao = a_off + steps[s]
            _tileload(4, a, ao, lda)
            _tileload(6, b, bo + s * step_b, 256)
            _tileload(7, b, bo + s * step_b + 64, 256)
            _tdpbusd(0, 4, 6)
            _tdpbusd(1, 4, 7)
            if two:
                _tileload(5, a, ao + 16 * lda, lda)
                _tdpbusd(2, 5, 6)
                _tdpbusd(3, 5, 7)
        _tilestore(0, t, 4 * cs, 256)
        _tilestore(1, t, 4 * (cs + 16), 256)
        if two:
            _tilestore(2, t, 4 * (16 * 64 + cs), 256)
            _tilestore(3, t, 4 * (16 * 64 + cs + 16), 256)


PEAK_TILES = 4   # independent int32 tiles the probe keeps in flight


@njit
def peak_probe(n):
    """n steps of PEAK_TILES independent tdpbusd (16 x 16 x 64 multiply-adds each);
    returns a value of the last tile, so the work is not dead."""
    configure(16, 16)
    a = np.ones(2048, np.uint8)
    b = np.ones(2048, np.int8)
    t = np.zeros(256, np.int32)
    _tilezero(0)
    _tilezero(1)
    _tilezero(2)
    _tilezero(3)
    _tileload(4, a, 0, 64)
    _tileload(5, a, 1024, 64)
    _tileload(6, b, 0, 64)
    _tileload(7, b, 1024, 64)
    for _ in range(n):
        _tdpbusd(0, 4, 6)
        _tdpbusd(1, 4, 7)
        _tdpbusd(2, 5, 6)
        _tdpbusd(3, 5, 7)
    _tilestore(3, t, 0, 64)
    release()
    return t[0]


PEAK_OPS_PER_STEP = PEAK_TILES * 16 * 16 * 64 * 2
