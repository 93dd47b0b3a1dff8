"""Bias correction: remove the mean shift int8 weights add to a layer's output.

Rounding weights to int8 changes each output by dW @ x; its mean over the
data, dW @ E[x], is a constant per output channel that the bias can absorb:

    b' = b - dW @ E[x]          (conv: E[x] per input channel, summed over the taps)

E[x] comes from calibration (InputStats), as does a small sample of real
inputs on which the correction is kept only if it lowers the layer's int8
output error.

    stats = InputStats(channel_axis=-1)   # fed by calibrate_ranges
    b_new = corrected_bias(w, w_q, w_scale, b, stats, kind="linear")
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxopt.quant import qops
from fxopt.quant.observers import Observer


class InputStats(Observer):
    """Per-channel mean of a layer's input, and a bounded sample of it.

    Linear inputs keep up to `rows` rows; conv inputs keep their first image.
    """

    def __init__(self, conv: bool, rows: int = 64):
        self.conv, self.rows = conv, rows
        self.sum, self.count, self.sample = None, 0, None

    def update(self, t: torch.Tensor) -> None:
        t = t.detach().float()
        flat = t.transpose(0, 1).reshape(t.shape[1], -1).t() if self.conv else t.reshape(-1, t.shape[-1])
        s = flat.sum(dim=0, dtype=torch.float64)
        self.sum = s if self.sum is None else self.sum + s
        self.count += flat.shape[0]
        if self.sample is None:
            self.sample = t[:1].clone() if self.conv else flat[: self.rows].clone()

    def range(self):
        raise NotImplementedError("InputStats gives mean() and sample, not a range")

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()


def weight_shift(w: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, mean: torch.Tensor,
                 groups: int = 1) -> torch.Tensor:
    """dW @ E[x] per output channel (for convs the taps of a channel share its mean)."""
    dw = (w_q.float() * w_scale.reshape(-1, *[1] * (w.dim() - 1)) - w.float())
    if w.dim() == 2:
        return dw @ mean
    o, cg = dw.shape[:2]
    per_channel = dw.sum(dim=(2, 3))                     # [O, C/groups]
    means = mean.reshape(groups, cg).repeat_interleave(o // groups, dim=0)
    return (per_channel * means).sum(dim=1)


def corrected_bias(w, w_q, w_scale, b, stats: InputStats, conv_args: dict | None = None):
    """The corrected bias if it lowers int8 error on the sampled inputs, else None."""
    groups = conv_args["groups"] if conv_args else 1
    shift = weight_shift(w, w_q, w_scale, stats.mean(), groups)
    base = b.float() if b is not None else torch.zeros(w.shape[0])
    new = base - shift
    x = stats.sample
    if x is None:
        return None
    reference = _layer(x, w.float(), base, conv_args)
    before = _int8_error(x, w_q, w_scale, base, reference, conv_args)
    after = _int8_error(x, w_q, w_scale, new, reference, conv_args)
    return new if after < before else None


def _layer(x, w, b, conv_args):
    if conv_args is None:
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, conv_args["stride"], conv_args["padding"], conv_args["dilation"],
                    conv_args["groups"])


def _int8_error(x, w_q, w_scale, b, reference, conv_args) -> float:
    if conv_args is None:
        y = qops._quantized_linear(x, w_q, w_scale, b, "none", [], 0.0, 0)
    else:
        c = conv_args
        y = qops._quantized_conv2d(x, w_q, w_scale, b, c["stride"], c["padding"], c["dilation"],
                                   c["groups"], "none", [], 0.0, 0)
    return float(((y - reference) ** 2).sum())
