"""Whether an array holds only finite values, in one pass with no branch per element.

v - v is 0 for every finite v and NaN for NaN and +-inf, so the sum of v - v over the
array is NaN exactly when a value is not finite; a sum of zeros cannot overflow, and
NaN survives any order of summation (so LLVM may reorder it into SIMD lanes).

    >>> all_finite(np.array([1.0, np.inf], np.float32))
    False
"""
import numpy as np
from numba import njit

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)

KERNEL_VERSION = "finite-3"


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@njit(cache=CACHE, fastmath={"reassoc"})
def _nonfinite_sum(x):
    # 1-D only (callers flatten): one compiled version per dtype, which `fxopt warmup` compiles
    s = x.dtype.type(0)
    for i in range(x.size):
        v = x[i]
        s += v - v
    return s


def all_finite(x: np.ndarray) -> bool:
    """True if every value of float32/float64 x is finite (NaN and inf are not)."""
    if x.dtype not in _FLOATS:    # dtype instances: a check the runtime's entry pays per call
        raise TypeError(f"all_finite: x must be float32 or float64, got {x.dtype}")
    s = _nonfinite_sum(x.reshape(-1))
    return s == s
