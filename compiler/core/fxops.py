"""Operators of the `fxopt` namespace, so rewritten graphs stay graphs of torch ops.

A fused unit (linear or conv, bias, activation) is one node:

    torch.ops.fxopt.linear_act(x, w, b, "gelu", [])
    torch.ops.fxopt.conv2d_act(x, w, b, stride, padding, dilation, groups, "relu", [])

They are defined with torch.library's low-level API rather than
`custom_op`: the decorator costs about 5 us more per call, which is most of a
small layer's time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxopt.core.ops import apply_activation

_lib = torch.library.Library("fxopt", "DEF")  # noqa: the registration must stay alive

_lib.define("linear_act(Tensor x, Tensor w, Tensor? b, str act, float[] act_args) -> Tensor")
_lib.define("conv2d_act(Tensor x, Tensor w, Tensor? b, int[] stride, int[] padding, "
            "int[] dilation, int groups, str act, float[] act_args) -> Tensor")


def _linear_act(x, w, b, act, act_args):
    return apply_activation(F.linear(x, w, b), act, act_args)


def _conv2d_act(x, w, b, stride, padding, dilation, groups, act, act_args):
    return apply_activation(F.conv2d(x, w, b, stride, padding, dilation, groups), act, act_args)


_lib.impl("linear_act", _linear_act, "CompositeExplicitAutograd")
_lib.impl("conv2d_act", _conv2d_act, "CompositeExplicitAutograd")


@torch.library.register_fake("fxopt::linear_act")
def _linear_act_fake(x, w, b, act, act_args):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.register_fake("fxopt::conv2d_act")
def _conv2d_act_fake(x, w, b, stride, padding, dilation, groups, act, act_args):
    n, _, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, w.shape[0], oh, ow))


linear_act = torch.ops.fxopt.linear_act.default
conv2d_act = torch.ops.fxopt.conv2d_act.default
linear_act_impl, conv2d_act_impl = _linear_act, _conv2d_act   # what the ops run (the plan calls them)
