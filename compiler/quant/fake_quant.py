"""Fake quantization that computes the kernels' numbers, with gradients for training.

Every function here quantizes and dequantizes in float32 exactly as the int8 (and
grouped int4) ops round: the integer codes equal those of qops (and so of the
kernels); only the float sums that follow differ, by fp32 summation order.

    w_hat = weight_per_channel(w, step)        # int8, symmetric per output channel
    w_hat = weight_groups(w, step, 4, 32)      # int4 groups along K (quantize_weight_groups)
    x_hat = static(x, a_step, a_zp)            # uint8 per tensor, calibrated zero point
    x_hat = dynamic_rows(x) / dynamic_images(x)

Gradients: rounding passes them straight through (STE); values the clamp cuts get
none. Step sizes are learned as in LSQ (Esser et al. 2020): d x_hat / d s is
round(v) - v inside the grid and the clamp bound outside, scaled by
1 / sqrt(elements per step * qmax) so steps move at the weights' pace.
"""
from __future__ import annotations

import math

import torch

from fxopt.quant import qops

W8_MAX = 127


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _grad_scaled(step: torch.Tensor, g: float) -> torch.Tensor:
    # the value of step bit for bit (a - a is exactly 0; (s - s*g) + s*g need not be s),
    # the gradient of step * g (LSQ's step-size gradient scale)
    scaled = step * g
    return step.detach() + (scaled - scaled.detach())


def weight_per_channel(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """w quantized as quantize_weight_per_channel does with scale `step` [out]: w / step
    (a float32 division, as it), rounded, |q| <= 127, times step."""
    per = w[0].numel()
    s = _grad_scaled(step, 1.0 / math.sqrt(per * W8_MAX)).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(round_ste(w / s), -W8_MAX, W8_MAX) * s


def weight_codes(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The int8 codes weight_per_channel(w, step) stands for (what the kernels get)."""
    s = step.detach().float().reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w.detach().float() / s), -W8_MAX, W8_MAX).to(torch.int8)


def weight_groups(w: torch.Tensor, step: torch.Tensor, bits: int = 4, group_size: int = 32) -> torch.Tensor:
    """w [N, K] quantized as quantize_weight_groups(w, bits, group_size) does, with scales
    `step` [N, K // group_size]: |q| <= 2**(bits-1) - 1."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"the input dim {k} is not a multiple of group_size {group_size}: pick a "
                         f"group size that divides it, or keep this layer int8")
    qmax = 2 ** (bits - 1) - 1
    s = _grad_scaled(step, 1.0 / math.sqrt(group_size * qmax))[:, :, None]
    groups = w.reshape(n, k // group_size, group_size)
    return (torch.clamp(round_ste(groups / s), -qmax, qmax) * s).reshape(n, k)


def group_codes(w: torch.Tensor, step: torch.Tensor, bits: int = 4, group_size: int = 32) -> torch.Tensor:
    """The int codes weight_groups(w, step, bits, group_size) stands for, as int8 [N, K]."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    q = torch.clamp(torch.round(groups / step.detach().float()[:, :, None]), -qmax, qmax)
    return q.to(torch.int8).reshape(n, k)


def static(x: torch.Tensor, step: torch.Tensor, zp: int) -> torch.Tensor:
    """x quantized to uint8 with one (scale, zero point), as qops.quantize_tensor: x times
    float32(1 / scale), rounded, plus zp, clamped to [0, 255]; then dequantized.
    float32's 1 / step equals float32(1 / float64 step) (a correctly rounded quotient rounded
    again to a precision less than half as wide is the same), so the codes are the kernel's."""
    s = _grad_scaled(step, 1.0 / math.sqrt(max(1, x[0].numel()) * 255))
    q = torch.clamp(round_ste(x * (1.0 / s)) + zp, 0, 255)
    return (q - zp) * s


def dynamic_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of the last dim quantized from its own range (qops.quantize_rows, what the
    linear kernel does), dequantized; gradient straight through."""
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    q, scale, zp = qops.quantize_rows(x2)
    x_hat = ((q - zp[:, None]) * scale[:, None]).reshape(x.shape)
    return x + (x_hat - x).detach()


def dynamic_images(x: torch.Tensor) -> torch.Tensor:
    """Each image quantized from its own range (the dynamic conv kernel), dequantized;
    gradient straight through."""
    out = []
    for img in x.detach().float():
        s, z = qops.dynamic_tensor_qparams(img)
        out.append((qops.quantize_tensor(img, s, z) - z) * torch.tensor(s, dtype=torch.float32))
    return x + (torch.stack(out) - x).detach() if out else x


def activations(x: torch.Tensor, step, zp: int, per: str) -> torch.Tensor:
    """x as the op will see it: static per tensor (step given), else dynamic per row
    (per="row", linears) or per image (per="image", convs)."""
    if step is not None:
        return static(x, step, zp)
    return dynamic_rows(x) if per == "row" else dynamic_images(x)


# --- the ops a QAT graph runs in place of the quantized ones ------------------------

def linear(x, w, w_step, b, act, act_args, a_step, a_zp):
    """fxopt.quantized_linear with float weights and learned steps (a_step None: dynamic)."""
    from fxopt.core.ops import apply_activation
    x_hat = activations(x.float(), a_step, a_zp, "row")
    y = torch.nn.functional.linear(x_hat, _weight(w, w_step), b)
    return apply_activation(y, act, act_args)


def linear_groups(x, w, w_step, b, act, act_args, a_step, a_zp, bits):
    """A linear with grouped low-bit weights (quantize_weight_groups: w_step [N, K // group])
    and int8 activations as the int8 linear: what an int4 kernel computes."""
    from fxopt.core.ops import apply_activation
    x_hat = activations(x.float(), a_step, a_zp, "row")
    w_hat = _weight_groups(w, w_step, bits)
    return apply_activation(torch.nn.functional.linear(x_hat, w_hat, b), act, act_args)


def conv2d(x, w, w_step, b, stride, padding, dilation, groups, act, act_args, a_step, a_zp):
    """fxopt.quantized_conv2d with float weights and learned steps (a_step None: dynamic)."""
    from fxopt.core.ops import apply_activation
    x_hat = activations(x.float(), a_step, a_zp, "image")
    y = torch.nn.functional.conv2d(x_hat, _weight(w, w_step), b, stride, padding, dilation, groups)
    return apply_activation(y, act, act_args)


def embedding(w, w_step, indices):
    """fxopt.embedding_int8 with a float table and a learned step per row."""
    return torch.nn.functional.embedding(indices, weight_per_channel(w, w_step))


def attention(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """The int8 attention's output forward, float attention's gradient backward: it has no
    weights to learn, the layers around it do."""
    exact = qops.quantized_attention(q.detach(), k.detach(), v.detach(), attn_mask=attn_mask,
                                     scale=scale, is_causal=is_causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                           is_causal=is_causal, scale=scale)
    return ref + (exact - ref).detach()


def _weight(w, w_step):
    """Latent float weights quantized with their steps; int8 codes (frozen, e.g. a shared
    layer's codebook) times their steps."""
    if w.dtype == torch.int8:
        return w.float() * w_step.reshape(-1, *([1] * (w.dim() - 1)))
    return weight_per_channel(w, w_step)


def _weight_groups(w, w_step, bits):
    """The grouped twin of _weight: w_step [N, K // group]."""
    n, k = w.shape
    if w.dtype == torch.int8:
        return (w.float().reshape(n, w_step.shape[1], -1) * w_step[:, :, None]).reshape(n, k)
    return weight_groups(w, w_step, bits, k // w_step.shape[1])
