"""Evaluate weight-only subgraphs once at optimize time.

A node whose inputs are all weights or constants (e.g. `t(weight)`, a weight
times a constant scale) is computed now and replaced by a new weight. A fold
that would grow the model (its result larger than the weights it reads, as
an `expand` does) is skipped and counted.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxopt.core.ir import add_weight, get_weight, layer_name
from fxopt.core.ops import OpKind, kind_of
from fxopt.core.pass_base import PassInfo, PassResult

PASS = PassInfo("fold_constants", doc="precompute weight-only subgraphs")

# Kinds whose value does not depend on run-time data even with constant inputs
# are everything but random ops; those never reach here in eval graphs except
# dropout, which remove_identity has handled, so we only guard against it.
_NEVER = (OpKind.DROPOUT, OpKind.SHAPE, OpKind.INPUT, OpKind.OUTPUT)


def run(gm, ctx) -> PassResult:
    values: dict[Node, object] = {}
    stats = {"folded": 0, "skipped_would_grow": 0}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node] = get_weight(gm, node)
        elif node.op == "call_function" and _foldable(node, values):
            values[node] = _evaluate(node, values)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node not in values or not _is_frontier(node, values):
            continue
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue
        if value.numel() > _input_numel(node):
            stats["skipped_would_grow"] += 1
            continue
        new = add_weight(gm, f"{layer_name(node)}.{node.name}_folded", value, before=node)
        new.meta["fxopt_id"] = node.meta.get("fxopt_id")
        node.replace_all_uses_with(new)
        stats["folded"] += 1
    return PassResult(stats["folded"] > 0, stats)


def _foldable(node: Node, values: dict) -> bool:
    if kind_of(node) in _NEVER or not node.all_input_nodes and not _creates_constant(node):
        return False
    if any(n not in values for n in node.all_input_nodes):
        return False
    return not node.is_impure()


def _creates_constant(node: Node) -> bool:
    # factory ops with literal sizes (zeros([3]), arange(8)) are constants too
    return all(not isinstance(a, (Node, torch.SymInt)) for a in node.args)


def _evaluate(node: Node, values: dict):
    args = torch.fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _is_frontier(node: Node, values: dict) -> bool:
    """A constant node some non-constant node (or the output) reads."""
    return any(u not in values for u in node.users)


def _input_numel(node: Node) -> int:
    """Elements of the weights this constant subgraph reads (its size before folding)."""
    seen, stack, total = set(), [node], 0
    while stack:
        n = stack.pop()
        for src in n.all_input_nodes:
            if src in seen:
                continue
            seen.add(src)
            if src.op == "get_attr":
                val = src.meta.get("val")
                total += val.numel() if isinstance(val, torch.Tensor) else 0
            else:
                stack.append(src)
    return max(total, 1 if not node.all_input_nodes else total)
