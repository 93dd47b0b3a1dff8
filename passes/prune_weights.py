"""Zero individual weights of linear and conv layers (unstructured pruning).

Runs on the ATen graph before fold_batchnorm, like prune_channels; the zeros it
makes survive every later pass (folding and SmoothQuant scale them, int8 rounds
0 to 0). The masks go to ctx.state["prune_weights"]["masks"] so distill_pruned
keeps them through fine-tuning, and to gm.meta["fxopt_sparsity"] (per layer:
kept, total) for the report.

    prune_weights{ratio=0.9,scope=global}
    prune_weights{ratio=0.95,schedule=iterative,steps=3,finetune={'epochs': 2}}

With schedule=iterative the sparsity grows over `steps` steps, each followed
(but the last: distill_pruned does that one) by distillation fine-tuning with
the `finetune` options.
"""
from __future__ import annotations

from fxopt.core.errors import PassError
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.pruning.finetune import finetune as distill
from fxopt.pruning.unstructured import (WEIGHT_DEFAULTS, apply_masks, check_weight_options, prunable,
                                        sparsity, step_ratios, weight_grads, weight_masks)

PASS = PassInfo("prune_weights", options={k: v for k, v in WEIGHT_DEFAULTS.items() if k != "structure"},
                doc="unstructured pruning: zero the least important weights of linears and convs")


def run(gm, ctx, **options) -> PassResult:
    opts = check_weight_options(options)
    ratios = step_ratios(opts["ratio"], opts["steps"]) if opts["schedule"] == "iterative" else [opts["ratio"]]
    masks = {}
    for i, ratio in enumerate(ratios):
        if i:
            _finetune_between(gm, ctx, opts, masks)
        grads = _grads(gm, ctx, opts)
        masks = apply_masks(gm, weight_masks(gm, ratio, opts["scope"], opts["criterion"], grads,
                                             opts["protect"], current=masks))
    state = ctx.state.setdefault(PASS.name, {})
    state["masks"] = masks
    layers = prunable(gm)
    gm.meta["fxopt_sparsity"] = {
        layers[n].meta.get("fxopt_layer", n): [int(m.sum()), m.numel()] for n, m in masks.items()}
    zeroed, total = sparsity(gm, masks)
    return PassResult(zeroed > 0, {"layers": len(masks), "weights": total, "zeroed": zeroed,
                                   "steps": len(ratios)})


def _grads(gm, ctx, opts):
    if opts["criterion"] != "taylor":
        return None
    data = ctx.state.get("calibration_data")
    if data is None:
        raise PassError("prune_weights: criterion='taylor' needs calibration_data (a few batches of inputs) "
                        "to compute dL/dw; give calibration_data= or use criterion='magnitude'")
    return weight_grads(gm, list(prunable(gm, opts["protect"])), data, opts["taylor_batches"])


def _finetune_between(gm, ctx, opts, masks) -> None:
    """Recover between the steps of an iterative schedule (distillation from the user's model)."""
    if not opts["finetune"]:
        return
    data, teacher = ctx.state.get("calibration_data"), ctx.state.get("teacher")
    if data is None or teacher is None:
        raise PassError("prune_weights: fine-tuning between iterative steps needs calibration_data and "
                        "the unpruned model; optimize(..., finetune={...}, calibration_data=loader) gives both")
    distill(gm, teacher, data, progress=False, seed=ctx.seed, masks=masks, **dict(opts["finetune"]))
    for p in gm.parameters():
        p.requires_grad_(False)
