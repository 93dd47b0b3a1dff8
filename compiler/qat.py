"""fxopt.finetune: recover accuracy after pruning (distillation) or quantization (QAT).

    small = fxopt.finetune(fxopt.prune(model, x, 0.5), model, loader, epochs=3)
    fast = fxopt.optimize(model, x, target="cpu-int8", calibration_data=loader)
    fast = fxopt.finetune(fast, model, loader, epochs=2)       # quantization-aware training

A quantized model's lowered graph holds packed int8 weights, no float ones, so QAT
starts again from the teacher: the pipeline the model's report records (every pass
with its options, layers kept fp32 included) runs on the teacher with
finetune_quantized spliced in after quantize_int8, calibrated on `data`. The int8
graph that recompile makes is first checked against the model given (a compile up to
quantize_int8, before any training): the same int8 layers, the same activation scheme
and the same weight scales, else the teacher is not the model that was optimized (or SmoothQuant, which reads
the calibration data, chose differently) and that is an error naming the layer.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from fxopt.core.pipeline import PassSpec, Pipeline
from fxopt.driver.compile import compile_model, reiterable
from fxopt.pruning.finetune import finetune as distill
from fxopt.quant import qops
from fxopt.quant.qat import with_qat
from fxopt.runtime import kernel_ops

PRUNERS = ("prune_channels", "prune_weights")
TRAINING = ("temperature", "lr", "loss", "alpha")
NEITHER = ("fxopt.finetune trains a pruned or a quantized model, and {what} is neither: prune it first "
           "(fxopt.prune, or fxopt.optimize(..., prune=...)), or quantize it (fxopt.optimize(..., "
           "target='cpu-int8', calibration_data=...)) and pass the result")


def finetune(student: nn.Module, teacher: nn.Module, data, epochs: int = 1, *, loss_fn=None, **options):
    """Fine-tune `student` against `teacher` on `data`; returns the trained model.

    A model fxopt.optimize returned with an int8 target: quantization-aware training
    (fake quantization at the kernels' rounding, straight-through gradients, learned
    step sizes), distilled from `teacher`, then lowered again; a new model is returned.
    A pruned model (fxopt.prune, or masks of torch.nn.utils.prune): distillation in
    place (fxopt.pruning.finetune, all of its options). loss_fn(output, target) with
    (inputs, target) batches: the task loss (loss="task" unless loss= says otherwise).

        fast = fxopt.finetune(fast, model, loader, epochs=2, lr=1e-4)
    """
    if loss_fn is not None:
        options = {"loss": "task", **options, "task_loss": loss_fn}
    report = getattr(student, "fxopt_report", None)
    names = Pipeline.parse(report.pipeline).names if report is not None and report.pipeline else []
    if "quantize_int8" in names:
        return _quantization_aware(student, teacher, data, epochs, report, options)
    if _pruned(student, names):
        return distill(student, teacher, data, epochs, **options)
    what = (f"this {type(student).__name__} (pipeline {report.pipeline.split(',')[-1]}..., no pruning, "
            f"no quantize_int8)" if report is not None else f"this {type(student).__name__} (no pruning masks)")
    raise ValueError(NEITHER.format(what=what))


def _pruned(student, names) -> bool:
    if getattr(student, "fxopt_prune", None) is not None or any(p in names for p in PRUNERS):
        return True
    return any(name.endswith("_mask") for name, _ in student.named_buffers())


def _quantization_aware(student, teacher, data, epochs, report, options) -> GraphModule:
    unknown = sorted(set(options) - set(TRAINING) - {"task_loss"})
    if unknown:
        raise TypeError(f"fxopt.finetune of a quantized model takes {', '.join(TRAINING)} and loss_fn; "
                        f"not {', '.join(unknown)}")
    if "task_loss" in options:
        raise TypeError("loss_fn with a quantized model: optimize(..., finetune=) trains on inputs only; "
                        "distill from the teacher (the default loss='kd') instead")
    passes = Pipeline.parse(report.pipeline).passes
    if any(s.name == "finetune_quantized" for s in passes):
        raise ValueError("fxopt.finetune: this model was already quantization-aware trained (optimize(..., "
                         "finetune=...)); QAT restarts from the teacher and cannot continue from its trained "
                         "weights: optimize the original model again with more epochs, e.g. finetune="
                         "{'epochs': 4}")
    data = reiterable(data, stacklevel=4)
    spec = [_as_resolved(s, report) for s in passes]
    pipeline, _ = with_qat(Pipeline(tuple(spec)), {"epochs": epochs, **options, "qat": True}, pruned=False)
    example = next(iter(data))
    example = example if isinstance(example, (tuple, dict)) else (example,)
    # check before training: compiling up to quantize_int8 costs a fraction of the training
    ptq, _ = compile_model(teacher, example, Pipeline(tuple(spec)), data, True,
                           {"latency_repeats": 0, "stop_after": "quantize_int8", "drift": False,
                            "report_layers": False})
    _check_same_quantization(_kernel_layers(student), _reference_layers(ptq))
    gm, new_report = compile_model(teacher, example, pipeline, data, True, {"latency_repeats": 0})
    gm.fxopt_report = new_report
    return gm


def _as_resolved(spec, report):
    """A pass as it ran: quantize_int4 reads group_size and int4_rounding from optimize's
    options (not in the pipeline string); its record holds the values it used."""
    if spec.name != "quantize_int4":
        return spec
    stats = report.record("quantize_int4").stats
    return PassSpec(spec.name, {**spec.options, "group_size": stats["group_size"], "rounding": stats["rounding"]})


def _kernel_layers(gm) -> dict:
    """{layer: (static?, weight scales)} of a lowered graph's int8 (and int4) linears and convs."""
    out = {}
    for node in gm.graph.nodes:
        if node.target in kernel_ops.LINEARS:          # int8, sparse int8, int4: one schema
            a_scale = node.args[9]
        elif node.target is kernel_ops.conv2d_int8:
            a_scale = node.args[11]
        else:
            continue
        out[node.meta.get("fxopt_layer", node.name)] = (a_scale > 0, _tensor(gm, node.args[2]))
    return out


def _reference_layers(gm) -> dict:
    """The same, of a graph after quantize_int8 (its int8 reference ops)."""
    out = {}
    for node in gm.graph.nodes:
        if node.target in (qops.quantized_linear, qops.quantized_conv2d):
            out[node.meta.get("fxopt_layer", node.name)] = (node.args[-2] > 0, _tensor(gm, node.args[2]))
    return out


def _tensor(gm, node) -> torch.Tensor:
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach().float().reshape(-1)


def _check_same_quantization(given: dict, made: dict) -> None:
    fix = ("pass as teacher the model fxopt.optimize was given (and, where SmoothQuant smoothed a "
           "LayerNorm, the same calibration batches), or call fxopt.optimize(model, ..., finetune={...})")
    if set(given) != set(made):
        raise ValueError(f"fxopt.finetune: recompiling the teacher with the model's recorded pipeline gives "
                         f"int8 layers {sorted(made)}, the model has {sorted(given)}; {fix}")
    for layer, (static, scales) in given.items():
        static2, scales2 = made[layer]
        if static != static2:
            raise ValueError(f"fxopt.finetune: layer {layer} has {'static' if static else 'dynamic'} int8 "
                             f"activations in the model, {'static' if static2 else 'dynamic'} when recompiled; {fix}")
        if scales.shape != scales2.shape or not torch.allclose(scales, scales2, rtol=1e-6, atol=0):
            raise ValueError(f"fxopt.finetune: layer {layer}'s int8 weight scales differ from the teacher's "
                             f"recompiled ones: the teacher is not the model that was optimized; {fix}")
