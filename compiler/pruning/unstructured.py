"""Unstructured pruning: zero individual weights of linear and conv layers.

    masks = weight_masks(gm, ratio=0.9, scope="layer", criterion="magnitude")
    apply_masks(gm, masks)            # new weight tensors with the pruned entries at 0.0

Deep Compression's first stage (Han et al. 2015). Unlike structured pruning the
shapes stay; what is gained is zeros, which int8 keeps exactly (round(0 / s) = 0),
which the later passes keep (batch-norm folding and SmoothQuant scale rows and
columns, fusion and merging copy them) and which the compressed artifact
stores as positions only. Fine-tuning must keep them: fxopt.pruning.finetune
takes the masks and re-applies them after every optimizer step.

The masks themselves come from torch.nn.utils.prune's L1Unstructured, fed with
|w| (magnitude) or |w * dL/dw| (taylor: the first-order loss change of removing
a weight) as importance; scope "global" ranks every layer's weights together.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.nn.utils import prune as torch_prune

from fxopt.core.ir import ID, add_weight, get_weight, is_weight
from fxopt.core.ops import weight_layout

WEIGHT_DEFAULTS = {"structure": "weights", "ratio": 0.9, "scope": "layer", "criterion": "magnitude",
                   "schedule": "oneshot", "steps": 3, "protect": (), "taylor_batches": 8,
                   "finetune": None}
WEIGHT_SCOPES = ("layer", "global")
WEIGHT_CRITERIA = ("magnitude", "taylor")
SCHEDULES = ("oneshot", "iterative")


def check_weight_options(options: dict) -> dict:
    """prune={"structure": "weights", ...} options with defaults; unknown names or bad values raise."""
    unknown = set(options) - set(WEIGHT_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))} for prune={{'structure': 'weights'}}; "
                        f"valid: {', '.join(WEIGHT_DEFAULTS)}")
    opts = {**WEIGHT_DEFAULTS, **options}
    ratio = opts["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"prune ratio must be a number in [0, 1) (the fraction of weights zeroed), got {ratio!r}")
    for key, valid in (("scope", WEIGHT_SCOPES), ("criterion", WEIGHT_CRITERIA), ("schedule", SCHEDULES)):
        if opts[key] not in valid:
            raise ValueError(f"unknown prune {key} {opts[key]!r} for structure='weights'; use one of "
                             f"{', '.join(map(repr, valid))}")
    steps = opts["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"prune steps must be an int >= 1 (iterative schedule), got {steps!r}")
    protect = opts["protect"]
    opts["protect"] = (protect,) if isinstance(protect, str) else tuple(protect)
    return opts


def prunable(gm: GraphModule, protect=()) -> dict:
    """{weight target: layer node} of every linear/conv whose weight is a constant, in graph order;
    layers whose name starts with a `protect` prefix are left out."""
    found = {}
    for node in gm.graph.nodes:
        layout = weight_layout(node)
        if layout is None or not is_weight(layout.weight):
            continue
        layer = node.meta.get("fxopt_layer") or node.name
        if any(layer == p or layer.startswith(p + ".") for p in protect):
            continue
        found.setdefault(str(layout.weight.target), node)
    return found


def weight_masks(gm: GraphModule, ratio: float, scope: str = "layer", criterion: str = "magnitude",
                 grads: dict | None = None, protect=(), current: dict | None = None) -> dict:
    """{weight target: bool mask} keeping the (1 - ratio) most important weights, per layer or
    globally. `current` masks (an earlier step's) stay applied: pruned weights never return."""
    layers = prunable(gm, protect)
    scores = {}
    for name, node in layers.items():
        w = get_weight(gm, weight_layout(node).weight).detach().float()
        if criterion == "taylor":
            if grads is None or name not in grads:
                raise ValueError("criterion='taylor' needs gradients: give calibration_data (batches of inputs)")
            scores[name] = (w * grads[name].float()).abs()
        else:
            scores[name] = w.abs()
    current = current or {}
    defaults = {n: current.get(n, torch.ones_like(s)).float() for n, s in scores.items()}
    if scope == "global":
        flat = torch.cat([scores[n].reshape(-1) for n in scores])
        base = torch.cat([defaults[n].reshape(-1) for n in scores])
        mask = torch_prune.L1Unstructured(ratio).compute_mask(flat, base)
        out, at = {}, 0
        for n, s in scores.items():
            out[n] = mask[at:at + s.numel()].reshape(s.shape).bool()
            at += s.numel()
        return out
    return {n: torch_prune.L1Unstructured(ratio).compute_mask(s, defaults[n]).bool() for n, s in scores.items()}


def apply_masks(gm: GraphModule, masks: dict) -> dict:
    """Point every masked layer at a new weight with the pruned entries set to 0.0 (weights
    are never edited in place: the pass manager's snapshots hold the old ones).
    Returns the masks under the new weight targets."""
    out = {}
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
    for name, mask in masks.items():
        old = nodes[name]
        w = get_weight(gm, old)
        new = add_weight(gm, f"{old.meta.get('fxopt_layer', name)}.weight_pruned",
                         torch.where(mask, w.detach(), torch.zeros((), dtype=w.dtype)), before=old)
        new.meta[ID] = old.meta.get(ID, new.meta.get(ID))
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
        out[str(new.target)] = mask
    gm.recompile()
    return out


def step_ratios(ratio: float, steps: int) -> list:
    """Sparsity after each step of an iterative schedule: the kept fraction shrinks by the
    same factor each step (e.g. 0.9 over 3 steps: 0.536, 0.785, 0.9)."""
    keep = 1.0 - ratio
    return [1.0 - keep ** ((i + 1) / steps) for i in range(steps)]


def weight_grads(gm: GraphModule, names, data, max_batches: int = 8) -> dict:
    """dL/dw for the weights `names`, summed over up to `max_batches` items of `data`
    (cross-entropy against the model's own predictions when items carry no target)."""
    from fxopt.pruning.importance import _loss
    from fxopt.pruning.training import call, first_tensor, split_item

    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
    params = {n: get_weight(gm, nodes[n]).detach().clone().requires_grad_(True) for n in names}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for item in data:
        inputs, target = split_item(item)
        loss = _loss(first_tensor(call(gm, inputs, params)), target, None)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                total[n] += g
        seen += 1
        if seen >= max_batches:
            break
    if seen == 0:
        raise ValueError("criterion='taylor' got no data: calibration_data yielded no batches")
    return total


def sparsity(gm: GraphModule, masks: dict) -> tuple[int, int]:
    """(zeroed, total) elements over the masked weights."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return total - kept, total
