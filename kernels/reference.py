"""Plain numpy twins of every kernel, used as test references.

Written independently of the kernels (no packed layout, no tiles) and in
the most direct form; integer parts are exact (int64), float parts follow
the documented float32 formulas.
"""
import math

import numpy as np

_F0, _F1, _F255 = np.float32(0), np.float32(1), np.float32(255)


def quantize_weights_s8(w):
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8), scales


def quantize_rows_f32_u8(x):
    x = np.asarray(x, np.float32)
    lo = np.minimum(x.min(axis=1, initial=0), _F0).astype(np.float32)
    hi = np.maximum(x.max(axis=1, initial=0), _F0).astype(np.float32)
    with np.errstate(over="ignore"):
        span = (hi - lo).astype(np.float32)
    scale = np.where(np.isfinite(span), span / _F255, hi / _F255 - lo / _F255).astype(np.float32)
    scale = np.where(scale == 0, _F1, scale).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(np.float32)
    inv = (_F1 / scale).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]) + zp[:, None], 0, 255).astype(np.uint8)
    return q, scale, zp.astype(np.int32)


def quantize_tensor_f32_u8(x, scale, zero_point):
    inv = _F1 / np.float32(scale)
    q = np.rint(np.asarray(x, np.float32) * inv) + np.float32(zero_point)
    return np.clip(q, 0, 255).astype(np.uint8)


def gemm_u8s8_s32(a, w):
    """a uint8 (M, K), w int8 (N, K) -> int32 (M, N), exact."""
    return (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)


def activation(y, act="none", act_args=()):
    y = np.asarray(y, np.float64)
    if act == "relu":
        return np.maximum(y, 0)
    if act in ("relu6", "hardtanh"):
        lo, hi = act_args or ((0.0, 6.0) if act == "relu6" else (-1.0, 1.0))
        return np.clip(y, lo, hi)
    if act == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * y * (1 + erf(y / math.sqrt(2)))
    if act == "gelu_tanh":
        return 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    if act == "silu":
        return y / (1 + np.exp(-y))
    assert act == "none", act
    return y


def gemm_u8s8_f32(a, a_scales, a_zps, w, w_scales, bias=None, act="none", act_args=()):
    """float64 reference of the dequantizing epilogue."""
    m = a.shape[0]
    zps = np.broadcast_to(np.asarray(a_zps, np.int64), (m,))
    acc = (a.astype(np.int64) - zps[:, None]) @ w.astype(np.int64).T
    sa = np.broadcast_to(np.asarray(a_scales, np.float64), (m,))
    y = acc * sa[:, None] * np.asarray(w_scales, np.float64)[None, :]
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return activation(y, act, act_args)


def gemm_u8s8_u8(a, a_scales, a_zps, w, w_scales, out_scale, out_zp, bias=None,
                 act="none", act_args=()):
    y = gemm_u8s8_f32(a, a_scales, a_zps, w, w_scales, bias, act, act_args)
    return np.clip(np.rint(y / out_scale) + out_zp, 0, 255).astype(np.uint8)


def linear_f32(x, w_q, w_scales, bias=None, act="none", act_args=()):
    q, s, z = quantize_rows_f32_u8(x)
    return gemm_u8s8_f32(q, s, z, w_q, w_scales, bias, act, act_args)


def _quantize_sym_rows(x):
    """Symmetric int8 per row as the attention kernel rounds it: x * (1 / scale)."""
    amax = np.abs(x).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    inv = (_F1 / scales).astype(np.float32)
    return np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int64), scales


def attention_int8(q, k, v, mask=None, scale=None, is_causal=False):
    """Twin of attention.attention_int8, one (batch, head) at a time: Q rows
    uint8 per row, K int8 per key (softmax scale folded into its scale), P
    = rint(255 exp(s - max)) with scale 1 / (255 sum exp), V int8 per
    column; integer products exact. Returns float64 (B, H, Sq, Dv) and the
    P scales (B, H, Sq), for tolerances."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    nb, nh, sq, d = q.shape
    sk = k.shape[2]
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    if is_causal:
        mask = np.tril(np.ones((sq, sk), bool))
    full = None if mask is None else np.broadcast_to(mask, (nb, nh, sq, sk))
    out = np.zeros((nb, nh, sq, v.shape[3]))
    pscales = np.zeros((nb, nh, sq), np.float32)
    for b in range(nb):
        for h in range(nh):
            qq, qs, qz = quantize_rows_f32_u8(q[b, h])
            kq, ks = _quantize_sym_rows(k[b, h])
            acc = (qq.astype(np.int64) - qz[:, None]) @ kq.T
            s = acc.astype(np.float32) * (qs[:, None] * (ks * scale)[None, :])
            keep = np.ones((sq, sk), bool)
            if full is not None and full.dtype == bool:
                keep = full[b, h]
            elif full is not None:
                s = s + full[b, h].astype(np.float32)
            s = np.where(keep, s, np.float32(-np.inf))
            mx = s.max(axis=1, keepdims=True)
            live = np.isfinite(mx[:, 0])
            e = np.where(keep & live[:, None], np.exp(s - np.where(live[:, None], mx, 0)), 0)
            e = e.astype(np.float32)
            pq = np.rint(e * _F255).astype(np.int64)
            total = e.sum(axis=1, dtype=np.float32)
            ps = np.where(live, _F1 / (_F255 * np.where(live, total, 1)), 0).astype(np.float32)
            vq, vs = _quantize_sym_rows(v[b, h].T)
            out[b, h] = (pq @ vq.T) * ps[:, None].astype(np.float64) * vs[None, :]
            pscales[b, h] = ps
    return out, pscales


def im2col_nchw(x, kh, kw, stride, padding, dilation):
    """x (C, H, W) -> (OH*OW, C*kh*kw) patches, zero padded."""
    c, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.zeros((c, h + 2 * ph, w + 2 * pw), x.dtype)
    xp[:, ph:ph + h, pw:pw + w] = x
    cols = np.empty((oh, ow, c, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j] = xp[:, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                                     j * dw:j * dw + sw * (ow - 1) + 1:sw].transpose(1, 2, 0)
    return cols.reshape(oh * ow, c * kh * kw), oh, ow


def conv2d_f32(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Exact float64 convolution (NCHW, OIHW weights) by im2col."""
    pair = lambda v: (v, v) if np.isscalar(v) else tuple(v)
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    n, c = x.shape[:2]
    o, cg, kh, kw = weight.shape
    og = o // groups
    outs = []
    for b in range(n):
        per_group = []
        for g in range(groups):
            cols, oh, ow = im2col_nchw(np.asarray(x[b, g * cg:(g + 1) * cg], np.float64),
                                       kh, kw, stride, padding, dilation)
            wg = np.asarray(weight[g * og:(g + 1) * og], np.float64).reshape(og, -1)
            per_group.append((cols @ wg.T).T.reshape(og, oh, ow))
        outs.append(np.concatenate(per_group))
    y = np.stack(outs)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :, None, None]
    return y


def linear_int4_f32(x, q, scales, group, bias=None, act="none", act_args=()):
    """The int4 linear (int4.py) in numpy: x float32 (M, K) quantized per row, q int8 (N, K),
    scales float32 (N, K/group). Before the activation it is the kernel's float32 arithmetic
    in the kernel's order (so equal bit for bit); the activation in float64."""
    a, sa, zp = quantize_rows_f32_u8(x)
    return int4_epilogue(int4_group_sums(a, zp, q, group), sa, scales, bias, act, act_args)


def int4_group_sums(a, zp, q, group):
    """int32 (G, M, N): sum over group g of (a[i, k] - zp[i]) * q[n, k], exact."""
    m, k = a.shape
    d = a.astype(np.int64) - np.asarray(zp, np.int64).reshape(-1, 1)
    qg = q.astype(np.int64).reshape(q.shape[0], k // group, group)
    return np.stack([d[:, g * group:(g + 1) * group] @ qg[:, g].T for g in range(k // group)]).astype(np.int32)


def int4_epilogue(acc, a_scales, scales, bias=None, act="none", act_args=()):
    f = np.zeros(acc.shape[1:], np.float32)
    for g in range(acc.shape[0]):
        f = f + acc[g].astype(np.float32) * scales[:, g].astype(np.float32)
    y = f * np.asarray(a_scales, np.float32).reshape(-1, 1)
    if bias is not None:
        y = y + np.asarray(bias, np.float32)
    return y if act == "none" else activation(y, act, act_args).astype(np.float32)
