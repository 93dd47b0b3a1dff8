"""int8 2-D convolution: im2col feeding the GEMM, depthwise done directly (depthwise.py), and 3x3
stride-1 convs on AMX straight from the image (conv_amx.py, no im2col).

The input image is quantized once per tensor (dynamic asymmetric uint8,
formula of quantize.py over the whole image) and laid out HWC, so im2col
moves runs of bytes, not floats, and out-of-image taps read the zero point
(= 0.0). Weights are quantized per output channel; GEMM columns are ordered
(kh, kw, c), i.e. ``weight.transpose(0, 2, 3, 1).reshape(O, -1)``.

    >>> pc = pack_conv_weights_s8(weight, groups=1)            # (O, I/g, kh, kw)
    >>> y = conv2d_f32(x, pc, bias, stride=2, padding=1, act="relu")
"""
import functools
from typing import NamedTuple, Optional

import numpy as np
from numba import njit, prange

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from . import conv_amx
from .depthwise import depthwise_u8, pack_taps
from .dispatch import KernelError, isa as current_isa
from . import dispatch as _dispatch
from .linear import _bias, _prepare_u8, _run, epilogue_params, get_num_threads, new_a_rows, rows_share_l1_set
from .pack import pack_weights_s8, quantize_weights_s8
from .quantize import padded_k, scale_zero_point
from .rowops import minmax_f32, quantize_u8
from .simd import A_DTYPES, BLOCK_COLS

KERNEL_VERSION = "conv-19"
_NO_X = np.empty((0, 0), np.float32)
_NO_CODES = np.empty((0, 0), np.uint8)
_F0, _F1, _F255 = np.float32(0.0), np.float32(1.0), np.float32(255.0)
# blocks of quantize_chw_rows (pixels, channels), of quantize_rgb_rows (pixels) and of
# rows_to_chw (square), in L1
_CHW_PIXELS, _CHW_CHANNELS = 128, 32
_RGB_PIXELS = 1024
_TILE = 32
# float32 values per job of image_ranges and quantize_hwc_rows; pixel rows per job
_RANGE_CHUNK, _ROW_BLOCK = 1 << 14, 32
# images under this many values are quantized on the calling thread (quantize_hwc_rows_serial):
# serial / 2 threads, AMX Xeon: 96 values 0.35 / 2.0 us, 4096 0.6 / 2.1, 32928 2.3 / 3.3-3.7,
# 56448 4.2-4.4 / 4.3-4.7, 94080 6.8-7.3 / 5.7-6.4
SERIAL_VALUES = 1 << 16


class PackedConv(NamedTuple):
    """Conv weights (O, I/groups, kh, kw) packed per group for the GEMM,
    or, for depthwise (groups == I == O), int8 taps (O, kh*kw) + scales."""
    out_channels: int
    in_channels: int
    kh: int
    kw: int
    groups: int
    parts: tuple                        # PackedWeights per group (GEMM path)
    dw_q: Optional[np.ndarray] = None   # depthwise int8 taps (O, kh*kw)
    dw_scales: Optional[np.ndarray] = None


def pack_conv_weights_s8(weight, groups=1, scales=None):
    """Pack conv weights (O, I/groups, kh, kw) for conv2d_f32.

    float weights are quantized (symmetric, per output channel); int8
    weights with their per-channel ``scales`` (O,) are packed as they are.

        >>> pc = pack_conv_weights_s8(w_float, groups=1)
        >>> pc = pack_conv_weights_s8(w_int8, groups=32, scales=s)
    """
    w = np.asarray(weight)
    if w.ndim != 4:
        raise KernelError(f"conv weight must be (O, I/groups, kh, kw), got {w.shape}")
    o, cg, kh, kw = w.shape
    if o % groups:
        raise KernelError(f"out_channels {o} not divisible by groups {groups}")
    if scales is None:
        q, s = quantize_weights_s8(w.astype(np.float32).reshape(o, -1))
        q = q.reshape(w.shape)
    elif w.dtype == np.int8:
        q, s = w, np.ascontiguousarray(scales, np.float32).reshape(o)
    else:
        raise KernelError("pass int8 weights with scales, or float weights without")
    c = cg * groups
    if groups > 1 and groups == c == o:
        return PackedConv(o, c, kh, kw, groups, (), q.reshape(o, kh * kw).copy(), s)
    # GEMM columns in (kh, kw, c) order, the order im2col_u8 writes
    taps_last = np.ascontiguousarray(q.transpose(0, 2, 3, 1)).reshape(o, -1)
    og = o // groups
    parts = tuple(pack_weights_s8(taps_last[g * og:(g + 1) * og], s[g * og:(g + 1) * og])
                  for g in range(groups))
    return PackedConv(o, c, kh, kw, groups, parts)


@njit(cache=CACHE)
def im2col_u8(x, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, zp, out, oy0, oy1, ow):
    """Patches of channels c0..c0+cg of one uint8 HWC image (C-contiguous) into out
    (OH*OW, Kp), columns ordered (kh, kw, c), output rows oy0..oy1-1 (of OH), OW wide:
    each tap is one contiguous run of cg values, copied with vector moves (out is uint8,
    or uint16 A rows for the avx2 GEMM). ph, pw: the padding above and left of the image;
    below and right, whatever OH and OW reach past it (taps outside read zp)."""
    h, w, c_all = x.shape
    zq = np.uint8(zp)
    uc0 = np.uint64(c0)
    # all channels, no dilation: a kernel row inside the image is kw * cg contiguous
    # values of x, one run (a stem conv's 3 channels would be runs of 3 otherwise)
    whole_rows = cg == c_all and dw == 1
    flat = x.reshape(-1)
    run = np.uint64(kw * cg)
    for oy in range(oy0, oy1):
        for ox in range(ow):
            row = np.uint64(oy * ow + ox)
            col = np.uint64(0)
            x0 = ox * sw - pw
            inside = whole_rows and 0 <= x0 and x0 + kw <= w
            for i in range(kh):
                y = oy * sh - ph + i * dh
                if inside and 0 <= y < h:
                    src = np.uint64((y * w + x0) * c_all)
                    for t in range(run):
                        out[row, col + np.uint64(t)] = flat[src + np.uint64(t)]
                    col += run
                    continue
                for j in range(kw):
                    xx = x0 + j * dw
                    if 0 <= y < h and 0 <= xx < w:
                        uy, ux = np.uint64(y), np.uint64(xx)
                        for c in range(cg):
                            uc = np.uint64(c)
                            out[row, col + uc] = x[uy, ux, uc0 + uc]
                    else:
                        for c in range(cg):
                            out[row, col + np.uint64(c)] = zq
                    col += np.uint64(cg)
            for k in range(col, out.shape[1]):
                out[row, np.uint64(k)] = zq


@njit(cache=CACHE, parallel=True)
def im2col_batch_u8(x, cg, kh, kw, sh, sw, ph, pw, dh, dw, zps, out, oh, ow):
    """im2col_u8 of every image of a uint8 NHWC batch, image i (zero point zps[i]) into
    its OH*OW consecutive rows of out: one call, output rows spread over the threads
    (a batch of 1 too: a 7x7 stem's patches alone cost more than its GEMM)."""
    n = x.shape[0]
    rows = oh * ow
    for job in prange(n * oh):
        i, oy = job // oh, job % oh
        im2col_u8(x[i], 0, cg, kh, kw, sh, sw, ph, pw, dh, dw, zps[i], out[i * rows:(i + 1) * rows],
                  oy, oy + 1, ow)


@njit(cache=CACHE, parallel=True)
def image_ranges(x, scales, zps):
    """Dynamic quantization parameters of each image (row) of x (N, S), float32 and
    C-contiguous: quantize.py's formula over the whole image, its min and max taken in
    chunks spread over the threads."""
    n, size = x.shape
    chunks = (size + _RANGE_CHUNK - 1) // _RANGE_CHUNK
    lo = np.empty(n * chunks, np.float32)
    hi = np.empty(n * chunks, np.float32)
    for job in prange(n * chunks):
        i, c = job // chunks, job % chunks
        start = c * _RANGE_CHUNK
        lo[job], hi[job] = minmax_f32(x, i * size + start, min(_RANGE_CHUNK, size - start))
    for i in range(n):
        a, b = _F0, _F0
        for job in range(i * chunks, (i + 1) * chunks):
            a, b = min(a, lo[job]), max(b, hi[job])
        scale, zp = scale_zero_point(a, b)
        scales[i] = scale
        zps[i] = np.int32(zp)


@njit(cache=CACHE, parallel=True)
def quantize_chw_rows(x, scales, zps, out):
    """Quantize CHW images x (N, C, P) float32 (P = H*W pixels, C-contiguous), image n
    with scales[n] and zps[n], into pixel rows out (N*P, >= C): out[n*P + p, c], the
    HWC order im2col and the GEMM read, zero points in the k-group padding. One pass,
    in blocks of _CHW_PIXELS pixels x _CHW_CHANNELS channels: each channel's run of
    pixels quantized with the vector intrinsic into a small tile, the tile then
    copied across (numpy's transpose of a 256-channel 56x56 image to HWC alone takes
    5 ms: it thrashes the cache)."""
    n, c, p = x.shape
    flat = x.reshape(-1)
    pad_end = min(out.shape[1], (c + 3) & ~3)
    bp, bc = (p + _CHW_PIXELS - 1) // _CHW_PIXELS, (c + _CHW_CHANNELS - 1) // _CHW_CHANNELS
    for job in prange(n * bp * bc):
        tile = np.empty(_CHW_CHANNELS * _CHW_PIXELS, np.uint8)
        i = job // (bp * bc)
        rest = job - i * bp * bc
        p0, c0 = (rest // bc) * _CHW_PIXELS, (rest % bc) * _CHW_CHANNELS
        inv, zp = _F1 / scales[i], np.int32(zps[i])
        npx, nch = min(p, p0 + _CHW_PIXELS) - p0, min(c, c0 + _CHW_CHANNELS) - c0
        for ch in range(nch):
            quantize_u8(flat, (i * c + c0 + ch) * p + p0, npx, inv, zp, tile, ch * _CHW_PIXELS)
        for px in range(npx):
            row = np.uint64(i * p + p0 + px)
            for ch in range(nch):
                out[row, np.uint64(c0 + ch)] = tile[np.uint64(ch * _CHW_PIXELS + px)]
            if c0 + nch == c:
                for k in range(c, pad_end):
                    out[row, np.uint64(k)] = zp


@njit(cache=CACHE, parallel=True)
def quantize_rgb_rows(x, scales, zps, out):
    """quantize_chw_rows of three-channel images (a model's RGB input) x (N, 3, P) into
    rows of three, out (N*P*3,) flat: each block's three channel runs quantized, then
    interleaved in a loop of three stores a pixel, which LLVM vectorizes (the general
    loop's byte copies took 51 us for one 224x224 image, 2 threads, AMX Xeon)."""
    n, _, p = x.shape
    flat = x.reshape(-1)
    bp = (p + _RGB_PIXELS - 1) // _RGB_PIXELS
    for job in prange(n * bp):
        tile = np.empty(3 * _RGB_PIXELS, np.uint8)
        i, p0 = job // bp, (job % bp) * _RGB_PIXELS
        inv, zp = _F1 / scales[i], np.int32(zps[i])
        npx = min(p, p0 + _RGB_PIXELS) - p0
        for ch in range(3):
            quantize_u8(flat, (i * 3 + ch) * p + p0, npx, inv, zp, tile, ch * _RGB_PIXELS)
        r, g, b = tile[:npx], tile[_RGB_PIXELS:_RGB_PIXELS + npx], tile[2 * _RGB_PIXELS:2 * _RGB_PIXELS + npx]
        o = out[(i * p + p0) * 3:(i * p + p0 + npx) * 3]
        for px in range(npx):
            o[3 * px] = r[px]
            o[3 * px + 1] = g[px]
            o[3 * px + 2] = b[px]


@njit(cache=CACHE, parallel=True)
def quantize_hwc_rows(x, scales, zps, out):
    """Quantize HWC images x (N, P, C) float32 (C-contiguous), image n with scales[n]
    and zps[n], into pixel rows out (N*P, >= C), zero points in the k-group padding:
    into a plain (N*P, C) array in flat runs of _RANGE_CHUNK values, into wider rows
    (the GEMM's A rows) _ROW_BLOCK rows a job; the jobs spread over the threads."""
    _quantize_hwc(x, scales, zps, out)


@njit(cache=CACHE)
def quantize_hwc_rows_serial(x, scales, zps, out):
    """quantize_hwc_rows on the calling thread: for images under SERIAL_VALUES values
    (a squeeze-excite's pooled pixel), where a thread launch costs more than it saves."""
    _quantize_hwc(x, scales, zps, out)


@njit(inline="always")
def _quantize_hwc(x, scales, zps, out):
    n, p, c = x.shape
    size = p * c
    q_row = out.strides[0] // out.itemsize
    if q_row == c:
        chunks = (size + _RANGE_CHUNK - 1) // _RANGE_CHUNK
        for job in prange(n * chunks):
            i, k = job // chunks, job % chunks
            start = i * size + k * _RANGE_CHUNK
            quantize_u8(x, start, min(_RANGE_CHUNK, size - k * _RANGE_CHUNK), _F1 / scales[i],
                        np.int32(zps[i]), out, start)
        return
    pad_end = min(out.shape[1], (c + 3) & ~3)
    blocks = (p + _ROW_BLOCK - 1) // _ROW_BLOCK
    for job in prange(n * blocks):
        i, b = job // blocks, job % blocks
        inv, zp = _F1 / scales[i], np.int32(zps[i])
        for r in range(i * p + b * _ROW_BLOCK, i * p + min(p, (b + 1) * _ROW_BLOCK)):
            quantize_u8(x, r * c, c, inv, zp, out, r * q_row)
            for k in range(c, pad_end):
                out[np.uint64(r), np.uint64(k)] = zp


@njit(cache=CACHE, parallel=True)
def rows_to_chw(y, out):
    """out (N, O, P) = pixel rows y (N, P, O) transposed, in _TILE x _TILE blocks."""
    n, p, o = y.shape
    src, dst = y.reshape(-1), out.reshape(-1)
    bp, bo = (p + _TILE - 1) // _TILE, (o + _TILE - 1) // _TILE
    for job in prange(n * bp * bo):
        i = job // (bp * bo)
        rest = job - i * bp * bo
        p0, o0 = (rest // bo) * _TILE, (rest % bo) * _TILE
        base = np.uint64(i * p * o)
        for ch in range(o0, min(o, o0 + _TILE)):
            d = base + np.uint64(ch * p)
            s = base + np.uint64(ch)
            for px in range(p0, min(p, p0 + _TILE)):
                dst[d + np.uint64(px)] = src[s + np.uint64(px * o)]


def _pair(v, name):
    t = (int(v), int(v)) if np.isscalar(v) else tuple(int(i) for i in v)
    if len(t) != 2:
        raise KernelError(f"{name} must be an int or a pair, got {v!r}")
    return t


def four_pads(padding):
    """padding as (top, left, bottom, right), checked: four ints as they are, an int or a pair
    (the same pads on both sides) doubled.

        >>> four_pads((1, 2))       # (1, 2, 1, 2)
    """
    pads = tuple(int(v) for v in padding) if not np.isscalar(padding) and len(padding) == 4 else \
        2 * _pair(padding, "padding")
    if min(pads) < 0:
        raise KernelError(f"padding must not be negative, got {padding}")
    return pads


def _geometry(stride, padding, dilation):
    """(sh, sw, ph, pw, dh, dw), each given as an int or a pair (checked)."""
    return (*_pair(stride, "stride"), *_pair(padding, "padding"), *_pair(dilation, "dilation"))


def _out_hw(h, w, pc, geo, far=None):
    """The output height and width of pc's kernel over an h x w input with geometry geo,
    padded below and right as above and left, or by far = (bottom, right)."""
    sh, sw, ph, pw, dh, dw = geo
    pb, pr = (ph, pw) if far is None else far
    return (h + ph + pb - dh * (pc.kh - 1) - 1) // sh + 1, (w + pw + pr - dw * (pc.kw - 1) - 1) // sw + 1


def _residual_rows(residual, pc, n, oh, ow, nhwc, codes=False):
    """The residual as the GEMM's (N*OH*OW, O) output rows (NHWC order): float32, or with
    codes a uint8 residual's own codes (the epilogue dequantizes them)."""
    if pc.dw_q is not None or pc.groups != 1:
        raise KernelError("conv2d_f32: a residual needs a dense conv (groups == 1)")
    r = np.asarray(residual)
    shape = (n, oh, ow, pc.out_channels) if nhwc else (n, pc.out_channels, oh, ow)
    if r.shape != shape:
        raise KernelError(f"conv2d_f32: residual must have the output's shape {shape}, got {r.shape}")
    if not nhwc:
        r = r.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(r, np.uint8 if codes else np.float32).reshape(n * oh * ow, pc.out_channels)


def residual_floats(codes, res_scale, res_zero_point):
    """The float32 values uint8 residual codes stand for, as the epilogue computes them
    (epilogue.residual_value): (float32(code) - zero point) * scale."""
    return (codes.astype(np.float32) - np.float32(res_zero_point)) * np.float32(res_scale)


@functools.lru_cache(maxsize=256)
def _static_scales(n, a_scale, a_zp):
    """(scales, zero points) of n images with one static scale: made once, read by every call
    (two np.full a call were 1.3 us of a 1-pixel conv's 18). Callers do not write them."""
    return np.full(n, a_scale, np.float32), np.full(n, a_zp, np.int32)


def _pixel_rows(x, nhwc, cg, a_scale, a_zp, out):
    """Quantize images x (NHWC or NCHW float32, contiguous) into HWC pixel rows out
    (N*H*W, >= C); returns the images' scales and zero points (static a_scale > 0 for
    all, else each image's own)."""
    n = x.shape[0]
    if a_scale > 0:
        scales, zps = _static_scales(n, a_scale, a_zp)
    else:
        scales, zps = np.empty(n, np.float32), np.empty(n, np.int32)
        image_ranges(x.reshape(n, -1), scales, zps)
    if nhwc:
        quantize = quantize_hwc_rows if x.size >= SERIAL_VALUES else quantize_hwc_rows_serial
        quantize(x.reshape(n, -1, cg), scales, zps, out)
    elif cg == 3 and out.shape[1] == 3 and out.flags.c_contiguous:
        quantize_rgb_rows(x.reshape(n, 3, -1), scales, zps, out.reshape(-1))
    else:
        quantize_chw_rows(x.reshape(n, cg, -1), scales, zps, out)
    return scales, zps


def _hwc_images(x, nhwc, a_scale, a_zp):
    """x's images quantized (_pixel_rows) as uint8 HWC images (N, H, W, C), with
    their scales and zero points."""
    n, c = x.shape[0], x.shape[3 if nhwc else 1]
    h, w = x.shape[1:3] if nhwc else x.shape[2:]
    xq = np.empty((n, h, w, c), np.uint8)
    scales, zps = _pixel_rows(x, nhwc, c, a_scale, a_zp, xq.reshape(-1, c))
    return xq, scales, zps


def _depthwise(x, nhwc, pc, geo, bias, ep, oh, ow, a_scale, a_zp):
    """A depthwise conv of the batch (depthwise.depthwise_u8); returns (N, OH, OW, C) float32."""
    xq, scales, zps = _hwc_images(x, nhwc, a_scale, a_zp)
    pairs, sums = pack_taps(_taps(pc))
    out = np.empty((x.shape[0] * oh * ow, pc.out_channels), np.float32)
    sh, sw, ph, pw, dh, dw = geo
    depthwise_u8(xq, zps, scales, pairs, sums, pc.kh, pc.kw, sh, sw, ph, pw, dh, dw, oh, ow, pc.dw_scales, bias, ep,
                 out, _NO_CODES)
    return out.reshape(x.shape[0], oh, ow, pc.out_channels)


def _taps(pc):
    """A depthwise PackedConv's int8 taps as (C, kh, kw)."""
    return pc.dw_q.reshape(pc.out_channels, pc.kh, pc.kw)


def _layout_in(x, layout, c, direct):
    """(x, nhwc): the images of a bound conv's call as its kernels take them. NHWC as they
    are; NCHW float32 C-contiguous images with c channels as they are where `direct` (the
    kernel quantizes them from CHW, nhwc False), any other NCHW x copied NHWC."""
    if layout == "NHWC":
        return x, True
    if layout != "NCHW":
        raise KernelError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if (direct and type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == c
            and x.flags.c_contiguous):
        return x, False
    x = np.asarray(x)
    if x.ndim != 4:
        raise KernelError(f"conv: input must be 4-D NCHW images, got shape {x.shape}")
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)), True


def _bind_depthwise(pc, bias, stride, padding, dilation, ep, a_scale, a_zp, out_scale):
    """bind_conv2d of a depthwise conv: call(x, residual=None, n_threads=None, layout="NHWC")
    on float32 or (static scale) uint8 images, float32 output or with out_scale > 0 uint8;
    padding two ints or four, (top, left, bottom, right)."""
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    pt, pl, pb, pr = four_pads(padding)
    pairs, sums = pack_taps(_taps(pc))
    c = pc.out_channels

    def call(x, residual=None, n_threads=None, layout="NHWC"):
        if residual is not None:
            raise KernelError("a depthwise conv adds no residual: add it after the conv")
        x, nhwc = _layout_in(x, layout, c, True)
        if type(x) is not np.ndarray or x.ndim != 4 or x.shape[3 if nhwc else 1] != c:
            raise KernelError(f"depthwise conv: input must be {layout} with {c} channels; got "
                              f"{getattr(x, 'shape', x)}")
        n, h, w = (x.shape[0], *x.shape[1:3]) if nhwc else (x.shape[0], *x.shape[2:])
        oh, ow = _out_hw(h, w, pc, (sh, sw, pt, pl, dh, dw), (pb, pr))
        if oh <= 0 or ow <= 0:
            raise KernelError(f"conv: kernel larger than padded input {x.shape} (NHWC)")
        if x.dtype == np.uint8:
            if not (a_scale > 0 and x.flags.c_contiguous):
                raise KernelError(f"uint8 input is taken by convs with a static scale only, as C-contiguous NHWC; "
                                  f"got a_scale={a_scale}: pass float32 images")
            xq, (scales, zps) = x, _static_scales(n, a_scale, a_zp)
        else:
            xq, scales, zps = _hwc_images(np.ascontiguousarray(x, np.float32), nhwc, a_scale, a_zp)
        rows = n * oh * ow
        out = np.empty((0 if out_scale > 0 else rows, c), np.float32)
        codes = np.empty((rows if out_scale > 0 else 0, c), np.uint8)
        depthwise_u8(xq, zps, scales, pairs, sums, pc.kh, pc.kw, sh, sw, pt, pl, dh, dw, oh, ow, pc.dw_scales, bias,
                     ep, out, codes)
        return (codes if out_scale > 0 else out).reshape(n, oh, ow, c)
    return call


def _conv_batched(x, nhwc, pc, geo, bias, ep, n_threads, oh, ow, a_scale, a_zp, res=_NO_X, static_rows=None,
                  out_dtype=np.float32):
    """All images of a batch in one GEMM (M = N*OH*OW): small late-stage images (7x7)
    would starve the GEMM one by one. Each image keeps its own scale and zero point
    through the GEMM's per-row quantization parameters. Returns (N, OH, OW, O) of
    out_dtype (uint8: ep requantizes). static_rows: the rows' (scales, zero points) of a
    static scale, made once by the caller. A uint8 x (NHWC) is quantized already, with
    the static (a_scale, a_zp): it goes to im2col, or straight to the GEMM, as it is.
    geo's pads are those above and left of the images; below and right, whatever (OH, OW)
    reach past them."""
    n, rows = x.shape[0], oh * ow
    cg = pc.in_channels
    kp = padded_k(pc.parts[0].k)     # K, or more (_whole_amx_tiles): im2col fills it with zero points
    h, w = x.shape[1:3] if nhwc else x.shape[2:]
    same = (oh, ow) == (h, w)       # stride 1: then the pads below and right are geo's above and left
    direct = pc.kh == pc.kw == 1 and kp == cg and geo == (1, 1, 0, 0, 1, 1) and same
    if nhwc and same and conv_amx.suits(pc, geo, current_isa(), oh, ow):
        return _implicit_3x3(x, pc, bias, ep, n_threads, oh, ow, a_scale, a_zp, res, static_rows, out_dtype)
    if x.dtype == np.uint8:
        zps = _static_scales(n, a_scale, a_zp)[1]
        xq = x.reshape(-1, cg)
        cols = _prepare_u8(xq, pc.parts[0]) if direct else new_a_rows(n * rows, kp // 4)
    else:
        cols = new_a_rows(n * rows, kp // 4)
        xq = cols if direct else np.empty((x.size // cg, cg), np.uint8)
        scales, zps = _pixel_rows(x, nhwc, cg, a_scale, a_zp, xq)
    if not direct:
        im2col_batch_u8(xq.reshape(n, h, w, cg), cg, pc.kh, pc.kw, *geo, zps, cols, oh, ow)
    rows_s, rows_z = static_rows if static_rows is not None else (np.repeat(scales, rows), np.repeat(zps, rows))
    out = np.empty((n * rows, pc.out_channels), out_dtype)
    _run(_NO_X, cols, rows_s, rows_z, pc.parts[0], _bias(bias if bias.size else None, pc.out_channels),
         ep, out, n_threads, res)
    return out.reshape(n, oh, ow, pc.out_channels)


def _implicit_3x3(x, pc, bias, ep, n_threads, oh, ow, a_scale, a_zp, res, static_rows, out_dtype):
    """_conv_batched of a 3x3 stride-1 conv on AMX: conv_amx.conv3x3 reads the uint8 images
    (quantized here from float NHWC) with no im2col."""
    n, cg = x.shape[0], pc.in_channels
    if x.dtype == np.uint8:
        xq, zps = x, _static_scales(n, a_scale, a_zp)[1]
    else:
        xq = np.empty(x.shape, np.uint8)
        scales, zps = _pixel_rows(x, True, cg, a_scale, a_zp, xq.reshape(-1, cg))
    rows_s, rows_z = static_rows if static_rows is not None else (np.repeat(scales, oh * ow), np.repeat(zps, oh * ow))
    out = np.empty((n * oh * ow, pc.out_channels), out_dtype)
    conv_amx.conv3x3(xq, zps, pc.parts[0], rows_s, rows_z, bias, ep, out, res, n_threads or get_num_threads())
    return out.reshape(n, oh, ow, pc.out_channels)


def _grouped(x, nhwc, pc, geo, bias, ep, n_threads, oh, ow, a_scale, a_zp):
    """A grouped conv of the batch, image by image (_gemm_groups); returns (N, OH, OW, O)."""
    xq, scales, zps = _hwc_images(x, nhwc, a_scale, a_zp)
    return np.stack([_gemm_groups(img, pc, geo, s, z, bias, ep, n_threads, oh, ow).reshape(oh, ow, -1)
                     for img, s, z in zip(xq, scales, zps)])


def _gemm_groups(xq, pc, geo, s, z, bias, ep, n_threads, oh, ow):
    """A grouped conv of one HWC image: one GEMM per group (dense convs, groups == 1,
    take _conv_batched)."""
    og = pc.out_channels // pc.groups
    cg = pc.in_channels // pc.groups
    kp = padded_k(cg * pc.kh * pc.kw)
    out = np.empty((oh * ow, pc.out_channels), np.float32)
    rows_s = np.full(oh * ow, s, np.float32)
    rows_z = np.full(oh * ow, z, np.int32)
    cols = new_a_rows(oh * ow, kp // 4)
    for g, pw in enumerate(pc.parts):
        im2col_u8(xq, g * cg, cg, pc.kh, pc.kw, *geo, z, cols, 0, oh, ow)
        part = np.empty((oh * ow, og), np.float32)
        b = bias[g * og:(g + 1) * og] if bias.size else bias
        _run(_NO_X, cols, rows_s, rows_z, pw, _bias(b if b.size else None, og), ep, part,
             n_threads)
        out[:, g * og:(g + 1) * og] = part
    return out


def bind_conv2d(pc, bias=None, stride=1, padding=0, dilation=1, act="none", act_args=(), a_scale=0.0,
                a_zero_point=0, out_scale=0.0, out_zero_point=0, res_scale=0.0, res_zero_point=0):
    """conv2d_f32 on NHWC images with all but the input bound once, for a runtime that calls
    the layer many times: call(x, residual=None, n_threads=None) -> (N, OH, OW, O) float32,
    the result of conv2d_f32(x, pc, ..., layout="NHWC") bit for bit. Per call it only
    quantizes, lays out and multiplies; the checks, epilogue constants and (for a static
    scale) the GEMM rows' scales are made once, per input size for the last.

    Chained int8 layers (dense and depthwise convs, static scales) skip the float
    activations: with out_scale > 0 the output is uint8, clip(rint(y / out_scale) +
    out_zero_point, 0, 255) of that float result y, written by the GEMM's (or the depthwise
    kernel's) epilogue; and x may be uint8 NHWC,
    quantized already with (a_scale, a_zero_point), which the call then takes as it is
    (the result is the call's on the float image those codes stand for). With res_scale > 0
    and uint8 output the residual may be uint8 NHWC codes too, standing for (code -
    res_zero_point) * res_scale (residual_floats): the result is the call's with those
    floats, bit for bit. A depthwise conv (_bind_depthwise) adds no residual.

    padding may be four numbers, (top, left, bottom, right), for dense and depthwise convs:
    TensorFlow-style "same" pads of stride 2 ([0, 0, 1, 1]) fold into the conv. The call
    takes layout="NCHW" too for x (float32 images, the model's input as it comes; the
    residual stays NHWC): dense and depthwise convs quantize them straight into their pixel
    rows, with no NHWC copy (_layout_in).

        >>> call = bind_conv2d(pc, bias, stride=2, padding=1, act="relu", a_scale=0.02, a_zero_point=128)
        >>> y = call(x_nhwc)
    """
    if a_scale > 0 and not 0 <= a_zero_point <= 255:
        raise KernelError(f"a_zero_point must be in [0, 255], got {a_zero_point}")
    if res_scale > 0 and not 0 <= res_zero_point <= 255:
        raise KernelError(f"res_zero_point must be in [0, 255], got {res_zero_point}")
    dense = pc.dw_q is None and pc.groups == 1
    chained_out = out_scale > 0
    if chained_out and not ((dense or pc.dw_q is not None) and 0 <= out_zero_point <= 255):
        raise KernelError(f"uint8 output (out_scale > 0) needs a dense or depthwise conv and an out_zero_point "
                          f"in [0, 255]; got groups={pc.groups}, out_zero_point={out_zero_point}")
    b = np.zeros(pc.out_channels, np.float32) if bias is None else _bias(bias, pc.out_channels)
    ep_args = (float(out_scale), int(out_zero_point)) if chained_out else (1.0, 0)
    if pc.dw_q is not None:
        return _bind_depthwise(pc, b, stride, padding, dilation, epilogue_params(act, tuple(act_args), *ep_args),
                               a_scale, a_zero_point, out_scale)
    pt, pl, pb, pr = four_pads(padding)
    four = (pt, pl) != (pb, pr)
    if four and not dense:
        raise KernelError(f"padding as four numbers, {padding}, is for dense (groups=1) and depthwise convs; "
                          f"this one has groups={pc.groups}: pad the input (np.pad) and pass padding=0")
    geo = (*_pair(stride, "stride"), pt, pl, *_pair(dilation, "dilation"))
    if dense and pc.kh * pc.kw > 1:     # im2col's rows (a 1x1 conv's rows are the image's own)
        pc = pc._replace(parts=(_whole_amx_tiles(pc.parts[0]),))
    res_args = (float(res_scale), int(res_zero_point)) if res_scale > 0 else (1.0, 0)
    eps = {first: epilogue_params(act, tuple(act_args), *ep_args, first, *res_args) for first in (False, True)}
    out_dtype = np.uint8 if chained_out else np.float32
    static = a_scale > 0
    sizes = {}       # (N, H, W) -> (OH, OW, the GEMM rows' static scales and zero points or None)
    # uint8 images into a 1x1 stride-1 conv: their pixel rows are the GEMM's A rows, in place
    # where the ISA reads uint8 rows of in_channels bytes as they are (_rows_in_place); such a
    # call goes straight to the GEMM. The bound call's Python around the GEMM took 5-8 us of
    # 12-20 for MobileNetV2's 14x14 and 28x28 1x1 convs; this path takes 2-3 us off it.
    pixel_rows = (dense and static and pc.kh == pc.kw == 1 and geo == (1, 1, 0, 0, 1, 1)
                  and padded_k(pc.parts[0].k) == pc.in_channels)

    def call(x, residual=None, n_threads=None, layout="NHWC"):
        x, nhwc = _layout_in(x, layout, pc.in_channels, dense)
        if not nhwc:
            return images(x, False, residual, n_threads)
        if type(x) is np.ndarray and x.dtype == np.uint8:
            if not (dense and static and x.ndim == 4 and x.shape[3] == pc.in_channels and x.flags.c_contiguous):
                raise KernelError(f"uint8 input is taken by dense convs with a static scale only, as C-contiguous "
                                  f"NHWC (N, H, W, {pc.in_channels}); got groups={pc.groups}, a_scale={a_scale}, "
                                  f"shape {x.shape}: pass float32 images")
        elif (chained_out or not dense or type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim != 4
                or x.shape[3] != pc.in_channels or not x.flags.c_contiguous):
            if chained_out or four:     # conv2d_f32 has no uint8 output, no four pads: the fast path
                x = np.ascontiguousarray(x, np.float32)
                if x.ndim != 4 or x.shape[3] != pc.in_channels:
                    raise KernelError(f"conv: input {x.shape} (NHWC) does not have {pc.in_channels} channels")
            else:
                if _is_codes(residual):
                    _check_codes(res_scale, chained_out)     # refused: float output
                return conv2d_f32(x, pc, bias, stride, (pt, pl), dilation, act, act_args, "NHWC", n_threads,
                                  a_scale, a_zero_point, residual)
        return images(x, True, residual, n_threads)

    def images(x, nhwc, residual, n_threads):
        """The conv of checked images x, NHWC or (nhwc False) NCHW float32."""
        n, h, w = (x.shape[0], *x.shape[1:3]) if nhwc else (x.shape[0], *x.shape[2:])
        size = sizes.get((n, h, w))
        if size is None:
            oh, ow = _out_hw(h, w, pc, geo, (pb, pr))
            if oh <= 0 or ow <= 0:
                raise KernelError(f"conv: kernel larger than padded input {x.shape} (NHWC)")
            rows = (np.full(n * oh * ow, a_scale, np.float32), np.full(n * oh * ow, a_zero_point, np.int32)) \
                if static else None
            if len(sizes) > 64:            # many input sizes: keep the table small
                sizes.clear()
            size = sizes[n, h, w] = (oh, ow, rows)
        oh, ow, rows = size
        if pixel_rows and residual is None and nhwc and x.dtype == np.uint8 and _rows_in_place(pc.in_channels):
            # what _conv_batched does for them, without its decisions (x is C-contiguous NHWC)
            out = np.empty((n * oh * ow, pc.out_channels), out_dtype)
            _run(_NO_X, x.reshape(-1, pc.in_channels), rows[0], rows[1], pc.parts[0], b, eps[False], out, n_threads)
            return out.reshape(n, oh, ow, pc.out_channels)
        res = _NO_X
        if residual is not None:
            codes = _is_codes(residual)
            if codes:
                _check_codes(res_scale, chained_out)
            res = _residual_rows(residual, pc, n, oh, ow, True, codes)
        return _conv_batched(x, nhwc, pc, geo, b, eps[residual is not None], n_threads, oh, ow, a_scale,
                             a_zero_point, res, rows, out_dtype)
    return call


def _rows_in_place(k):
    """Whether linear._prepare_u8 takes C-contiguous uint8 rows of k bytes (a whole number of
    k-groups) as they are on the current path, whatever their number."""
    isa = _dispatch._current[0]
    known = _IN_PLACE.get((isa, k))
    if known is None:
        known = _IN_PLACE[isa, k] = A_DTYPES[isa] == np.uint8 and k % 4 == 0 and not rows_share_l1_set(k)
    return known


_IN_PLACE = {}      # (isa, row bytes) -> _rows_in_place


def _is_codes(residual):
    return type(residual) is np.ndarray and residual.dtype == np.uint8


def _check_codes(res_scale, chained_out):
    """A uint8 residual is refused unless the conv was bound with its scale and writes uint8
    (a float output adding codes would compile the GEMM once more, for no model's use)."""
    if not (res_scale > 0 and chained_out):
        raise KernelError(f"conv: a uint8 residual is taken by a conv bound with the scale its codes stand for "
                          f"(res_scale > 0, now {res_scale}) and uint8 output (out_scale > 0); pass float32")


def _whole_amx_tiles(pw):
    """pw with K padded with zero weights to whole AMX tiles (64 k) when AMX runs it and
    that adds at most half: the GEMM then runs on AMX tiles instead of vpdpbusd (a 7x7
    stem on RGB, K = 147 -> 192, 224x224 in: its GEMM 285 -> 138 us, the whole conv
    634 -> 528 us; AMX Xeon, 2 threads). im2col fills the added columns with the zero
    point, which the zero weights ignore."""
    k64 = (pw.k + 63) // 64 * 64
    if current_isa() not in conv_amx.AMX_ISAS or k64 == pw.k or k64 > 1.5 * pw.k:
        return pw
    blocks = pw.data.size // (BLOCK_COLS * padded_k(pw.k))
    q = pw.data.reshape(blocks, -1, BLOCK_COLS, 4).transpose(0, 2, 1, 3).reshape(blocks * BLOCK_COLS, -1)
    return pack_weights_s8(np.pad(q[:pw.n, :pw.k], ((0, 0), (0, k64 - pw.k))), pw.scales)


def conv2d_f32(x, pc, bias=None, stride=1, padding=0, dilation=1, act="none",
               act_args=(), layout="NCHW", n_threads=None, a_scale=0.0, a_zero_point=0,
               residual=None):
    """Quantized conv2d: float input, PackedConv weights, float output.

    x: float32 (N, C, H, W) (or (N, H, W, C) with layout="NHWC"); returns
    float32 (N, O, OH, OW) for NCHW, (N, OH, OW, O) for NHWC. Matches
    torch.nn.functional.conv2d up to int8 quantization of x and the weights.
    Activations are quantized per image from the image itself, or, with
    a_scale > 0, with the given static scale and zero point.
    residual: optional float32 of the output's shape and layout, added before
    the activation, act(conv(x) + bias + residual) as in a ResNet block
    (dense convs only: groups == 1).
    """
    if a_scale > 0 and not 0 <= a_zero_point <= 255:
        raise KernelError(f"a_zero_point must be in [0, 255], got {a_zero_point}")
    if layout not in ("NCHW", "NHWC"):
        raise KernelError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    x = np.ascontiguousarray(x, np.float32)
    nhwc = layout == "NHWC"
    if x.ndim != 4 or x.shape[3 if nhwc else 1] != pc.in_channels:
        raise KernelError(f"conv2d_f32: input {x.shape} ({layout}) does not have "
                          f"{pc.in_channels} channels")
    geo = _geometry(stride, padding, dilation)
    h, w = x.shape[1:3] if nhwc else x.shape[2:]
    oh, ow = _out_hw(h, w, pc, geo)
    if oh <= 0 or ow <= 0:
        raise KernelError(f"conv2d_f32: kernel larger than padded input {x.shape}")
    b = np.zeros(pc.out_channels, np.float32) if bias is None else _bias(bias, pc.out_channels)
    ep = epilogue_params(act, tuple(act_args), residual_first=residual is not None)
    res = _NO_X
    if residual is not None:
        res = _residual_rows(residual, pc, x.shape[0], oh, ow, nhwc)
    if pc.dw_q is not None:
        y = _depthwise(x, nhwc, pc, geo, b, ep, oh, ow, a_scale, a_zero_point)
    elif pc.groups == 1:  # dense: one GEMM for the batch, at batch 1 too
        y = _conv_batched(x, nhwc, pc, geo, b, ep, n_threads, oh, ow, a_scale, a_zero_point, res)
    else:
        y = _grouped(x, nhwc, pc, geo, b, ep, n_threads, oh, ow, a_scale, a_zero_point)
    if nhwc:
        return y
    out = np.empty((y.shape[0], pc.out_channels, oh, ow), np.float32)
    rows_to_chw(y.reshape(y.shape[0], oh * ow, -1), out.reshape(out.shape[0], pc.out_channels, -1))
    return out
