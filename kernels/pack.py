"""Weight quantization and packing into the GEMM's VNNI layout.

Packed layout (one flat, 64-byte aligned int8 array):
N is padded to a multiple of 64 and K to a multiple of 4 with zeros; block
``nb`` of 64 output channels holds ``Kp / 4`` k-groups of 256 bytes, and in
k-group g byte ``4 * c + kk`` is ``W[64 * nb + c, 4 * g + kk]``. A 64-byte
vector thus feeds one ``vpdpbusd`` with 16 channels x 4 k; every ISA path
reads this same layout.

A PackedWeights is plain arrays plus ints, so it can be saved with
``np.savez(f, **pw.to_arrays())`` and restored with
``PackedWeights.from_arrays(**np.load(f))`` - no pickle.
"""
import math
from typing import NamedTuple

import numpy as np

from .dispatch import KernelError, isa as current_isa
from .simd import BLOCK_COLS

KERNEL_VERSION = "pack-1"
ALIGN = 64


def aligned_empty(shape, dtype, align=ALIGN):
    """np.empty whose data pointer is a multiple of ``align`` bytes."""
    dtype = np.dtype(dtype)
    # math.prod, not np.prod: 0.06 against 2.8 us, on every conv call's A rows
    nbytes = int(math.prod(shape if isinstance(shape, tuple) else np.atleast_1d(shape).tolist())) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def aligned_copy(a, align=ALIGN):
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


def packed_nbytes(n, k):
    """Bytes of the packed layout of an (n, k) int8 weight: N padded to 64, K to 4."""
    return (n + BLOCK_COLS - 1) // BLOCK_COLS * ((k + 3) // 4) * 4 * BLOCK_COLS


class PackedWeights(NamedTuple):
    """int8 weights (N x K) packed for the GEMM.

    data: flat int8, 64-byte aligned, layout in the module docstring
    scales: float32 (N,) per-output-channel weight scales
    col_sums: int32 (N,) sum over k of W[n, k] (zero-point compensation)
    n, k: logical shape; isa: the ISA path active when packed (informative:
    every path reads the same layout)
    """
    data: np.ndarray
    scales: np.ndarray
    col_sums: np.ndarray
    n: int
    k: int
    isa: str

    @property
    def k_groups(self):
        return (self.k + 3) // 4

    def to_arrays(self):
        """Plain arrays and ints for np.savez (no pickle needed)."""
        return {"data": self.data, "scales": self.scales, "col_sums": self.col_sums,
                "n": np.int64(self.n), "k": np.int64(self.k), "isa": np.str_(self.isa)}

    @classmethod
    def from_arrays(cls, data, scales, col_sums, n, k, isa="portable"):
        n, k = int(n), int(k)
        if n < 1 or k < 1:
            raise KernelError(f"packed weights need N >= 1 and K >= 1, got N={n}, K={k}")
        expected = packed_nbytes(n, k)
        data = np.asarray(data, np.int8).reshape(-1)
        if data.size != expected:
            raise KernelError(f"packed data has {data.size} bytes, expected "
                              f"{expected} for N={n}, K={k}")
        if data.ctypes.data % ALIGN:
            data = aligned_copy(data)
        scales, col_sums = np.asarray(scales), np.asarray(col_sums)
        if scales.shape != (n,) or col_sums.shape != (n,):
            raise KernelError(f"scales and col_sums must have shape ({n},), got {scales.shape} "
                              f"and {col_sums.shape}")
        scales = np.ascontiguousarray(scales, np.float32)
        col_sums = np.ascontiguousarray(col_sums, np.int32)
        return cls(data, scales, col_sums, n, k, str(isa))


def quantize_weights_s8(w):
    """Symmetric per-output-channel int8 quantization of fp32 weights (N, K).

    Returns (q int8 (N, K) in [-127, 127], scales float32 (N,)) with
    w ~= q * scales[:, None].

        >>> q, s = quantize_weights_s8(np.random.randn(16, 32).astype(np.float32))
    """
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise KernelError(f"weights must be 2-D (N, K), got shape {w.shape}")
    amax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scales = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


def pack_weights_s8(q, scales):
    """Pack int8 weights (N, K) and their scales (N,) into PackedWeights.

        >>> pw = pack_weights_s8(*quantize_weights_s8(w))
    """
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2:
        raise KernelError(f"weights must be a 2-D int8 array, got {q.dtype} {q.shape}")
    n, k = q.shape
    if n == 0 or k == 0:
        raise KernelError(f"weights must be non-empty, got shape {q.shape}")
    scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
    if scales.shape != (n,):
        raise KernelError(f"need one scale per output channel ({n}), got {scales.shape}")
    blocks, kg = (n + BLOCK_COLS - 1) // BLOCK_COLS, (k + 3) // 4
    padded = np.zeros((blocks * BLOCK_COLS, kg * 4), np.int8)
    padded[:n, :k] = q
    layout = padded.reshape(blocks, BLOCK_COLS, kg, 4).transpose(0, 2, 1, 3)
    data = aligned_empty(layout.size, np.int8)
    data[:] = layout.reshape(-1)
    col_sums = q.sum(axis=1, dtype=np.int64).astype(np.int32)
    return PackedWeights(data, scales, col_sums, n, k, current_isa())
