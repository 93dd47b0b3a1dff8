"""Quantization-aware training of a quantized graph: prepare, train, convert.

    units = prepare(gm, float_weights)       # int8 ops -> fake-quant ops with float weights
    finetune(gm, teacher, data, after_step=units.clamp_steps)
    convert(gm, units)                        # back to int8 ops with the learned numbers

prepare runs on the graph quantize_int8 made, so every decision it took stays as it
was (which layers are int8, static or dynamic activations, bias correction, shared
weights): each fxopt.quantized_linear / quantized_conv2d becomes fake_quant.linear /
conv2d with a latent float weight (the float weight it was quantized from), a weight
step per output channel (initialised to its int8 scale) and, for static activations,
an activation step (initialised to the calibrated scale; the zero point stays).
convert writes back int8 codes, scales and a_scale, so lower_to_kernels packs exactly
what was trained. Ops with no autograd formula (fxopt's fused fp32 units, the int8
attention and embedding) run their differentiable twins meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxopt.core import fxops
from fxopt.core.errors import PipelineError
from fxopt.core.ir import ID, LAYER, add_weight, finish, get_weight
from fxopt.core.pipeline import PassSpec, Pipeline
from fxopt.quant import fake_quant, qops

CODES = "fxopt_qat_codes"
_TWINS = {fxops.linear_act: fxops.linear_act_impl, fxops.conv2d_act: fxops.conv2d_act_impl,
          qops.quantized_attention: fake_quant.attention}
_MIN_STEP = 1e-10          # 1 / step stays finite; a step this small quantizes nothing anyway
# Adam moves a parameter by about lr per step whatever its size; a step size of 1e-3 moved
# at the weights' lr would swing by 10 % a step (measured: NaN within an epoch at lr=1e-3).
# Each step tensor's lr is lr * STEP_LR * its initial mean: about STEP_LR * lr relative change
# per step, the weights' relative pace at their usual size (~0.1).
STEP_LR = 10.0


@dataclass
class Units:
    """What prepare changed, for convert: fake-quant nodes, swapped targets, step nodes."""
    fake: list = field(default_factory=list)       # (node, kind)
    swapped: list = field(default_factory=list)    # (node, original target)
    steps: list = field(default_factory=list)      # names of step buffers (parameters once trained)
    latent: list = field(default_factory=list)     # names of latent float weights
    frozen: int = 0
    simulated: int = 0                             # linears given grouped weights by prepare
    step_size: dict = field(default_factory=dict)  # step name -> its initial mean

    def step_lrs(self, lr: float) -> dict:
        """{step name: learning rate} for finetune(param_lr=...): see STEP_LR."""
        return {name: lr * STEP_LR * size for name, size in self.step_size.items()}

    def clamp_steps(self, gm: GraphModule) -> None:
        """Keep every step size positive (an optimizer step may push one through 0)."""
        with torch.no_grad():
            for name in self.steps:
                getattr(gm, name).clamp_(min=_MIN_STEP)


def prepare(gm: GraphModule, float_weights: dict, frozen_layers=(), linear_bits: int = 8,
            group_size: int = 32) -> Units:
    """Turn gm's int8 ops into trainable fake-quant ops, in place. float_weights: {node id:
    float weight} (quantize_int8 records them); a layer in frozen_layers (or without a
    float weight) keeps its codes and learns only its steps and bias.
    A linear whose scale is 2-d (N, K / group: grouped int4 weights, quantize_weight_groups'
    numbers) trains as such. linear_bits < 8 simulates that on an int8 graph: its linears
    take grouped weights (linear_bits, group_size) where group_size divides K; such a graph
    trains and evaluates, but has no op to convert into (compile with an int4 target)."""
    units = Units()
    simulate = (linear_bits, group_size) if linear_bits < 8 else None
    for node in list(gm.graph.nodes):
        if node.target in (qops.quantized_linear, qops.quantized_conv2d):
            _prepare_unit(gm, node, float_weights, set(frozen_layers), units, simulate)
        elif node.target is qops.embedding_int8 and node.meta.get(ID) in float_weights:
            _prepare_embedding(gm, node, float_weights[node.meta[ID]], units)
        elif node.op == "call_function" and node.target in _TWINS:
            units.swapped.append((node, node.target))
            node.target = _TWINS[node.target]
    finish(gm)
    return units


INT4_BITS = 4      # a 2-d weight scale in the graph is quantize_weight_groups(w, 4, group)'s


def _prepare_unit(gm, node, float_weights, frozen_layers, units, simulate=None) -> None:
    linear = node.target is qops.quantized_linear
    x, w_q, w_scale, b = node.args[:4]
    a_scale, a_zp = node.args[-2:]
    layer = node.meta.get(LAYER, node.name)
    w = float_weights.get(node.meta.get(ID))
    if w is None or layer in frozen_layers:
        w_node = w_q
        units.frozen += 1
    else:
        w_node = add_weight(gm, f"{layer}.qat_weight", w.detach().float().clone(), before=node)
        units.latent.append(str(w_node.target))
    target = fake_quant.linear if linear else fake_quant.conv2d
    step_init, extra = get_weight(gm, w_scale).float().clone(), ()
    if linear and step_init.dim() == 2:
        target, extra = fake_quant.linear_groups, (INT4_BITS,)
    elif simulate and linear and w is not None and w.shape[1] % simulate[1] == 0:
        step_init = qops.quantize_weight_groups(w, *simulate)[1]
        target, extra, units.simulated = fake_quant.linear_groups, (simulate[0],), units.simulated + 1
    step = _step(gm, f"{layer}.qat_weight_step", step_init, node, units)
    a_step = None
    if a_scale > 0:
        a_step = _step(gm, f"{layer}.qat_act_step", torch.tensor(a_scale, dtype=torch.float32), node, units)
    rest = node.args[4:-2]                 # act, act_args (linear); conv geometry too
    new = _swap(gm, node, target, (x, w_node, step, b, *rest, a_step, a_zp, *extra), units,
                "linear" if linear else "conv2d")
    new.meta[CODES] = get_weight(gm, w_q)   # the PTQ codes, to count what training moved


def _prepare_embedding(gm, node, w, units) -> None:
    w_q, w_scale, indices = node.args
    codes = get_weight(gm, w_q)
    layer = node.meta.get(LAYER, node.name)
    w_node = add_weight(gm, f"{layer}.qat_weight", w.detach().float().clone(), before=node)
    step = _step(gm, f"{layer}.qat_weight_step", get_weight(gm, w_scale).float().clone(), node, units)
    units.latent.append(str(w_node.target))
    new = _swap(gm, node, fake_quant.embedding, (w_node, step, indices), units, "embedding")
    new.meta[CODES] = codes


def _step(gm, name, value, before, units) -> Node:
    node = add_weight(gm, name, value, before=before)
    units.steps.append(str(node.target))
    units.step_size[str(node.target)] = float(value.abs().mean())
    return node


def _swap(gm, node, target, args, units, kind) -> None:
    # shapes are the int8 op's: copy its metadata rather than trace the fake op on fake tensors
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    units.fake.append((new, kind))
    return new


def convert(gm: GraphModule, units: Units) -> dict:
    """Back to int8 ops carrying the trained codes and steps, in place; returns counts."""
    if units.simulated:
        raise NotImplementedError("convert: prepare(linear_bits=...) simulated grouped low-bit linears on "
                                  "an int8 graph, which has no op to hold them; evaluate or train the "
                                  "fake-quant graph, or compile with an int4 target to convert")
    for node, target in units.swapped:
        node.target = target
    moved = 0
    for node, kind in units.fake:
        moved += _convert_one(gm, node, kind)
    for p in gm.parameters():
        p.requires_grad_(False)
    finish(gm)
    return {"int8_ops": len(units.fake), "frozen_codes": units.frozen, "codes_changed": moved}


def _convert_one(gm, node, kind) -> int:
    """Rewrite one fake-quant node to its int8 op; returns how many int8 codes training moved."""
    layer = node.meta.get(LAYER, node.name)
    if kind == "embedding":
        w_node, step_node, indices = node.args
    else:
        w_node, step_node = node.args[1:3]
    w, step = get_weight(gm, w_node).detach(), get_weight(gm, step_node).detach().float().clone()
    grouped = node.target is fake_quant.linear_groups
    args = node.args[:-1] if grouped else node.args          # linear_groups' last argument: bits
    if w.dtype == torch.int8:
        codes = w
    elif grouped:
        codes = fake_quant.group_codes(w, step, node.args[-1], w.shape[1] // step.shape[1])
    else:
        codes = fake_quant.weight_codes(w, step)
    old = node.meta.pop(CODES, None)
    q_node = add_weight(gm, f"{layer}.weight_int8", codes, before=node)
    s_node = add_weight(gm, f"{layer}.weight_scale", step, before=node)
    if kind == "embedding":
        args, target = (q_node, s_node, indices), qops.embedding_int8
    else:
        x, _, _, b, *rest, a_step, a_zp = args
        a_scale = float(get_weight(gm, a_step).detach()) if a_step is not None else 0.0
        target = qops.quantized_linear if kind == "linear" else qops.quantized_conv2d
        args = (x, q_node, s_node, b, *rest, a_scale, a_zp)
        info = dict(node.meta.get("fxopt_quant", {}))
        if a_step is not None:
            info["a_scale"] = a_scale
        reason = ", ".join(r for r in (info.get("reason"), "quantization-aware trained") if r)
        node.meta["fxopt_quant"] = {**info, "qat": True, "reason": reason}
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return 0 if old is None else int((old != codes).sum())


def pruned_masks(gm: GraphModule, units: Units) -> dict:
    """{latent weight name: weight != 0}: keeps weights a pruning zeroed at exactly 0."""
    return {name: getattr(gm, name) != 0 for name in units.latent}


def with_qat(pipeline: Pipeline, finetune, pruned: bool) -> tuple:
    """(pipeline, options for distill_pruned): finetune_quantized{finetune} spliced in right
    after quantize_int8 where finetune= asks for quantization-aware training. Without prune=
    an int8 target's finetune= is QAT; with prune= it recovers the pruned model by
    distillation (as before QAT existed), and finetune={..., "qat": True} does both.
    QAT trains on what the kernels compute, which is exact but for the 8-bit residual adds
    lower_to_kernels chains by default (the fake-quant graph does not model them): a QAT
    pipeline lowers with lower_to_kernels{residual_codes=False}, unless its spec says."""
    if not finetune:
        return pipeline, finetune
    if not isinstance(finetune, dict):
        raise TypeError(f"finetune must be a dict of training options, e.g. {{'epochs': 2}}, got {finetune!r}")
    options = dict(finetune)
    asked = options.pop("qat", None)
    names = pipeline.names
    if "quantize_int8" not in names:
        if not pruned:
            raise ValueError("finetune= trains a pruned or a quantized model, and this one would be neither: "
                             "give prune= (distillation after pruning) or an int8 target such as "
                             "target='cpu-int8' (quantization-aware training)")
        if asked:
            raise ValueError("finetune={'qat': True} trains the int8 model, and this target has no "
                             "quantize_int8: use an int8 target such as target='cpu-int8'")
        return pipeline, options
    if not (asked if asked is not None else not pruned):
        return pipeline, options
    at = names.index("quantize_int8") + 1
    # the fake-quant graph adds residuals in float: so do the kernels of a QAT model, unless asked
    passes = [PassSpec(p.name, {"residual_codes": False, **p.options}) if p.name == "lower_to_kernels" else p
              for p in pipeline.passes]
    out = Pipeline(tuple(passes[:at] + [PassSpec("finetune_quantized", options)] + passes[at:]))
    try:
        out.validate()
    except PipelineError as e:
        raise PipelineError(f"finetune: {e}") from None
    return out, options
