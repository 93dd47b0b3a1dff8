"""Pooling of NHWC images: max pooling of the uint8 activations chained int8 convs hand
on; global average pooling of their float outputs.

Quantization is monotone, so the max of the codes is the code of the max: a max pool
between two int8 convs runs on the uint8 codes and changes nothing (torch's CPU max pool
has no uint8 path).

    >>> y = max_pool2d_nhwc(x, (3, 3), stride=(2, 2), padding=(1, 1))   # x (N, H, W, C)
"""
import numpy as np
from numba import get_num_threads, njit, prange

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .dispatch import KernelError

KERNEL_VERSION = "pool-2"


@njit(cache=CACHE, parallel=True)
def _max_pool(x, kh, kw, sh, sw, ph, pw, dh, dw, out):
    """out[n, oy, ox, c] = max of x[n, y, x, c] over the window's taps inside the image,
    one job per output row; channels innermost, contiguous in x and out (a vector max)."""
    n, h, w, c = x.shape
    oh, ow = out.shape[1], out.shape[2]
    src, dst = x.reshape(-1), out.reshape(-1)
    for job in prange(n * oh):
        i, oy = job // oh, job % oh
        for ox in range(ow):
            d = np.uint64(((i * oh + oy) * ow + ox) * c)
            first = True
            for ty in range(kh):
                y = oy * sh - ph + ty * dh
                if y < 0 or y >= h:
                    continue
                for tx in range(kw):
                    xx = ox * sw - pw + tx * dw
                    if xx < 0 or xx >= w:
                        continue
                    s = np.uint64(((i * h + y) * w + xx) * c)
                    if first:
                        for ch in range(c):
                            dst[d + np.uint64(ch)] = src[s + np.uint64(ch)]
                        first = False
                    else:
                        for ch in range(c):
                            uc = np.uint64(ch)
                            dst[d + uc] = max(dst[d + uc], src[s + uc])


def pool_out_size(size, k, s, p, d, ceil_mode):
    """torch's output length of a pooling window: with ceil_mode the last window may
    overhang the end, but must start inside the input or its left padding."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d_nhwc(x, kernel_size, stride=None, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    """torch.nn.functional.max_pool2d of NHWC images x (uint8 here; any numpy dtype numba
    compares), returned NHWC and C-contiguous. stride defaults to the kernel size; the
    padding is at most half the kernel, as torch requires, so every window has a tap."""
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        raise KernelError(f"max_pool2d_nhwc: x must be a 4-D NHWC numpy array, got {getattr(x, 'shape', type(x))}")
    kh, kw = kernel_size
    sh, sw = stride if stride else kernel_size
    (ph, pw), (dh, dw) = padding, dilation
    if min(kh, kw, sh, sw, dh, dw) < 1 or not (0 <= ph <= kh // 2 and 0 <= pw <= kw // 2):
        raise KernelError(f"max_pool2d_nhwc: need kernel, stride and dilation >= 1 and padding at most half the "
                          f"kernel; got kernel {kernel_size}, stride {stride}, padding {padding}, dilation {dilation}")
    n, h, w, c = x.shape
    oh = pool_out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_out_size(w, kw, sw, pw, dw, ceil_mode)
    if oh <= 0 or ow <= 0:
        raise KernelError(f"max_pool2d_nhwc: window {kernel_size} larger than the padded input {x.shape} (NHWC)")
    out = np.empty((n, oh, ow, c), x.dtype)
    _max_pool(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, dh, dw, out)
    return out


# The global average pool of a conv's float NHWC output (a squeeze-excite's, a classifier
# head's) splits the pixel rows into one run a thread, in order, as the conv's row jobs are.
# EfficientNet-B0's plan (AMX Xeon, 2 threads) pooled its 144 x 56 x 56 SE input in 107 us
# with torch's adaptive_avg_pool2d (25 us on the same tensor alone) and 41 us with this;
# alone, 20 us. What the rest costs in the plan, the conv's 1.8 MB of output in flight, is
# not measured apart.

@njit(cache=CACHE, parallel=True)
def _mean_pixels(x, hw, parts, out):
    """out[i*C + ch] = the mean of channel ch over image i's hw pixel rows of x (rows, C)
    float32: each of parts' rows (threads, N*C) a thread's float32 sums over its run of
    rows, then the threads' sums added in float64. One accumulator row per image run, its
    loads and adds vectorized (a += into parts directly ran 5x slower)."""
    rows, c = x.shape
    threads = parts.shape[0]
    src = x.reshape(-1)
    for t in prange(threads):
        dst = parts[t]
        for k in range(dst.shape[0]):
            dst[k] = 0.0
        acc = np.empty(c, np.float32)
        r, hi = (t * rows) // threads, ((t + 1) * rows) // threads
        while r < hi:
            i = r // hw
            end = min(hi, (i + 1) * hw)
            for ch in range(c):
                acc[ch] = 0.0
            for p in range(r, end):
                a = np.uint64(p * c)
                for ch in range(c):
                    u = np.uint64(ch)
                    acc[u] += src[a + u]
            b = np.uint64(i * c)
            for ch in range(c):
                u = np.uint64(ch)
                dst[b + u] = acc[u]
            r = end
    for k in range(out.shape[0]):
        total = 0.0
        for t in range(threads):
            total += np.float64(parts[t, k])
        out[k] = np.float32(total / hw)


def global_avg_pool_nhwc(x, n_threads=None):
    """adaptive_avg_pool2d(x, 1) of NHWC float32 images x: (N, C) float32 channel means,
    each thread's sums in float32, theirs added in float64.

        >>> m = global_avg_pool_nhwc(x)          # x (N, H, W, C)
    """
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32:
        raise KernelError(f"global_avg_pool_nhwc: x must be a 4-D float32 NHWC numpy array, got "
                          f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    x = np.ascontiguousarray(x)
    n, h, w, c = x.shape
    if h * w == 0:
        raise KernelError(f"global_avg_pool_nhwc: images of {h} x {w} pixels have no mean")
    threads = max(1, min(n_threads or get_num_threads(), n * h * w))
    out = np.empty((n, c), np.float32)
    _mean_pixels(x.reshape(n * h * w, c), h * w, np.empty((threads, n * c), np.float32), out.reshape(-1))
    return out
