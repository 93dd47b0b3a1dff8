"""How much each index of a pruning group matters.

Every criterion returns one score per group index (higher = keep). Magnitude
criteria score each weight member (producer rows, consumer columns, grouped
conv filters) over the elements an index covers, then average across members so a
group of many layers is judged by all of them.

    l1:       mean over members of sum |w|
    l2:       mean over members of sqrt(sum w^2)
    bn_scale: mean |gamma| over the group's batch norms (l1 when it has none)
    taylor:   mean over members of |sum w * dL/dw|, gradients summed over a few
              batches (first-order estimate of the loss change when removed)
    random:   seeded uniform scores, the baseline

    scores = group_scores(gm, group, "l1")       # tensor [group.count]
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxopt.core.ir import get_weight
from fxopt.core.ops import batch_norm_parts, kind_of, OpKind, weight_layout
from fxopt.pruning.dependency import Group

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")


def group_scores(gm: GraphModule, group: Group, criterion: str, grads: dict | None = None,
                 seed: int = 0) -> torch.Tensor:
    """One float64 score per index of `group` under `criterion`."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed + _stable_hash(group.name))
        return torch.rand(group.count, generator=gen, dtype=torch.float64)
    if criterion == "bn_scale":
        gammas = bn_gammas(group)
        if gammas:
            return _mean([_per_index(get_weight(gm, g).detach().abs(), 0, group.count) for g in gammas])
        criterion = "l1"
    if criterion == "taylor" and grads is None:
        raise ValueError("the taylor criterion needs gradients: pass data= (a few batches) to prune")
    per_member = []
    for weight, axis, reps in weight_members(group):
        w = get_weight(gm, weight).detach().double()
        if criterion == "l1":
            per_member.append(_per_index(w.abs(), axis, group.count, reps))
        elif criterion == "l2":
            per_member.append(_per_index(w * w, axis, group.count, reps).sqrt())
        else:
            g = grads[str(weight.target)].double()
            per_member.append(_per_index(w * g, axis, group.count, reps).abs())
    return _mean(per_member)


def weight_members(group: Group) -> list:
    """(weight get_attr node, axis, reps) of every producer, consumer and grouped conv."""
    out = []
    for m in group.of_role("out", "in", "grouped"):
        layout = weight_layout(m.node)
        out.append((layout.weight, m.axis, m.reps))
    return out


def bn_gammas(group: Group) -> list:
    """The weight (gamma) nodes of the batch norms on the group's path."""
    gammas = []
    for node in group.slots:
        if kind_of(node) is OpKind.BATCH_NORM:
            gamma = batch_norm_parts(node)[1]
            if gamma is not None:
                gammas.append(gamma)
    return gammas


def _per_index(t: torch.Tensor, axis: int, count: int, reps: int = 1) -> torch.Tensor:
    """Sum of `t` over everything but `axis`, with `axis` folded into `reps` tiles of
    `count` blocks (a block per index), summed over tiles."""
    t = t.double().movedim(axis, 0)
    return t.reshape(reps, count, -1).sum(dim=(0, 2))


def _mean(scores: list) -> torch.Tensor:
    return torch.stack(scores).mean(dim=0)


def _stable_hash(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % (2 ** 31)


# --- gradients for taylor -----------------------------------------------------------

def taylor_grads(gm: GraphModule, groups: list, data, loss_fn=None, max_batches: int = 8) -> dict:
    """dL/dw summed over up to `max_batches` items of `data` for every weight member.

    An item is model inputs (tuple, dict or tensor) or an (inputs, target) pair
    whose inputs are a tuple or dict. Without targets the loss is cross-entropy
    against the model's own predictions, so no labels are needed.
    """
    from fxopt.pruning.training import call, first_tensor, split_item

    names = sorted({str(w.target) for g in groups for w, _, _ in weight_members(g)})
    params = {n: get_weight(gm, _attr_node(gm, n)).detach().clone().requires_grad_(True) for n in names}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for item in data:
        inputs, target = split_item(item)
        out = first_tensor(call(gm, inputs, params))
        loss = _loss(out, target, loss_fn)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                total[n] += g
        seen += 1
        if seen >= max_batches:
            break
    if seen == 0:
        raise ValueError("the taylor criterion got no data: data= yielded no batches")
    return total


def _loss(out, target, loss_fn):
    if loss_fn is not None:
        return loss_fn(out, target)
    logits = out.reshape(-1, out.shape[-1]).float()
    if target is None:
        target = logits.detach().argmax(dim=-1)
    return torch.nn.functional.cross_entropy(logits, target.reshape(-1))


def _attr_node(gm, name):
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) == name:
            return node
    raise KeyError(name)
