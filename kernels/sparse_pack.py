"""Packing int8 weights into the sparse kernel's slot layout (see sparse.py for the layout
and why), and the PackedSparse it makes: plain arrays, saved as one uint8 blob.

    >>> ps = pack_sparse_s8(*quantize_weights_s8(w))
    >>> blob = ps.to_bytes(); PackedSparse.from_bytes(blob, ps.scales, ps.col_sums, ps.n, ps.k)
"""
from typing import NamedTuple

import numpy as np
from numba import njit

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)
from .dispatch import KernelError

KERNEL_VERSION = "sparse-pack-1"
SLICE = 8           # output rows per slice (int32 lanes of a ymm)
SLOTS = 4           # byte slots per row and step
CHUNK = 32          # k per activation chunk: two vpshufb tables of 16
HIGH = 0x80         # slot index byte: k & 15, plus HIGH for k in the chunk's second 16
STEP = SLICE * SLOTS
PAIR_MAX = 128      # |a| + |b| of a slot pair: 255 * 128 < 2^15


@njit(cache=CACHE)
def _row_slots(q, n, c, ks, vs):
    """Row n's nonzeros in chunk c as slot entries (k within the chunk, value) in ks, vs,
    an empty entry (value 0) before any that would overflow its pair; returns the count."""
    k0, k1 = c * CHUNK, min(q.shape[1], (c + 1) * CHUNK)
    count = 0
    for k in range(k0, k1):
        v = np.int32(q[n, k])
        if v == 0:
            continue
        if count % 2 == 1 and abs(vs[count - 1]) + abs(v) > PAIR_MAX:
            ks[count] = 0
            vs[count] = 0
            count += 1
        ks[count] = (k - k0) % 16 + HIGH * ((k - k0) // 16)
        vs[count] = v
        count += 1
    return count


@njit(cache=CACHE)
def _pack(q, slice_ptr, chunks, idx, val, fill):
    """Count the steps (fill False: slice_ptr only) or write them (fill True)."""
    n, k = q.shape
    nchunks = (k + CHUNK - 1) // CHUNK
    ks = np.empty((SLICE, 2 * CHUNK), np.int32)
    vs = np.empty((SLICE, 2 * CHUNK), np.int32)
    counts = np.empty(SLICE, np.int64)
    j = 0
    for s in range((n + SLICE - 1) // SLICE):
        slice_ptr[s] = j
        for c in range(nchunks):
            most = 0
            for r in range(SLICE):
                counts[r] = 0
                if s * SLICE + r < n:
                    counts[r] = _row_slots(q, s * SLICE + r, c, ks[r], vs[r])
                most = max(most, counts[r])
            steps = (most + SLOTS - 1) // SLOTS
            if fill:
                for t in range(steps):
                    chunks[j + t] = c
                    for r in range(SLICE):
                        for b in range(SLOTS):
                            e = t * SLOTS + b
                            o = (j + t) * STEP + r * SLOTS + b
                            idx[o] = ks[r, e] if e < counts[r] else 0
                            val[o] = vs[r, e] if e < counts[r] else 0
            j += steps
    slice_ptr[(n + SLICE - 1) // SLICE] = j
    return j


class PackedSparse(NamedTuple):
    """int8 weights (N x K) in the slot layout of the module docstring, with the per-channel
    scales and column sums of the dense PackedWeights (the same epilogue reads them)."""
    slice_ptr: np.ndarray   # int32 (ceil(N/8) + 1,)
    chunks: np.ndarray      # uint16 (steps,)
    idx: np.ndarray         # uint8 (steps * 32,)
    val: np.ndarray         # int8 (steps * 32,)
    scales: np.ndarray
    col_sums: np.ndarray
    n: int
    k: int

    @property
    def steps(self):
        return int(self.chunks.shape[0])

    @property
    def nbytes(self):
        return self.slice_ptr.nbytes + self.chunks.nbytes + self.idx.nbytes + self.val.nbytes

    def to_bytes(self):
        """The layout as one uint8 array (what the lowered op keeps): slice_ptr, chunks
        (padded to 4 bytes), idx, val."""
        chunks = np.zeros((self.steps + 1) // 2 * 2, np.uint16)
        chunks[:self.steps] = self.chunks
        return np.concatenate([self.slice_ptr.view(np.uint8), chunks.view(np.uint8),
                               self.idx, self.val.view(np.uint8)])

    @classmethod
    def from_bytes(cls, blob, scales, col_sums, n, k):
        """Inverse of to_bytes, checked: the kernel reads only inside its arrays whatever
        the blob (a corrupt file is a KernelError, not a wild read)."""
        n, k = int(n), int(k)
        if n < 1 or k < 1:
            raise KernelError(f"sparse weights need N >= 1 and K >= 1, got N={n}, K={k}")
        blob = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
        head = 4 * (slices(n) + 1)
        if blob.size < head:
            raise KernelError(f"sparse weights: {blob.size} bytes, fewer than the {head} of the slice table")
        slice_ptr = blob[:head].copy().view(np.int32)
        steps = int(slice_ptr[-1])
        expected = head + (steps + 1) // 2 * 4 + 2 * STEP * steps if steps >= 0 else -1
        if blob.size != expected or slice_ptr[0] != 0 or np.any(np.diff(slice_ptr) < 0):
            raise KernelError(f"sparse weights: a slice table of {slices(n)} slices that does not fit "
                              f"the {blob.size} bytes given (N={n}, K={k}); the data is corrupt")
        off = head + (steps + 1) // 2 * 4
        chunks = blob[head:head + 2 * steps].copy().view(np.uint16)
        idx = blob[off:off + STEP * steps].copy()
        val = blob[off + STEP * steps:].copy().view(np.int8)
        if steps and (chunks.max() >= (k + CHUNK - 1) // CHUNK or np.any(idx & ~np.uint8(HIGH | 15))):
            raise KernelError(f"sparse weights: a chunk or slot index past K={k}; the data is corrupt")
        pairs = np.abs(val.reshape(-1, 2).astype(np.int32)).sum(axis=1)
        if pairs.size and pairs.max() > PAIR_MAX:
            raise KernelError("sparse weights: a slot pair beyond +-128 (the int16 sum would "
                              "saturate); the data is corrupt")
        scales, col_sums = np.asarray(scales), np.asarray(col_sums)
        if scales.shape != (n,) or col_sums.shape != (n,):
            raise KernelError(f"scales and col_sums must have shape ({n},), got {scales.shape} and "
                              f"{col_sums.shape}")
        return cls(slice_ptr, chunks, idx, val, np.ascontiguousarray(scales, np.float32),
                   np.ascontiguousarray(col_sums, np.int32), n, k)


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
    if q.min() < -127:
        raise KernelError("int8 weights must be in [-127, 127] (quantize_weights_s8's range), got -128")
    scales = np.ascontiguousarray(scales, np.float32).reshape(-1)
    if scales.shape != (n,):
        raise KernelError(f"need one scale per output channel ({n}), got {scales.shape}")
    q = np.ascontiguousarray(q)
    slice_ptr = np.zeros(slices(n) + 1, np.int32)
    steps = _pack(q, slice_ptr, np.empty(0, np.uint16), np.empty(0, np.uint8), np.empty(0, np.int8), False)
    chunks, idx, val = np.empty(steps, np.uint16), np.empty(steps * STEP, np.uint8), np.empty(steps * STEP, np.int8)
    _pack(q, slice_ptr, chunks, idx, val, True)
    col_sums = q.sum(axis=1, dtype=np.int64).astype(np.int32)
    return PackedSparse(slice_ptr, chunks, idx, val, scales, col_sums, n, k)


def unpack_sparse_s8(ps):
    """The (N, K) int8 weights a PackedSparse holds: the exact inverse of pack_sparse_s8
    (empty slots hold 0), for readers that need the matrix back (the compressed artifact).

        >>> np.array_equal(unpack_sparse_s8(pack_sparse_s8(q, s)), q)
        True
    """
    q = np.zeros((ps.n, ps.k), np.int8)
    steps = ps.steps
    if steps == 0:
        return q
    slice_of = np.repeat(np.arange(slices(ps.n)), np.diff(ps.slice_ptr))
    idx = ps.idx.reshape(steps, SLICE, SLOTS).astype(np.int64)
    val = ps.val.reshape(steps, SLICE, SLOTS)
    rows = np.broadcast_to(slice_of[:, None, None] * SLICE + np.arange(SLICE)[None, :, None], idx.shape)
    cols = ps.chunks.astype(np.int64)[:, None, None] * CHUNK + (idx & 15) + 16 * ((idx & HIGH) >> 7)
    keep = val != 0
    rows, cols = rows[keep], cols[keep]
    if rows.size and (rows.max() >= ps.n or cols.max() >= ps.k):
        raise KernelError(f"sparse weights: a nonzero past N={ps.n} or K={ps.k}; the data is corrupt")
    q[rows, cols] = val[keep]
    return q
