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
"""
from __future__ import annotations

from fxopt.core.ops import OpKind, conv_parts, is_conv2d, pad_parts
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.core.pattern import Pat, find_all

PASS = PassInfo("fold_padding", doc="fold symmetric zero pads into the conv2d that reads them")

_PATTERN = Pat(is_conv2d, Pat(OpKind.PAD, name="pad"), name="conv")


def run(gm, ctx) -> PassResult:
    stats = {"folded": 0, "skipped_asymmetric": 0, "skipped_not_zero_constant": 0,
             "skipped_shared_pad": 0, "skipped_not_2d": 0}
    for m in find_all(gm, _PATTERN):
        pad, conv = m["pad"], m["conv"]
        reason = _why_not(pad, conv)
        if reason:
            stats[reason] += 1
            continue
        _fold(gm, pad, conv)
        stats["folded"] += 1
    return PassResult(stats["folded"] > 0, stats)


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
