"""Fold a symmetric zero padding into the conv that reads it.

    y = conv2d(pad(x, [l, l, t, t]), W, padding=[ph, pw])
      ->  y = conv2d(x, W, padding=[ph + t, pw + l])

TensorFlow-style "same" convolutions (Hugging Face MobileNetV2, EfficientNet)
pad explicitly before the conv; as its own op that pad copies the whole
activation and fills the border. A conv pads with zeros itself, so a constant
zero pad of the two spatial dims, equal on both sides of each, is the conv's
own padding. Asymmetric pads (stride-2 "same", [0, 1, 0, 1]), non-zero
values, other modes, pads of more than the spatial dims and pads with other
users stay as they are, counted by reason. (All-zero pads are copies:
remove_identity drops them.)

PyTorch's own "same" and "valid" (conv2d(x, W, padding="same"), as Hugging Face's
EfficientNet depthwise convs have it) become numbers first, where they are symmetric
(odd kernels): the int8 rules and the saved-model opset know numeric padding only.
"""
from __future__ import annotations

import torch

from fxopt.core.ops import OpKind, conv_parts, is_conv2d, pad_parts
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.core.pattern import Pat, find_all

PASS = PassInfo("fold_padding", doc="fold symmetric zero pads into the conv2d that reads them")

_PATTERN = Pat(is_conv2d, Pat(OpKind.PAD, name="pad"), name="conv")


def run(gm, ctx) -> PassResult:
    stats = {"folded": 0, "skipped_asymmetric": 0, "skipped_not_zero_constant": 0,
             "skipped_shared_pad": 0, "skipped_not_2d": 0, "named_padding": 0, "named_padding_kept": 0}
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.conv2d.padding:
            stats["named_padding" if _numeric_padding(node) else "named_padding_kept"] += 1
    for m in find_all(gm, _PATTERN):
        pad, conv = m["pad"], m["conv"]
        reason = _why_not(pad, conv)
        if reason:
            stats[reason] += 1
            continue
        _fold(gm, pad, conv)
        stats["folded"] += 1
    return PassResult(stats["folded"] + stats["named_padding"] > 0, stats)


def _numeric_padding(conv) -> bool:
    """conv2d(x, W, padding="same" or "valid") -> the same conv with numeric padding, in place,
    when that padding is symmetric; False (unchanged) otherwise."""
    parts = conv_parts(conv)
    w = parts["weight"].meta.get("val") if hasattr(parts["weight"], "meta") else None
    if w is None or w.dim() != 4:
        return False
    dilation = _pair(parts["dilation"])
    mode = parts["padding"]         # conv_parts gives 0 where the call left "valid", the default
    if mode in ("valid", 0):
        padding = [0, 0]
    elif mode == "same" and _pair(parts["stride"]) == [1, 1]:
        totals = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        if any(t % 2 for t in totals):      # an even kernel: PyTorch pads one more at the end
            return False
        padding = [t // 2 for t in totals]
    else:
        return False
    conv.target = torch.ops.aten.conv2d.default
    conv.args = (parts["x"], parts["weight"], parts["bias"], _pair(parts["stride"]), padding, dilation,
                 parts["groups"])
    conv.kwargs = {}
    return True


def _spatial(amounts):
    """(top, left) of a pad that pads only the last two dims, equally on both sides."""
    if len(amounts) not in (2, 4) or not all(isinstance(v, int) and v >= 0 for v in amounts):
        return None
    left, right, top, bottom = (amounts + [0, 0])[:4]
    return (top, left) if (left, top) == (right, bottom) else None


def _why_not(pad, conv) -> str | None:
    parts = pad_parts(pad)
    if len(pad.users) != 1:
        return "skipped_shared_pad"
    if isinstance(conv_parts(conv)["padding"], str) or len(conv.meta["val"].shape) != 4:
        return "skipped_not_2d"
    if parts["mode"] != "constant" or parts["value"] != 0:
        return "skipped_not_zero_constant"
    if _spatial(parts["amounts"]) is None:
        return "skipped_asymmetric"
    return None


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _fold(gm, pad, conv) -> None:
    parts, padded = conv_parts(conv), pad_parts(pad)
    top, left = _spatial(padded["amounts"])
    ph, pw = _pair(parts["padding"])
    conv.args = (padded["x"], parts["weight"], parts["bias"], _pair(parts["stride"]),
                 [ph + top, pw + left], _pair(parts["dilation"]), parts["groups"])
    conv.kwargs = {}
    gm.graph.erase_node(pad)
