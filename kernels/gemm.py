"""uint8 x packed int8 GEMM with int32 accumulation and fused epilogues.

Work is split into jobs of (one 64-column block of B) x (a chunk of rows
of A). A job walks its rows in tiles of MR (isa_geometry) and computes
each MR x 64 int32 tile with the ISA's intrinsic: for float and uint8
output it finishes the tile in registers (simd.tile_f32, simd.tile_u8),
else it stores it (simd.tile_s32) into a small L1-resident buffer and
immediately runs the epilogue on it (epilogue.py); either way the int32
result never goes to memory. Jobs run serially or over Numba's thread
pool (prange), one entry pair per ISA below, each bound to its ISA by a
compile-time IsaTag constant.
"""
import numpy as np
import llvmlite.ir as ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .epilogue import (EP_ACT, EP_P0, EP_P1, EP_RES_FIRST, add_residual_rows, apply_activation, in_registers,
                       store_tile_f32, store_tile_s32, store_tile_u8)
from . import amx
from .rowops import borrowed, call_llvm, prefetch
from .quantize import quantize_rows_range
from .simd import (A_DTYPES, AMX_ISAS, BLOCK_COLS, GEOMETRY, GROUP_BYTES, TAGS, is_portable, isa_geometry, tile_f32,
                   tile_f32_half, tile_u8, tile_u8_half, tile_u8_quarter, HALF_COLS, QUARTER_COLS, staged_f32,
                   staged_u8, tile_s32, tile_s32_quarter)

KERNEL_VERSION = "gemm-24"


def _s32_dispatch(tile):
    """A call of the int32 tile intrinsic `tile` (tile_s32, tile_s32_quarter) for a run-time
    row count mr: the intrinsic needs mr as a literal, one specialization per count."""
    @njit(inline="always")
    def dispatch(tag, mr, a, a_off, lda, b, b_off, kg, t, t_off):
        if mr == 6:
            tile(tag, 6, a, a_off, lda, b, b_off, kg, t, t_off, BLOCK_COLS)
        elif mr == 5:
            tile(tag, 5, a, a_off, lda, b, b_off, kg, t, t_off, BLOCK_COLS)
        elif mr == 4:
            tile(tag, 4, a, a_off, lda, b, b_off, kg, t, t_off, BLOCK_COLS)
        elif mr == 3:
            tile(tag, 3, a, a_off, lda, b, b_off, kg, t, t_off, BLOCK_COLS)
        elif mr == 2:
            tile(tag, 2, a, a_off, lda, b, b_off, kg, t, t_off, BLOCK_COLS)
        else:
            tile(tag, 1, a, a_off, lda, b, b_off, kg, t, t_off, BLOCK_COLS)
    return dispatch


_tile = _s32_dispatch(tile_s32)
_tile_quarter = _s32_dispatch(tile_s32_quarter)


def _tile_dispatch(tile):
    """A call of the tile intrinsic `tile` (tile_f32, tile_u8 or their half tiles) for a
    run-time row count mr: the intrinsic needs mr as a literal, one specialization per
    count. e0, e1: the tile's last two arguments (the residual and the parameter vector ep)."""
    @njit(inline="always")
    def dispatch(tag, mr, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0,
                 ascale, azp, m0, out, act, p0, p1, e0, e1):
        if mr == 6:
            tile(tag, 6, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0, ascale, azp, m0, out,
                 act, p0, p1, e0, e1)
        elif mr == 5:
            tile(tag, 5, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0, ascale, azp, m0, out,
                 act, p0, p1, e0, e1)
        elif mr == 4:
            tile(tag, 4, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0, ascale, azp, m0, out,
                 act, p0, p1, e0, e1)
        elif mr == 3:
            tile(tag, 3, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0, ascale, azp, m0, out,
                 act, p0, p1, e0, e1)
        elif mr == 2:
            tile(tag, 2, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0, ascale, azp, m0, out,
                 act, p0, p1, e0, e1)
        else:
            tile(tag, 1, a, a_off, lda, b, b_off, kg, colsum, wscale, bias, n0, ascale, azp, m0, out,
                 act, p0, p1, e0, e1)
    return dispatch


_tile_f32 = _tile_dispatch(tile_f32)
_tile_f32_half = _tile_dispatch(tile_f32_half)  # the half-width tile (simd.HALF_COLS)
_tile_u8 = _tile_dispatch(tile_u8)
_tile_u8_half = _tile_dispatch(tile_u8_half)
_tile_u8_quarter = _tile_dispatch(tile_u8_quarter)


@njit
def _tile_portable(mr, ncols, a, m0, b, boff, kg, t):
    for r in range(mr):
        for j in range(ncols):
            t[r * BLOCK_COLS + j] = 0
        for g in range(kg):
            a0 = np.int32(a[m0 + r, 4 * g])
            a1 = np.int32(a[m0 + r, 4 * g + 1])
            a2 = np.int32(a[m0 + r, 4 * g + 2])
            a3 = np.int32(a[m0 + r, 4 * g + 3])
            base = boff + g * GROUP_BYTES
            for j in range(ncols):
                p = base + 4 * j
                t[r * BLOCK_COLS + j] += (a0 * b[p] + a1 * b[p + 1]
                                          + a2 * b[p + 2] + a3 * b[p + 3])


@njit(inline="always")
def _tiles_s32(tag, mr, m0, ncols, aq, bp, boff, kg, t):
    """int32 tile of rows m0.. and the block's first ncols columns into t."""
    if is_portable(tag):
        _tile_portable(mr, ncols, aq, m0, bp, boff, kg, t)
    else:
        tc, lda = isa_geometry(tag)[1], aq.shape[1]
        for cs in range(0, ncols, tc):
            if ncols - cs <= _quarter_cols(tag):    # a tail of at most a quarter tile
                _tile_quarter(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * cs, kg, t, cs)
            else:
                _tile(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * cs, kg, t, cs)


def _quarter_cols(tag):
    raise NotImplementedError  # compiled through the overload below


@overload(_quarter_cols, inline="always")
def _quarter_cols_impl(tag):
    cols = QUARTER_COLS.get(tag.isa, 0)
    return lambda tag: cols


def _is_float32(a):
    raise NotImplementedError  # compiled through the overload below


@overload(_is_float32, inline="always")
def _is_float32_impl(a):
    flag = a.dtype == types.float32
    return lambda a: flag


def _finished_in_registers(a):
    raise NotImplementedError  # compiled through the overload below


@overload(_finished_in_registers, inline="always")
def _finished_in_registers_impl(a):
    """True for the output types whose whole tiles _register_tile finishes: float32, uint8."""
    flag = a.dtype in (types.float32, types.uint8)
    return lambda a: flag


def _register_tile(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale,
                   bias, res, ep, out):
    raise NotImplementedError  # compiled through the overload below


@overload(_register_tile, inline="always")
def _register_tile_impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale,
                        bias, res, ep, out):
    """The first `width` columns (register_width) of a block, float or uint8 output, an
    activation done in registers (none, relu, clamp, erf GELU, SiLU): dequantized, activated and
    the fused residual added (tile_f32) or requantized (tile_u8) in registers, the int32
    tile never stored. The hot path, kept apart from the tail
    and int32-staging code of _compute and from _stored_tile's path: with either in
    the same loop body, though never run, a tile cost ~240 cycles more on Zen 4, and
    an AVX2 tile at K=64 ran 1.5x slower on Zen 3. (Adding the residual to the stored
    tile instead cost ~600 cycles a tile: the reloads wait on the stores.)"""
    if out.dtype == types.uint8:
        half, quarter = HALF_COLS.get(tag.isa, 0), QUARTER_COLS.get(tag.isa, 0)

        def impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale, bias, res, ep,
                 out):
            act = np.int32(ep[EP_ACT])
            tc, lda = isa_geometry(tag)[1], aq.shape[1]
            full = width - width % tc
            for cs in range(0, full, tc):
                _tile_u8(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * cs, kg, colsum, wscale, bias,
                         n0 + cs, ascale, azp, m0, out, act, ep[EP_P0], ep[EP_P1], res, ep)
            if width - full >= half > 0:  # a half tile, then a quarter tile (register_width)
                _tile_u8_half(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * full, kg, colsum, wscale,
                              bias, n0 + full, ascale, azp, m0, out, act, ep[EP_P0], ep[EP_P1], res, ep)
                full += half
            if width - full >= quarter > 0:
                _tile_u8_quarter(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * full, kg, colsum, wscale,
                                 bias, n0 + full, ascale, azp, m0, out, act, ep[EP_P0], ep[EP_P1], res, ep)
        return impl
    if out.dtype != types.float32:
        def impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale, bias, res, ep,
                 out):
            pass  # never called: _job_into routes other outputs to _compute
        return impl

    def impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale, bias, res, ep, out):
        _prefetch_residual(res, mr, m0, n0, width)
        act = np.int32(ep[EP_ACT])
        tc, lda = isa_geometry(tag)[1], aq.shape[1]
        full = width - width % tc
        for cs in range(0, full, tc):
            _tile_f32(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * cs, kg, colsum, wscale, bias,
                      n0 + cs, ascale, azp, m0, out, act, ep[EP_P0], ep[EP_P1], res, ep)
        if full < width:  # a half tile (register_width)
            _tile_f32_half(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * full, kg, colsum, wscale,
                           bias, n0 + full, ascale, azp, m0, out, act, ep[EP_P0], ep[EP_P1], res, ep)
    return impl


@njit(inline="always")
def _prefetch_residual(res, mr, m0, n0, width):
    """Ask for a tile's residual rows (if any), so they arrive while the K loop runs."""
    if res.shape[0] > 0:
        step = 64 // res.itemsize
        for r in range(mr):
            for line in range(0, width, step):
                prefetch(res, (m0 + r) * res.shape[1] + n0 + line)


def register_width(tag, ncols, out):
    raise NotImplementedError  # compiled through the overload below


@overload(register_width, inline="always")
def _register_width_impl(tag, ncols, out):
    """Columns of a block _register_tile does: whole tiles, plus a half tile (HALF_COLS)
    where the ISA has one and the tail holds it, then for uint8 out a quarter tile
    (QUARTER_COLS) likewise; the rest is staged (_compute). On avx512 a 32-column block
    (a conv with 32 channels) staged ran at 305 GOP/s against 788 for 64 columns
    (4096x288, 2 threads, Zen 5)."""
    half = HALF_COLS.get(tag.isa, 0)
    quarter = QUARTER_COLS.get(tag.isa, 0) if out.dtype == types.uint8 else 0
    tc = GEOMETRY[tag.isa][1]

    def impl(tag, ncols, out):
        width = ncols - ncols % tc
        if half and ncols - width >= half:
            width += half
        if quarter and ncols - width >= quarter:
            width += quarter
        return width
    return impl


def _stored_tile(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale,
                 bias, res, ep, out):
    raise NotImplementedError  # compiled through the overload below


@overload(_stored_tile, inline="always")
def _stored_tile_impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale,
                      bias, res, ep, out):
    """The first `width` columns (whole tiles) of a block, float output, activation tanh
    GELU: it runs on the stored tile, between the residual's two places."""
    if out.dtype != types.float32:
        def impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale, bias, res, ep,
                 out):
            pass  # never called: _job_into routes other outputs to _compute
        return impl

    def impl(tag, mr, m0, n0, width, aq, bp, boff, kg, colsum, ascale, azp, wscale, bias, res, ep, out):
        act = np.int32(ep[EP_ACT])
        first = ep[EP_RES_FIRST] != 0  # act(y + res), else act(y) + res
        tc, lda = isa_geometry(tag)[1], aq.shape[1]
        for cs in range(0, width, tc):
            _tile_f32(tag, mr, aq, m0 * lda, lda, bp, boff + 4 * cs, kg, colsum, wscale, bias,
                      n0 + cs, ascale, azp, m0, out, 0, ep[EP_P0], ep[EP_P1],
                      res if first else res[:0], ep)
        for r in range(mr):
            apply_activation(out, m0 + r, n0, width, act, ep[EP_P0], ep[EP_P1])
        if res.shape[0] > 0 and not first:
            add_residual_rows(out, res, m0, mr, n0, width, 0, ep)
    return impl


def _staged(mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
    raise NotImplementedError  # compiled through the overload below


@overload(_staged, inline="always")
def _staged_impl(mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
    """The epilogue of an int32 tile staged in t (mr rows of BLOCK_COLS) into out's
    rows m0.. and columns n0..n0+ncols, by out's type."""
    if out.dtype == types.float32:
        def impl(mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
            act = np.int32(ep[EP_ACT])
            has_res = res.shape[0] > 0
            pre = has_res and ep[EP_RES_FIRST] != 0  # the activation waits for the residual
            store_tile_f32(t, BLOCK_COLS, mr, m0, n0, ncols, colsum, ascale, azp,
                           wscale, bias, ep, 0 if pre else act, out)
            if has_res:
                add_residual_rows(out, res, m0, mr, n0, ncols, act if pre else 0, ep)
    elif out.dtype == types.uint8:
        def impl(mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
            store_tile_u8(t, BLOCK_COLS, mr, m0, n0, ncols, colsum, ascale, azp,
                          wscale, bias, res, ep, out, y)
    elif out.dtype == types.int32:
        def impl(mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
            store_tile_s32(t, BLOCK_COLS, mr, m0, n0, ncols, out)
    else:
        return None
    return impl


@njit(inline="always")
def _compute(tag, mr, m0, n0, ncols, aq, bp, boff, kg, colsum, ascale, azp, wscale,
             bias, res, ep, out, t, y):
    """Column tails, no bias vector, int32 output, uint8 output with tanh GELU (not
    epilogue.in_registers), the portable ISA (whole tiles with float output take
    _register_tile / _stored_tile, with uint8 output _register_tile): the int32 tile
    staged in t."""
    _tiles_s32(tag, mr, m0, ncols, aq, bp, boff, kg, t)
    _staged(mr, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y)


def _amx_rows(tag, m_start, m_end, n0, ncols, aq, bp, boff, kg, colsum, ascale, azp, wscale,
              bias, res, ep, out, t, y):
    raise NotImplementedError  # compiled through the overload below


@overload(_amx_rows, inline="always")
def _amx_rows_impl(tag, m_start, m_end, n0, ncols, aq, bp, boff, kg, colsum, ascale, azp, wscale,
                   bias, res, ep, out, t, y):
    """On an AMX path, rows m_start.. of a block in AMX blocks (amx.block_s32) of 32 rows,
    or, in a GEMM of amx.MIN_ROWS to 31 rows, one block of all of them; each staged in t
    and finished by _amx_epilogue. Returns the first row left for the vpdpbusd tiles
    (m_start itself on other paths, when K is not whole AMX tiles, or under MIN_ROWS)."""
    if tag.isa not in AMX_ISAS:
        return lambda tag, m_start, m_end, n0, ncols, aq, bp, boff, kg, colsum, ascale, azp, \
            wscale, bias, res, ep, out, t, y: m_start
    any_width = out.dtype != types.uint8      # float and int32 out: narrow blocks stay on AMX too

    def impl(tag, m_start, m_end, n0, ncols, aq, bp, boff, kg, colsum, ascale, azp, wscale, bias,
             res, ep, out, t, y):
        m_amx = m_start
        lda = aq.shape[1]
        suits = amx.suits(aq.shape[0], kg) & ((ncols == BLOCK_COLS) | (kg > NARROW_VNNI_KG) | any_width)
        if suits & (aq.shape[0] < amx.ROWS):
            # tiles of the GEMM's own rows (_tile_state): all of them one block
            amx.block_s32(aq, m_start * lda, lda, bp, boff, kg, t, m_end - m_start > 16)
            _amx_epilogue(tag, m_start, m_end - m_start, n0, ncols, colsum, ascale, azp, wscale, bias,
                          res, ep, out, t, y)
            m_amx = m_end
        elif suits:
            m_amx = m_start + (m_end - m_start) // amx.ROWS * amx.ROWS
            for m0 in range(m_start, m_amx, amx.ROWS):
                amx.block_s32(aq, m0 * lda, lda, bp, boff, kg, t, True)
                _amx_epilogue(tag, m0, amx.ROWS, n0, ncols, colsum, ascale, azp, wscale, bias, res,
                              ep, out, t, y)
        return m_amx
    return impl


# a column block under 64 wide with uint8 output and K up to this many k-groups takes the
# vpdpbusd tiles (quarter and half tiles in registers), not AMX, which computes all 64
# columns and stages a narrow block's epilogue. 12544 rows, AMX / vpdpbusd: K 64 -> 16
# 157 / 54 us, 64 -> 48 238 / 124, 192 -> 32 229 / 160; but 3136 x 512 -> 48 97 / 145
# (2 threads, AMX Xeon)
NARROW_VNNI_KG = 64


def _amx_epilogue(tag, m0, rows, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
    raise NotImplementedError  # compiled through the overload below


_EP_ROWS = 4  # rows of an AMX block staged_f32 / staged_u8 finish at a time (their vectors stay in registers)


@overload(_amx_epilogue, inline="always")
def _amx_epilogue_impl(tag, m0, rows, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out,
                       t, y):
    """The epilogue of an AMX block (rows of out from m0, staged in t): for float output,
    a bias and all 64 columns, in registers (simd.staged_f32, as _register_tile and
    _stored_tile do it) _EP_ROWS rows at a time; for uint8 output likewise (simd.staged_u8)
    when the activation runs in registers (in_registers); else, and for the last rows, _staged."""
    if out.dtype == types.uint8:
        def impl(tag, m0, rows, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
            act = np.int32(ep[EP_ACT])
            whole = (ncols == BLOCK_COLS) & (bias.shape[0] > 0) & in_registers(act)
            full = (rows - rows % _EP_ROWS) * np.intp(whole)
            if full < rows:
                _staged(rows - full, m0 + full, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep,
                        out, t[full * BLOCK_COLS:], y)
            for r in range(0, full, _EP_ROWS):
                staged_u8(tag, _EP_ROWS, t, r * BLOCK_COLS, BLOCK_COLS, colsum, wscale, bias, n0,
                          ascale, azp, m0 + r, out, act, ep[EP_P0], ep[EP_P1], res, ep)
        return impl
    if out.dtype != types.float32:
        def impl(tag, m0, rows, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
            _staged(rows, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y)
        return impl

    def impl(tag, m0, rows, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
        # no variable set on two paths here (inlined in a loop, Numba's IR check warns of
        # their phis): the choices are arithmetic
        whole = (ncols == BLOCK_COLS) & (bias.shape[0] > 0)
        full = (rows - rows % _EP_ROWS) * np.intp(whole)
        if full < rows:
            _staged(rows - full, m0 + full, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep,
                    out, t[full * BLOCK_COLS:], y)
        act, first = np.int32(ep[EP_ACT]), ep[EP_RES_FIRST] != 0
        in_regs = in_registers(act)   # else tanh GELU: after the tile, as _stored_tile
        tile_act = act * np.int32(in_regs)
        tile_res = res[:res.shape[0] * np.intp(in_regs | first)]
        for r in range(0, full, _EP_ROWS):
            staged_f32(tag, _EP_ROWS, t, r * BLOCK_COLS, BLOCK_COLS, colsum, wscale, bias, n0,
                       ascale, azp, m0 + r, out, tile_act, ep[EP_P0], ep[EP_P1], tile_res, ep)
        if not in_regs:
            for r in range(full):
                apply_activation(out, m0 + r, n0, BLOCK_COLS, act, ep[EP_P0], ep[EP_P1])
            if res.shape[0] > 0 and not first:
                add_residual_rows(out, res, m0, full, n0, BLOCK_COLS, 0, ep)
    return impl


def _plan_rows(tag, kg):
    raise NotImplementedError  # compiled through the overload below


@overload(_plan_rows, inline="always")
def _plan_rows_impl(tag, kg):
    """Rows a job's row chunk is a multiple of: AMX blocks where they run, else the
    vpdpbusd tile's rows."""
    mr = GEOMETRY[tag.isa][0]
    if tag.isa not in AMX_ISAS:
        return lambda tag, kg: mr
    return lambda tag, kg: mr if kg % amx.K_GROUPS else amx.ROWS


def _tile_state(tag, on, m, kg):
    raise NotImplementedError  # compiled through the overload below


@overload(_tile_state, inline="always")
def _tile_state_impl(tag, on, m, kg):
    """A thread's AMX tile configuration loaded (on) for a GEMM of m rows and kg k-groups
    (tiles of 16 rows, or of its own rows when m < amx.ROWS), or released; nothing on
    other paths, or where _amx_rows leaves the GEMM to vpdpbusd (~0.3 us saved at M=1)."""
    if tag.isa not in AMX_ISAS:
        return lambda tag, on, m, kg: None

    def impl(tag, on, m, kg):
        if amx.suits(m, kg):
            if on:
                r0 = min(m, 16)
                amx.configure(r0, min(m - r0, 16))
            else:
                amx.release()
    return impl


def _scratch(tag):
    raise NotImplementedError  # compiled through the overload below


@overload(_scratch)
def _scratch_impl(tag):
    """A worker's tile buffers: int32 tile t, float32 rows y for the staged uint8 epilogue
    (store_tile_u8 finishes as many rows at a time as y has), allocated once per call."""
    rows = max(GEOMETRY[tag.isa][0], amx.ROWS if tag.isa in AMX_ISAS else 0)
    return lambda tag: (np.empty(rows * BLOCK_COLS, np.int32), np.empty((rows, BLOCK_COLS), np.float32))


@njit(inline="always")
def _job_into(tag, job, nmc, mchunk, rows_first, aq, bp, kg, colsum, ascale, azp, wscale, bias,
              res, ep, out, t, y):
    """One job: a column block of B times a chunk of A's rows, tile by tile. Jobs are
    numbered block by block (a block's row chunks in turn), or with rows_first chunk by
    chunk (a chunk's column blocks in turn)."""
    mr_max = isa_geometry(tag)[0]
    m, n = aq.shape[0], out.shape[1]
    if rows_first:
        nblocks = (n + BLOCK_COLS - 1) // BLOCK_COLS
        chunk = job // nblocks
        nb = job - chunk * nblocks
    else:
        nb = job // nmc
        chunk = job - nb * nmc
    m_start = chunk * mchunk
    m_end = min(m, m_start + mchunk)
    n0 = nb * BLOCK_COLS
    ncols = min(BLOCK_COLS, n - n0)
    boff = nb * kg * GROUP_BYTES
    m_start = _amx_rows(tag, m_start, m_end, n0, ncols, aq, bp, boff, kg, colsum, ascale, azp,
                        wscale, bias, res, ep, out, t, y)
    # whole tiles of the ISA with float output take the in-register epilogue, with uint8
    # output those whose activation runs in registers (in_registers), a residual or not;
    # column tails (under one tile), int32 output, uint8 with a later activation, and the
    # portable ISA are staged
    regs = bias.shape[0] > 0 and not is_portable(tag)
    width = 0
    if regs and in_registers(np.int32(ep[EP_ACT])) and _finished_in_registers(out):
        width = register_width(tag, ncols, out)
    elif regs and _is_float32(out):   # tanh GELU: _stored_tile
        width = ncols - ncols % isa_geometry(tag)[1]
    if width > 0:
        if in_registers(np.int32(ep[EP_ACT])):  # one loop per kind of tile (see _register_tile)
            for m0 in range(m_start, m_end, mr_max):
                _register_tile(tag, min(mr_max, m_end - m0), m0, n0, width, aq, bp, boff, kg,
                               colsum, ascale, azp, wscale, bias, res, ep, out)
        else:
            for m0 in range(m_start, m_end, mr_max):
                _stored_tile(tag, min(mr_max, m_end - m0), m0, n0, width, aq, bp, boff, kg,
                             colsum, ascale, azp, wscale, bias, res, ep, out)
    if width < ncols:
        for m0 in range(m_start, m_end, mr_max):
            _compute(tag, min(mr_max, m_end - m0), m0, n0 + width, ncols - width, aq, bp,
                     boff + 4 * width, kg, colsum, ascale, azp, wscale, bias, res, ep, out, t, y)


# bytes that stay in a core's L2 (512 KiB to 2 MiB on the CPUs measured) while the
# rest streams past: A rows in the rows-first order of _plan, all of B in it
L2_KEEP_BYTES = 128 * 1024


@njit
def _plan(mr_max, m, n, row_bytes, kg, threads):
    """(column blocks, row chunks, rows per chunk, rows first).

    Block by block (the default), every column block streams all of A past its
    columns of B, in row chunks enough for >= 2 jobs per thread. When A is too big for L2 and all of B fits, chunk by chunk instead:
    a chunk of A's rows stays in L2 while every block of B passes, so A comes from
    memory once, not once per block. That is the early convs of a conv net (M = N*H*W
    in the ten thousands, K and N small): 25088x64x256 with a residual 1.23-1.35x,
    6272x128x512 1.18-1.30x on Zen 3. With B larger than L2 (transformer linears)
    the row chunks measured 0-7% slower. mr_max: rows per tile (isa_geometry)."""
    nblocks = (n + BLOCK_COLS - 1) // BLOCK_COLS
    tiles = max(1, (m + mr_max - 1) // mr_max)
    if (m * row_bytes > 2 * L2_KEEP_BYTES and nblocks > 1
            and nblocks * kg * GROUP_BYTES <= L2_KEEP_BYTES):
        mchunk = max(1, L2_KEEP_BYTES // (mr_max * row_bytes)) * mr_max
        return nblocks, (m + mchunk - 1) // mchunk, mchunk, True
    want = (2 * threads + nblocks - 1) // nblocks if nblocks % threads else 1
    nmc = max(1, min(tiles, want))
    mchunk = ((tiles + nmc - 1) // nmc) * mr_max
    nmc = (m + mchunk - 1) // mchunk
    return nblocks, nmc, mchunk, False


def _atomic_add(ordering):
    """An intrinsic (arr, idx, v): atomically arr[idx] += v (int64 array), returning the
    old value, with the LLVM memory ordering `ordering`."""
    @intrinsic
    def add(typingctx, arr, idx, v):
        if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
            return None

        def codegen(context, builder, sig, args):
            data = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0]).data
            i = context.cast(builder, args[1], sig.args[1], types.intp)
            val = context.cast(builder, args[2], sig.args[2], types.int64)
            return builder.atomic_rmw("add", builder.gep(data, [i]), val, ordering)
        return types.int64(arr, idx, v), codegen
    return add


_count_add = _atomic_add("monotonic")   # a job counter: orders nothing else
_sync_add = _atomic_add("acq_rel")      # publishes (and sees) the writes made before it


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86 pause)."""
    def codegen(context, builder, sig, args):
        call_llvm(builder, "llvm.x86.sse2.pause", ir.VoidType(), [])
        return context.get_dummy_value()
    return types.void(), codegen


# int64s between two counters in _starts' array: 128 bytes, so that no two share a
# cache line or an adjacent-line prefetch pair
_COUNTER_STRIDE = 16


@njit
def _starts(njobs, threads):
    """The workers' shared counters: worker w's next job at w * _COUNTER_STRIDE (set to
    its first job), then the quantization's next row chunk and its chunks done."""
    nxt = np.zeros((threads + 2) * _COUNTER_STRIDE, np.int64)
    for w in range(threads):
        nxt[w * _COUNTER_STRIDE] = w * njobs // threads
    return nxt


@njit
def _quantize_share(x, q, s, z, nxt, threads):
    """Quantize float rows x into q, s, z with the other workers: take chunks of rows
    from the counter after the job counters until none are left, count each one done,
    then wait until all are. A worker only waits once it has finished every chunk it
    took, and every chunk taken is being finished by a running worker, so workers that
    run one after another on one thread (more workers than threads) never deadlock."""
    m = x.shape[0]
    rows = max(1, (m + 4 * threads - 1) // (4 * threads))
    chunks = (m + rows - 1) // rows
    take, done = threads * _COUNTER_STRIDE, (threads + 1) * _COUNTER_STRIDE
    while True:
        c = _count_add(nxt, take, 1)
        if c >= chunks:
            break
        quantize_rows_range(x, q, s, z, c * rows, min(m, (c + 1) * rows))
        _sync_add(nxt, done, 1)
    while _sync_add(nxt, done, 0) < chunks:
        _pause()


@njit
def _worker(tag, w, threads, nxt, njobs, nmc, mchunk, rows_first, x, aq, bp, kg, colsum, ascale,
            azp, wscale, bias, res, ep, out, t, y):
    """Quantize float rows x (if any, x.shape[1] > 0) into aq, ascale, azp with the
    other workers (_quantize_share); then run worker w's contiguous share of the jobs,
    then help the others. t, y: the worker's own scratch (_scratch).

    Owner and helpers take jobs from the same atomic counter, so each job
    runs once; a worker delayed by the OS (a shared machine) no longer
    holds up its whole static share, while in the common case every thread
    keeps the same columns of B (warm in its own L2) from call to call.
    """
    # the caller holds every array for the whole call; borrowed views keep the
    # reference counting of each inlined call's argument copies (atomic adds on counts
    # that both threads share) out of the tile loops. A float-in linear on AMX then
    # takes 0.67-0.87x the time on 1 thread (1-128 rows x768x768), 0.85-0.99x on 2.
    x, aq, bp, colsum = borrowed(x), borrowed(aq), borrowed(bp), borrowed(colsum)
    ascale, azp, wscale, bias = borrowed(ascale), borrowed(azp), borrowed(wscale), borrowed(bias)
    res, ep, out = borrowed(res), borrowed(ep), borrowed(out)
    nxt, t, y = borrowed(nxt), borrowed(t), borrowed(y)
    if x.shape[1] > 0:
        _quantize_share(x, aq, ascale, azp, nxt, threads)
    _tile_state(tag, True, aq.shape[0], kg)
    for v in range(threads):
        owner = (w + v) % threads
        hi = (owner + 1) * njobs // threads
        while True:
            job = _count_add(nxt, owner * _COUNTER_STRIDE, 1)
            if job >= hi:
                break
            _job_into(tag, job, nmc, mchunk, rows_first, aq, bp, kg, colsum, ascale, azp, wscale,
                      bias, res, ep, out, t, y)
    _tile_state(tag, False, aq.shape[0], kg)


@njit(cache=CACHE)  # called from Python too (linear._padded_rows): cached, or each process compiles it
def a_stride(kg, itemsize=1):
    """Row stride of quantized A, in elements of `itemsize` bytes: whole cache lines
    plus one, so the MR rows a tile reads never share an L1 set (a stride of 1 KiB
    multiples would put 4-6 rows in one 8-way set and let the B stream evict them)."""
    return ((4 * kg * itemsize + 63) // 64 * 64 + 64) // itemsize


def a_rows(tag, m, kg):
    """Fresh (m, a_stride) A rows for k-groups kg, 64-byte aligned, of the element type
    the tag's path reads fastest (simd.A_DTYPES)."""
    raise NotImplementedError  # compiled through the overload below


@overload(a_rows, inline="always")
def _a_rows_impl(tag, m, kg):
    dtype = A_DTYPES[tag.isa]
    size = np.dtype(dtype).itemsize

    def impl(tag, m, kg):
        # 64-byte aligned (Numba's np.empty gives 32): an AMX tile row is then one line
        stride = a_stride(kg, size)
        raw = np.empty(m * stride + 64 // size, dtype)
        off = ((-raw.ctypes.data) % 64) // size
        return raw[off:off + m * stride].reshape((m, stride))
    return impl


@njit
def _serial_jobs(tag, x, aq, ascale, azp, bp, kg, colsum, wscale, bias, res, ep, out):
    """The jobs on this thread: one worker (quantizing float rows x first, if given)."""
    nblocks, nmc, mchunk, rows_first = _plan(_plan_rows(tag, kg), aq.shape[0], out.shape[1],
                                             aq.strides[0], kg, 1)
    njobs = nblocks * nmc
    t, y = _scratch(tag)
    _worker(tag, 0, 1, _starts(njobs, 1), njobs, nmc, mchunk, rows_first, x, aq, bp, kg, colsum,
            ascale, azp, wscale, bias, res, ep, out, t, y)


@njit(parallel=True)
def _parallel_jobs(tag, x, aq, ascale, azp, bp, kg, colsum, wscale, bias, res, ep, out, threads):
    """One worker per thread over Numba's pool; workers quantize float rows x (if given)
    together, then share jobs (_worker). Quantizing in the same launch, not before it
    on one thread: a 2-thread float-in linear on AMX takes 0.95x the time at 8x768x768,
    0.88x at 32x768x768, 0.89x at 8x3072x768 (0.99x at 128 rows)."""
    nblocks, nmc, mchunk, rows_first = _plan(_plan_rows(tag, kg), aq.shape[0], out.shape[1],
                                             aq.strides[0], kg, threads)
    nxt = _starts(nblocks * nmc, threads)
    for w in prange(threads):
        t, y = _scratch(tag)   # allocated here, once per worker, so _worker may borrow them
        _worker(tag, w, threads, nxt, nblocks * nmc, nmc, mchunk, rows_first, x, aq, bp, kg,
                colsum, ascale, azp, wscale, bias, res, ep, out, t, y)


def _entries(tag):
    """The serial and the threaded entry of one ISA, bound to it by the closure's tag:
    a compile-time constant, so each ISA compiles to its own machine code, and Numba's
    disk cache keys each closure on its tag. An entry quantizes float rows x, or with
    an empty x takes the quantized rows aq as they are; pass an aq of the ISA's
    A_DTYPES element type (an empty one with x) so that both branches share one
    compiled body. With x, ascale and azp of x's M rows receive the rows' scales and
    zero points (a NaN scale: a row holding NaN or inf); empty ones, fresh arrays."""
    @njit(cache=CACHE)
    def serial(x, aq, ascale, azp, bp, kg, colsum, wscale, bias, res, ep, out, threads):
        if x.shape[1] == 0:
            _serial_jobs(tag, x, aq, ascale, azp, bp, kg, colsum, wscale, bias, res, ep, out)
        else:  # fresh rows, quantized by the worker
            m = x.shape[0]
            s, z = _row_params(ascale, azp, m)
            _serial_jobs(tag, x, a_rows(tag, m, kg), s, z, bp, kg, colsum, wscale, bias, res, ep, out)

    @njit(cache=CACHE)  # the threads are launched by the parallel=True callees
    def parallel(x, aq, ascale, azp, bp, kg, colsum, wscale, bias, res, ep, out, threads):
        if x.shape[1] == 0:
            _parallel_jobs(tag, x, aq, ascale, azp, bp, kg, colsum, wscale, bias, res, ep, out,
                           threads)
        else:  # fresh rows, quantized by the workers
            m = x.shape[0]
            s, z = _row_params(ascale, azp, m)
            _parallel_jobs(tag, x, a_rows(tag, m, kg), s, z, bp, kg, colsum, wscale, bias, res, ep, out,
                           threads)
    return serial, parallel


@njit(inline="always")
def _row_params(ascale, azp, m):
    """The per-row scales and zero points float rows are quantized into: the caller's, if
    sized for the m rows, else fresh."""
    if ascale.shape[0] == m and azp.shape[0] == m:
        return ascale, azp
    return np.empty(m, np.float32), np.empty(m, np.int32)


ENTRIES = {name: _entries(tag) for name, tag in TAGS.items()}
