"""Compile a model: check options, capture, run the pipeline, report.

    gm, report = compile_model(model, (x,), "cpu-int8", calibration_data, True, {})

optimize, bisect, prune and the accuracy-budgeted search call this; it is the one
place that turns a user's model, inputs and options into a pass-manager run.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fxopt.core.capture import TRACE_LOCK, capture, normalize_inputs
from fxopt.core.errors import PipelineError
from fxopt.core.pass_base import PassContext
from fxopt.core.pass_manager import Instruments, PassManager, snapshot
from fxopt.core.pipeline import Pipeline, target_pipeline
from fxopt.core.size_table import size_table
from fxopt.driver.compile_notice import NOTICE as COMPILE_NOTICE
from fxopt.passes.quantize_int4 import check_group_size
from fxopt.pruning.structured import with_pruning
from fxopt.quant.qat import with_qat
from fxopt.quant.weight_sharing import with_sharing
from fxopt.report import model_report
from fxopt.runtime.input_check import input_specs, install as install_input_check
from fxopt.runtime.plan import install as install_plan

# Options optimize() takes besides the instruments; later stages add theirs here.
OPTIONS = {
    "seed": "seed for anything random a pass does (default 0)",
    "report_layers": "per-layer precision and error table in the report (default True)",
    "latency_repeats": "runs to time the model before and after for the report (default 5, 0 = skip)",
    "prune": "pruning before fusion/quantization: a ratio (0.3) or a dict of prune_channels options "
             "(ratio, criterion, scope, max_ratio, round_to, protect, heads); {'structure': 'weights', "
             "'ratio': 0.9, ...} zeroes individual weights instead (prune_weights: scope layer|global, "
             "criterion magnitude|taylor, schedule oneshot|iterative, steps, protect)",
    "finetune": "training on calibration_data, distilled from the model: with prune, recovery of the "
                "pruned model (distill_pruned); with an int8 target, quantization-aware training after "
                "quantize_int8 (finetune_quantized: fake quant, STE, LSQ steps); with both, distillation "
                "unless 'qat': True asks for both. A dict of their options (epochs, lr, temperature, "
                "loss, alpha), e.g. {'epochs': 2}",
    "share_weights": "int8 targets: weight sharing, each linear/conv's nonzero weights clustered (k-means, "
                     "linear init) to 2**bits int8 values: {'bits': 5} or per kind {'conv': 8, 'linear': 5}",
    "runtime": "how the optimized model runs: 'plan' (default: an execution plan calling the "
               "kernels directly) or 'graph' (the lowered graph through torch's dispatcher, for debugging)",
    "calibration_nonfinite": "a calibration batch holding NaN: 'error' (default) or 'skip' it with a warning",
    "calibration_outliers": "a calibration batch whose |x| is 10x the median batch's: 'drop' (default, "
                            "with a warning) or 'keep'",
    # Accuracy-budgeted search (fxopt.search.budget): given eval_fn, optimize returns the fastest
    # precision-per-layer and prune-ratio configuration whose metric stays within the budget.
    "eval_fn": "eval_fn(model) -> float, higher is better: turns on the accuracy-budgeted search",
    "max_accuracy_drop": "search: allowed metric drop from the unoptimized model (default 0.01)",
    "drop_mode": "search: 'absolute' (units of eval_fn, default) or 'relative' (fraction of it)",
    "max_evals": "search: most configurations evaluated with eval_fn (default 40)",
    "time_budget_s": "search: no new evaluation after this many seconds (default none)",
    "search_prune": "search: global prune ratios tried (default (0, 0.1, 0.2, 0.3, 0.5); () = no pruning)",
    "finetune_budget": "search: distillation epochs (or distill_pruned options) for ratios that miss",
    "plot_path": "search: save the Pareto front (latency vs metric) as a PNG here (needs matplotlib)",
    "search_cost": "search: 'latency' (measured, default) or 'macs' (int8 MAC = half; deterministic)",
    "search_precisions": "search: precisions a layer may take, among 'int4', 'int8', 'bf16' (needs the "
                         "quantize_bf16 pass), 'fp32' (always a candidate), e.g. ('int4', 'int8', 'fp32'); "
                         "default: the target's own precision and fp32",
    "latency_aware": "int8 targets: time each int8 layer against the same layer in fp32 and keep fp32 "
                     "where int8 measured slower, if that makes the model faster (default True); "
                     "False keeps int8 everywhere (the smallest model). Either way a slower result warns",
    "sparse": "int8 targets: a linear whose int8 weights are at least half zeros (pruned by fxopt, by "
              "torch.nn.utils.prune, or any other way) is timed with the sparse kernel against the dense "
              "one at the example row count and runs the faster (default True; the layer table says "
              "which and both times); False keeps every linear on the dense kernel; 'always' takes the "
              "sparse kernel wherever the zeros allow, untimed (reproducible)",
    "group_size": "cpu-int4: weights per int4 scale along K: 32 (default), 64 or 128",
    "int4_rounding": "cpu-int4: 'auto' (default: GPTQ rounding with calibration_data, else round to "
                     "nearest), 'nearest' or 'gptq' (GPTQ on the calibration data, or the example inputs)",
}
INSTRUMENTS = ("print_ir_after", "dump_dir", "stop_after", "disable", "drift")


# torch.export keeps process-wide state while it traces (capture.TRACE_LOCK says which),
# passes propagate fake tensors, and distill_pruned seeds torch's global RNG: two compiles
# at once fail or interleave. Optimizing is not a hot path, so calls from several threads
# take turns, and with fxopt.capture too (one lock).
COMPILE_LOCK = TRACE_LOCK


def compile_model(model, example_inputs, target, calibration_data, dynamic, options, keep=False,
                  twin=False):
    """(optimized GraphModule, Report) for `model` under `target` (a target name, a pipeline
    string or a Pipeline); with keep=True also the PassManager, holding the graph before
    every pass (what bisect reads); with twin=True also the fp32 twin (fp32_twin), or None.
    `options` are optimize()'s: OPTIONS and INSTRUMENTS.
    Thread-safe: concurrent calls run one after another (COMPILE_LOCK)."""
    with COMPILE_LOCK:
        try:
            return _compile(model, example_inputs, target, calibration_data, dynamic, options, keep, twin)
        finally:
            COMPILE_NOTICE.finish()     # "compiled N kernels in T s", if any compiled


def _compile(model, example_inputs, target, calibration_data, dynamic, options, keep, twin):
    _check_options(options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    calibration_data = reiterable(calibration_data)
    example_inputs = example_from(example_inputs, calibration_data)
    args, kwargs = normalize_inputs(example_inputs)
    pipeline = target_pipeline(target) if isinstance(target, str) else _as_pipeline(target)
    prune, finetune = options.pop("prune", None), options.pop("finetune", None)
    pruned = prune is not None and prune is not False
    pipeline, finetune = with_qat(pipeline, finetune, pruned)    # int8 targets: quantization-aware training
    pipeline = with_pruning(pipeline, prune, finetune if pruned else None)
    pipeline = with_sharing(pipeline, options.pop("share_weights", None))
    COMPILE_NOTICE.before(pipeline.names)   # a cold kernel cache: say so before capture starts
    instruments = Instruments(**{k: _tuple(k, options.pop(k)) for k in INSTRUMENTS if k in options})
    gm = capture(model, example_inputs, dynamic=dynamic)
    # drift after every pass and the per-layer table run the model many times: on a
    # large example batch, two samples tell the same story at a fraction of the cost
    probe_args, probe_kwargs = probe_inputs(gm, args, kwargs)
    reference = reference_outputs(model, probe_args, probe_kwargs) if instruments.drift else None
    original = snapshot(gm)
    ctx = PassContext(example_args=args, example_kwargs=kwargs, probe=(probe_args, probe_kwargs),
                      options=options, seed=options.get("seed", 0))
    ctx.state["calibration_data"] = calibration_data
    ctx.state["teacher"] = model
    manager = PassManager(pipeline, ctx, reference, instruments, keep_snapshots=keep)
    gm, report = manager.run(gm)
    specs = input_specs(gm)
    if specs is not None:   # one entry check (device, dtype, rank, sizes), as a loaded model has
        install_input_check(gm, specs)
    install_plan(gm, options.get("runtime", "plan"))
    _model_sections(report, model, original, gm, (args, kwargs), (probe_args, probe_kwargs), options)
    if keep:
        return gm, report, manager
    if twin:
        return gm, report, fp32_twin(pipeline, original, gm, ctx)
    return gm, report


def fp32_twin(pipeline, captured, gm, ctx):
    """What `gm`'s int8 layers would run in fp32: the captured graph through the pipeline's
    fp32 passes (cpu-fp32's), with an execution plan; latency-aware lowering times each int8
    layer against its twin. No second capture and no calibration: a fraction of a compile.
    None when there is nothing to compare (no int8 layer) or the twin would not have `gm`'s
    shapes (pruning changes them)."""
    fp32_names = set(target_pipeline("cpu-fp32").names)
    if not model_report.int8_layers(gm) or "prune_channels" in pipeline.names:
        return None
    passes = Pipeline(tuple(p for p in pipeline.passes if p.name in fp32_names))
    ctx = PassContext(example_args=ctx.example_args, example_kwargs=ctx.example_kwargs, probe=ctx.probe,
                      seed=ctx.seed)
    twin, _ = PassManager(passes, ctx, None, Instruments(drift=False)).run(snapshot(captured))
    install_plan(twin, "plan")
    return twin


def _model_sections(report, model, original, gm, full, probe, options) -> None:
    """Per-layer table (on the probe inputs) and size/MACs/latency summary (on the full
    example inputs), added to the report."""
    rows = model_report.layer_rows(original, gm, *probe) if options.get("report_layers", True) else []
    summary = model_report.model_summary(model, original, gm, *full, rows, options.get("latency_repeats", 5))
    report.layers, report.summary = rows, summary
    if rows:
        report.sections["layers"] = model_report.format_layers(rows, model_report.fp32_ops(gm))
    report.sections["model"] = model_report.format_summary(summary)
    sparsity, shared = gm.meta.get("fxopt_sparsity", {}), gm.meta.get("fxopt_shared", {})
    if sparsity or shared:     # unstructured pruning / weight sharing: the Deep Compression table
        report.sections["compression"] = size_table(sparsity, shared, summary["fp32_bytes"])


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTIONS) - set(INSTRUMENTS))
    if unknown:
        valid = ", ".join(sorted(OPTIONS) + list(INSTRUMENTS) + ["calibration_data", "dynamic"])
        raise PipelineError(f"unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    if not isinstance(options.get("latency_aware", True), bool):
        raise TypeError(f"latency_aware must be True or False, got {options['latency_aware']!r}")
    if options.get("sparse", True) not in (True, False, "always"):
        raise TypeError(f"sparse must be True, False or 'always', got {options['sparse']!r}")
    if "group_size" in options:
        check_group_size(options["group_size"])


def _tuple(key, value):
    if key in ("print_ir_after", "disable") and isinstance(value, str) and value != "all":
        return tuple(v for v in value.split(",") if v)
    if key in ("print_ir_after", "disable") and value != "all":
        return tuple(value)
    return value


def _as_pipeline(target) -> Pipeline:
    if isinstance(target, Pipeline):
        target.validate()
        return target
    raise PipelineError(f"target must be a target name or a pipeline string, got {type(target).__name__}")


PROBE_BATCH = 2


def probe_inputs(gm, args, kwargs):
    """The example inputs cut to PROBE_BATCH samples when every tensor input has the same,
    dynamic batch dim; otherwise the example inputs as they are."""
    import torch.utils._pytree as pytree
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    info = gm.meta.get("fxopt_capture", {})
    dims = info.get("dynamic_dims", {})
    batch_dynamic = len(dims) == len(leaves) and all(0 in d for d in dims.values())
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if not batch_dynamic or len(sizes) != 1 or (sizes.pop() or 0) <= PROBE_BATCH:
        return args, kwargs
    cut = lambda t: t[:PROBE_BATCH] if isinstance(t, torch.Tensor) else t  # noqa: E731
    return pytree.tree_map(cut, args), pytree.tree_map(cut, kwargs)


def reiterable(data, stacklevel=4):
    """Several passes read the calibration data; a one-shot iterator would be empty for
    all but the first, so its items are kept in a list (and the user is told)."""
    if data is None or iter(data) is not data:
        return data
    items = list(data)
    warnings.warn(f"fxopt: calibration_data is a one-shot iterator; its {len(items)} items were kept "
                  "in memory because several passes read them. Pass a list or a DataLoader to avoid this.",
                  stacklevel=stacklevel)
    return items


def example_from(example_inputs, calibration_data):
    if example_inputs is not None:
        return example_inputs
    if calibration_data is None:
        raise TypeError("optimize needs example_inputs (a tuple of args or a dict of kwargs), "
                        "or calibration_data whose first item serves as the example")
    try:
        return next(iter(calibration_data))
    except StopIteration:
        raise ValueError("calibration_data is empty; give at least one input") from None


def reference_outputs(model, args, kwargs):
    """The unoptimized model's outputs on the example inputs (eval mode, model untouched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        model.train(was_training)
