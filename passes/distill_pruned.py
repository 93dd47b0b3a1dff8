"""Recover a pruned graph by knowledge distillation from the unpruned model.

Runs right after prune_channels or prune_weights (before fusion and quantization)
on ctx.state["calibration_data"]; the teacher is ctx.state["teacher"], the
user's model. See fxopt.pruning.finetune for the loss. After prune_weights, the
pruned weights stay exactly zero (its masks are re-applied after every step).

    prune_channels{ratio=0.5},distill_pruned{epochs=2,temperature=4.0}
"""
from __future__ import annotations

from fxopt.core.errors import PassError, PipelineError
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.pruning.finetune import finetune

PRUNERS = ("prune_channels", "prune_weights")
PASS = PassInfo("distill_pruned",
                options={"epochs": 1, "temperature": 4.0, "lr": 1e-3, "loss": "kd", "alpha": 0.5},
                doc="knowledge-distillation fine-tuning of the pruned graph")


def run(gm, ctx, **options) -> PassResult:
    if not any(p in ctx.ran for p in PRUNERS):
        raise PipelineError(f"pass distill_pruned requires prune_channels or prune_weights to run before it")
    data, teacher = ctx.state.get("calibration_data"), ctx.state.get("teacher")
    if data is None or teacher is None:
        raise PassError("distill_pruned needs calibration_data (batches of inputs) and the "
                        "unpruned model as ctx.state['teacher']; optimize(..., prune=..., "
                        "finetune={...}, calibration_data=loader) provides both")
    masks = ctx.state.get("prune_weights", {}).get("masks")
    finetune(gm, teacher, data, progress=False, seed=ctx.seed, masks=masks, **options)
    for p in gm.parameters():
        p.requires_grad_(False)
    return PassResult(True, {"epochs": options["epochs"], "masked_weights": len(masks or {})})
