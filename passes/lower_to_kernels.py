"""Lower int8 ops to the Numba kernels: pack weights once, call the kernel op.

    fxopt.quantized_linear(x, w_q, w_scale, b, act, ...)   (torch reference)
 -> fxopt.linear_int8(x, packed, w_scale, col_sums, b, n, k, act, ...)
    fxopt.quantized_attention(q, k, v, attn_mask=..., ...) (no weights)
 -> fxopt.attention_int8(q, k, v, attn_mask=..., ...)

Packing (VNNI order, 64-byte aligned, column sums for the zero point) happens
here, at optimize time; the op only runs the kernel. Ops without a kernel
stay as they are and are counted.
"""
from __future__ import annotations

import torch

from fxopt import kernel_ops, qops
from fxopt.ir import add_weight, get_weight, infer_meta, insert_call
from fxopt.pass_base import PassInfo, PassResult

aten = torch.ops.aten

PASS = PassInfo("lower_to_kernels", requires=("quantize_int8",),
                doc="replace int8 reference ops by Numba kernel ops with pre-packed weights")


def run(gm, ctx) -> PassResult:
    stats = {"linear": 0, "conv2d": 0, "attention": 0}
    for node in list(gm.graph.nodes):
        if node.target is qops.quantized_linear:
            _lower_linear(gm, node)
            stats["linear"] += 1
        elif node.target is qops.quantized_conv2d:
            _lower_conv(gm, node)
            stats["conv2d"] += 1
        elif node.target is qops.quantized_attention:
            _replace(gm, node, kernel_ops.attention_int8, node.args, node.kwargs)
            stats["attention"] += 1
    if stats["conv2d"]:
        stats["view_to_reshape"] = _views_to_reshapes(gm)
    stats["chained"] = _chain(gm)
    from fxopt import kernels
    gm.meta.setdefault("fxopt_artifact", {})["kernel_isa"] = kernels.isa()
    return PassResult(stats["linear"] + stats["conv2d"] + stats["attention"] > 0, stats)


def _lower_linear(gm, node) -> None:
    x, w_q, w_scale, b, act, act_args, a_scale, a_zp = node.args
    buffers = kernel_ops.pack_linear(get_weight(gm, w_q), get_weight(gm, w_scale))
    layer = node.meta.get("fxopt_layer", node.name)
    packed = add_weight(gm, f"{layer}.packed", buffers["packed"], before=node)
    scale = add_weight(gm, f"{layer}.packed_scale", buffers["w_scale"], before=node)
    col_sums = add_weight(gm, f"{layer}.col_sums", buffers["col_sums"], before=node)
    args = (x, packed, scale, col_sums, b, buffers["n"], buffers["k"], act, act_args, a_scale, a_zp)
    _replace(gm, node, kernel_ops.linear_int8, args)


def _lower_conv(gm, node) -> None:
    x, w_q, w_scale, b, stride, padding, dilation, groups, act, act_args, a_scale, a_zp = node.args
    buffers = kernel_ops.pack_conv(get_weight(gm, w_q), get_weight(gm, w_scale), groups)
    layer = node.meta.get("fxopt_layer", node.name)
    packed = add_weight(gm, f"{layer}.packed", buffers["packed"], before=node)
    scale = add_weight(gm, f"{layer}.packed_scale", buffers["w_scale"], before=node)
    col_sums = add_weight(gm, f"{layer}.col_sums", buffers["col_sums"], before=node)
    args = (x, packed, scale, col_sums, b, buffers["geometry"], stride, padding, dilation, act, act_args,
            a_scale, a_zp)
    _replace(gm, node, kernel_ops.conv2d_int8, args)


def _chain(gm) -> int:
    """Let an int8 linear hand uint8 straight to the next one when that one quantizes its
    input statically: the producer's epilogue requantizes to the consumer's (scale, zero
    point), so the value never exists in float. Convs have no uint8 input path yet."""
    count = 0
    for node in gm.graph.nodes:
        if node.target is not kernel_ops.linear_int8 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.target is not kernel_ops.linear_int8 or user.args[0] is not node or user.args[9] <= 0:
            continue
        node.args = (*node.args[:11], float(user.args[9]), int(user.args[10]))
        infer_meta(gm, node)
        node.meta.setdefault("fxopt_quant", {})["chained"] = True
        count += 1
    return count


def _views_to_reshapes(gm) -> int:
    """Conv kernels return channels_last tensors, and what flows from them (adds, pools)
    stays channels_last, which `view` cannot always reinterpret; `reshape` copies then."""
    count = 0
    for node in gm.graph.nodes:
        if node.target is aten.view.default:
            node.target = aten.reshape.default
            count += 1
    return count


def _replace(gm, node, target, args, kwargs=None):
    new = insert_call(gm, node, target, args, kwargs, like=node)
    for key in ("fxopt_quant", "fxopt_activation"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
