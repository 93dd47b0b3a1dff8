"""int4 weight layout: two weights a byte, in the order the int4 kernel (int4.py) streams them.

    >>> pw = pack_int4(q, scales, group=32)      # q: int8 (N, K), |q| <= 7; scales (N, K/32)
    >>> np.array_equal(unpack_int4(pw.data, pw.n, pw.k), q)
    True

The numbers are fxopt.quant.qops.quantize_weight_groups's: symmetric, |q| <= 7, one float32
scale per group of `group` weights along K. Layout: output columns in blocks of COLS (8; N is
padded with zero columns to whole blocks), each block's K in steps of 8, one step one 32-byte
vector: byte 4c + j holds column c's weight k0 + j in its low nibble and k0 + 4 + j in its
high one, each stored as q + 8 (0..15). The kernel masks the low nibbles and shifts the high
ones into place, two vectors in the dense kernel's order (4 k of 8 columns, one 32-bit lane a
column) from one load, so every weight byte is read once. The + 8 makes a nibble unsigned;
the kernel takes 8 * (the activations' sum over the group) off again.
Scales and column sums (the sum of q over a group, for the activation zero point) are laid
out [block, group, column of the block], one 8-lane vector per (block, group).
"""
import numpy as np

from .dispatch import KernelError

GROUP_SIZES = (32, 64, 128)
COLS = 8            # output columns a block, one 32-bit lane each
STEP_K = 8          # k values of one step: 4 in the low nibbles, 4 in the high
STEP_BYTES = 32
QMAX = 7


class PackedInt4:
    """int4 weights in the kernel's layout: data (uint8, N_pad * K / 2), scales (float32) and
    col_sums (int32), both (blocks, groups, COLS), for an (n, k) weight in groups of `group`."""
    __slots__ = ("data", "scales", "col_sums", "n", "k", "group")

    def __init__(self, data, scales, col_sums, n, k, group):
        self.data, self.scales, self.col_sums = data, scales, col_sums
        self.n, self.k, self.group = int(n), int(k), int(group)

    @property
    def blocks(self):
        return -(-self.n // COLS)

    @property
    def groups(self):
        return self.k // self.group

    @classmethod
    def from_arrays(cls, data, scales, col_sums, n, k):
        """Rebuild from the op's stored buffers: data (the packed bytes), scales (N, K/group)
        and col_sums (N, K/group), or an empty col_sums: computed from the bytes (a graph
        stores none, they would take a quarter of the int4 bytes); checks every shape."""
        group = check_shapes(data, scales, col_sums, n, k)
        data = np.ascontiguousarray(data)
        sums = nibble_group_sums(data, n, k, group)
        if col_sums.size and not np.array_equal(sums, _blocked(col_sums, n, np.int32(0))):
            raise KernelError("int4: col_sums are not the group sums of the packed weights")
        return cls(data, _blocked(scales, n, np.float32(1)), sums, n, k, group)

    def natural(self):
        """(scales, col_sums) as (N, K/group) arrays, the form stored in a graph."""
        return _unblocked(self.scales, self.n), _unblocked(self.col_sums, self.n)


def check_group(k, group):
    if group not in GROUP_SIZES:
        raise KernelError(f"int4 group size must be one of {GROUP_SIZES}, got {group!r}")
    if k <= 0 or k % group:
        raise KernelError(f"int4: the input dim K={k} is not a multiple of the group size {group}: "
                          f"pick a group size that divides it, or keep this layer int8")


def check_shapes(data, scales, col_sums, n, k):
    """The group size the buffers imply; KernelError naming what is off."""
    if n <= 0 or k <= 0:
        raise KernelError(f"int4: n and k must be positive, got n={n}, k={k}")
    if not (isinstance(scales, np.ndarray) and scales.ndim == 2 and scales.shape[0] == n
            and scales.shape[1] > 0 and k % scales.shape[1] == 0):
        raise KernelError(f"int4: scales must be float32 (N={n}, K/group), got "
                          f"{getattr(scales, 'dtype', type(scales))} {getattr(scales, 'shape', '')}")
    group = k // scales.shape[1]
    check_group(k, group)
    if scales.dtype != np.float32 or not np.all(np.isfinite(scales)):
        raise KernelError("int4: scales must be finite float32")
    if not (isinstance(col_sums, np.ndarray) and col_sums.dtype == np.int32
            and (col_sums.shape == scales.shape or col_sums.shape == (0,))):
        raise KernelError(f"int4: col_sums must be int32 {scales.shape} or empty (0,), got "
                          f"{getattr(col_sums, 'dtype', type(col_sums))} {getattr(col_sums, 'shape', '')}")
    nbytes = -(-n // COLS) * COLS * k // 2
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1 and data.size == nbytes):
        raise KernelError(f"int4: packed data must be {nbytes} uint8 bytes for N={n}, K={k}, got "
                          f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
    return group


def _blocked(a, n, fill):
    """(N, G) -> (blocks, G, COLS), padded columns `fill`."""
    nb = -(-n // COLS)
    p = np.full((nb * COLS, a.shape[1]), fill, a.dtype)
    p[:n] = a
    return np.ascontiguousarray(p.reshape(nb, COLS, a.shape[1]).transpose(0, 2, 1))


def _unblocked(b, n):
    nb, g, _ = b.shape
    return np.ascontiguousarray(b.transpose(0, 2, 1).reshape(nb * COLS, g)[:n])


def pack_int4(q, scales, group):
    """PackedInt4 of int8 q (N, K) with |q| <= 7 and float32 scales (N, K/group)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype != np.int8:
        raise KernelError(f"int4: q must be a 2-D int8 array, got {q.dtype} {q.shape}")
    n, k = q.shape
    check_group(k, group)
    if q.size and int(np.abs(q.astype(np.int16)).max()) > QMAX:
        raise KernelError(f"int4: weights must lie in [-{QMAX}, {QMAX}] (quantize_weight_groups' grid)")
    scales = np.ascontiguousarray(scales, np.float32)
    if scales.shape != (n, k // group):
        raise KernelError(f"int4: scales must have shape {(n, k // group)}, got {scales.shape}")
    col_sums = q.astype(np.int32).reshape(n, k // group, group).sum(axis=2, dtype=np.int32)
    return PackedInt4(pack_nibbles(q), _blocked(scales, n, np.float32(1)), _blocked(col_sums, n, np.int32(0)),
                      n, k, group)


def nibble_group_sums(data, n, k, group):
    """int32 (blocks, groups, COLS): each column's sum of q over each group, from the bytes."""
    nb = -(-n // COLS)
    b = data.reshape(nb, k // group, group // STEP_K, COLS, 4)
    s = (b & 15).astype(np.int32) + (b >> 4)
    return np.ascontiguousarray(s.sum(axis=(2, 4), dtype=np.int32) - 8 * group)


def pack_nibbles(q):
    """The packed bytes of int8 q (N, K): see the module docstring."""
    n, k = q.shape
    nb = -(-n // COLS)
    u = np.full((nb * COLS, k), 8, np.uint8)
    u[:n] = (q.astype(np.int16) + 8).astype(np.uint8)
    # (block, column, step, half, j) -> (block, step, column, j, half)
    u = u.reshape(nb, COLS, k // STEP_K, 2, 4).transpose(0, 2, 1, 4, 3)
    return np.ascontiguousarray(u[..., 0] | (u[..., 1] << 4)).reshape(-1)


def unpack_int4(data, n, k):
    """int8 (n, k) weights of packed bytes, exactly those pack_nibbles took."""
    nb = -(-n // COLS)
    b = np.asarray(data, np.uint8).reshape(nb, k // STEP_K, COLS, 4)
    u = np.stack([b & 15, b >> 4], axis=-1)                     # (block, step, column, j, half)
    q = u.transpose(0, 2, 1, 4, 3).reshape(nb * COLS, k).astype(np.int16) - 8
    return q[:n].astype(np.int8)


def packed_nbytes(n, k):
    return -(-n // COLS) * COLS * k // 2
