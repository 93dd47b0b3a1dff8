"""Batched int8 matmul for attention (Q @ K^T, P @ V), both operands activations.

The left operand is quantized per row (dynamic asymmetric uint8), the right
one per output column (dynamic symmetric int8), both on the fly; the int32
products are dequantized to float32 in the GEMM's epilogue.

    >>> scores = bmm_f32_int8(q, k, transpose_b=True)    # (B, M, K) x (B, N, K)
    >>> ctx = bmm_f32_int8(p, v)                         # (B, M, K) x (B, K, N)
"""
import numpy as np

from .dispatch import KernelError
from .linear import _run, epilogue_params
from .pack import PackedWeights, aligned_empty
from .simd import BLOCK_COLS

KERNEL_VERSION = "attention-1"
_NO_Q = np.empty((0, 0), np.uint8)
_NO_F = np.empty(0, np.float32)
_NO_I = np.empty(0, np.int32)


def _quantize_pack_batch(bt):
    """(B, N, K) float32 -> per-batch PackedWeights, vectorized over the batch."""
    nb, n, k = bt.shape
    amax = np.abs(bt).max(axis=2)
    scales = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(bt / scales[:, :, None]), -127, 127).astype(np.int8)
    blocks, kg = (n + BLOCK_COLS - 1) // BLOCK_COLS, (k + 3) // 4
    padded = np.zeros((nb, blocks * BLOCK_COLS, kg * 4), np.int8)
    padded[:, :n, :k] = q
    data = aligned_empty((nb, blocks * kg * 4 * BLOCK_COLS), np.int8)
    data[...] = padded.reshape(nb, blocks, BLOCK_COLS, kg, 4).transpose(0, 1, 3, 2, 4).reshape(nb, -1)
    sums = q.sum(axis=2, dtype=np.int32)
    return [PackedWeights(data[i], scales[i], sums[i], n, k, "any") for i in range(nb)]


def bmm_f32_int8(a, b, transpose_b=False, n_threads=None):
    """float32 (B, M, K) x (B, K, N) -> (B, M, N) through int8 (or b as
    (B, N, K) with transpose_b=True, the Q @ K^T case). Leading dims beyond
    one batch dim are flattened and restored.
    """
    a = np.ascontiguousarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.ndim < 3 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2]:
        raise KernelError(f"bmm_f32_int8: need matching batch dims, got {a.shape} and {b.shape}")
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    bt = b if transpose_b else np.swapaxes(b, -1, -2)
    bt = np.ascontiguousarray(bt.reshape(-1, *bt.shape[-2:]))
    if bt.shape[2] != a3.shape[2]:
        raise KernelError(f"bmm_f32_int8: inner dims differ ({a3.shape[2]} vs {bt.shape[2]})")
    n = bt.shape[1]
    out = np.empty((a3.shape[0], a3.shape[1], n), np.float32)
    zero_bias = np.zeros(n, np.float32)
    ep = epilogue_params()
    for i, pw in enumerate(_quantize_pack_batch(bt)):
        _run(a3[i], _NO_Q, _NO_F, _NO_I, pw, zero_bias, ep, out[i], n_threads)
    return out.reshape(*lead, a3.shape[1], n)
