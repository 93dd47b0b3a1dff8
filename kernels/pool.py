"""Max pooling of NHWC images, for the uint8 activations chained int8 convs hand on.

Quantization is monotone, so the max of the codes is the code of the max: a max pool
between two int8 convs runs on the uint8 codes and changes nothing (torch's CPU max pool
has no uint8 path).

    >>> y = max_pool2d_nhwc(x, (3, 3), stride=(2, 2), padding=(1, 1))   # x (N, H, W, C)
"""
import numpy as np
from numba import njit, prange

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .dispatch import KernelError

KERNEL_VERSION = "pool-1"


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
