"""Merge linears that read the same input into one wider linear, then split.

    q = linear(x, Wq, bq); k = linear(x, Wk, bk); v = linear(x, Wv, bv)
 -> qkv = linear(x, [Wq; Wk; Wv], [bq; bk; bv]); q, k, v = split(qkv, [nq, nk, nv], -1)

Attention's Q/K/V projections are the common case. One wide GEMM uses the
cores better than three narrow ones, and an int8 lowering quantizes the
shared input once instead of three times. Only units with the same
activation merge; the merged unit keeps the first member's id and layer
name, and lists the others in meta["fxopt_merged"].
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch

from fxopt.core import fxops
from fxopt.core.ir import ID, LAYER, add_weight, get_weight, insert_call, is_weight
from fxopt.core.pass_base import PassInfo, PassResult

aten = torch.ops.aten

PASS = PassInfo("fuse_parallel_linears", requires=("fuse_epilogues",), options={"max_width": 16384},
                doc="merge linears sharing an input (Q/K/V) into one wide linear + split")


def run(gm, ctx, max_width=16384) -> PassResult:
    stats = {"merged_groups": 0, "merged_linears": 0}
    for group in _groups(gm):
        if sum(get_weight(gm, u.args[1]).shape[0] for u in group) > max_width:
            continue
        _merge(gm, group)
        stats["merged_groups"] += 1
        stats["merged_linears"] += len(group)
    return PassResult(stats["merged_groups"] > 0, stats)


def _groups(gm) -> list:
    by_input = defaultdict(list)
    for node in gm.graph.nodes:
        if node.target is fxops.linear_act and is_weight(node.args[1]) and \
                (node.args[2] is None or is_weight(node.args[2])):
            key = (node.args[0], node.args[3], tuple(node.args[4]))
            by_input[key].append(node)
    return [g for g in by_input.values() if len(g) > 1]


def _merge(gm, group: list) -> None:
    first = group[0]
    x, act, act_args = first.args[0], first.args[3], first.args[4]
    weights = [get_weight(gm, u.args[1]) for u in group]
    biases = [get_weight(gm, u.args[2]) if u.args[2] is not None else torch.zeros(w.shape[0], dtype=w.dtype)
              for u, w in zip(group, weights)]
    sizes = [w.shape[0] for w in weights]
    name = first.meta.get(LAYER, first.name)
    # the merged node must come after every member's weights; the first member's place is safe
    # for the input, and the weights are inserted right before it
    w_node = add_weight(gm, f"{name}.merged_weight", torch.cat(weights), before=first)
    b_node = add_weight(gm, f"{name}.merged_bias", torch.cat(biases), before=first)
    merged = insert_call(gm, first, fxops.linear_act, (x, w_node, b_node, act, act_args), like=first)
    merged.meta["fxopt_merged"] = [u.meta.get(LAYER, u.name) for u in group]
    merged.meta[LAYER] = "+".join(merged.meta["fxopt_merged"])
    # the wide value is new: fresh ids, so per-layer comparisons match the members' getitems
    merged.meta[ID] = f"{first.meta.get(ID, first.name)}.merged"
    merged.meta["fxopt_activation"] = first.meta.get("fxopt_activation", "none")
    split = insert_call(gm, first, aten.split_with_sizes.default, (merged, sizes, -1), like=first)
    split.meta[ID] = f"{first.meta.get(ID, first.name)}.split"
    for i, u in enumerate(group):
        part = insert_call(gm, first, operator.getitem, (split, i), like=u)
        u.replace_all_uses_with(part)
    for u in group:  # erased last: `first` anchors every insertion above
        gm.graph.erase_node(u)
