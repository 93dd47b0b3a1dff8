"""Remove whole channels, neurons and attention heads (structured pruning).

Runs on the ATen graph before fold_batchnorm, so batch-norm scales are still
there for the bn_scale criterion. Groups of dimensions that must shrink
together come from fxopt.pruning.dependency; groups it cannot prove safe are left
alone and counted in the stats. The full per-group report (widths, params,
MACs before/after, removed indices) goes to ctx.state["prune_channels"] and
gm.meta["fxopt_prune"].

    prune_channels{ratio=0.5,criterion=l1,scope=global,round_to=16}
"""
from __future__ import annotations

from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.pruning.structured import DEFAULTS, prune_graph

PASS = PassInfo("prune_channels", options=dict(DEFAULTS),
                doc="structured pruning of channels, FFN neurons and attention heads")


def run(gm, ctx, **options) -> PassResult:
    data = ctx.state.get("calibration_data")
    loss_fn = ctx.state.get("prune_loss")
    if options["criterion"] != "taylor":
        data = None
    report = prune_graph(gm, data=data, loss_fn=loss_fn, seed=ctx.seed, **options)
    ctx.state[PASS.name] = report
    gm.meta["fxopt_prune"] = report
    pruned = [g for g in report.groups if g.kept < g.count]
    stats = {"groups_pruned": len(pruned),
             "groups_kept_whole": len(report.groups) - len(pruned),
             "groups_unsafe": len(report.unsafe),
             "heads_removed": sum(g.count - g.kept for g in pruned if g.kind == "heads"),
             "params_before": report.params[0], "params_after": report.params[1],
             "macs_before": report.macs[0], "macs_after": report.macs[1]}
    return PassResult(bool(pruned), stats)
