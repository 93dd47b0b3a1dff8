"""Per-layer precisions for the accuracy-budgeted search (fxopt.search.budget).

A configuration names, for each quantized layer, one precision of the ladder
int4 < int8 < bf16 < fp32 (least to most accurate), a global prune ratio and distillation
on/off. It is built as one pipeline from the target's own:

    quantize_int4{skip=every layer not int4}, quantize_bf16{skip=every layer not bf16},
    quantize_int8{per_layer={each fp32 or bf16 layer: 'fp32'}}

(a pass the target already has keeps its options and only gains skips; one it lacks is
inserted before quantize_int8 only when some layer asks for its precision), so a
configuration with int8/fp32 layers only is exactly what the search built before.

    cfg = Config(fp32=("head.4",), other=(("head.2", "int4"),))
    str(build_pipeline(target_pipeline("cpu-int8"), cfg, ["stem.0", "head.2", "head.4"]))
    # ...,quantize_int4{skip=('head.4', 'stem.0')},quantize_int8{per_layer={'head.4': 'fp32'}},...
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

from fxopt.core.pipeline import PassSpec, Pipeline
from fxopt.core.registry import pass_names

LADDER = ("int4", "int8", "bf16", "fp32")          # least to most accurate
PASSES = {"int4": "quantize_int4", "bf16": "quantize_bf16", "int8": "quantize_int8"}
# search_cost="macs": a layer's MACs weigh this much (fp32 = 2 as the int8/fp32 search had it)
MAC_WEIGHT = {"int4": 0.5, "int8": 1.0, "bf16": 1.5, "fp32": 2.0}


@dataclass(frozen=True)
class Config:
    fp32: tuple = ()          # layer names kept fp32, sorted
    ratio: float = 0.0        # global prune ratio
    finetune: bool = False    # distillation recovery after pruning
    other: tuple = ()         # ((layer, precision), ...) sorted: layers not at the target's own precision nor fp32

    @property
    def label(self) -> str:
        fp32 = ",".join(self.fp32) if self.fp32 else "-"
        text = f"prune={self.ratio:g} fp32=[{fp32}]"
        by_prec = collections.defaultdict(list)
        for layer, prec in self.other:
            by_prec[prec].append(layer)
        for prec in LADDER:
            if by_prec[prec]:
                text += f" {prec}=[{','.join(by_prec[prec])}]"
        return text + (" +finetune" if self.finetune else "")


def check_precisions(value) -> tuple | None:
    """search_precisions as a tuple in ladder order (fp32 always included), or None (the
    target's own precision and fp32); a clear error for anything else."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value) or not value:
        raise ValueError(f"search_precisions={value!r}; give a tuple of precision names among "
                         f"{LADDER}, e.g. search_precisions=('int4', 'int8', 'fp32')")
    unknown = [p for p in value if p not in LADDER]
    if unknown:
        raise ValueError(f"search_precisions: unknown precision {', '.join(map(repr, unknown))}; "
                         f"use names among {LADDER}")
    for prec, name in PASSES.items():
        if prec in value and name not in pass_names():
            raise ValueError(f"search_precisions: {prec!r} needs the pass {name} (passes/{name}.py), which "
                             f"this fxopt does not have; drop {prec!r} from search_precisions")
    return tuple(p for p in LADDER if p in value or p == "fp32")


def check_pipeline(base: Pipeline, precisions) -> None:
    """A pipeline the precisions can be built on: int4/bf16/int8 need quantize_int8 to insert
    their pass before (or the pass itself already there)."""
    if precisions is None:
        return
    names = base.names
    for prec in precisions:
        if prec != "fp32" and PASSES[prec] not in names and "quantize_int8" not in names:
            raise ValueError(f"search_precisions: {prec!r} cannot be built on this target's pipeline "
                             f"({', '.join(names)}): it has no quantize_int8 to insert {PASSES[prec]} "
                             f"before; use target='cpu-int8'")


def build_pipeline(base: Pipeline, config: Config, all_layers) -> Pipeline:
    """`base` with each layer at its configured precision (module docstring); layers the
    configuration does not name keep what `base` gives them."""
    fp32 = set(config.fp32)
    chosen = collections.defaultdict(set)
    for layer, prec in config.other:
        chosen[prec].add(layer)
    named = fp32 | {layer for layer, _ in config.other}
    specs = []
    for spec in base.passes:
        if spec.name == "quantize_int8":
            for prec in ("int4", "bf16"):   # inserted in ladder order, only when some layer asks
                if chosen[prec] and PASSES[prec] not in base.names:
                    skip = sorted(set(all_layers) - chosen[prec])
                    specs.append(PassSpec(PASSES[prec], {"skip": tuple(skip)}))
            kept = fp32 | chosen["bf16"]
            if kept:
                per_layer = {**spec.options.get("per_layer", {}), **{name: "fp32" for name in sorted(kept)}}
                spec = PassSpec(spec.name, {**spec.options, "per_layer": per_layer})
        elif spec.name in (PASSES["int4"], PASSES["bf16"]):
            prec = "int4" if spec.name == PASSES["int4"] else "bf16"
            skip = named - chosen[prec]      # the target's own pass: only the layers set otherwise
            if skip:
                skip = tuple(sorted({*spec.options.get("skip", ()), *skip}))
                spec = PassSpec(spec.name, {**spec.options, "skip": skip})
        specs.append(spec)
    return Pipeline(tuple(specs))


def make_config(assign: dict, default: dict, ratio: float = 0.0, finetune: bool = False) -> Config:
    """The canonical Config of a {layer: precision} assignment (layers at their `default`
    precision are not named, so one model has one cache key)."""
    fp32 = tuple(sorted(name for name, p in assign.items() if p == "fp32"))
    other = tuple(sorted((name, p) for name, p in assign.items() if p != "fp32" and p != default.get(name)))
    return Config(fp32, ratio, finetune, other)


def assignment(config: Config, default: dict) -> dict:
    """{layer: precision} of `config` over the layers of `default`."""
    out = dict(default)
    out.update(dict(config.other))
    out.update({name: "fp32" for name in config.fp32})
    return out


def mix_label(precisions) -> str:
    """'int4 2, int8 3, fp32 1' from the precisions of a model's layers."""
    counts = collections.Counter(precisions)
    order = [p for p in LADDER if p in counts] + sorted(p for p in counts if p not in LADDER)
    return ", ".join(f"{p} {counts[p]}" for p in order)


def macs_cost(rows: list[dict], macs_total: int) -> float:
    """Deterministic cost: each layer's MACs weighed by MAC_WEIGHT, other MACs as fp32."""
    layer_macs = sum(r["macs"] for r in rows)
    return sum(r["macs"] * MAC_WEIGHT.get(r["precision"], 2.0) for r in rows) + 2.0 * (macs_total - layer_macs)


def candidates(allowed: list, times: dict, margin: float) -> tuple[list, dict]:
    """(ladder of a layer, {dropped precision: why}): the allowed precisions least accurate
    first, without those a more accurate one beats on time by more than `margin` (a lower
    precision that is not faster buys nothing), so the first rung is the fastest.

        candidates(["int8", "fp32"], {"int8": 2e-3, "fp32": 1e-3}, 0.1)
        -> (["fp32"], {"int8": "int8 not faster here (2.000 ms vs 1.000 ms fp32)"})
    """
    ladder = sorted(allowed, key=LADDER.index)
    kept, dropped = [], {}
    for i, p in enumerate(ladder):
        better = [q for q in ladder[i + 1:] if p in times and q in times and times[p] > times[q] * (1 + margin)]
        if better:
            q = min(better, key=lambda q: times[q])
            dropped[p] = f"{p} not faster here ({_ms(times[p])} vs {_ms(times[q])} {q})"
        else:
            kept.append(p)
    return kept, dropped


def explain(prec: str, ladder: list, dropped: dict, raised: bool | None) -> str:
    """Why a layer has `prec` in the chosen configuration, given its ladder, the precisions
    dropped from it (with their reasons) and whether the greedy raised it for accuracy (None:
    the chosen configuration is not a greedy result, e.g. the plain target).

        explain("int8", ["int4", "int8", "fp32"], {}, True) -> "accuracy: int8, not int4, to meet the budget"
    """
    slower = "; ".join(dropped.values())
    if prec == "fp32" and ladder == ["fp32"] and slower:
        return slower                    # every lower precision was slower here
    if raised is None or prec not in ladder:
        why = f"{prec} as in the chosen configuration (chosen on the whole model)"
        return why + (f", though per layer {dropped[prec]}" if prec in dropped else "")
    if raised:
        rung = ladder.index(prec)
        why = ("accuracy: kept fp32 to meet the budget" if prec == "fp32" else
               f"accuracy: {prec}, not {ladder[rung - 1]}, to meet the budget")
    else:
        why = f"{prec} within budget"
    return why + (f"; {slower}" if slower else "")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"
