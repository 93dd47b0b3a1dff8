"""Mark linear/conv + bias + activation as one fused unit for the lowering.

    act(linear(x, W) + b)  ->  fxopt.linear_act(x, W, b, "act")
    act(conv2d(x, W, b))   ->  fxopt.conv2d_act(x, W, b, ..., "act")

Also brings matrix products against a constant weight into linear form first
(`addmm(b, x, W)` and `matmul(x, W)` become `linear(x, W^T, b)`), so GPT-2's
Conv1D layers fuse like any linear. Fusion never changes numerics: the fused
op computes exactly the ops it replaces, in fp32.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxopt.core import fxops
from fxopt.core.ir import add_weight, get_weight, insert_call, is_weight, layer_name
from fxopt.core.ops import OpKind, activation_of, conv_parts, is_kind, kind_of
from fxopt.core.pass_base import PassInfo, PassResult

aten = torch.ops.aten

PASS = PassInfo("fuse_epilogues", doc="fuse bias and activation into linear/conv units")


def run(gm, ctx) -> PassResult:
    stats = {"to_linear": 0, "bias_absorbed": 0, "linear": 0, "conv2d": 0, "with_activation": 0,
             "skipped_conv": 0}
    for node in list(gm.graph.nodes):
        if is_kind(node, OpKind.MATMUL) and _to_linear(gm, node):
            stats["to_linear"] += 1
    for node in list(gm.graph.nodes):
        if is_kind(node, OpKind.LINEAR):
            stats["bias_absorbed"] += _absorb_bias_add(gm, node)
            fused = _fuse(gm, node, _fuse_linear)
        elif is_kind(node, OpKind.CONV):
            fused = _fuse(gm, node, _fuse_conv)
            if fused is None:
                stats["skipped_conv"] += 1
                continue
        else:
            continue
        stats["linear" if is_kind(node, OpKind.LINEAR) else "conv2d"] += 1
        stats["with_activation"] += fused
    changed = stats["linear"] + stats["conv2d"] + stats["to_linear"] > 0
    return PassResult(changed, stats)


def _to_linear(gm, node: Node) -> bool:
    """addmm(b, x, W) / mm(x, W) / matmul(x, W) with W a 2-D weight -> linear(x, W^T, b)."""
    name = node.target._schema.name.split("::")[1]
    if name == "addmm" and len(node.args) == 3 and not node.kwargs:
        bias, x, w = node.args
    elif name in ("mm", "matmul") and len(node.args) == 2:
        (x, w), bias = node.args, None
    else:
        return False
    if not is_weight(w) or get_weight(gm, w).dim() != 2:
        return False
    if bias is not None and not (is_weight(bias) and get_weight(gm, bias).dim() == 1):
        return False
    wt = add_weight(gm, f"{layer_name(node)}.weight_t", get_weight(gm, w).t().contiguous(), before=node)
    new = insert_call(gm, node, aten.linear.default, (x, wt, bias), like=node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True


def _absorb_bias_add(gm, linear: Node) -> int:
    """linear(x, W) + b, with b a 1-D weight and no bias yet -> linear(x, W, b)."""
    if len(linear.args) > 2 and linear.args[2] is not None or len(linear.users) != 1:
        return 0
    add = next(iter(linear.users))
    if not is_kind(add, OpKind.ELEMENTWISE) or add.target is not aten.add.Tensor or add.kwargs:
        return 0
    other = add.args[1] if add.args[0] is linear else add.args[0]
    out_features = get_weight(gm, linear.args[1]).shape[0] if is_weight(linear.args[1]) else None
    if not is_weight(other) or tuple(get_weight(gm, other).shape) != (out_features,):
        return 0
    linear.args = (linear.args[0], linear.args[1], other)
    add.replace_all_uses_with(linear)
    gm.graph.erase_node(add)
    return 1


def _fuse(gm, node: Node, build) -> int | None:
    """Replace node (and a sole-user activation) by a fused op; returns 1 if an activation went in."""
    act_node = next(iter(node.users)) if len(node.users) == 1 else None
    act = activation_of(act_node) if act_node is not None else None
    act_name, act_args = (act.name, list(act.args)) if act else ("none", [])
    fused = build(gm, node, act_name, act_args)
    if fused is None:
        return None
    last = act_node if act else node
    last.replace_all_uses_with(fused)
    fused.meta["fxopt_activation"] = str(act) if act else "none"
    if act:
        # ids follow values: the fused node now computes what the activation did
        if "fxopt_id" in act_node.meta:
            fused.meta["fxopt_id"] = act_node.meta["fxopt_id"]
        gm.graph.erase_node(act_node)
    gm.graph.erase_node(node)
    return 1 if act else 0


def _fuse_linear(gm, node, act_name, act_args):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return insert_call(gm, node, fxops.linear_act, (x, w, b, act_name, act_args), like=node)


def _fuse_conv(gm, node, act_name, act_args):
    p = conv_parts(node)
    if p["transposed"] or isinstance(p["padding"], str) or len(node.meta["val"].shape) != 4:
        return None
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]  # noqa: E731
    args = (p["x"], p["weight"], p["bias"], pair(p["stride"]), pair(p["padding"]),
            pair(p["dilation"]), int(p["groups"]), act_name, act_args)
    return insert_call(gm, node, fxops.conv2d_act, args, like=node)
