"""Cut a pruning group for real: new, smaller weight tensors and rewritten shapes.

    apply_group(gm, group, keep)     # keep: sorted group indices that stay
    refresh_meta(gm)                 # once, after every group is applied

Weights are never edited in place: each cut weight is a new tensor
registered with add_weight, and the op is pointed at it.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxopt.core.ir import add_weight, get_weight
from fxopt.core.ops import (OpKind, kind_of, layer_norm_parts, set_conv_groups, shape_list_arg,
                       weight_layout)
from fxopt.pruning.dependency import Group


def element_index(keep: torch.Tensor, unit: int, count: int = 0, reps: int = 1) -> torch.Tensor:
    """Element positions covered by group indices `keep` when each covers `unit`
    elements, in each of `reps` consecutive tiles of `count` indices."""
    keep = keep.to(torch.long)
    one = (keep[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)
    return torch.cat([one + r * count * unit for r in range(reps)])


def apply_group(gm: GraphModule, group: Group, keep: torch.Tensor) -> dict:
    """Keep only indices `keep` of `group`: cut every member weight, fix every size.
    Returns {old weight node: new weight node} for the weights it replaced."""
    replaced = {}
    keep = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long)
    for member in group.members:
        idx = element_index(keep, member.unit, group.count, member.reps)
        if member.role == "param":
            replaced[member.node] = _cut_attr(gm, member.node, member.axis, idx)
            continue
        layout = weight_layout(member.node)
        replaced[layout.weight] = _cut_attr(gm, layout.weight, member.axis, idx)
        if member.role in ("out", "grouped") and layout.bias is not None:
            replaced[layout.bias] = _cut_attr(gm, layout.bias, 0, idx)
        if member.role == "grouped":
            rows_per_group = layout.weight.meta["val"].shape[0] // layout.groups
            set_conv_groups(member.node, len(idx) // rows_per_group)
    for node, (dim, unit, reps) in group.slots.items():
        _fix_sizes(node, dim, len(keep) * unit * reps, group.count * unit * reps)
    return replaced


def _cut_attr(gm: GraphModule, attr: Node, axis: int, idx: torch.Tensor) -> Node:
    tensor = get_weight(gm, attr)
    cut = tensor.detach().index_select(axis, idx).clone()
    new = add_weight(gm, str(attr.target), cut, before=attr)
    for key in ("fxopt_id", "fxopt_layer"):
        if key in attr.meta:
            new.meta[key] = attr.meta[key]
    attr.replace_all_uses_with(new)
    gm.graph.erase_node(attr)
    _forget(gm, str(attr.target))
    return new


def _forget(gm: GraphModule, target: str) -> None:
    # The full-size tensor must go, or the pruned model keeps it in memory and
    # in its state_dict. Snapshots the pass manager took hold their own references.
    if any(n.op == "get_attr" and str(n.target) == target for n in gm.graph.nodes):
        return
    owner_name, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)


def _fix_sizes(node: Node, dim: int, new_size: int, old_size: int) -> None:
    """Literal sizes of the pruned dim in view/reshape/expand, split and layer_norm args."""
    if kind_of(node) is OpKind.SPLIT:
        sizes = node.args[1]
        if isinstance(sizes, int) and _opname(node) == "split":
            node.args = _with_arg(node.args, 1, sizes * new_size // old_size)
        elif isinstance(sizes, (list, tuple)):
            node.args = _with_arg(node.args, 1, [v * new_size // old_size for v in sizes])
        return
    index = shape_list_arg(node)
    if index is not None:
        sizes = list(node.args[index])
        if isinstance(sizes[dim], Node):
            raise ValueError(f"{node.name}: the pruned dim has a symbolic size")
        if sizes[dim] != -1:
            sizes[dim] = new_size
            node.args = _with_arg(node.args, index, sizes)
        return
    if kind_of(node) is OpKind.LAYER_NORM:
        parts = layer_norm_parts(node)
        rank = len(node.meta["val"].shape)
        if parts is not None and dim == rank - 1:
            node.args = _with_arg(node.args, 1, [new_size])


def _opname(node) -> str:
    return node.target._schema.name.split("::")[1]


def _with_arg(args: tuple, index: int, value) -> tuple:
    args = list(args)
    args[index] = value
    return tuple(args)
