"""Accuracy-budgeted optimization: the fastest int8/pruning configuration within a metric budget.

    fast = fxopt.optimize(model, (x,), target="cpu-int8", calibration_data=batches,
                          eval_fn=lambda m: accuracy(m, x_val, y_val), max_accuracy_drop=0.01)
    print(fast.fxopt_report.sections["search"])    # chosen layers, every evaluation, Pareto flags

A configuration is (layers kept fp32, one global prune ratio, distillation on/off). It is
built as an ordinary pipeline (quantize_int8{per_layer={...: 'fp32'}} plus prune=/finetune=)
and evaluated with the user's eval_fn; each configuration is evaluated once (cached).

The search, cheapest information first:
  1. the plain target (all int8, no pruning) and the all-fp32 configuration;
  2. per-layer int8 vs fp32 op latency (search_cost="latency"): slower int8 layers stay fp32;
  3. each layer quantized alone (metric drop), when max_evals leaves room, else the SQNR proxy;
  4. each prune ratio of the ladder with every layer fp32 (the pruning effect alone), and with
     distillation (finetune_budget) where pruning alone misses the budget;
  5. per feasible ratio, most aggressive first: start from all int8, revert the most sensitive
     layer to fp32 until the budget is met, then try re-quantizing the others one by one.
The pruning API takes one ratio for all groups (plus `protect`), so ratios are global.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fxopt.core.capture import normalize_inputs
from fxopt.core.pipeline import PassSpec, Pipeline, target_pipeline
from fxopt.driver.compile import compile_model, example_from
from fxopt.report import model_report, pareto
from fxopt.search import sensitivity

DEFAULTS = {"eval_fn": None, "max_accuracy_drop": 0.01, "drop_mode": "absolute", "max_evals": 40,
            "time_budget_s": None, "search_prune": (0.0, 0.1, 0.2, 0.3, 0.5), "finetune_budget": None,
            "plot_path": None, "search_cost": "latency"}
COSTS = ("latency", "macs")


@dataclass(frozen=True)
class Config:
    fp32: tuple = ()          # layer names kept fp32, sorted
    ratio: float = 0.0        # global prune ratio
    finetune: bool = False    # distillation recovery after pruning

    @property
    def label(self) -> str:
        fp32 = ",".join(self.fp32) if self.fp32 else "-"
        return f"prune={self.ratio:g} fp32=[{fp32}]" + (" +finetune" if self.finetune else "")


class BudgetExhausted(Exception):
    """max_evals or time_budget_s reached: the search stops and chooses among what it has."""


class Evaluator:
    """Builds and evaluates configurations, each once; keeps every evaluation in order."""

    def __init__(self, compile_fn, settings: dict, ref: float, floor: float, args, kwargs, repeats):
        self.compile_fn, self.s, self.ref, self.floor = compile_fn, settings, ref, floor
        self.args, self.kwargs, self.repeats = args, kwargs, max(repeats, 3)
        self.cache, self.evals, self.t0 = {}, [], time.perf_counter()
        self.bar = tqdm(total=settings["max_evals"], desc="fxopt search", leave=False, unit="eval",
                        disable=None)   # None: no bar when output is not a terminal

    def __call__(self, config: Config) -> dict:
        if config in self.cache:
            return self.cache[config]
        self._check_budget()
        t0 = time.perf_counter()
        gm = self.compile_fn(config, report_layers=True)
        metric = float(self.s["eval_fn"](gm))
        latency = model_report.median_latency(lambda: gm(*self.args, **self.kwargs), self.repeats)
        summary = gm.fxopt_report.summary
        fp32_macs = summary["macs_optimized"] - summary["int8_macs"]
        e = {"label": config.label, "fp32": list(config.fp32), "ratio": config.ratio,
             "finetune": config.finetune, "metric": metric, "drop": self.ref - metric,
             "meets": metric >= self.floor, "latency_s": latency, "macs": summary["macs_optimized"],
             "fp32_macs": fp32_macs, "seconds": time.perf_counter() - t0,
             "layers": gm.fxopt_report.layers}
        # macs cost: an int8 MAC is counted at half an fp32 MAC, a deterministic proxy for tests.
        e["cost"] = latency if self.s["search_cost"] == "latency" else e["macs"] + fp32_macs
        self.cache[config] = e
        self.evals.append(e)
        self.bar.update(1)
        self.bar.set_postfix(metric=f"{metric:.4f}", meets=e["meets"])
        return e

    def _check_budget(self) -> None:
        if not self.evals:
            return   # the plain target is always evaluated: the search never returns nothing
        if len(self.evals) >= self.s["max_evals"]:
            raise BudgetExhausted(f"max_evals={self.s['max_evals']} reached")
        limit = self.s["time_budget_s"]
        if limit is not None and time.perf_counter() - self.t0 > limit:
            raise BudgetExhausted(f"time_budget_s={limit} reached")


def split_options(options: dict) -> tuple[dict, dict]:
    """(search settings with defaults, the remaining optimize options); checks the settings."""
    settings = {k: options.pop(k) if k in options else v for k, v in DEFAULTS.items()}
    if not callable(settings["eval_fn"]):
        raise TypeError("eval_fn must be a callable eval_fn(model) -> float (higher is better)")
    if settings["drop_mode"] not in ("absolute", "relative"):
        raise ValueError(f"drop_mode={settings['drop_mode']!r}; use 'absolute' or 'relative'")
    if settings["search_cost"] not in COSTS:
        raise ValueError(f"search_cost={settings['search_cost']!r}; use one of {COSTS}")
    ladder = settings["search_prune"]
    ladder = (0.0,) if ladder in (None, False) else tuple(sorted({0.0, *map(float, ladder)}))
    settings["search_prune"] = ladder
    return settings, options


def with_fp32_layers(pipeline: Pipeline, layers) -> Pipeline:
    """`pipeline` with quantize_int8 told to keep `layers` fp32 (per_layer), other options kept.

        str(with_fp32_layers(target_pipeline("cpu-int8"), ["fc1"]))   # ...quantize_int8{per_layer={'fc1': 'fp32'}},...
    """
    specs = []
    for spec in pipeline.passes:
        if spec.name == "quantize_int8" and layers:
            per_layer = {**spec.options.get("per_layer", {}), **{name: "fp32" for name in layers}}
            spec = PassSpec(spec.name, {**spec.options, "per_layer": per_layer})
        elif spec.name in ("quantize_int4", "quantize_bf16") and layers:   # leave them to quantize_int8 (or fp32)
            spec = PassSpec(spec.name, {**spec.options, "skip": tuple(sorted({*spec.options.get("skip", ()), *layers}))})
        specs.append(spec)
    return Pipeline(tuple(specs))


def search(model, example_inputs, target, calibration_data, dynamic, options: dict):
    """The fastest configuration within the budget, compiled with the user's options.

    Called by fxopt.optimize when eval_fn is given; returns the optimized module with
    report.sections["search"] (text) and report.summary["search"] (data).
    """
    s, options = split_options(dict(options))
    base = target_pipeline(target) if isinstance(target, str) else target
    prune_opts = options.pop("prune", None)
    prune_opts = {} if prune_opts in (None, False) or isinstance(prune_opts, (int, float)) else dict(prune_opts)
    finetune = s["finetune_budget"]
    finetune = {"epochs": int(finetune)} if isinstance(finetune, (int, float)) else finetune
    options.pop("finetune", None)

    def compile_fn(config: Config, **extra):
        opts = {**options, "latency_repeats": 0, **extra}
        if config.ratio > 0:
            opts["prune"] = {**prune_opts, "ratio": config.ratio}
            if config.finetune:
                opts["finetune"] = dict(finetune)
        gm, report = compile_model(model, example_inputs, with_fp32_layers(base, config.fp32),
                                   calibration_data, dynamic, opts)
        gm.fxopt_report = report
        return gm

    ref = _metric(s["eval_fn"], model)
    allowed = s["max_accuracy_drop"] * (abs(ref) if s["drop_mode"] == "relative" else 1.0)
    args, kwargs = normalize_inputs(example_from(example_inputs, calibration_data))
    ev = Evaluator(compile_fn, s, ref, ref - allowed, args, kwargs, options.get("latency_repeats", 5))
    state = {"layers": [], "forced": {}, "times": {}, "alone": {}, "stopped": None, "ref": ref,
             "allowed": allowed}
    try:
        _run(ev, compile_fn, s, finetune, state)
    except BudgetExhausted as e:
        state["stopped"] = str(e)
    finally:
        ev.bar.close()
    return _finish(ev, compile_fn, options, s, state)


def _metric(eval_fn, model) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(eval_fn(model))
    finally:
        model.train(was_training)


def _run(ev: Evaluator, compile_fn, s: dict, finetune, state: dict) -> None:
    """Steps 1-5 of the module docstring; fills `state` and ev.evals."""
    plain = ev(Config())
    proxy = sensitivity.quant_proxy(plain["layers"])
    layers = [name for name, _ in proxy]
    state["layers"], state["sqnr"] = layers, dict(proxy)
    everything = tuple(sorted(layers))
    if s["search_cost"] == "latency" and layers:
        times = sensitivity.layer_latency(compile_fn(Config()), compile_fn(Config(everything)),
                                          ev.args, ev.kwargs)
        state["times"], state["forced"] = times, sensitivity.slower_in_int8(times)
    all_fp32 = ev(Config(everything))
    order = _sensitivity_order(ev, layers, everything, all_fp32, s, state)
    for ratio, tuned in _feasible_ratios(ev, everything, s, finetune):
        _greedy(ev, order, set(state["forced"]), ratio, tuned)


def _sensitivity_order(ev, layers, everything, all_fp32, s, state) -> list:
    """Layers most sensitive first: measured drop of each quantized alone when evals allow,
    then SQNR (lowest first) as the proxy and tie-break."""
    # Keep at least half the evaluations for the search itself.
    if len(layers) + len(s["search_prune"]) <= s["max_evals"] // 2:
        for name in layers:
            alone = ev(Config(tuple(n for n in everything if n != name)))
            state["alone"][name] = all_fp32["metric"] - alone["metric"]
    return sorted(layers, key=lambda n: (-state["alone"].get(n, 0.0), state["sqnr"][n], n))


def _feasible_ratios(ev, everything, s, finetune) -> list:
    """[(ratio, finetune)] whose pruning alone (all layers fp32) meets the budget, largest first.

    Where pruning alone misses and finetune_budget is given, distillation is tried from the
    smallest missing ratio up, stopping at the first that still misses.
    """
    feasible, missing = [(0.0, False)], []
    for ratio in s["search_prune"][1:]:
        if ev(Config(everything, ratio))["meets"]:
            feasible.append((ratio, False))
        else:
            missing.append(ratio)
    for ratio in missing if finetune else []:
        if not ev(Config(everything, ratio, True))["meets"]:
            break
        feasible.append((ratio, True))
    return sorted(feasible, reverse=True)


def _greedy(ev, order, forced: set, ratio: float, tuned: bool) -> None:
    """At one prune ratio: revert the most sensitive layers to fp32 until the budget is met,
    then try giving each reverted layer back to int8, least sensitive first."""
    fp32 = set(forced)
    e = ev(Config(tuple(sorted(fp32)), ratio, tuned))
    left = [n for n in order if n not in fp32]
    while not e["meets"] and left:
        fp32.add(left.pop(0))
        e = ev(Config(tuple(sorted(fp32)), ratio, tuned))
    if not e["meets"]:
        return
    for name in reversed([n for n in order if n in fp32 - forced]):
        trial = tuple(sorted(fp32 - {name}))
        if ev(Config(trial, ratio, tuned))["meets"]:
            fp32.discard(name)


def choose(evals: list[dict], tol: float = 0.0) -> tuple[int, bool]:
    """(index, met): the cheapest evaluation that meets the budget, else the best metric.

    Costs within `tol` (a fraction) of the cheapest count as equal and the fewest MACs
    wins among them, so timing noise does not pick a bigger model.

        choose([{"cost": 2, "metric": .9, "meets": True}, {"cost": 1, "metric": .8, "meets": False}]) -> (0, True)
    """
    meeting = [i for i, e in enumerate(evals) if e["meets"]]
    if meeting:
        best = min(evals[i]["cost"] for i in meeting)
        near = [i for i in meeting if evals[i]["cost"] <= best * (1 + tol)]
        return min(near, key=lambda i: (evals[i].get("macs", 0), evals[i]["cost"], -evals[i]["metric"], i)), True
    return min(range(len(evals)), key=lambda i: (-evals[i]["metric"], evals[i]["cost"], i)), False


def _finish(ev: Evaluator, compile_fn, options: dict, s: dict, state: dict):
    if not ev.evals:
        raise RuntimeError(f"the search made no evaluation ({state['stopped']}); raise max_evals "
                           f"or time_budget_s")
    best, met = choose(ev.evals, 0.05 if s["search_cost"] == "latency" else 0.0)
    e = ev.evals[best]
    config = Config(tuple(e["fp32"]), e["ratio"], e["finetune"])
    gm = compile_fn(config, **{k: v for k, v in options.items() if k in ("latency_repeats", "report_layers")})
    final_metric = float(s["eval_fn"](gm))
    floor = state["ref"] - state["allowed"]
    if not met:
        warnings.warn(f"fxopt search: no configuration met the budget: best metric {e['metric']:.4f} "
                      f"({e['label']}) < {floor:.4f} (reference {state['ref']:.4f} minus allowed drop "
                      f"{state['allowed']:.4f}); misses by {floor - e['metric']:.4f}. Returning it anyway.",
                      stacklevel=3)
    front = pareto.pareto_front(ev.evals)
    layers = _layer_table(config, state)
    data = {"reference_metric": state["ref"], "allowed_drop": state["allowed"], "floor": floor,
            "drop_mode": s["drop_mode"], "cost": s["search_cost"], "met": met, "chosen": best,
            "chosen_config": e["label"], "final_metric": final_metric, "stopped": state["stopped"],
            "evaluations": [{k: v for k, v in x.items() if k != "layers"} for x in ev.evals],
            "pareto": front, "layers": layers, "plot": None}
    if s["plot_path"]:
        data["plot"] = pareto.plot_front(ev.evals, front, s["plot_path"], best, floor,
                                         "latency (ms)" if s["search_cost"] == "latency" else "cost (MMACs)")
    report = gm.fxopt_report
    report.search = data
    report.summary["search"] = data
    report.sections["search"] = _format(data, ev.evals)
    return gm


def _layer_table(config: Config, state: dict) -> list[dict]:
    rows = []
    for name in state["layers"]:
        t8, t32 = state["times"].get(name, (None, None))
        if name in state["forced"]:
            why = state["forced"][name]
        elif name in config.fp32:
            why = "accuracy: kept fp32 to meet the budget"
        else:
            why = "int8 within budget"
        rows.append({"layer": name, "precision": "fp32" if name in config.fp32 else "int8", "why": why,
                     "sqnr_db": state["sqnr"].get(name), "alone_drop": state["alone"].get(name),
                     "int8_ms": None if t8 is None else t8 * 1e3, "fp32_ms": None if t32 is None else t32 * 1e3})
    return rows


def _format(data: dict, evals: list[dict]) -> str:
    verdict = "meets the budget" if data["met"] else \
        f"MISSES the budget by {data['floor'] - evals[data['chosen']]['metric']:.4f}"
    lines = [f"reference metric {data['reference_metric']:.4f}, allowed drop {data['allowed_drop']:.4f} "
             f"({data['drop_mode']}), floor {data['floor']:.4f}; cost = {data['cost']}",
             f"chosen #{data['chosen']}: {data['chosen_config']} -> metric {data['final_metric']:.4f}, {verdict}"]
    if data["stopped"]:
        lines.append(f"search stopped early: {data['stopped']}")
    lines += ["", pareto.format_layers(data["layers"]), "",
              f"{len(evals)} evaluations:", pareto.format_evals(evals, data["pareto"], data["chosen"])]
    if data["plot"]:
        lines.append(f"Pareto plot: {data['plot']}")
    return "\n".join(lines)
