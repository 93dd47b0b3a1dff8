"""3x3 stride-1 convolutions on AMX tiles without im2col (an implicit GEMM).

The uint8 image is copied once into a border of its zero point, (N, H+2, W+2, C), and
read as flat rows of C bytes. Output pixel (y, x) of image i is flat row
p = (i*(H+2) + y)*(W+2) + x, and its tap (dy, dx) is row p + dy*(W+2) + dx: for every
tap, 32 consecutive output rows read 32 consecutive input rows, C bytes apart, which is
the A tile amx.block_s32_steps loads with a per-step offset (tap, 64-channel chunk). So
each input byte is moved once instead of nine times (im2col). The rows that fall on the
border (two per image row, two image rows per image) are computed and dropped: the
epilogue writes the valid runs of each block to their rows of out.

The weights are conv.py's packed (kh, kw, c) columns: k = tap * C + c, whole AMX tiles
when C is a multiple of 64.

    >>> conv3x3(xq, zps, pw, ascale, azp, bias, ep, out, res, threads)   # xq (N, H, W, C) uint8
"""
import numpy as np
from numba import njit, prange

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from . import amx
from .gemm import _amx_epilogue, _scratch
from .pack import aligned_empty
from .simd import AMX_ISAS, BLOCK_COLS, GROUP_BYTES, TAGS

KERNEL_VERSION = "conv-amx-1"
ROWS = amx.ROWS        # output rows per block
_CHUNKS_PER_THREAD = 4
MIN_SIDE = 14          # see suits


def suits(pc, geo, isa, h, w):
    """True if conv3x3 computes this conv faster than im2col: AMX, a dense 3x3 kernel with
    stride 1, padding 1 and no dilation, whole tiles of channels, and an image of at least
    MIN_SIDE pixels a side. On smaller ones the border rows computed and dropped cost more
    than im2col saves: (AMX Xeon, 2 threads, uint8 in and out, implicit against im2col)
    56x56x64 1.17x (batch 8: 1.49x), 28x28x128 1.53x (1.96x), 14x14x256 1.15x (1.42x),
    7x7x512 0.92x (0.76x): at 7x7, 81 padded pixels hold 49 outputs."""
    return (isa in AMX_ISAS and pc.dw_q is None and pc.groups == 1 and pc.kh == pc.kw == 3
            and geo == (1, 1, 1, 1, 1, 1) and pc.in_channels % 64 == 0 and min(h, w) >= MIN_SIDE)


@njit(cache=CACHE, parallel=True)
def pad_images(x, zps, out):
    """out (N, H+2, W+2, C) = the uint8 images x (N, H, W, C), image i in a border of its
    zero point zps[i]; one job per row of out."""
    n, h, w, c = x.shape
    hp, wp = h + 2, w + 2
    for job in prange(n * hp):
        i, yy = job // hp, job % hp
        z = np.uint8(zps[i])
        row = out[i, yy].reshape(-1)
        if yy == 0 or yy == hp - 1:
            row[:] = z
            continue
        src = x[i, yy - 1].reshape(-1)
        row[:c] = z
        row[c:(wp - 1) * c] = src
        row[(wp - 1) * c:] = z


@njit(inline="always")
def _valid_runs(tag, p0, n, h, w, wp, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, t, y):
    """The epilogue of the block of flat rows p0..p0+ROWS (staged in t), run by run of
    valid output pixels, each to its rows of out (N*H*W, O)."""
    hw = (h + 2) * wp
    r = 0
    while r < ROWS:
        p = p0 + r
        i = p // hw
        yy = (p - i * hw) // wp
        xx = p - i * hw - yy * wp
        if i >= n or yy >= h:            # an image's bottom border: to the next image
            r += hw - (p - i * hw)
        elif xx >= w:                    # a row's right border: to the next row
            r += wp - xx
        else:
            run = min(w - xx, ROWS - r)
            _amx_epilogue(tag, (i * h + yy) * w + xx, run, n0, ncols, colsum, ascale, azp, wscale, bias,
                          res, ep, out, t[r * BLOCK_COLS:], y)
            r += run


@njit(parallel=True)
def _jobs(tag, xp, steps, bp, kg, colsum, ascale, azp, wscale, bias, res, ep, out, n, h, w, blocks, chunk):
    """Row blocks in chunks over the threads; in a chunk, every column block of B passes
    its row blocks (the chunk's rows stay in L2, one column block of B in L1/L2)."""
    c, wp = xp.shape[1], w + 2
    nblocks = (out.shape[1] + BLOCK_COLS - 1) // BLOCK_COLS
    for job in prange((blocks + chunk - 1) // chunk):
        t, y = _scratch(tag)
        amx.configure(16, 16)
        for nb in range(nblocks):
            n0 = nb * BLOCK_COLS
            ncols = min(BLOCK_COLS, out.shape[1] - n0)
            for rb in range(job * chunk, min(blocks, (job + 1) * chunk)):
                amx.block_s32_steps(xp, rb * ROWS * c, c, steps, bp, nb * kg * GROUP_BYTES, kg, t, True)
                _valid_runs(tag, rb * ROWS, n, h, w, wp, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep,
                            out, t, y)
        amx.release()


def _entry(tag):
    @njit(cache=CACHE)
    def run(xp, steps, bp, kg, colsum, ascale, azp, wscale, bias, res, ep, out, n, h, w, blocks, chunk):
        _jobs(tag, xp, steps, bp, kg, colsum, ascale, azp, wscale, bias, res, ep, out, n, h, w, blocks, chunk)
    return run


_RUN = _entry(TAGS["amx_int8"])
_steps_cache = {}


def _steps(c, wp):
    """Byte offsets of each k-step's A tile from the output row's own: tap (dy, dx), chunk c0."""
    steps = _steps_cache.get((c, wp))
    if steps is None:
        s = np.arange(9 * c // 64)
        tap, c0 = s * 64 // c, s * 64 % c
        steps = _steps_cache[(c, wp)] = ((tap // 3 * wp + tap % 3) * c + c0).astype(np.int64)
    return steps


def conv3x3(xq, zps, pw, ascale, azp, bias, ep, out, res, threads):
    """out (N*H*W, O) = the epilogue of the 3x3 conv (stride 1, padding 1) of the uint8
    images xq (N, H, W, C), image i's zero point zps[i], by the packed weights pw (9*C
    columns in (kh, kw, c) order); ascale, azp: per output row, as the GEMM takes them."""
    n, h, w, c = xq.shape
    hp, wp = h + 2, w + 2
    last = ((n - 1) * hp + h - 1) * wp + w            # one past the last valid flat row
    blocks = (last + ROWS - 1) // ROWS
    buf = aligned_empty(((blocks * ROWS + 2 * wp + 2) * c,), np.uint8)
    pad_images(xq, zps, buf[:n * hp * wp * c].reshape(n, hp, wp, c))
    chunk = max(1, blocks // (_CHUNKS_PER_THREAD * threads))
    _RUN(buf.reshape(-1, c), _steps(c, wp), pw.data, pw.k // 4, pw.col_sums, ascale, azp, pw.scales, bias, res,
         ep, out, n, h, w, blocks, chunk)
    return out
