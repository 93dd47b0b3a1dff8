"""Never hand back a slower model without a word: latency-aware lowering.

optimize times the input model and its result on the example inputs (taking turns,
report.summary). With latency_aware=True (the default), every int8 layer is then timed as
the model runs it (the steps of its execution plan) against the same layer compiled fp32
(the fp32 twin: the captured graph through the fp32 passes, no second capture):

  1. the layers where int8 measured slower than fp32 beyond NOISE are compiled again in fp32,
     and that mixed model is kept if it measures faster than the all-int8 one by more than
     NOISE / 2 (taking turns; a gain within noise is not worth the size);
     the per-layer table says why each of those layers is fp32;
  2. if the result is still slower than the input model, optimize warns with the figures
     and the reason.

    gm, report = check((gm, report, twin), recompile, options, args, kwargs)   # what fxopt.optimize does

latency_aware=False keeps int8 everywhere (the smallest model) and only warns. Without a
twin (pruned models: the twin would have other shapes) the layers are compared only when the
whole model measured slower, against an fp32 compile of the pruned model. A fine-tuned
(distilled) compile is not redone: it warns only.
"""
from __future__ import annotations

import warnings

import torch

from fxopt.core.pipeline import target_pipeline
from fxopt.report import model_report
from fxopt.report.timing import interleaved_medians
from fxopt.search import sensitivity
from fxopt.search.budget import with_fp32_layers

NOISE = 0.10     # slower by more than this fraction counts as slower (shared machines)


def keep_fp32(target, layers):
    """`target` (a name, a pipeline string or a Pipeline) with `layers` kept fp32."""
    return with_fp32_layers(target_pipeline(target) if isinstance(target, str) else target, layers)


def _ratio(report) -> float | None:
    """Optimized over original latency, None when not measured."""
    s = report.summary
    if s.get("latency_original") is None:
        return None
    return s["latency_optimized"] / s["latency_original"]


def check(done, recompile, options: dict, args: tuple, kwargs: dict):
    """(gm, report) of `done` (what compile_model returns with twin=True), or of a recompile
    (`recompile(layers)`) that keeps the layers where int8 measured slower fp32."""
    gm, report, twin = done
    ratio = _ratio(report)
    int8 = model_report.int8_layers(gm)
    if ratio is None or not int8:
        return gm, report
    aware = options.get("latency_aware", True) and not options.get("finetune")
    if aware and (twin is not None or ratio > 1 + NOISE):
        gm, report = _lower_by_latency(gm, report, twin, int8, recompile, args, kwargs)
        ratio = _ratio(report)
    if ratio > 1 + NOISE:
        reverted = report.summary.get("latency_aware", {})
        warnings.warn(_slower_message(report.summary, ratio, reverted, len(int8)), stacklevel=3)
    return gm, report


def _lower_by_latency(gm, report, twin, int8, recompile, args, kwargs):
    if twin is None:
        twin = recompile(int8)[0]
    call = report.summary["latency_optimized"]
    # a few profiles of each plan, ~50 ms each: large models need few calls for a steady median
    times = sensitivity.plan_layer_latency(gm, twin, args, kwargs, repeats=max(1, min(5, int(0.05 / call))))
    precision = {row["layer"]: row["precision"] for row in report.layers}     # int8, int4 or bf16
    slow = {name: why for name, why in sensitivity.slower_in_int8(times, NOISE, precision).items() if name in int8}
    word = "/".join(sorted({precision.get(name, "int8") for name in int8})) or "int8"   # what the text calls them
    if not slow:
        return gm, report
    gain = sum(times[name][0] - times[name][1] for name in slow)
    if gain < call * NOISE / 2:     # a recompile could not gain more than noise: do not pay for it
        report.sections["latency_aware"] = _format(slow, len(int8), call, None, kept=False, gain=gain, word=word)
        return gm, report
    mixed, mixed_report = recompile(sorted(slow))
    t_int8, t_mixed = _turns(gm, mixed, args, kwargs)
    if t_mixed > t_int8 * (1 - NOISE / 2):
        # Within noise of each other (the layers added up to little of the model): int8 stays,
        # which keeps the model small.
        report.sections["latency_aware"] = _format(slow, len(int8), t_int8, t_mixed, kept=False, word=word)
        return gm, report
    mixed_report.sections["latency_aware"] = _format(slow, len(int8), t_int8, t_mixed, kept=True, word=word)
    mixed_report.summary["latency_aware"] = slow
    _say_why(mixed, mixed_report, slow)
    return mixed, mixed_report


def _say_why(gm, report, slow: dict) -> None:
    """The per-layer table names latency as the reason these layers are fp32, not the
    per_layer option that carried the decision."""
    for row in report.layers:
        if row["layer"] in slow:
            row["why"] = f"latency-aware lowering: {slow[row['layer']]}"
    if report.layers:
        report.sections["layers"] = model_report.format_layers(report.layers, model_report.fp32_ops(gm))


def _turns(a, b, args, kwargs) -> tuple[float, float]:
    """Median seconds per call of two optimized models, timed taking turns."""
    with torch.no_grad():
        med = interleaved_medians({"a": lambda: a(*args, **kwargs), "b": lambda: b(*args, **kwargs)},
                                  repeats=7, min_batch_s=1e-3, warmup=1)
    return med["a"], med["b"]


def _slower_message(s: dict, ratio: float, reverted: dict, n_int8: int) -> str:
    text = (f"fxopt: the optimized model measured slower than the input model on the example inputs "
            f"({s['latency_optimized'] * 1e3:.3f} ms vs {s['latency_original'] * 1e3:.3f} ms per call, "
            f"{1 / ratio:.2f}x).")
    if len(reverted) < n_int8:
        text += (" Its int8 layers are too small for int8 to pay: quantizing their activations costs "
                 "more than the int8 products save.")
    if reverted:
        text += f" Kept fp32 where int8 measured slower: {', '.join(reverted)}."
    if len(reverted) == n_int8:
        text += " No layer is int8 now: the rest is the fp32 graph (or a busy machine's timing noise)."
    return text + (" target='cpu-fp32' keeps the input's speed; latency_aware=False keeps int8 "
                   "everywhere, for the size.")


def _format(slow: dict, n_int8: int, t_int8: float, t_mixed: float | None, kept: bool,
            gain: float = 0.0, word: str = "int8") -> str:
    head = f"latency-aware lowering: {len(slow)} of {n_int8} {word} layers measured slower than fp32"
    if t_mixed is None:
        head += (f", by {gain * 1e3:.3f} ms together, under {NOISE / 2:.0%} of the {t_int8 * 1e3:.3f} ms "
                 f"call, so they stay {word}:")
    elif kept:
        head += (f" and went back to fp32; the model with them fp32 runs {t_mixed * 1e3:.3f} ms against "
                 f"{t_int8 * 1e3:.3f} ms all-{word}:")
    else:
        head += (f", but the model with them fp32 was not faster ({t_mixed * 1e3:.3f} ms against "
                 f"{t_int8 * 1e3:.3f} ms all-{word}), so they stay {word}:")
    return "\n".join([head] + [f"  {name}: {why}" for name, why in slow.items()])
