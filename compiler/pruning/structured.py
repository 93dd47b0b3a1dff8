"""Structured pruning: remove whole channels, neurons and attention heads.

    small = fxopt.prune(model, example_inputs, ratio=0.5, criterion="l1")
    small(*inputs)                      # a smaller GraphModule, same interface
    print(small.fxopt_prune)            # groups, kept widths, params and MACs

The work is split: dependency.py finds the groups, importance.py scores
their indices, this module decides how many to cut (allocation) and drives
prune_apply.py; passes/prune_channels.py runs it inside a pipeline.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch.fx import GraphModule

from fxopt.core.ir import ID, get_weight, refresh_meta
from fxopt.core.macs import count_params, node_macs
from fxopt.core.ops import OpKind, kind_of, weight_layout
from fxopt.core.pipeline import PassSpec, Pipeline
from fxopt.pruning.dependency import analyze
from fxopt.pruning.importance import CRITERIA, group_scores, taylor_grads
from fxopt.pruning.prune_apply import apply_group

SCOPES = ("uniform", "global")
DEFAULTS = {"ratio": 0.3, "criterion": "l1", "scope": "uniform", "max_ratio": 0.9,
            "round_to": 16, "protect": (), "heads": True, "taylor_batches": 8}


@dataclass
class GroupReport:
    name: str
    kind: str
    unit: int
    count: int
    kept: int
    removed: list                 # group indices removed, lowest score first
    scores: list                  # score of every index (criterion's scale)
    params: tuple = (0, 0)        # (before, after) elements of the group's weights
    macs: tuple = (0, 0)          # (before, after) of the group's layers
    members: list = field(default_factory=list)   # (layer, role, weight axis, unit, reps)
    normalized: bool = False      # a layer norm over the pruned dim: kept values shift

    def __str__(self) -> str:
        return (f"{self.name:<48} {self.kind:<8} {self.count * self.unit:>6} -> "
                f"{self.kept * self.unit:<6} params {self.params[0]:>9} -> {self.params[1]:<9} "
                f"MACs {self.macs[0]:>11} -> {self.macs[1]}")


@dataclass
class PruneReport:
    options: dict
    groups: list = field(default_factory=list)
    unsafe: list = field(default_factory=list)     # (group name, reason): left alone
    params: tuple = (0, 0)
    macs: tuple = (0, 0)

    def __str__(self) -> str:
        lines = [f"prune_channels {self.options}",
                 f"params {self.params[0]} -> {self.params[1]}   MACs {self.macs[0]} -> {self.macs[1]}"]
        lines += [str(g) for g in self.groups]
        lines += [f"left alone: {name}: {why}" for name, why in self.unsafe]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as plain data (what fxopt.save stores); from_dict is the inverse."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PruneReport:
        return cls(**{**d, "groups": [GroupReport(**g) for g in d["groups"]]})


def prune_graph(gm: GraphModule, data=None, loss_fn=None, seed: int = 0, **options) -> PruneReport:
    """Prune `gm` in place (new weights, rewritten graph) and return the report."""
    opts = check_options(options)
    analysis = analyze(gm, protect=opts["protect"], heads=opts["heads"])
    params_before, macs_before = count_params(gm), node_macs(gm)
    grads = None
    if opts["criterion"] == "taylor":
        if data is None:
            raise ValueError("criterion='taylor' needs data: a few batches of inputs "
                             "(or (inputs, target) pairs) passed as data= or calibration_data=")
        grads = taylor_grads(gm, analysis.groups, data, loss_fn, opts["taylor_batches"])
    scores = [group_scores(gm, g, opts["criterion"], grads, seed) for g in analysis.groups]
    counts = allocate(analysis.groups, scores, opts)
    report = PruneReport(dict(opts), unsafe=list(analysis.unsafe))
    group_params = [_group_params(gm, g) for g in analysis.groups]
    group_ids = [_group_ids(g) for g in analysis.groups]
    plans = []
    for group, score, n_remove in zip(analysis.groups, scores, counts):
        removed = lowest(score, n_remove)
        keep = sorted(set(range(group.count)) - set(removed))
        plans.append((group, score, removed, keep))
    replaced = {}
    for group, _, removed, keep in plans:
        if removed:
            replaced.update(apply_group(gm, group, torch.tensor(keep)))
    refresh_meta(gm)
    macs_after = node_macs(gm)
    for (group, score, removed, keep), before, ids in zip(plans, group_params, group_ids):
        report.groups.append(GroupReport(
            group.name, group.kind, group.unit, group.count, len(keep), removed,
            [float(s) for s in score], (before, _group_params(gm, group, replaced)),
            (sum(macs_before.get(i, 0) for i in ids), sum(macs_after.get(i, 0) for i in ids)),
            [(_layer(m.node), m.role, m.axis, m.unit, m.reps)
             for m in group.of_role("out", "in", "grouped")],
            _normalizes(group)))
    report.params = (params_before, count_params(gm))
    report.macs = (sum(macs_before.values()), sum(macs_after.values()))
    return report


def lowest(scores: torch.Tensor, n: int) -> list:
    """Indices of the n lowest scores (ties broken by index), lowest first."""
    if n <= 0:
        return []
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return order[:n]


def allocate(groups, scores, opts) -> list:
    """How many indices to remove from each group."""
    ratio, cap = float(opts["ratio"]), float(opts["max_ratio"])
    if opts["scope"] == "uniform":
        wanted = [int(round(ratio * g.count)) for g in groups]
    else:
        wanted = _global(groups, scores, ratio, cap)
    return [_legal(g, n, cap, int(opts["round_to"])) for g, n in zip(groups, wanted)]


def _global(groups, scores, ratio, cap) -> list:
    # Scores are normalised by their group's mean so that groups of different
    # sizes and scales compete on equal terms; the lowest ratio of all indices go.
    ranked = []
    for gi, s in enumerate(scores):
        mean = float(s.mean()) or 1.0
        ranked += [(float(v) / mean, gi) for v in s]
    ranked.sort()
    budget = int(round(ratio * len(ranked)))
    wanted = [0] * len(groups)
    for _, gi in ranked:
        if budget == 0:
            break
        if wanted[gi] < math.floor(cap * groups[gi].count):
            wanted[gi] += 1
            budget -= 1
    return wanted


def _legal(group, n_remove, cap, round_to) -> int:
    """Clamp to max_ratio and round the kept width up to a multiple of round_to elements."""
    n_remove = max(0, min(n_remove, math.floor(cap * group.count), group.count - 1))
    keep = group.count - n_remove
    step = round_to // math.gcd(round_to, group.unit) if round_to > 1 else 1
    keep = max(step, -(-keep // step) * step)
    return max(0, group.count - keep)


def _group_params(gm, group, replaced=None) -> int:
    """Elements of the group's weights (producers, consumers, params) as they are now."""
    replaced = replaced or {}
    seen, total = set(), 0
    for m in group.members:
        if m.role == "param":
            nodes = [m.node]
        else:
            layout = weight_layout(m.node)
            nodes = [layout.weight] + ([layout.bias] if layout.bias is not None else [])
        for n in nodes:
            n = replaced.get(n, n)
            if n not in seen:
                seen.add(n)
                total += get_weight(gm, n).numel()
    return total


def _layer(node) -> str:
    return node.meta.get("fxopt_layer") or node.name


def _normalizes(group) -> bool:
    return any(kind_of(n) is OpKind.LAYER_NORM and dim == len(n.meta["val"].shape) - 1
               for n, (dim, _, _) in group.slots.items())


def _group_ids(group) -> set:
    nodes = [m.node for m in group.of_role("out", "in", "grouped")] + list(group.slots)
    return {n.meta.get(ID, n.name) for n in nodes}


def check_options(options) -> dict:
    """The pruning options with defaults filled in; unknown names or bad values raise."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown pruning option(s) {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if not 0.0 <= float(opts["ratio"]) < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {opts['ratio']}")
    if opts["criterion"] not in CRITERIA:
        raise ValueError(f"unknown criterion {opts['criterion']!r}; use one of {', '.join(CRITERIA)}")
    if opts["scope"] not in SCOPES:
        raise ValueError(f"unknown scope {opts['scope']!r}; use 'uniform' or 'global'")
    protect = opts["protect"]
    opts["protect"] = (protect,) if isinstance(protect, str) else tuple(protect)
    return opts


def with_pruning(pipeline, prune=None, finetune=None):
    """`pipeline` with prune_channels, or prune_weights for prune={"structure": "weights", ...}
    (and distill_pruned when `finetune` is given) spliced in before fold_batchnorm, i.e.
    before fusion and quantization.

    prune: a ratio (0.3) or a dict of prune_channels options; with "structure": "weights",
    a dict of prune_weights options (fxopt.pruning.unstructured). finetune: a dict of
    distill_pruned options (epochs, temperature, lr, loss), e.g. {"epochs": 2}.
    """
    if prune is None or prune is False:
        if finetune:
            raise ValueError("finetune= recovers a pruned model: give prune= too")
        return pipeline
    options = {"ratio": float(prune)} if isinstance(prune, (int, float)) else dict(prune)
    structure = options.pop("structure", "channels")
    if structure == "weights":
        from fxopt.pruning.unstructured import check_weight_options
        check_weight_options(options)
        if options.get("schedule") == "iterative" and finetune:
            options["finetune"] = dict(finetune)    # recovery between the steps too
        specs = [PassSpec("prune_weights", options)]
    elif structure == "channels":
        check_options(options)
        specs = [PassSpec("prune_channels", options)]
    else:
        raise ValueError(f"unknown prune structure {structure!r}; use 'channels' (whole channels, "
                         "neurons and heads; the default) or 'weights' (individual weights)")
    if finetune:
        specs.append(PassSpec("distill_pruned", dict(finetune)))
    passes = list(pipeline.passes)
    names = [p.name for p in passes]
    at = names.index("fold_batchnorm") if "fold_batchnorm" in names else 0
    out = Pipeline(tuple(passes[:at] + specs + passes[at:]))
    out.validate()
    return out
