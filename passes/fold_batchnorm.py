"""Fold an eval-mode batch norm into the conv or linear that feeds it.

    y = bn(conv(x, W, b))  ->  y = conv(x, W * s, (b - mean) * s + beta),
    s = gamma / sqrt(var + eps), one scale per output channel.

Works for grouped, depthwise and bias-free convs (the scale is per output
channel whatever the groups). A producer with other users keeps its batch
norm: folding would change what those users see.
"""
from __future__ import annotations

import torch

from fxopt.core.ir import add_weight, get_weight, is_weight, layer_name
from fxopt.core.ops import OpKind, batch_norm_parts, conv_parts, is_eval_batch_norm, kind_of
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.core.pattern import Pat, find_all

PASS = PassInfo("fold_batchnorm", doc="fold eval batch norms into the preceding conv/linear")

_PATTERN = Pat(is_eval_batch_norm, Pat(lambda n: kind_of(n) in (OpKind.CONV, OpKind.LINEAR),
                                       name="producer"), name="bn")


def run(gm, ctx) -> PassResult:
    stats = {"folded": 0, "skipped_shared_producer": 0, "skipped_not_foldable": 0}
    for m in find_all(gm, _PATTERN):
        producer, bn = m["producer"], m["bn"]
        reason = _why_not(producer, bn)
        if reason:
            stats[reason] += 1
            continue
        _fold(gm, producer, bn)
        stats["folded"] += 1
    unmatched = sum(1 for n in gm.graph.nodes if is_eval_batch_norm(n))
    stats["left_unfolded"] = unmatched
    return PassResult(stats["folded"] > 0, stats)


def _why_not(producer, bn) -> str | None:
    if not isinstance(bn.meta.get("val"), torch.Tensor):  # the (out, mean, rstd) tuple form
        return "skipped_not_foldable"
    if len(producer.users) != 1:
        return "skipped_shared_producer"
    _, w, b, mean, var, _ = batch_norm_parts(bn)
    params = [p for p in (w, b, mean, var) if p is not None]
    weight, bias = _weight_and_bias(producer)
    if not all(is_weight(p) for p in params) or not is_weight(weight):
        return "skipped_not_foldable"
    if bias is not None and not is_weight(bias):
        return "skipped_not_foldable"
    if kind_of(producer) is OpKind.CONV and conv_parts(producer)["transposed"]:
        return "skipped_not_foldable"
    if kind_of(producer) is OpKind.LINEAR and len(producer.meta["val"].shape) != 2:
        # BatchNorm1d on [N, L, C] normalises dim 1 (L), not the linear's features
        return "skipped_not_foldable"
    return None


def _weight_and_bias(producer):
    if kind_of(producer) is OpKind.CONV:
        parts = conv_parts(producer)
        return parts["weight"], parts["bias"]
    bias = producer.args[2] if len(producer.args) > 2 else producer.kwargs.get("bias")
    return producer.args[1], bias


def _fold(gm, producer, bn) -> None:
    _, gamma, beta, mean, var, eps = batch_norm_parts(bn)
    weight_node, bias_node = _weight_and_bias(producer)
    weight = get_weight(gm, weight_node)
    mean_t, var_t = get_weight(gm, mean).double(), get_weight(gm, var).double()
    scale = torch.rsqrt(var_t + eps)
    if gamma is not None:
        scale = scale * get_weight(gm, gamma).double()
    shift = -mean_t * scale
    if beta is not None:
        shift = shift + get_weight(gm, beta).double()
    bias = get_weight(gm, bias_node).double() if bias_node is not None else torch.zeros_like(mean_t)
    new_w = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
    new_b = (bias * scale + shift).to(weight.dtype)
    name = layer_name(producer)
    w_node = add_weight(gm, f"{name}.weight_bnfolded", new_w, before=producer)
    b_node = add_weight(gm, f"{name}.bias_bnfolded", new_b, before=producer)
    args = list(producer.args)
    args[1] = w_node
    if len(args) > 2:
        args[2] = b_node
    else:
        args.append(b_node)
    producer.args = tuple(args)
    producer.kwargs = {k: v for k, v in producer.kwargs.items() if k != "bias"}
    if bn.meta.get("fxopt_layer"):
        producer.meta["fxopt_folded"] = bn.meta["fxopt_layer"]
    # ids follow values: the producer now computes what the batch norm did
    if "fxopt_id" in bn.meta:
        producer.meta["fxopt_id"] = bn.meta["fxopt_id"]
    bn.replace_all_uses_with(producer)
    gm.graph.erase_node(bn)
