"""The user's entry points: optimize, bisect, prune and profile.

    fast = fxopt.optimize(model, (x,), target="cpu-fp32")
    fast(x)                        # same outputs, same structure
    print(fast.fxopt_report)       # what each pass did

    found = fxopt.bisect(model, (x,), target="cpu-fp32", tol=1e-4)
    print(found)                   # first pass, then first node, over tol

    small = fxopt.prune(model, (x,), ratio=0.5)

    print(fxopt.profile(fast, x))  # per step of the execution plan: op, layer, us, %
"""
from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from fxopt.core.bisect import BisectResult, locate
from fxopt.core.capture import capture, normalize_inputs
from fxopt.core.drift import METRICS
from fxopt.core.pass_base import PassContext
from fxopt.core.pass_manager import PassManager
from fxopt.core.pipeline import PassSpec, Pipeline
from fxopt.driver.compile import COMPILE_LOCK, compile_model, example_from, reference_outputs, reiterable
from fxopt.pruning.structured import check_options as check_prune_options
from fxopt.runtime.plan import Plan, plan_of
from fxopt.runtime.profile import Profile
from fxopt.search import latency_guard
from fxopt.search.budget import search

DEFAULT_TARGET = "cpu-int8"


def optimize(model: nn.Module, example_inputs=None, target: str = DEFAULT_TARGET, *,
             calibration_data=None, dynamic: bool = True, **options) -> nn.Module:
    """Capture `model`, run the target's pipeline, and return the optimized module.

    The result is called exactly like `model` and returns the same output
    structure; `result.fxopt_report` holds the per-pass table. `model` itself
    is never modified.

    Debugging options: print_ir_after=("fold_batchnorm",) or "all",
    dump_dir="stages/", stop_after="fold_batchnorm", disable=("fuse_epilogues",),
    drift=False (skip measuring drift after every pass).

        fast = fxopt.optimize(model, (x,), target="cpu-fp32", dump_dir="stages")

    Latency-aware lowering: each int8 layer is timed against the same layer in fp32, and
    the layers where int8 measured slower stay fp32 when that makes the model faster; a
    result still slower than `model` warns (fxopt.search.latency_guard; latency_aware=False
    keeps int8 everywhere and only warns; latency_repeats=0 measures nothing).

    With eval_fn=, the accuracy-budgeted search (fxopt.search.budget) picks per layer
    int8 or fp32 (or any of search_precisions=("int4", "int8", "bf16", "fp32")) and a prune
    ratio within max_accuracy_drop; see
    fxopt.driver.compile.OPTIONS.
    """
    if options.get("eval_fn") is not None:
        return search(model, example_inputs, target, calibration_data, dynamic, options)
    calibration_data = reiterable(calibration_data, stacklevel=3)   # latency-aware lowering may compile again

    def compile_with(target, twin=False):
        return compile_model(model, example_inputs, target, calibration_data, dynamic, dict(options), twin=twin)

    def keep_fp32(layers):
        return compile_with(latency_guard.keep_fp32(target, layers))

    measured = options.get("latency_repeats", 5) and not options.get("finetune")
    twin = bool(measured) and options.get("latency_aware", True) is True
    done = compile_with(target, twin=twin) if twin else (*compile_with(target), None)
    args, kwargs = normalize_inputs(example_from(example_inputs, calibration_data))
    gm, report = latency_guard.check(done, keep_fp32, options, args, kwargs)
    gm.fxopt_report = report
    return gm


def bisect(model, example_inputs, target: str = "cpu-fp32", tol: float = 1e-4,
           metric: str = "max_abs", **options) -> BisectResult:
    """Run `target` on `model` and locate the first pass and node whose drift exceeds `tol`.

    metric: "max_abs" (error above tol), "sqnr" (below tol dB) or "cosine" (below tol).

        found = fxopt.bisect(model, (x,), target="cpu-int8", metric="sqnr", tol=30)
        found.pass_name, found.node_layer, found.node_drift
    """
    if metric not in METRICS:
        raise ValueError(f"unknown drift metric {metric!r}; use one of {METRICS}")
    gm, report, manager = compile_model(model, example_inputs, target, options.pop("calibration_data", None),
                                        options.pop("dynamic", True), options, keep=True)
    return locate(gm, report, manager, tol, metric)


def prune(model: nn.Module, example_inputs, ratio: float = 0.3, *, data=None, loss_fn=None,
          seed: int = 0, dynamic: bool = True, **options) -> GraphModule:
    """Capture `model` and remove the lowest-ranked channels, neurons and heads.

    Options: criterion ("l1", "l2", "bn_scale", "taylor", "random"), scope
    ("uniform": every group loses `ratio`; "global": the lowest `ratio` of all
    indices, ranked across groups), max_ratio (cap per group), round_to (kept
    widths are multiples of this many elements; 16 suits the int8 kernel),
    protect (layer-name prefixes never cut), heads (prune attention heads).
    taylor needs `data`: a few batches of inputs or (inputs, target) pairs,
    and takes an optional loss_fn(output, target).
    Returns a GraphModule called like `model`; `.fxopt_prune` is the
    PruneReport and `.fxopt_report` the pass manager's record.

        small = fxopt.prune(model, (x,), ratio=0.5, round_to=1)
    """
    check_prune_options({"ratio": ratio, **options})
    with COMPILE_LOCK:
        return _prune(model, example_inputs, ratio, data, loss_fn, seed, dynamic, options)


def _prune(model, example_inputs, ratio, data, loss_fn, seed, dynamic, options):
    args, kwargs = normalize_inputs(example_inputs)
    pipeline = Pipeline((PassSpec("prune_channels", {"ratio": ratio, **options}),))
    pipeline.validate()
    gm = capture(model, example_inputs, dynamic=dynamic)
    ctx = PassContext(example_args=args, example_kwargs=kwargs, seed=seed)
    ctx.state["calibration_data"] = data
    ctx.state["prune_loss"] = loss_fn
    manager = PassManager(pipeline, ctx, reference_outputs(model, args, kwargs))
    gm, record = manager.run(gm)
    gm.fxopt_report = record
    gm.fxopt_prune = ctx.state.get("prune_channels")
    return gm


def profile(model: GraphModule, *args, repeats: int | None = None, **kwargs) -> Profile:
    """Time each step of the execution plan `model` (what optimize or load returned) runs,
    on these inputs: op, layer, output shape, dtype, us and % of the call, kernel steps
    apart from the rest, and the time outside the steps, over `repeats` calls (None: about
    2 s of them, 20 to 200). print() gives the table.

        prof = fxopt.profile(fast, **inputs)
        print(prof)              # slowest steps first
        prof.kernel_us, prof.outside_us, prof.rows
    """
    if not isinstance(model, GraphModule):
        raise TypeError(f"profile expects a model from fxopt.optimize or fxopt.load, got {type(model).__name__}")
    plan = plan_of(model) or Plan(model)       # runtime="graph" models: the plan they would run
    return plan.profile(*args, repeats=repeats, **kwargs)
