"""Quantized operators: what an int8 op computes, written in plain torch.

These define the numbers an int8 layer must produce. `quantize_int8` rewrites
fp32 units into them; `lower_to_kernels` then swaps each for the Numba kernel
op that computes the same thing fast. The integer part is exact here (int8 x
uint8 products summed in float64, exact below 2**53); quantization rounds as
the kernels do (round half to even, float32 scale arithmetic).

Activation quantization schemes, chosen per op:
  a_scale > 0   static: one (a_scale, a_zp) for the whole tensor, calibrated
  a_scale == 0  dynamic: linear per row, conv per image, from the input itself

    y = torch.ops.fxopt.quantized_linear(x, w_q, w_scale, b, "gelu", [], 0.0, 0)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxopt.core.fxops import _lib
from fxopt.core.ops import apply_activation

_lib.define("quantized_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? b, str act, "
            "float[] act_args, float a_scale, int a_zp) -> Tensor")
_lib.define("quantized_conv2d(Tensor x, Tensor w_q, Tensor w_scale, Tensor? b, int[] stride, "
            "int[] padding, int[] dilation, int groups, str act, float[] act_args, float a_scale, "
            "int a_zp) -> Tensor")
_lib.define("embedding_int8(Tensor w_q, Tensor w_scale, Tensor indices) -> Tensor")
# softmax(q k^T * scale + mask) v with both products in int8 (see _quantized_attention)
_lib.define("quantized_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, "
            "float? scale=None, bool is_causal=False) -> Tensor")


# --- quantization arithmetic (shared with the passes) ---------------------------

def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0): w ~= w_q * scale[:, None, ...]; |w_q| <= 127."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(flat / scale[:, None]), -127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def quantize_weight_groups(w: torch.Tensor, bits: int = 4, group_size: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric low-bit weights in groups of `group_size` along the input dim (a linear's
    dim 1): w ~= w_q * scale[:, k // group_size]; |w_q| <= 2**(bits-1) - 1 (7 for int4, so
    the grid is symmetric and -8 is never used). Returns (w_q int8 of w's shape, scale
    float32 [out, K // group_size]). The one definition of int4 weights: the kernels, the
    packing and fake quantization all compute these numbers."""
    if w.dim() != 2:
        raise ValueError(f"grouped weight quantization takes a 2-d (out, in) weight, got shape "
                         f"{tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"the input dim {k} is not a multiple of group_size {group_size}: pick a "
                         f"group size that divides it, or keep this layer int8")
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    amax = groups.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(groups / scale[:, :, None]), -qmax, qmax).to(torch.int8)
    return q.reshape(n, k), scale


def qparams_from_range(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] and 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return 1.0, 0
    zp = int(min(max(round(-lo / scale), 0), 255))
    return float(torch.tensor(scale, dtype=torch.float32)), zp


def quantize_rows(x2: torch.Tensor):
    """Dynamic per-row asymmetric uint8, as the kernel does: (q, scale[M], zp[M])."""
    lo = torch.clamp(x2.amin(dim=1), max=0.0)
    hi = torch.clamp(x2.amax(dim=1), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x2 * (1.0 / scale)[:, None]) + zp[:, None], 0, 255)
    return q, scale, zp


def quantize_tensor(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    return torch.clamp(torch.round(x * inv) + zp, 0, 255)


def dynamic_tensor_qparams(x: torch.Tensor) -> tuple[float, int]:
    return qparams_from_range(float(x.min()), float(x.max())) if x.numel() else (1.0, 0)


# --- reference implementations ----------------------------------------------------

def _quantized_linear(x, w_q, w_scale, b, act, act_args, a_scale, a_zp):
    x2 = x.reshape(-1, x.shape[-1]).float()
    if a_scale > 0:
        q = quantize_tensor(x2, a_scale, a_zp)
        scale = torch.full((x2.shape[0],), a_scale, dtype=torch.float32)
        zp = torch.full((x2.shape[0],), float(a_zp))
    else:
        q, scale, zp = quantize_rows(x2)
    if w_scale.dim() == 2:     # grouped (int4) weights: a scale per (output, group along K)
        w = w_q.double() * w_scale.double().repeat_interleave(w_q.shape[1] // w_scale.shape[1], dim=1)
        y = ((q.double() - zp.double()[:, None]) @ w.t()) * scale.double()[:, None]
    else:
        acc = (q.double() - zp.double()[:, None]) @ w_q.double().t()
        y = acc * scale.double()[:, None] * w_scale.double()[None, :]
    if b is not None:
        y = y + b.double()
    y = apply_activation(y.float(), act, act_args)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def _quantized_conv2d(x, w_q, w_scale, b, stride, padding, dilation, groups, act, act_args, a_scale, a_zp):
    if a_scale > 0:
        q = quantize_tensor(x.float(), a_scale, a_zp) - a_zp
        scales = torch.full((x.shape[0],), a_scale, dtype=torch.float64)
    else:  # dynamic: one (scale, zero point) per image, as the kernel does
        per_image = [dynamic_tensor_qparams(img) for img in x]
        q = torch.stack([quantize_tensor(img.float(), s, z) - z for img, (s, z) in zip(x, per_image)])
        scales = torch.tensor([s for s, _ in per_image], dtype=torch.float64)
    # zero padding in the quantized domain is the zero point, i.e. 0 after the shift
    acc = F.conv2d(q.double(), w_q.double(), None, stride, padding, dilation, groups)
    y = acc * scales[:, None, None, None] * w_scale.double()[None, :, None, None]
    if b is not None:
        y = y + b.double()[None, :, None, None]
    return apply_activation(y.float(), act, act_args)


def _embedding_int8(w_q, w_scale, indices):
    # indexing would wrap negative indices to the table's end; eager embedding raises
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < w_q.shape[0]):
        raise IndexError(f"index out of range in self: embedding indices must be in [0, {w_q.shape[0]}), "
                         f"got values in [{int(indices.min())}, {int(indices.max())}]")
    return w_q[indices].float() * w_scale[indices].unsqueeze(-1)


def quantize_symmetric_rows(x: torch.Tensor):
    """Symmetric int8 per row of the last dim, rounded as the attention kernel does
    (x * (1 / scale)): (q as float64, scale)."""
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(x * (1.0 / scale)[..., None]), -127, 127)
    return q.double(), scale


def _quantized_attention(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """The int8 attention the kernel computes: Q rows uint8 (dynamic, asymmetric), K per
    key and V per column int8 (symmetric), P = softmax rounded to rint(255 e) / (255 sum e)
    with e = exp(s - row max) in [0, 1]. Fully masked rows give 0, as torch's sdpa.
    Returns (B, H, Sq, Dv) laid out as (B, Sq, H, Dv), as the kernel and torch's sdpa do."""
    q, k, v = q.float(), k.float(), v.float()
    sq, sk = q.shape[-2], k.shape[-2]
    s_f = torch.tensor(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, dtype=torch.float32)
    qq, qs, qz = quantize_rows(q.reshape(-1, q.shape[-1]))
    qq = (qq.double() - qz.double()[:, None]).reshape(q.shape)
    kq, ks = quantize_symmetric_rows(k)
    acc = (qq @ kq.transpose(-1, -2)).float()
    s = acc * (qs.reshape(q.shape[:-1])[..., None] * (ks * s_f)[..., None, :])
    keep = torch.ones(s.shape, dtype=torch.bool)
    if is_causal:
        keep = torch.ones(sq, sk, dtype=torch.bool).tril().expand(s.shape)
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask.expand(s.shape)
    elif attn_mask is not None:
        s = s + attn_mask.float()
    s = s.masked_fill(~keep, float("-inf"))
    mx = s.amax(dim=-1, keepdim=True)
    live = torch.isfinite(mx)
    e = torch.where(keep & live, torch.exp(s - torch.where(live, mx, 0.0)), 0.0)
    pq = torch.round(e * 255.0).double()
    ps = torch.where(live, 1.0 / (255.0 * e.sum(dim=-1, keepdim=True)), 0.0)
    vq, vs = quantize_symmetric_rows(v.transpose(-1, -2))
    out = ((pq @ vq.transpose(-1, -2)) * ps.double() * vs.double()[..., None, :]).float()
    return out.transpose(1, 2).contiguous().transpose(1, 2)


_lib.impl("quantized_linear", _quantized_linear, "CompositeExplicitAutograd")
_lib.impl("quantized_conv2d", _quantized_conv2d, "CompositeExplicitAutograd")
_lib.impl("embedding_int8", _embedding_int8, "CompositeExplicitAutograd")
_lib.impl("quantized_attention", _quantized_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("fxopt::quantized_linear")
def _quantized_linear_fake(x, w_q, w_scale, b, act, act_args, a_scale, a_zp):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("fxopt::quantized_conv2d")
def _quantized_conv2d_fake(x, w_q, w_scale, b, stride, padding, dilation, groups, act, act_args,
                           a_scale, a_zp):
    from fxopt.core.fxops import _conv2d_act_fake
    return _conv2d_act_fake(x, w_q, b, stride, padding, dilation, groups, act, act_args)


@torch.library.register_fake("fxopt::embedding_int8")
def _embedding_int8_fake(w_q, w_scale, indices):
    return w_scale.new_empty((*indices.shape, w_q.shape[1]))


@torch.library.register_fake("fxopt::quantized_attention")
def _quantized_attention_fake(q, k, v, attn_mask=None, scale=None, is_causal=False):
    return attention_like(q, v)


def attention_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An empty attention output (B, H, Sq, Dv), laid out (B, Sq, H, Dv) like torch's sdpa."""
    b, h, sq, _ = q.shape
    return q.new_empty((b, sq, h, v.shape[-1]), dtype=torch.float32).transpose(1, 2)


quantized_linear = torch.ops.fxopt.quantized_linear.default
quantized_conv2d = torch.ops.fxopt.quantized_conv2d.default
embedding_int8 = torch.ops.fxopt.embedding_int8.default
quantized_attention = torch.ops.fxopt.quantized_attention.default
