"""Accuracy-budgeted optimization: the fastest precision/pruning configuration within a metric budget.

    fast = fxopt.optimize(model, (x,), target="cpu-int8", calibration_data=batches,
                          eval_fn=lambda m: accuracy(m, x_val, y_val), max_accuracy_drop=0.01,
                          search_precisions=("int4", "int8", "fp32"))    # default: int8 and fp32
    print(fast.fxopt_report.sections["search"])    # chosen precision per layer, every evaluation, Pareto flags

A configuration is (a precision per layer, one global prune ratio, distillation on/off);
precisions climb the ladder int4 < int8 < bf16 < fp32 (least to most accurate). It is built
as an ordinary pipeline (fxopt.search.precision: quantize_int4{skip=...}, quantize_bf16{skip=...},
quantize_int8{per_layer={...: 'fp32'}}, plus prune=/finetune=) and evaluated with the user's
eval_fn; each configuration is evaluated once (cached) and counts in max_evals.

search_precisions: the precisions a layer may take. Default None: the target's own (int8 for
cpu-int8; int4, or int8 where K does not fit a group, for cpu-int4) and fp32, as the search
always did. Given, e.g. ("int4", "int8", "bf16", "fp32"): a layer gets a precision only where
its op takes it (int4: linears whose K is a multiple of the group size; bf16: linears, and
only with the quantize_bf16 pass installed), found by compiling the model once per precision;
fp32 is always a candidate (the top of the ladder).

The search, cheapest information first:
  1. the plain target (no pruning) and the all-fp32 configuration;
  2. per layer and precision, the op's latency (search_cost="latency": each layer's op timed
     in one compile per uniform precision); a precision slower than a more accurate one (by
     more than 10 %) is dropped for that layer, so each layer's ladder goes fastest first;
     search_cost="macs" weighs MACs instead (int4 0.5, int8 1, bf16 1.5, fp32 2);
  3. each layer alone at each lower rung of its ladder, the others fp32 (metric drop), when
     max_evals leaves room, else the SQNR of that precision's compile as the proxy;
  4. each prune ratio of the ladder with every layer fp32 (the pruning effect alone), and with
     distillation (finetune_budget) where pruning alone misses the budget;
  5. per feasible ratio, most aggressive first: start with every layer on its fastest rung,
     move the most damaging layer (at its current precision) one rung up until the budget
     is met, then try moving each raised layer back down, least damaging first.
The pruning API takes one ratio for all groups (plus `protect`), so ratios are global.
"""
from __future__ import annotations

import math
import time
import warnings

import torch
from tqdm.auto import tqdm

from fxopt.core.capture import normalize_inputs
from fxopt.core.pipeline import Pipeline, target_pipeline
from fxopt.driver.compile import compile_model, example_from
from fxopt.report import model_report, pareto
from fxopt.search import sensitivity
from fxopt.search.precision import (Config, assignment, build_pipeline, candidates, check_pipeline,
                                    check_precisions, explain, macs_cost, make_config, mix_label)

DEFAULTS = {"eval_fn": None, "max_accuracy_drop": 0.01, "drop_mode": "absolute", "max_evals": 40,
            "time_budget_s": None, "search_prune": (0.0, 0.1, 0.2, 0.3, 0.5), "finetune_budget": None,
            "plot_path": None, "search_cost": "latency", "search_precisions": None}
COSTS = ("latency", "macs")
QUANTIZED = ("int4", "int8", "bf16")   # the plain target's layers at these precisions are searched
MARGIN = 0.10                          # slower by more than this counts as slower (timing noise)


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
        summary, rows = gm.fxopt_report.summary, gm.fxopt_report.layers
        fp32_macs = summary["macs_optimized"] - summary["int8_macs"]
        precisions = {r["layer"]: r["precision"] for r in rows}
        e = {"label": config.label, "fp32": list(config.fp32), "other": [list(x) for x in config.other],
             "ratio": config.ratio, "finetune": config.finetune, "metric": metric, "drop": self.ref - metric,
             "meets": metric >= self.floor, "latency_s": latency, "macs": summary["macs_optimized"],
             "bytes": summary["optimized_bytes"], "fp32_macs": fp32_macs, "seconds": time.perf_counter() - t0,
             "precisions": precisions, "mix": mix_label(precisions.values()), "layers": rows}
        # macs cost: MACs weighed by precision (an int8 MAC half an fp32 MAC), a deterministic proxy for tests.
        e["cost"] = latency if self.s["search_cost"] == "latency" else macs_cost(rows, e["macs"])
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
    settings["search_precisions"] = check_precisions(settings["search_precisions"])
    ladder = settings["search_prune"]
    ladder = (0.0,) if ladder in (None, False) else tuple(sorted({0.0, *map(float, ladder)}))
    settings["search_prune"] = ladder
    return settings, options


def with_fp32_layers(pipeline: Pipeline, layers) -> Pipeline:
    """`pipeline` with quantize_int8 told to keep `layers` fp32 (per_layer), other options kept.

        str(with_fp32_layers(target_pipeline("cpu-int8"), ["fc1"]))   # ...quantize_int8{per_layer={'fc1': 'fp32'}},...
    """
    return build_pipeline(pipeline, Config(tuple(sorted(set(layers)))), ())


def search(model, example_inputs, target, calibration_data, dynamic, options: dict):
    """The fastest configuration within the budget, compiled with the user's options.

    Called by fxopt.optimize when eval_fn is given; returns the optimized module with
    report.sections["search"] (text) and report.summary["search"] (data).
    """
    s, options = split_options(dict(options))
    base = target_pipeline(target) if isinstance(target, str) else target
    check_pipeline(base, s["search_precisions"])
    prune_opts = options.pop("prune", None)
    prune_opts = {} if prune_opts in (None, False) or isinstance(prune_opts, (int, float)) else dict(prune_opts)
    finetune = s["finetune_budget"]
    finetune = {"epochs": int(finetune)} if isinstance(finetune, (int, float)) else finetune
    options.pop("finetune", None)

    # every layer of the plain target's report: an inserted quantize_int4/bf16 skips all but its own
    layout = {"all": ()}

    def compile_fn(config: Config, **extra):
        opts = {**options, "latency_repeats": 0, **extra}
        if config.ratio > 0:
            opts["prune"] = {**prune_opts, "ratio": config.ratio}
            if config.finetune:
                opts["finetune"] = dict(finetune)
        gm, report = compile_model(model, example_inputs, build_pipeline(base, config, layout["all"]),
                                   calibration_data, dynamic, opts)
        gm.fxopt_report = report
        return gm

    ref = _metric(s["eval_fn"], model)
    allowed = s["max_accuracy_drop"] * (abs(ref) if s["drop_mode"] == "relative" else 1.0)
    args, kwargs = normalize_inputs(example_from(example_inputs, calibration_data))
    ev = Evaluator(compile_fn, s, ref, ref - allowed, args, kwargs, options.get("latency_repeats", 5))
    state = {"layers": [], "default": {}, "ladder": {}, "dropped": {}, "times": {}, "sqnr": {}, "alone": {},
             "greedy": {}, "stopped": None, "ref": ref, "allowed": allowed, "layout": layout}
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
    proxy = sensitivity.quant_proxy(plain["layers"], QUANTIZED)
    layers = [name for name, _ in proxy]
    state["layout"]["all"] = tuple(r["layer"] for r in plain["layers"])
    state["layers"] = layers
    state["default"] = {r["layer"]: r["precision"] for r in plain["layers"] if r["layer"] in layers}
    state["sqnr"] = {(name, state["default"][name]): db for name, db in proxy}
    everything = tuple(sorted(layers))
    allowed = _measure(ev, compile_fn, s, state, everything, plain["layers"])
    for name in layers:
        state["ladder"][name], state["dropped"][name] = candidates(allowed[name], state["times"].get(name, {}), MARGIN)
    all_fp32 = ev(Config(everything))
    _sensitivity(ev, all_fp32, s, state)
    for ratio, tuned in _feasible_ratios(ev, everything, s, finetune):
        _greedy(ev, state, ratio, tuned)


def _measure(ev, compile_fn, s, state, everything, plain_rows) -> dict:
    """{layer: precisions it can take}; fills state["times"] (latency cost) and state["sqnr"].

    One compile per uniform precision (not evaluations): which layers really take it (the
    report's precision), their SQNR there, and (latency cost) each layer's op timed in it.
    """
    default, latency = state["default"], s["search_cost"] == "latency"
    wanted = s["search_precisions"]
    allowed = {name: {"fp32"} | ({default[name]} if wanted is None else set()) for name in default}
    compiled = []
    uniform = [] if wanted is None else [p for p in wanted if p != "fp32"]
    if latency or uniform:
        for prec in ([None] if wanted is None else uniform) + (["fp32"] if latency else []):
            # None: the plain target (each layer at its default precision)
            config = Config() if prec is None else make_config({n: prec for n in default}, default)
            if config == Config() and not latency:
                gm, rows = None, plain_rows     # the plain target's evaluation already has its rows
            else:
                gm = compile_fn(config, report_layers=True)
                rows = gm.fxopt_report.layers
            got = {r["layer"]: r["precision"] for r in rows}
            for r in rows:
                if r["layer"] in default and r["precision"] == (prec or default[r["layer"]]):
                    allowed[r["layer"]].add(r["precision"])
                    state["sqnr"].setdefault((r["layer"], r["precision"]),
                                             math.inf if r["sqnr_db"] is None else r["sqnr_db"])
            compiled.append((gm, got))
    if latency and default:
        times = sensitivity.precision_latency(compiled, ev.args, ev.kwargs)
        state["times"] = {name: t for name, t in times.items() if name in default}
    return {name: sorted(allowed[name]) for name in everything}


def _damage(state, name: str, prec: str) -> tuple:
    """Sort key, most damaging first: measured drop of `name` alone at `prec`, then its SQNR."""
    return (-state["alone"].get((name, prec), 0.0), state["sqnr"].get((name, prec), math.inf), name)


def _sensitivity(ev, all_fp32, s, state) -> None:
    """Each layer alone at each lower rung of its ladder (the others fp32), when evals allow:
    state["alone"][(layer, precision)] = metric drop. Else the SQNR proxy decides alone."""
    lower = [(name, p) for name in state["layers"] for p in state["ladder"][name] if p != "fp32"]
    # Keep at least half the evaluations for the search itself.
    if len(lower) + len(s["search_prune"]) > s["max_evals"] // 2:
        return
    for name, prec in lower:
        assign = {n: "fp32" for n in state["layers"]}
        assign[name] = prec
        alone = ev(make_config(assign, state["default"]))
        state["alone"][(name, prec)] = all_fp32["metric"] - alone["metric"]


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


def _greedy(ev, state: dict, ratio: float, tuned: bool) -> None:
    """At one prune ratio: every layer on its fastest rung; move the most damaging layer one
    rung up until the budget is met, then try moving each raised layer back down, least
    damaging first (with int8/fp32 ladders: revert the most sensitive layers to fp32, then
    give each back to int8)."""
    ladder = state["ladder"]
    rung = {name: 0 for name in ladder}

    def evaluate():
        return ev(make_config({n: ladder[n][rung[n]] for n in ladder}, state["default"], ratio, tuned))

    e, raised = evaluate(), []
    while not e["meets"]:
        movable = [n for n in state["layers"] if rung[n] < len(ladder[n]) - 1]
        if not movable:
            return
        name = min(movable, key=lambda n: _damage(state, n, ladder[n][rung[n]]))
        rung[name] += 1
        raised += [name] if name not in raised else []
        e = evaluate()
    for name in sorted(raised, key=lambda n: _damage(state, n, ladder[n][rung[n] - 1]), reverse=True):
        while rung[name] > 0:
            rung[name] -= 1
            if not evaluate()["meets"]:
                rung[name] += 1
                break
    # the greedy's result: which layers sit above their fastest rung for accuracy (the report's why)
    final = make_config({n: ladder[n][rung[n]] for n in ladder}, state["default"], ratio, tuned)
    state["greedy"][final] = {n for n in ladder if rung[n] > 0}


def choose(evals: list[dict], tol: float = 0.0) -> tuple[int, bool]:
    """(index, met): the cheapest evaluation that meets the budget, else the best metric.

    Costs within `tol` (a fraction) of the cheapest count as equal and the fewest MACs, then
    the fewest bytes (lower precisions), wins among them, so timing noise does not pick a
    bigger model.

        choose([{"cost": 2, "metric": .9, "meets": True}, {"cost": 1, "metric": .8, "meets": False}]) -> (0, True)
    """
    meeting = [i for i, e in enumerate(evals) if e["meets"]]
    if meeting:
        best = min(evals[i]["cost"] for i in meeting)
        near = [i for i in meeting if evals[i]["cost"] <= best * (1 + tol)]
        return min(near, key=lambda i: (evals[i].get("macs", 0), evals[i].get("bytes", 0), evals[i]["cost"],
                                        -evals[i]["metric"], i)), True
    return min(range(len(evals)), key=lambda i: (-evals[i]["metric"], evals[i]["cost"], i)), False


def _finish(ev: Evaluator, compile_fn, options: dict, s: dict, state: dict):
    if not ev.evals:
        raise RuntimeError(f"the search made no evaluation ({state['stopped']}); raise max_evals "
                           f"or time_budget_s")
    best, met = choose(ev.evals, 0.05 if s["search_cost"] == "latency" else 0.0)
    e = ev.evals[best]
    config = Config(tuple(e["fp32"]), e["ratio"], e["finetune"], tuple(map(tuple, e["other"])))
    gm = compile_fn(config, **{k: v for k, v in options.items() if k in ("latency_repeats", "report_layers")})
    final_metric = float(s["eval_fn"](gm))
    floor = state["ref"] - state["allowed"]
    if not met:
        warnings.warn(f"fxopt search: no configuration met the budget: best metric {e['metric']:.4f} "
                      f"({e['label']}) < {floor:.4f} (reference {state['ref']:.4f} minus allowed drop "
                      f"{state['allowed']:.4f}); misses by {floor - e['metric']:.4f}. Returning it anyway.",
                      stacklevel=3)
    front = pareto.pareto_front(ev.evals)
    layers = _layer_table(assignment(config, state["default"]), state["greedy"].get(config), state)
    data = {"reference_metric": state["ref"], "allowed_drop": state["allowed"], "floor": floor,
            "drop_mode": s["drop_mode"], "cost": s["search_cost"], "met": met, "chosen": best,
            "precisions": list(s["search_precisions"] or ("target", "fp32")),
            "chosen_config": e["label"], "chosen_mix": e["mix"], "final_metric": final_metric,
            "stopped": state["stopped"],
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


def _layer_table(chosen: dict, raised: set | None, state: dict) -> list[dict]:
    """Per searched layer: the chosen precision and why, and per precision its op latency
    (ms), SQNR (dB) and metric drop alone. `raised`: the layers the greedy moved up for
    accuracy, None when the chosen configuration is not a greedy result."""
    rows = []
    for name in state["layers"]:
        prec = chosen[name]
        ladder, dropped = state["ladder"].get(name, [prec]), state["dropped"].get(name, {})
        times = state["times"].get(name, {})
        rows.append({"layer": name, "precision": prec, "why": explain(prec, ladder, dropped, None if raised is None else name in raised),
                     "ladder": list(ladder),
                     "ms": {p: t * 1e3 for p, t in times.items()},
                     "sqnr_db": {p: db for (n, p), db in state["sqnr"].items() if n == name and p != "fp32"},
                     "alone_drop": {p: d for (n, p), d in state["alone"].items() if n == name}})
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
