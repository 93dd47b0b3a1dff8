"""Rewrite fp32 linear/conv units (and embedding tables) into int8 ops.

Weights become symmetric int8 per output channel. Activations are quantized
per op, by the scheme that suits it:
  dynamic  (linear: per row, conv: per image, from the input itself) - the default for linears,
           whose rows (tokens) differ widely in range;
  static   (per tensor, calibrated by calibrate_ranges) - the default for convs,
           whose ranges are stable and where a static scale lets int8 ops chain.
Embedding tables are stored int8 with a scale per row (weight-only).
Attention (scaled_dot_product_attention) becomes fxopt.quantized_attention: both of its
products in int8, all operands quantized on the fly (attention="fp32" keeps it fp32).

Every unit records its decision and the reason in node.meta["fxopt_quant"],
so the report can say why a layer stayed fp32.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxopt.core import fxops
from fxopt.core.ir import ID, add_weight, get_weight, insert_call, is_weight, layer_name
from fxopt.core.macs import concrete
from fxopt.core.ops import OpKind, arg, attention_parts, kind_of
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.quant import bias_correction, qops, weight_sharing

PASS = PassInfo(
    "quantize_int8", requires=("fuse_epilogues",),
    options={"activations": "auto", "skip": (), "per_layer": {}, "embeddings": True,
             "min_macs": 0, "bias_correction": "auto", "depthwise": "int8", "attention": "int8",
             "image_stem": "int8"},
    doc="int8 weights per channel; activations dynamic (linear) or static (conv)")

MODES = ("auto", "dynamic", "static", "fp32")
QUANT = "fxopt_quant"


def run(gm, ctx, activations="auto", skip=(), per_layer=None, embeddings=True, min_macs=0,
        bias_correction="auto", depthwise="int8", attention="int8", image_stem="int8") -> PassResult:
    if activations not in MODES:
        raise ValueError(f"quantize_int8: activations={activations!r}; use one of {MODES}")
    if attention not in ("int8", "fp32"):
        raise ValueError(f"quantize_int8: attention={attention!r}; use int8 or fp32")
    if bias_correction not in ("auto", "off"):
        raise ValueError(f"quantize_int8: bias_correction={bias_correction!r}; use auto or off")
    if image_stem not in ("fp32", "int8"):
        raise ValueError(f"quantize_int8: image_stem={image_stem!r}; use fp32 or int8")
    if depthwise not in ("fp32", "int8"):
        raise ValueError(f"quantize_int8: depthwise={depthwise!r}; use int8 or fp32")
    per_layer = dict(per_layer or {})
    ranges = ctx.state.get("calibrate_ranges", {})
    outputs = ctx.state.get("calibrate_outputs", {})
    inputs = ctx.state.get("calibrate_inputs", {}) if bias_correction == "auto" else {}
    stats = {"linear": 0, "conv2d": 0, "embedding": 0, "attention": 0, "dynamic": 0, "static": 0,
             "kept_fp32": 0, "bias_corrected": 0}
    # the float weights each int8 node stands for, by node id: finetune_quantized starts from them
    floats = ctx.state.setdefault(PASS.name, {}).setdefault("float_weights", {})
    for node in list(gm.graph.nodes):
        if node.target in (fxops.linear_act, fxops.conv2d_act):
            mode, reason = _choose(node, activations, skip, per_layer, ranges, gm, min_macs)
            if mode != "fp32" and depthwise == "fp32" and _is_depthwise(node) and \
                    _layer(node) not in per_layer:
                mode, reason = "fp32", DEPTHWISE_WHY
            if mode != "fp32" and image_stem == "fp32" and _is_image_stem(node) and \
                    _layer(node) not in per_layer:
                mode, reason = "fp32", IMAGE_STEM_WHY
            if mode == "fp32":
                node.meta[QUANT] = {"int8": False, "reason": reason}
                stats["kept_fp32"] += 1
                continue
            floats[node.meta.get(ID)] = get_weight(gm, node.args[1])
            stats["bias_corrected"] += _quantize_unit(gm, node, mode, ranges, inputs.get(_input_id(node)),
                                                      outputs.get(node.meta.get(ID)))
            stats["linear" if node.target is fxops.linear_act else "conv2d"] += 1
            stats[mode] += 1
        elif embeddings and kind_of(node) is OpKind.EMBEDDING and _layer(node) not in skip:
            if is_weight(node.args[0]):
                floats[node.meta.get(ID)] = get_weight(gm, node.args[0])
            stats["embedding"] += _quantize_embedding(gm, node)
        elif kind_of(node) is OpKind.ATTENTION:
            done = _quantize_attention(gm, node, attention, skip, per_layer)
            stats["attention" if done else "kept_fp32"] += 1
    changed = stats["linear"] + stats["conv2d"] + stats["embedding"] + stats["attention"] > 0
    return PassResult(changed, stats)


# Depthwise convs are int8 by default since kernels/depthwise.py (int16 pair multiply-adds)
# and their uint8 chaining (lower_to_kernels): MobileNetV2 b1 9.39 -> 5.56 ms, b8 74.5 ->
# 33.1 ms, EfficientNet-B0 b1 15.0 -> 12.7 ms against depthwise=fp32 (A/B in one process,
# AMX Xeon, 2 threads); EfficientNet-Lite0 with its ImageNet weights on 64 crops of
# photographs: min logit cosine to fp32 0.9771, top-1 agreement 87.5 % (0.9763 and 84.4 %
# with them fp32). Per layer alone the kernel runs at 0.7-1.7x torch fp32's speed (about
# equal summed over MobileNetV2's sizes): the gain is the chain (no float activations, pads
# or quantize steps between the convs).
DEPTHWISE_WHY = "depthwise conv, kept fp32 by depthwise=fp32"


# image_stem="fp32" keeps the first conv of an image model (on the model's input, at most
# IMAGE_CHANNELS channels) fp32. Its input quantization error is the one every later layer
# amplifies: EfficientNet-Lite0 with its ImageNet weights on 64 crops of photographs
# (python -m fxopt.bench.pretrained), every other conv int8: min logit cosine to fp32 0.979
# and the same top-1 class on 82.8 % of the crops with the stem int8; 0.998 and 95.3 % with it
# fp32. It is also where int8 pays least (K = 27 for a 3x3 RGB stem; 2.8 % of that model's
# MACs): on an AVX2 CPU it ran 1.10 ms int8 against 0.75 ms fp32. Not the default yet: it
# changes other measured results, which need re-measuring first (with it, the random-weight
# CNN of tests/test_dynamic_spatial fell to a worst cosine of 0.9957 at 160x160 against 0.9992
# at its captured size, beyond that test's margin; the digits CNN's deep-compression tests
# and figures count every conv int8).
IMAGE_CHANNELS = 4
IMAGE_STEM_WHY = "first conv on the image input, kept fp32 by image_stem=fp32"


def _is_image_stem(node) -> bool:
    """A conv reading a graph input of at most IMAGE_CHANNELS channels (through a pad, as
    TensorFlow-style "same" convs do)."""
    if node.target is not fxops.conv2d_act:
        return False
    src = node.args[0]
    while isinstance(src, Node) and kind_of(src) is OpKind.PAD:
        src = src.args[0]
    if not isinstance(src, Node) or kind_of(src) is not OpKind.INPUT:
        return False
    val = src.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.shape[1] <= IMAGE_CHANNELS


def _is_depthwise(node) -> bool:
    if node.target is not fxops.conv2d_act:
        return False
    w = node.args[1].meta["val"]
    groups = node.args[6]
    return groups > 1 and w.shape[1] == 1 and w.shape[0] == groups


def _layer(node) -> str:
    return node.meta.get("fxopt_layer") or layer_name(node)


def _choose(node, activations, skip, per_layer, ranges, gm, min_macs) -> tuple[str, str]:
    """(mode, reason): the activation scheme for this unit, or fp32 and why."""
    name = _layer(node)
    if name in skip:
        return "fp32", "skipped by the user (skip=)"
    if not is_weight(node.args[1]):
        return "fp32", "weight is computed at run time, not a constant"
    wanted = per_layer.get(name, activations)
    if wanted not in MODES:
        raise ValueError(f"quantize_int8: per_layer[{name!r}]={wanted!r}; use one of {MODES}")
    if wanted == "fp32":
        return "fp32", "kept fp32 by per_layer"
    if min_macs and _macs(node) < min_macs:
        return "fp32", f"too small for int8 to pay ({_macs(node)} MACs per row < {min_macs})"
    if wanted == "auto":
        wanted = "dynamic" if node.target is fxops.linear_act else "static"
    if wanted == "static" and _input_id(node) not in ranges:
        if node.target is fxops.conv2d_act:
            return "dynamic", ""
        return "fp32", "static activations asked but no calibrated range (run calibrate_ranges)"
    return wanted, ""


def _macs(node) -> int:
    w = node.args[1].meta["val"]
    return int(w.numel())


def _input_id(node) -> str:
    return node.args[0].meta.get("fxopt_id")


def _quantize_unit(gm, node, mode: str, ranges: dict, input_stats, out_range=None) -> int:
    """Rewrite one unit to its int8 op; returns 1 if its bias was corrected. out_range: the
    calibrated range of its output (a conv a residual add takes), recorded in the meta as
    out_scale, out_zp for lower_to_kernels to hand it on in uint8."""
    weight = get_weight(gm, node.args[1])
    w_q, w_scale = weight_sharing.quantize(node, weight, qops.quantize_weight_per_channel)
    name = _layer(node)
    # Measured on held-out zoo inputs: correction gains 1-7 dB on static convs (post-ReLU
    # inputs have a large mean) and loses 0.5-1.5 dB on dynamic linears (mean ~ 0, so the
    # correction fits calibration noise); auto corrects static ops only.
    corrected = None
    if input_stats is not None and mode == "static":
        corrected = _correct_bias(gm, node, weight, w_q, w_scale, input_stats)
    wq_node = add_weight(gm, f"{name}.weight_int8", w_q, before=node)
    ws_node = add_weight(gm, f"{name}.weight_scale", w_scale, before=node)
    a_scale, a_zp = 0.0, 0
    if mode == "static":
        a_scale, a_zp = qops.qparams_from_range(*ranges[_input_id(node)])
    if node.target is fxops.linear_act:
        x, _, b, act, act_args = node.args
        b = corrected if corrected is not None else b
        args = (x, wq_node, ws_node, b, act, act_args, a_scale, a_zp)
        target = qops.quantized_linear
    else:
        x, _, b, stride, padding, dilation, groups, act, act_args = node.args
        b = corrected if corrected is not None else b
        args = (x, wq_node, ws_node, b, stride, padding, dilation, groups, act, act_args, a_scale, a_zp)
        target = qops.quantized_conv2d
    new = insert_call(gm, node, target, args, like=node)
    new.meta["fxopt_activation"] = node.meta.get("fxopt_activation", "none")
    new.meta[QUANT] = {"int8": True, "mode": mode, "a_scale": a_scale, "a_zp": a_zp,
                       "reason": "per-row dynamic activations" if mode == "dynamic" and
                       target is qops.quantized_linear else f"{mode} per-tensor activations"}
    if corrected is not None:
        new.meta[QUANT]["reason"] += ", bias corrected"
    if out_range is not None:
        new.meta[QUANT]["out_scale"], new.meta[QUANT]["out_zp"] = qops.qparams_from_range(*out_range)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return int(corrected is not None)


def _correct_bias(gm, node, weight, w_q, w_scale, input_stats):
    """A new bias node if correcting the bias lowers this layer's int8 error, else None."""
    b_node = node.args[2]
    b = get_weight(gm, b_node) if b_node is not None else None
    conv_args = None
    if node.target is fxops.conv2d_act:
        _, _, _, stride, padding, dilation, groups, _, _ = node.args
        conv_args = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    new = bias_correction.corrected_bias(weight, w_q, w_scale, b, input_stats, conv_args)
    if new is None:
        return None
    return add_weight(gm, f"{_layer(node)}.bias_corrected", new, before=node)


def _quantize_embedding(gm, node) -> int:
    weight_node, indices = node.args[0], node.args[1]
    if not is_weight(weight_node) or arg(node, 4, "sparse", False):
        node.meta[QUANT] = {"int8": False, "reason": "embedding weight is not a constant"}
        return 0
    weight = get_weight(gm, weight_node)
    w_q, w_scale = qops.quantize_weight_per_channel(weight)   # per row of the table
    name = _layer(node)
    wq_node = add_weight(gm, f"{name}.weight_int8", w_q, before=node)
    ws_node = add_weight(gm, f"{name}.weight_scale", w_scale, before=node)
    new = insert_call(gm, node, qops.embedding_int8, (wq_node, ws_node, indices), like=node)
    new.meta[QUANT] = {"int8": True, "mode": "weight-only", "reason": "int8 table, scale per row"}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return 1



ATTENTION_WHY = "int8 Q.K^T and P.V: Q and P per row, K per key, V per column, all dynamic"


def _attention_blocker(node, wanted: str, skip, per_layer) -> str:
    """Why this attention node must stay fp32, or "" if the int8 kernel can take it."""
    name = _layer(node)
    if name in skip:
        return "skipped by the user (skip=)"
    if per_layer.get(name, wanted) == "fp32":
        return "kept fp32 by per_layer" if name in per_layer else "kept fp32 by attention='fp32'"
    q, k, v, mask = attention_parts(node)
    vals = [a.meta.get("val") if isinstance(a, Node) else None for a in (q, k, v)]
    if arg(node, 4, "dropout_p", 0.0) != 0:
        return "dropout_p > 0: the int8 kernel has no dropout"
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != torch.float32 for t in vals):
        return "q/k/v are not 4-D float32 (B, H, S, D) tensors"
    if not (_lead(vals[0]) == _lead(vals[1]) == _lead(vals[2])):
        return "q, k and v differ in batch or head count (GQA or broadcast)"
    m = mask.meta.get("val") if isinstance(mask, Node) else None
    if mask is not None and not (isinstance(m, torch.Tensor) and (m.dtype == torch.bool or m.is_floating_point())):
        return "attention mask is neither bool nor float"
    return ""


def _lead(t: torch.Tensor) -> list:
    """(batch, heads) of an attention operand, at the example sizes."""
    return [concrete(s) for s in t.shape[:2]]


def _quantize_attention(gm, node, wanted: str, skip, per_layer) -> bool:
    """Rewrite one scaled_dot_product_attention to quantized_attention; False if kept fp32."""
    why = _attention_blocker(node, wanted, skip, per_layer)
    if why:
        node.meta[QUANT] = {"int8": False, "reason": why}
        return False
    q, k, v, mask = attention_parts(node)
    kwargs = {"attn_mask": mask, "scale": node.kwargs.get("scale"),
              "is_causal": bool(arg(node, 5, "is_causal", False))}
    new = insert_call(gm, node, qops.quantized_attention, (q, k, v), kwargs, like=node)
    new.meta[QUANT] = {"int8": True, "mode": "dynamic", "reason": ATTENTION_WHY}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True
