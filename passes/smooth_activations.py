"""SmoothQuant: migrate activation outliers from a LayerNorm's output into the next linears.

A few channels of a transformer's LayerNorm output carry values far larger
than the rest, and set the int8 scale of every row they appear in. With a
per-channel factor s (alpha balances activations against weights),

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)
    LN(x) / s  feeds  linear(W * s)          (the same function in fp32)

the outliers shrink and the weights, quantized per output channel, absorb
them. s folds into the LayerNorm's affine parameters, so nothing is added to
the graph. Whether it helps depends on the model: with mode="auto" each
LayerNorm is smoothed only if the int8 error of its linears' outputs, on
sampled calibration rows, goes down.
"""
from __future__ import annotations

import torch

from fxopt.core import fxops
from fxopt.core.ir import add_weight, get_weight, is_weight, layer_name
from fxopt.core.ops import OpKind, arg, kind_of
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.quant import qops
from fxopt.quant.calibrate import calibration_inputs, observe
from fxopt.quant.observers import AbsMaxPerChannelObserver, Observer, Tee

PASS = PassInfo("smooth_activations", requires=("fuse_epilogues",),
                options={"alpha": 0.5, "mode": "auto", "sample_rows": 512},
                doc="SmoothQuant: fold activation outliers of LayerNorm outputs into the next linears")


class _RowSample(Observer):
    """Keeps the first `limit` rows (last dim = channels) it sees: bounded memory."""

    def __init__(self, limit: int):
        self.limit, self.rows = limit, []

    def update(self, t: torch.Tensor) -> None:
        have = sum(r.shape[0] for r in self.rows)
        if have < self.limit:
            self.rows.append(t.detach().float().reshape(-1, t.shape[-1])[: self.limit - have].clone())

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def run(gm, ctx, alpha=0.5, mode="auto", sample_rows=512) -> PassResult:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"smooth_activations: mode={mode!r}; use auto, on or off")
    groups = _groups(gm)
    stats = {"smoothed": 0, "not_helpful": 0, "candidates": len(groups)}
    if mode == "off" or not groups:
        return PassResult(False, stats)
    absmax = {ln: AbsMaxPerChannelObserver(-1) for ln in groups}
    rows = {ln: _RowSample(sample_rows) for ln in groups}
    data = calibration_inputs(ctx.example_args, ctx.example_kwargs, ctx.state.get("calibration_data"),
                              lambda message: None, ctx.options.get("calibration_nonfinite", "error"),
                              ctx.options.get("calibration_outliers", "drop"))
    outputs = {}
    for ln in groups:
        outputs[ln.meta["fxopt_id"]] = Tee(absmax[ln], rows[ln])
    observe(gm, data, outputs=outputs, progress=False)
    for ln, linears in groups.items():
        scale = _scale(gm, linears, absmax[ln].absmax(), alpha)
        if mode == "auto" and not _helps(gm, linears, rows[ln].sample(), scale):
            stats["not_helpful"] += 1
            continue
        _apply(gm, ln, linears, scale)
        stats["smoothed"] += 1
    return PassResult(stats["smoothed"] > 0, stats)


def _groups(gm) -> dict:
    """LayerNorms (affine, constant params) whose every user is a linear unit reading it as input."""
    found = {}
    for node in gm.graph.nodes:
        if kind_of(node) is not OpKind.LAYER_NORM or "layer_norm" not in str(node.target):
            continue
        w, b = arg(node, 2, "weight"), arg(node, 3, "bias")
        if not (is_weight(w) and is_weight(b)) or not node.users:
            continue
        linears = _linear_users(node, node.meta["val"].shape[-1])
        if linears:
            found[node] = linears
    return found


def _linear_users(node, channels, depth: int = 0) -> list | None:
    """The linear units reading node's value (through reshapes that keep the channel dim), or None
    if anything else reads it: then the scale could not be folded away."""
    linears = []
    for u in node.users:
        if u.target is fxops.linear_act and u.args[0] is node and is_weight(u.args[1]):
            linears.append(u)
        elif kind_of(u) is OpKind.RESHAPE and depth < 2 and u.meta["val"].shape[-1] == channels:
            below = _linear_users(u, channels, depth + 1)
            if not below:
                return None
            linears += below
        else:
            return None
    return linears


def _scale(gm, linears, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([get_weight(gm, u.args[1]).abs().amax(dim=0) for u in linears]).amax(dim=0)
    s = act_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=1e-5).float()


def _int8_error(x: torch.Tensor, w: torch.Tensor, reference: torch.Tensor) -> float:
    q, sx, zx = qops.quantize_rows(x)
    w_q, sw = qops.quantize_weight_per_channel(w)
    y = ((q - zx[:, None]) @ w_q.float().t()) * sx[:, None] * sw[None, :]
    return float(((y - reference) ** 2).sum())


def _helps(gm, linears, x: torch.Tensor, scale: torch.Tensor) -> bool:
    before = after = 0.0
    for u in linears:
        w = get_weight(gm, u.args[1]).float()
        reference = x @ w.t()
        before += _int8_error(x, w, reference)
        after += _int8_error(x / scale, w * scale, reference)
    return after < before


def _apply(gm, ln, linears, scale: torch.Tensor) -> None:
    name = layer_name(ln)
    w, b = get_weight(gm, arg(ln, 2, "weight")), get_weight(gm, arg(ln, 3, "bias"))
    args = list(ln.args)
    args[2] = add_weight(gm, f"{name}.weight_smoothed", w / scale, before=ln)
    args[3] = add_weight(gm, f"{name}.bias_smoothed", b / scale, before=ln)
    ln.args = tuple(args)
    for u in linears:
        weight = get_weight(gm, u.args[1])
        new = add_weight(gm, f"{layer_name(u)}.weight_smoothed", weight * scale[None, :], before=u)
        u.args = (u.args[0], new, *u.args[2:])
