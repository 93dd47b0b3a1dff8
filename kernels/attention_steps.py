"""One (batch, head) of the fused int8 attention, step by step (see attention.py).

Operands are read from flat float32 views at a base offset with a row stride
(elements); the outputs are the GEMM's operands: uint8 rows (Q, P; stored as uint16
on the avx2 path, simd.A_DTYPES) with their
per-row scale and zero point, and int8 columns packed in pack.py's VNNI layout
(K, V) with their per-column scale and sums.
"""
import numpy as np
from numba import njit

from .epilogue import exp_f32
from .rowops import absmax_cols, masked_max_f32, minmax_f32, quantize_u8
from .simd import BLOCK_COLS

KERNEL_VERSION = "attention-steps-5"
MASK_NONE, MASK_FLOAT, MASK_BOOL = 0, 1, 2

_F0, _F1, _F127, _F255 = (np.float32(v) for v in (0.0, 1.0, 127.0, 255.0))
_NEG_INF = np.float32(-np.inf)
_S8, _S16, _S24 = np.int32(8), np.int32(16), np.int32(24)


# --- quantize and pack the operands ----------------------------------------------------

@njit(inline="always")
def _range(x, off, n):
    """(min(0, x[off:off+n]), max(0, ...)), as quantize.row_range."""
    lo, hi = minmax_f32(x, off, n)
    return min(lo, _F0), max(hi, _F0)


@njit(inline="always")
def _abs_max(x, off, n):
    lo, hi = minmax_f32(x, off, n)
    return max(-lo, hi, _F0)


@njit(error_model="numpy")
def _q_row_params(lo, hi, n, qscale, qzp, zp, inv):
    """quantize.scale_zero_point and 1 / scale for n rows at once: across rows the
    divisions pipeline (vectorized) instead of forming one row's latency chain."""
    for i in range(n):
        s = (hi[i] - lo[i]) / _F255
        s = s if s != _F0 else _F1
        z = min(max(np.rint(-lo[i] / s), _F0), _F255)
        qscale[i] = s
        qzp[i] = np.int32(z)
        zp[i] = z
        inv[i] = _F1 / s


@njit(error_model="numpy")
def quantize_q_rows(qf, base, row_stride, sq, d, qa, qscale, qzp, tmp):
    """Rows of Q (flat, from `base`) -> uint8 rows of qa with per-row scale/zp
    (dynamic asymmetric, as quantize.py); columns d..(d rounded up to 4) get the
    zero point (they meet zero keys). tmp: float32 scratch (4, >= sq)."""
    kp = (d + 3) // 4 * 4
    lo, hi, zp, inv = tmp[0], tmp[1], tmp[2], tmp[3]
    for i in range(sq):
        lo[i], hi[i] = _range(qf, np.uint64(base + i * row_stride), d)
    _q_row_params(lo, hi, sq, qscale, qzp, zp, inv)
    for i in range(sq):
        ui, z = np.uint64(i), zp[i]
        quantize_u8(qf, base + i * row_stride, d, inv[i], np.int32(z), qa, i * qa.shape[1])
        for c in range(d, kp):
            qa[ui, np.uint64(c)] = np.uint8(z)


@njit(error_model="numpy")
def _k_row_params(amax, n, scale, kscale, inv):
    """Symmetric int8 scales of n keys (times the softmax scale) and 1 / scale."""
    for j in range(n):
        s = amax[j] / _F127 if amax[j] > _F0 else _F1
        kscale[j] = s * scale
        inv[j] = _F1 / s


@njit(error_model="numpy")
def quantize_k_rows(kf, base, row_stride, sk, d, scale, kt, kscale, ksum, tmp):
    """Keys -> int8 rows of kt, symmetric per key; kscale gets the key's scale
    times the softmax scale, ksum the key's sum (for the zero point term)."""
    amax, inv = tmp[0], tmp[1]
    for j in range(sk):
        amax[j] = _abs_max(kf, np.uint64(base + j * row_stride), d)
    _k_row_params(amax, sk, scale, kscale, inv)
    for j in range(sk):
        off, uj = np.uint64(base + j * row_stride), np.uint64(j)
        r = inv[j]
        total = np.int32(0)
        for c in range(d):
            qv = np.int32(min(max(np.rint(kf[off + np.uint64(c)] * r), -_F127), _F127))
            kt[uj, np.uint64(c)] = np.int8(qv)
            total += qv
        ksum[j] = total


@njit
def pack_k(sk, kt32, kp32):
    """Quantized keys (rows of kt32, 4-byte k-groups) into the packed N x K
    operand (N = keys): block nb, k-group g holds the words of keys
    64 nb .. 64 nb + 63 side by side. Written as contiguous stores with
    strided loads: the other loop order vectorizes into scatters, which
    are microcoded and slow on AMD."""
    kg = kt32.shape[1]
    for nb in range((sk + BLOCK_COLS - 1) // BLOCK_COLS):
        j0 = nb * BLOCK_COLS
        n = min(BLOCK_COLS, sk - j0)
        for g in range(kg):
            dst = np.uint64((nb * kg + g) * BLOCK_COLS)
            ug = np.uint64(g)
            for c in range(n):
                kp32[dst + np.uint64(c)] = kt32[np.uint64(j0 + c), ug]


@njit(error_model="numpy")
def v_scales(vf, base, row_stride, sk, dv, vmax, vscale, vinv):
    """Per-column (d) symmetric int8 scales of V and their inverses."""
    absmax_cols(vf, base, row_stride, sk, dv, vmax)
    for c in range(dv):
        s = vmax[c] / _F127 if vmax[c] > _F0 else _F1
        vscale[c] = s
        vinv[c] = _F1 / s


@njit(inline="always")
def _q8(x, inv):
    """One value to int8 (as the low byte of an int32)."""
    v = min(max(np.rint(x * inv), -_F127), _F127)
    return np.int32(v) & np.int32(0xFF)


@njit(fastmath={"nnan", "nsz"}, error_model="numpy")
def pack_v(vf, base, row_stride, sk, dv, vinv, vp32):
    """V (keys x dv) -> int8 packed as the N x K operand (N = dv, K = keys).

    A k-group holds 4 consecutive keys: the packed word of column c is the
    4 quantized bytes V[4g..4g+3, c], built with shifts so the loop over c
    vectorizes. Keys past sk (the last group's tail) stay zero.
    """
    kg = (sk + 3) // 4
    for g in range(kg):
        o0 = base + 4 * g * row_stride
        nk = min(4, sk - 4 * g)
        for nb in range((dv + BLOCK_COLS - 1) // BLOCK_COLS):
            c0 = nb * BLOCK_COLS
            dst = np.uint64((nb * kg + g) * BLOCK_COLS)
            n = min(BLOCK_COLS, dv - c0)
            if nk == 4:
                r0, r1 = np.uint64(o0 + c0), np.uint64(o0 + row_stride + c0)
                r2, r3 = np.uint64(o0 + 2 * row_stride + c0), np.uint64(o0 + 3 * row_stride + c0)
                for c in range(n):
                    u = np.uint64(c)
                    inv = vinv[np.uint64(c0) + u]
                    vp32[dst + u] = (_q8(vf[r0 + u], inv) | (_q8(vf[r1 + u], inv) << _S8)
                                     | (_q8(vf[r2 + u], inv) << _S16)
                                     | (_q8(vf[r3 + u], inv) << _S24))
            else:
                for c in range(n):
                    inv = vinv[c0 + c]
                    w = np.int32(0)
                    for kk in range(nk):
                        w |= _q8(vf[o0 + kk * row_stride + c0 + c], inv) << np.int32(8 * kk)
                    vp32[dst + np.uint64(c)] = w


# --- masked softmax, quantized to uint8 -------------------------------------------------

@njit
def _add_mask_float(s, ui, n, mf, moff):
    for j in range(n):
        u = np.uint64(j)
        s[ui, u] += mf[moff + u]


@njit(fastmath={"reassoc", "nsz", "contract"}, error_model="numpy")
def _exp_quantize_row(s, ui, n, mx, pa):
    """pa[i, j] = rint(255 exp(s - mx)) for j < n; returns the float sum of exp."""
    total = _F0
    for j in range(n):
        u = np.uint64(j)
        e = exp_f32(s[ui, u] - mx)
        total += e
        pa[ui, u] = np.uint8(np.int32(min(np.rint(e * _F255), _F255)))
    return total


@njit(fastmath={"reassoc", "nsz", "contract"}, error_model="numpy")
def _exp_quantize_row_kept(s, ui, n, mx, mb, moff, pa):
    """_exp_quantize_row with e = 0 where the bool mask byte is 0."""
    total = _F0
    for j in range(n):
        u = np.uint64(j)
        e = exp_f32(s[ui, u] - mx) if mb[moff + u] != 0 else _F0
        total += e
        pa[ui, u] = np.uint8(np.int32(min(np.rint(e * _F255), _F255)))
    return total


@njit(error_model="numpy")
def softmax_rows(s, sk, mkind, mf, mb, moff, mrow, causal, pa, pscale, maxes):
    """Scaled scores s (Sq, Sk) -> uint8 P rows in pa and their scales.

    Keys a row may not see (causal tail) and the columns up to the k-group
    boundary are 0 in pa; a fully masked row gets scale 0, so its output is
    exactly 0. maxes: float32 scratch (>= Sq).

    Every row's max first, then every row's exps: one row's max and then its exps,
    the same operations, took 13.4 us a 128 x 128 head (no mask) where the two passes
    take 7.9, and the whole attention of BERT-base at 8 x 128 3.32 ms where it takes
    2.44 (Xeon with AVX-512 and AMX, one thread; the same bits).
    """
    kp = (sk + 3) // 4 * 4
    ld = np.uint64(s.shape[1])
    for i in range(s.shape[0]):
        ui = np.uint64(i)
        n = min(sk, i + 1) if causal else sk
        roff = np.uint64(moff + i * mrow)
        if mkind == MASK_BOOL:
            maxes[i] = masked_max_f32(s, ui * ld, n, mb, roff)
        else:
            if mkind == MASK_FLOAT:
                _add_mask_float(s, ui, n, mf, roff)
            maxes[i] = minmax_f32(s, ui * ld, n)[1]
    for i in range(s.shape[0]):
        ui = np.uint64(i)
        n = min(sk, i + 1) if causal else sk
        roff = np.uint64(moff + i * mrow)
        mx = maxes[i]
        if mx == _NEG_INF or n == 0:
            n = 0
            pscale[i] = _F0
        else:
            if mkind == MASK_BOOL:
                total = _exp_quantize_row_kept(s, ui, n, mx, mb, roff, pa)
            else:
                total = _exp_quantize_row(s, ui, n, mx, pa)
            pscale[i] = _F1 / (_F255 * total)
        for j in range(n, kp):
            pa[ui, np.uint64(j)] = np.uint8(0)
