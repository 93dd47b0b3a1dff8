"""Sensitivity analysis for the accuracy-budgeted search (fxopt.search.budget).

Three measurements, cheapest first:
  quant_proxy    per-layer output SQNR of the all-int8 model (already in its report);
  layer_latency  each layer's int8 op against its fp32 op, run alone on the inputs it
                 really receives in the model (real kernels, real shapes);
  precision_latency  the same over any precisions: one compile per uniform precision, each
                 layer timed in the compiles where it has that precision;
  plan_layer_latency  the same from the steps of each model's execution plan, as the model
                 runs them (latency-aware lowering uses it);
  slower_in_int8 the layers where int8 is not faster, with the reason the report shows.

    rows = quant_proxy(int8_gm.fxopt_report.layers)       # [(layer, sqnr_db)], worst first
    times = layer_latency(int8_gm, fp32_gm, (x,), {})     # {layer: (int8 s, fp32 s)}
    slow = slower_in_int8(times, margin=0.10)             # {layer: "int8 not faster here (...)"}
    by_prec = precision_latency([(gm4, {"fc1": "int4"}), (gm32, {"fc1": "fp32"})], (x,), {})
                                                          # {layer: {"int4": s, "fp32": s}}

The per-layer metric effect (quantize one layer alone, prune at one ratio) is measured
by the search itself through its evaluation cache, so each costs one evaluation.
"""
from __future__ import annotations

import collections
import math
import statistics
import time

import torch
from torch.fx import GraphModule, Interpreter

from fxopt.core.ir import LAYER
from fxopt.report.model_report import layer_kind
from fxopt.runtime.plan import Plan, plan_of


def quant_proxy(rows: list[dict], precisions=("int8",)) -> list[tuple[str, float]]:
    """(layer, sqnr dB) of the layers of a report at one of `precisions`, least accurate
    (lowest SQNR) first.

        quant_proxy([{"layer": "fc1", "precision": "int8", "sqnr_db": 40.0}]) -> [("fc1", 40.0)]
    """
    out = [(r["layer"], r["sqnr_db"] if r["sqnr_db"] is not None else math.inf)
           for r in rows if r["precision"] in precisions]
    return sorted(out, key=lambda t: (t[1], t[0]))


class _Recorder(Interpreter):
    """Runs a graph and keeps the concrete arguments of every layer node, by layer name."""

    def __init__(self, gm):
        super().__init__(gm)
        self.calls = {}

    def run_node(self, n):
        out = super().run_node(n)
        if layer_kind(n) is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.calls[n.meta.get(LAYER, n.name)] = (n.target, args, kwargs)
        return out


def layer_calls(gm: GraphModule, args: tuple, kwargs: dict) -> dict:
    """{layer: (op, args, kwargs)}: each layer's op with the values it receives in `gm`."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*args, **kwargs)
    return rec.calls


def _time_call(call, repeats: int) -> float:
    op, args, kwargs = call
    with torch.no_grad():
        op(*args, **kwargs)   # warm-up: kernel compile and weight packing are not the layer's cost
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op(*args, **kwargs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_latency(int8_gm: GraphModule, fp32_gm: GraphModule, args: tuple, kwargs: dict,
                  repeats: int = 15) -> dict:
    """{layer: (int8 seconds, fp32 seconds)} for the layers present in both graphs.

    Each layer's op is called alone with the inputs recorded from a run of its own
    graph, so the int8 time includes quantizing the activations it receives, as in the model.
    """
    int8_calls = layer_calls(int8_gm, args, kwargs)
    fp32_calls = layer_calls(fp32_gm, args, kwargs)
    out = {}
    for name, call in int8_calls.items():
        if name in fp32_calls:
            out[name] = (_time_call(call, repeats), _time_call(fp32_calls[name], repeats))
    return out


def precision_latency(compiled: list, args: tuple, kwargs: dict, repeats: int = 15) -> dict:
    """{layer: {precision: seconds}} from `compiled` = [(gm, {layer: precision it got in gm})]
    (one compile per uniform precision): each layer's op, called alone on the inputs it
    receives in its own compile (as layer_latency does), at the precision it really has there
    (a layer int4 cannot take is int8 in the int4 compile; the first compile giving a
    precision is the one timed). A layer's precisions take turns, call by call, so a change
    in machine load hits them alike; medians of `repeats`.
    """
    calls = {}
    for gm, got in compiled:
        for name, call in layer_calls(gm, args, kwargs).items():
            if got.get(name) is not None:
                calls.setdefault(name, {}).setdefault(got[name], call)
    out = {}
    with torch.no_grad():
        for name, per in calls.items():
            for op, a, k in per.values():
                op(*a, **k)   # warm-up: kernel compile and weight packing are not the layer's cost
            samples = {prec: [] for prec in per}
            for _ in range(repeats):
                for prec, (op, a, k) in per.items():
                    t0 = time.perf_counter()
                    op(*a, **k)
                    samples[prec].append(time.perf_counter() - t0)
            out[name] = {prec: statistics.median(v) for prec, v in samples.items()}
    return out


def plan_layer_latency(int8_gm: GraphModule, fp32_gm: GraphModule, args: tuple, kwargs: dict,
                       rounds: int = 3, repeats: int = 5) -> dict:
    """{layer: (int8 seconds, fp32 seconds)} for the layers present in both graphs, from
    the steps each graph's execution plan runs for the layer (fxopt.profile): the layer as it
    runs in the model, quantize steps and all, with no dispatcher cost the plan does not pay.
    The two plans take turns, `rounds` profiles of `repeats` calls each; medians of rounds.
    """
    plans = [plan_of(gm) or Plan(gm) for gm in (int8_gm, fp32_gm)]
    samples = [collections.defaultdict(list), collections.defaultdict(list)]
    with torch.no_grad():
        for _ in range(rounds):
            for plan, out in zip(plans, samples):
                per_layer = collections.Counter()
                for row in plan.profile(*args, repeats=repeats, **kwargs).rows:
                    per_layer[row["layer"]] += row["us"] * 1e-6
                for layer, seconds in per_layer.items():
                    out[layer].append(seconds)
    int8, fp32 = samples
    return {layer: (statistics.median(int8[layer]), statistics.median(fp32[layer]))
            for layer in int8 if layer in fp32}


def slower_in_int8(times: dict, margin: float = 0.10, precision: dict | None = None) -> dict:
    """{layer: reason} for layers whose int8 op is slower than fp32 by more than `margin`.

    The margin keeps timing noise on a shared machine from flipping a decision.

        slower_in_int8({"fc": (2e-3, 1e-3)}) -> {"fc": "int8 not faster here (2.000 ms vs 1.000 ms fp32)"}
    """
    label = precision or {}        # {layer: "bf16", ...} where the layer is not int8
    return {name: f"{label.get(name, 'int8')} not faster here ({_time(t8)} vs {_time(t32)} fp32)"
            for name, (t8, t32) in times.items() if t8 > t32 * (1 + margin)}


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"
