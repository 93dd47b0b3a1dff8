"""Packing int8 weights into the sparse kernel's slot layout (see sparse.py for the layout
and why), the PackedSparse it makes (plain arrays, saved as one uint8 blob), and its exact
inverse, unpack_sparse_s8.

    >>> ps = pack_sparse_s8(*quantize_weights_s8(w))
    >>> blob = ps.to_bytes(); PackedSparse.from_bytes(blob, ps.scales, ps.col_sums, ps.n, ps.k)
    >>> q = unpack_sparse_s8(ps)          # the int8 (N, K) matrix that was packed
"""
from typing import NamedTuple

import numpy as np
from numba import njit

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .dispatch import KernelError, host_features
from .pack import aligned_empty

KERNEL_VERSION = "sparse-pack-2"
SLICE = 8           # output rows per slice (int32 lanes of a ymm)
SLOTS = 4           # byte slots per row and step
WINDOW = 32         # k a step can reach from its start: two vpshufb tables of 16
HIGH = 0x80         # slot index byte: (k - start) & 15, plus HIGH for the window's second 16
STEP = SLICE * SLOTS
# the wide layout (sparse.py: CPUs with AVX512-VBMI): slices of 16 rows, 4 slots a row, a
# window of 64 k that one vpermb looks up, slot index k - start; 64-byte steps
WIDE_SLICE = 16
WIDE_WINDOW = 64
WIDE_STEP = WIDE_SLICE * SLOTS
# whether this CPU runs the wide layout's step loop (vpermb and the 512-bit vpdpbusd)
WIDE_HOST = {"avx512vbmi", "avx512vnni", "avx512bw"} <= host_features()
# the blob's first 4 bytes: a layout of another version (sparse-pack-1 began with a zero
# int32, and read its chunk numbers as chunks of 32) is refused, not misread
MAGIC = np.frombuffer(b"SPK2", np.uint8)


@njit(cache=CACHE)
def _next_nonzero(q, row, k):
    """The first k' >= k with q[row, k'] != 0, or K."""
    while k < q.shape[1] and q[row, k] == 0:
        k += 1
    return k


@njit(cache=CACHE)
def _pack(q, slice_ptr, starts, idx, val, fill, slice_rows, window, wide):
    """Count the steps (fill False: slice_ptr only) or write them (fill True; idx and val
    zeroed beforehand). A slice's rows walk their nonzeros in k order together; each step's
    window starts at the lowest k any row has left, and every row puts up to SLOTS of its
    nonzeros inside the window in its slots: a row with few nonzeros near that k costs empty
    slots, but no step waits on a fixed chunk grid (31 % fewer steps than chunks of 32 at
    90 % random sparsity). slice_rows, window: SLICE and WINDOW, or the wide layout's
    (wide True: slot index k - start)."""
    n, k = q.shape
    nxt = np.empty(slice_rows, np.int64)
    step = slice_rows * SLOTS
    j = 0
    for s in range((n + slice_rows - 1) // slice_rows):
        slice_ptr[s] = j
        r0 = s * slice_rows
        rows = min(slice_rows, n - r0)
        for r in range(rows):
            nxt[r] = _next_nonzero(q, r0 + r, 0)
        while True:
            k0 = k
            for r in range(rows):
                k0 = min(k0, nxt[r])
            if k0 >= k:
                break
            if fill:
                starts[j] = k0
            for r in range(rows):
                kk, b = nxt[r], 0
                while kk < k0 + window and kk < k and b < SLOTS:
                    if fill:
                        o = j * step + r * SLOTS + b
                        idx[o] = kk - k0 if wide else (kk - k0) % 16 + HIGH * ((kk - k0) // 16)
                        val[o] = q[r0 + r, kk]
                    b += 1
                    kk = _next_nonzero(q, r0 + r, kk + 1)
                nxt[r] = kk
            j += 1
    slice_ptr[(n + slice_rows - 1) // slice_rows] = j
    return j


class WideSteps(NamedTuple):
    """The wide layout of the same weights (empty arrays where the CPU lacks AVX512-VBMI)."""
    slice_ptr: np.ndarray   # int32 (ceil(N/16) + 1,)
    starts: np.ndarray      # int32 (steps,)
    idx: np.ndarray         # uint8 (steps * 64,): k - start
    val: np.ndarray         # int8 (steps * 64,)


NO_WIDE = WideSteps(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int8))


def _layout(q, slice_rows, window, wide):
    """(slice_ptr, starts, idx, val) of int8 weights q in one of the two layouts."""
    slice_ptr = np.zeros((q.shape[0] + slice_rows - 1) // slice_rows + 1, np.int32)
    none = (np.empty(0, np.int32), np.empty(0, np.uint8), np.empty(0, np.int8))
    steps = _pack(q, slice_ptr, *none, False, slice_rows, window, wide)
    step = slice_rows * SLOTS
    # steps on cache lines: the wide loop's 64-byte loads split in two otherwise (1.35 -> 1.05 ns a step)
    starts = np.empty(steps, np.int32)
    idx, val = aligned_empty(steps * step, np.uint8), aligned_empty(steps * step, np.int8)
    idx[:], val[:] = 0, 0
    _pack(q, slice_ptr, starts, idx, val, True, slice_rows, window, wide)
    return slice_ptr, starts, idx, val


def wide_steps(q):
    """WideSteps of int8 weights q (N, K), or NO_WIDE where the kernels cannot run them."""
    if not WIDE_HOST:
        return NO_WIDE
    return WideSteps(*_layout(np.ascontiguousarray(q), WIDE_SLICE, WIDE_WINDOW, True))


class PackedSparse(NamedTuple):
    """int8 weights (N x K) in the slot layout of sparse.py's docstring, with the per-channel
    scales and column sums of the dense PackedWeights (the same epilogue reads them), and
    the int32 each output row's sum starts from on the SIMD path (sparse.py: why)."""
    slice_ptr: np.ndarray   # int32 (ceil(N/8) + 1,)
    starts: np.ndarray      # int32 (steps,): each step's first k
    idx: np.ndarray         # uint8 (steps * 32,)
    val: np.ndarray         # int8 (steps * 32,)
    scales: np.ndarray
    col_sums: np.ndarray
    n: int
    k: int
    offsets: np.ndarray     # int32 (ceil(N/8) * 8,): 128 * (row's sum) - (sum of its negative weights)
    wide: WideSteps = NO_WIDE   # the same weights in the wide layout (not saved: rebuilt on load)

    @property
    def steps(self):
        return int(self.starts.shape[0])

    @property
    def nbytes(self):
        """Bytes of the saved layout (the wide one is rebuilt on load)."""
        return self.slice_ptr.nbytes + self.starts.nbytes + self.idx.nbytes + self.val.nbytes

    def to_bytes(self):
        """The layout as one uint8 array (what the lowered op keeps): MAGIC, slice_ptr,
        starts, idx, val (offsets and the rest are recomputed or stored apart)."""
        return np.concatenate([MAGIC, self.slice_ptr.view(np.uint8), self.starts.view(np.uint8), self.idx,
                               self.val.view(np.uint8)])

    @classmethod
    def from_bytes(cls, blob, scales, col_sums, n, k, wide=True):
        """Inverse of to_bytes, checked: the kernel reads only inside its arrays whatever
        the blob (a corrupt file is a KernelError, not a wild read). wide False: without
        the wide layout (for a check or an unpack, not for the kernel)."""
        n, k = int(n), int(k)
        if n < 1 or k < 1:
            raise KernelError(f"sparse weights need N >= 1 and K >= 1, got N={n}, K={k}")
        blob = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
        head = 4 + 4 * (slices(n) + 1)
        if blob.size < head or not np.array_equal(blob[:4], MAGIC):
            raise KernelError(f"sparse weights: {blob.size} bytes that do not begin with the {KERNEL_VERSION} "
                              f"layout's mark; the data is corrupt or from another fxopt version (optimize "
                              f"and save the model again)")
        slice_ptr = blob[4:head].copy().view(np.int32)
        steps = int(slice_ptr[-1])
        expected = head + (4 + 2 * STEP) * steps if steps >= 0 else -1
        if blob.size != expected or slice_ptr[0] != 0 or np.any(np.diff(slice_ptr) < 0):
            raise KernelError(f"sparse weights: a slice table of {slices(n)} slices that does not fit "
                              f"the {blob.size} bytes given (N={n}, K={k}); the data is corrupt")
        off = head + 4 * steps
        starts = blob[head:off].copy().view(np.int32)
        idx = blob[off:off + STEP * steps].copy()
        val = blob[off + STEP * steps:].copy().view(np.int8)
        if steps and (starts.min() < 0 or starts.max() >= k or np.any(idx & ~np.uint8(HIGH | 15))):
            raise KernelError(f"sparse weights: a step start or slot index past K={k}; the data is corrupt")
        if np.any(val == -128):
            raise KernelError("sparse weights: a weight of -128 (outside quantize_weights_s8's [-127, 127]); "
                              "the data is corrupt")
        scales, col_sums = np.asarray(scales), np.asarray(col_sums)
        if scales.shape != (n,) or col_sums.shape != (n,):
            raise KernelError(f"scales and col_sums must have shape ({n},), got {scales.shape} and "
                              f"{col_sums.shape}")
        col_sums = np.ascontiguousarray(col_sums, np.int32)
        ps = cls(slice_ptr, starts, idx, val, np.ascontiguousarray(scales, np.float32), col_sums, n, k,
                 _offsets(slice_ptr, val, n))
        return ps._replace(wide=wide_steps(unpack_sparse_s8(ps))) if wide and WIDE_HOST else ps


def _offsets(slice_ptr, val, n):
    """PackedSparse.offsets, from the packed values alone: sum over row n of the SIMD
    path's |w| * (a - 128) (w > 0) and |w| * (127 - a) (w < 0) is sum(w * a) - 128 * sum(w)
    + sum(w < 0), so the row's sum starts from 128 * sum(w) - sum(w < 0) (sparse.py)."""
    rows = np.repeat(np.arange(slices(n)) * SLICE, np.diff(slice_ptr))
    lanes = (rows[:, None] + np.arange(SLICE)[None, :]).reshape(-1)
    w = val.astype(np.int64).reshape(-1, SLOTS)
    per_lane = 128 * w.sum(axis=1) - np.minimum(w, 0).sum(axis=1)
    # int32 sums wrap as the kernel's do (exact float64 counts, then modulo 2**32)
    return np.bincount(lanes, weights=per_lane, minlength=slices(n) * SLICE).astype(np.int64).astype(np.int32)


def slices(n):
    return (n + SLICE - 1) // SLICE


def density(q):
    """Fraction of nonzero entries of int8 weights q (what decides whether sparse pays)."""
    q = np.asarray(q)
    return float(np.count_nonzero(q)) / max(1, q.size)


def pack_sparse_s8(q, scales):
    """Pack int8 weights (N, K) and their per-channel scales (N,) into PackedSparse.

        >>> ps = pack_sparse_s8(*quantize_weights_s8(w))
    """
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2:
        raise KernelError(f"weights must be a 2-D int8 array, got {q.dtype} {q.shape}")
    n, k = q.shape
    if n == 0 or k == 0:
        raise KernelError(f"weights must be non-empty, got shape {q.shape}")
    if k > np.iinfo(np.int32).max - WIDE_WINDOW:
        raise KernelError(f"weights with K={k} columns: the sparse layout takes K < 2**31 - {WIDE_WINDOW}")
    if q.min() < -127:
        raise KernelError("int8 weights must be in [-127, 127] (quantize_weights_s8's range), got -128")
    scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
    if scales.shape != (n,):
        raise KernelError(f"need one scale per output channel ({n}), got {scales.shape}")
    q = np.ascontiguousarray(q)
    slice_ptr, starts, idx, val = _layout(q, SLICE, WINDOW, False)
    col_sums = q.sum(axis=1, dtype=np.int64).astype(np.int32)
    return PackedSparse(slice_ptr, starts, idx, val, scales, col_sums, n, k, _offsets(slice_ptr, val, n),
                        wide_steps(q))


def unpack_sparse_s8(ps):
    """The int8 weights (N, K) a PackedSparse holds: exactly the q pack_sparse_s8 was given.

        >>> np.array_equal(unpack_sparse_s8(pack_sparse_s8(q, scales)), q)    # True
    """
    if not isinstance(ps, PackedSparse):
        raise KernelError("unpack_sparse_s8 takes a PackedSparse from pack_sparse_s8 or PackedSparse.from_bytes")
    q = np.zeros((slices(ps.n) * SLICE, ps.k + WINDOW), np.int8)
    rows = np.repeat(np.arange(slices(ps.n)) * SLICE, np.diff(ps.slice_ptr))
    o = np.flatnonzero(ps.val)
    step, lane = o // STEP, o % STEP // SLOTS
    col = ps.starts[step].astype(np.int64) + (ps.idx[o] & 15) + 16 * (ps.idx[o] >> 7)
    q[rows[step] + lane, col] = ps.val[o]
    if np.any(q[ps.n:]) or np.any(q[:, ps.k:]):
        raise KernelError(f"sparse weights: a weight outside the {ps.n} x {ps.k} matrix; the data is corrupt")
    return np.ascontiguousarray(q[:ps.n, :ps.k])
