"""Never hand back a slower model without a word.

optimize already times the input model and its result on the example inputs (taking turns,
report.summary). When an int8 result measures slower than the input beyond NOISE:

  1. latency-aware lowering (latency_aware=True, the default): each int8 layer's op is timed
     against its fp32 op on the inputs it really receives (search.sensitivity, as the budget
     search does, without an accuracy budget); the layers where int8 measured slower are
     compiled again in fp32 and the faster of the two results is kept;
  2. if the result is still slower, optimize warns with the figures and the reason.

    gm, report = check((gm, report), recompile, options, args, kwargs)   # what fxopt.optimize does

latency_aware=False keeps int8 everywhere (the smallest model) and only warns. A fine-tuned
(pruned and distilled) compile is not redone: it warns only.
"""
from __future__ import annotations

import warnings

from fxopt.core.pipeline import target_pipeline
from fxopt.report import model_report
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
    """`done` (what compile_model returns), or a recompile with the slow int8 layers fp32."""
    gm, report = done[0], done[1]
    ratio = _ratio(report)
    int8 = model_report.int8_layers(gm)
    if ratio is None or not int8 or ratio <= 1 + NOISE:
        return done
    reverted = {}
    if options.get("latency_aware", True) and not options.get("finetune"):
        fp32 = recompile(int8)
        times = sensitivity.layer_latency(gm, fp32[0], args, kwargs)
        reverted = {name: why for name, why in sensitivity.slower_in_int8(times, NOISE).items() if name in int8}
        if reverted:
            mixed = fp32 if set(reverted) == set(int8) else recompile(sorted(reverted))
            if _ratio(mixed[1]) is not None and _ratio(mixed[1]) < ratio:
                done, ratio = mixed, _ratio(mixed[1])
                done[1].sections["latency_aware"] = _format(reverted, len(int8))
                done[1].summary["latency_aware"] = reverted
            else:
                reverted = {}
    if ratio > 1 + NOISE:
        warnings.warn(_slower_message(done[1].summary, ratio, reverted, len(int8)), stacklevel=3)
    return done


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


def _format(reverted: dict, n_int8: int) -> str:
    lines = [f"latency-aware lowering: the model measured slower than its input, so {len(reverted)} of "
             f"{n_int8} int8 layers went back to fp32 where int8 measured slower:"]
    lines += [f"  {name}: {why}" for name, why in reverted.items()]
    return "\n".join(lines)
