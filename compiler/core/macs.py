"""Parameter and multiply-accumulate counts of a captured graph, from its shape
metadata evaluated at the example sizes (symbolic batch/sequence/image dims take
the value they had when the graph was captured).

    macs = node_macs(gm)           # {fxopt_id: MACs} of linear/conv/matmul/attention
    total_macs(gm), count_params(gm)
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from fxopt.core.ir import ID, get_weight
from fxopt.core.ops import OpKind, attention_parts, batch_norm_parts, kind_of, weight_layout


def concrete(size) -> int:
    """The example value of a (possibly symbolic) size."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            hint = size.node.shape_env.size_hint(size.node.expr)
        return int(hint)
    return int(size)


def concrete_shape(node: Node) -> tuple:
    val = node.meta.get("val")
    return tuple(concrete(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()


def macs_of(node: Node) -> int:
    """Multiply-accumulates of one node at the example sizes (0 for cheap ops)."""
    kind = kind_of(node)
    layout = weight_layout(node)
    if layout is not None:
        w = concrete_shape(layout.weight)
        out = concrete_shape(node)
        if kind is OpKind.CONV:
            return math.prod(out) * math.prod(w[1:])
        return math.prod(out) * w[layout.in_axis]
    if kind is OpKind.MATMUL:
        a, b = concrete_shape(node.args[-2]), concrete_shape(node.args[-1])
        return math.prod(concrete_shape(node)) * (a[-1] if a else 0) if b else 0
    if kind is OpKind.ATTENTION:
        q, k, v, _ = attention_parts(node)
        qs, ks, vs = concrete_shape(q), concrete_shape(k), concrete_shape(v)
        return math.prod(qs[:-1]) * ks[-2] * (qs[-1] + vs[-1])
    return 0


def node_macs(gm: GraphModule) -> dict:
    """{fxopt_id: MACs} for every node that does multiply-accumulates."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            m = macs_of(node)
            if m:
                out[node.meta.get(ID, node.name)] = m
    return out


def total_macs(gm: GraphModule) -> int:
    return sum(node_macs(gm).values())


def count_params(gm: GraphModule) -> int:
    """Elements of every floating-point weight the graph reads (tied weights once),
    batch-norm running statistics excluded (they are statistics, not parameters)."""
    stats = set()
    for node in gm.graph.nodes:
        if kind_of(node) is OpKind.BATCH_NORM:
            _, _, _, mean, var, _ = batch_norm_parts(node)
            stats.update(n for n in (mean, var) if isinstance(n, Node))
    total, seen = 0, set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node not in stats and node.users:
            t = get_weight(gm, node)
            # tied weights (GPT-2's lm_head and wte) are one tensor, counted once
            if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total
