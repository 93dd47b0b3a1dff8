"""Quantization-aware training: fine-tune the int8 graph through fake quantization.

Runs right after quantize_int8 (batch norms folded, ranges calibrated, every layer's
int8 decision taken) on ctx.state["calibration_data"], distilling from the user's
model (ctx.state["teacher"]) with fxopt.pruning.finetune's losses. Each int8 op
trains as fake_quant computes it (the kernels' rounding and clamping, STE, LSQ step
sizes initialised to the PTQ scales); afterwards the learned codes, weight scales
and static activation scales are the int8 ops' arguments, so lower_to_kernels packs
exactly the trained model. Weights a pruning zeroed stay 0; shared (codebook) layers
keep their codes and learn their scales and bias.

    ...,quantize_int8,finetune_quantized{epochs=2,lr=1e-4},lower_to_kernels,...
"""
from __future__ import annotations

from fxopt.core.errors import PassError
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.pruning.finetune import finetune
from fxopt.quant import qat

PASS = PassInfo("finetune_quantized", requires=("quantize_int8",),
                options={"epochs": 1, "temperature": 4.0, "lr": 1e-4, "loss": "kd", "alpha": 0.5},
                doc="quantization-aware training (fake quant, STE, LSQ steps) distilled from the model")


def run(gm, ctx, **options) -> PassResult:
    data, teacher = ctx.state.get("calibration_data"), ctx.state.get("teacher")
    if data is None or teacher is None:
        raise PassError("finetune_quantized needs calibration_data (batches of inputs) and the "
                        "unoptimized model as ctx.state['teacher']; optimize(..., target='cpu-int8', "
                        "finetune={...}, calibration_data=loader) provides both")
    # quantize_int8 records them; an int4 pass before it may too (its 2-d scales train as groups)
    floats = {**ctx.state.get("quantize_int4", {}).get("float_weights", {}),
              **ctx.state.get("quantize_int8", {}).get("float_weights", {})}
    units = qat.prepare(gm, floats, frozen_layers=gm.meta.get("fxopt_shared", {}))
    if not units.fake:
        qat.convert(gm, units)
        return PassResult(False, {"int8_ops": 0})
    masks = qat.pruned_masks(gm, units) if "prune_weights" in ctx.ran else None
    finetune(gm, teacher, data, progress=False, seed=ctx.seed, masks=masks,
             after_step=units.clamp_steps, param_lr=units.step_lrs(options["lr"]), **options)
    stats = qat.convert(gm, units)
    return PassResult(True, {"epochs": options["epochs"], **stats})
