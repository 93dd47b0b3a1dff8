"""Rewrite fp32 linears into bf16 linears (target cpu-bf16): fxopt.linear_bf16.

y = bf16(x) @ bf16(W)^T with fp32 accumulation, + the fp32 bias, then the linear's fused
activation (kernels/bf16.py). Every linear with constant float32 weights is taken (fused
parallel linears and fused epilogues included), except the layers named in `skip` (the
names the report's layer column uses), which stay as they are: in cpu-bf16 they stay fp32;
a quantize_int8 running after this pass (a mixed pipeline) may take them, and leaves the
bf16 linears alone, as it leaves quantize_int4's. Convs, attention, layer norms and
embeddings are not this pass's (cpu-bf16 keeps them fp32).

Weights are rounded to bf16 (round to nearest even) and packed here, once: the saved model
holds the bf16 bits, half the fp32 bytes. A linear not taken says why in its report row.

    fast = fxopt.optimize(model, (x,), target="cpu-bf16")
    fast = fxopt.optimize(model, (x,), target="...,quantize_bf16{skip=('classifier',)},...")
"""
from __future__ import annotations

import torch

from fxopt.core import fxops
from fxopt.core.errors import PipelineError
from fxopt.core.ir import add_weight, get_weight, insert_call, is_weight, layer_name
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.runtime import kernel_ops

PASS = PassInfo("quantize_bf16", requires=("fuse_epilogues",), options={"skip": ()},
                doc="bf16 weights and activations, fp32 accumulation, for linears")

QUANT = "fxopt_quant"
WHY = "bf16 weights and activations (round to nearest even), fp32 accumulation"


def run(gm, ctx, skip=()) -> PassResult:
    skip = _check_skip(gm, skip)
    stats = {"bf16": 0, "kept_fp32": 0}
    for node in list(gm.graph.nodes):
        if node.target is not fxops.linear_act:
            continue
        name = _layer(node)
        why = _not_taken(gm, node, name, skip)
        if why:
            node.meta[QUANT] = {"int8": False, "reason": why}
            stats["kept_fp32"] += 1
            continue
        _rewrite(gm, node, name)
        stats["bf16"] += 1
    return PassResult(stats["bf16"] > 0, stats)


def _layer(node) -> str:
    return node.meta.get("fxopt_layer") or layer_name(node)


def _check_skip(gm, skip) -> frozenset:
    """skip as a set of layer names, each one a layer of this model (a typo would silently
    leave the layer it meant bf16)."""
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, (tuple, list, set, frozenset)) or not all(isinstance(s, str) for s in skip):
        raise PipelineError(f"quantize_bf16: skip must be a tuple of layer names, e.g. skip=('fc',), "
                            f"got {skip!r:.80}")
    known = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            known.update((_layer(node), node.name))
    unknown = sorted(set(skip) - known)
    if unknown:
        linears = sorted({_layer(n) for n in gm.graph.nodes if n.target is fxops.linear_act})
        shown = ", ".join(linears[:20]) + (f", ... ({len(linears)} in all)" if len(linears) > 20 else "")
        raise PipelineError(f"quantize_bf16: skip names {', '.join(map(repr, unknown))}, not a layer of this model; "
                         f"use the names of the report's layer column; its linear layers: {shown or 'none'}")
    return frozenset(skip)


def _not_taken(gm, node, name: str, skip) -> str | None:
    """Why this linear stays as it is, or None to take it."""
    if name in skip:
        return "fp32: named in quantize_bf16's skip"
    if not is_weight(node.args[1]):
        return "fp32: its weight is computed in the model, not a constant (bf16 packs weights ahead of time)"
    weight = get_weight(gm, node.args[1])
    if weight.dtype != torch.float32 or weight.dim() != 2:
        return f"fp32: weight is {weight.dtype} {tuple(weight.shape)}; quantize_bf16 takes 2-D float32 weights"
    b = node.args[2]
    if b is not None and not (is_weight(b) and get_weight(gm, b).dtype == torch.float32):
        return "fp32: its bias is not a float32 constant"
    return None


def _rewrite(gm, node, name: str) -> None:
    x, w, b, act, act_args = node.args
    buffers = kernel_ops.pack_linear_bf16(get_weight(gm, w))
    packed = add_weight(gm, f"{name}.weight_bf16", buffers["packed"], before=node)
    scale = add_weight(gm, f"{name}.w_scale", buffers["w_scale"], before=node)
    sums = add_weight(gm, f"{name}.col_sums", buffers["col_sums"], before=node)
    args = (x, packed, scale, sums, b, buffers["n"], buffers["k"], act, list(act_args), 0.0, 0)
    new = insert_call(gm, node, kernel_ops.linear_bf16, args, like=node)
    new.meta["fxopt_activation"] = node.meta.get("fxopt_activation", "none")
    new.meta[QUANT] = {"int8": False, "bits": 16, "mode": "bf16", "a_scale": 0.0, "a_zp": 0, "reason": WHY}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
