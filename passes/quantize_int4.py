"""Rewrite fp32 linears into int4-weight ops (target cpu-int4); everything else is left to quantize_int8.

Weights become qops.quantize_weight_groups' numbers: symmetric int4 (|q| <= 7) in groups of
`group_size` along K (32, 64 or 128), one scale per (output, group); activations stay the
int8 linear's (uint8, dynamic per row). The op is qops.quantized_linear with a 2-d scale
(N, K / group), which lower_to_kernels turns into fxopt.linear_int4. It runs before
quantize_int8, which then quantizes what is left (convs, embeddings, attention and the
linears this pass kept) to int8.

Rounding: "nearest" is quantize_weight_groups itself; "gptq" (compiler/quant/gptq.py) rounds
the columns one by one, each column's error compensated in the columns after it by the
inverse Hessian of the layer's calibration inputs: the same format, a smaller output error.
"auto" (the default) takes gptq when calibration_data was given, nearest otherwise; the
report's why column says which.

A linear whose K is not a multiple of the group size stays int8: its report row says so
(the reason is kept in ctx.state["quantize_int4"]["kept_int8"] for lower_to_kernels to attach;
the float weights, by node id, in ["float_weights"] for finetune_quantized to start from).
"""
from __future__ import annotations

from fxopt.core import fxops
from fxopt.core.ir import ID, add_weight, get_weight, insert_call, is_weight, layer_name
from fxopt.core.ops import OpKind, arg, kind_of
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.runtime import kernel_ops
from fxopt.quant import qops
from fxopt.quant.calibrate import calibration_inputs, observe
from fxopt.quant.gptq import HessianObserver, gptq_groups

PASS = PassInfo("quantize_int4", requires=("fuse_epilogues",), options={"group_size": None, "skip": (), "rounding": None, "embeddings": True},
                doc="int4 weights in groups along K (int8 activations) for linears")

GROUP_SIZES = (32, 64, 128)
ROUNDINGS = ("auto", "nearest", "gptq")
QUANT = "fxopt_quant"


def check_group_size(group_size) -> int:
    """The group size, or a ValueError naming the allowed ones."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"quantize_int4: group_size={group_size!r} is not supported; the int4 kernel "
                         f"takes {', '.join(map(str, GROUP_SIZES))} (weights per scale along K)")
    return int(group_size)


def run(gm, ctx, group_size=None, skip=(), rounding=None, embeddings=True) -> PassResult:
    group_size = check_group_size(ctx.get("group_size", 32) if group_size is None else group_size)
    rounding = ctx.get("int4_rounding", "auto") if rounding is None else rounding
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize_int4: rounding={rounding!r}; use one of {', '.join(ROUNDINGS)}")
    if rounding == "auto":
        rounding = "gptq" if ctx.state.get("calibration_data") is not None else "nearest"
    state = ctx.state.setdefault("quantize_int4", {})
    kept = state.setdefault("kept_int8", {})        # layer -> why it stays int8
    stats = {"int4": 0, "kept_int8": 0, "gptq": 0, "embedding": 0}
    units = []
    for node in list(gm.graph.nodes):
        name = node.meta.get("fxopt_layer") or layer_name(node)
        if embeddings and kind_of(node) is OpKind.EMBEDDING and name not in skip:
            stats["embedding"] += _quantize_embedding(gm, node, name, group_size)
            continue
        if node.target is not fxops.linear_act:
            continue
        if name in skip or not is_weight(node.args[1]):
            continue                                  # quantize_int8 decides and says why
        weight = get_weight(gm, node.args[1])
        k = weight.shape[1]
        if k % group_size:
            kept[name] = (f"int8 weights: K={k} is not a multiple of the int4 group size {group_size} "
                          f"(a group size that divides K, e.g. group_size={_divisor(k)}, makes it int4)"
                          if _divisor(k) else
                          f"int8 weights: K={k} is not a multiple of the int4 group size {group_size}")
            stats["kept_int8"] += 1
            continue
        units.append((node, name, weight))
    hessians = _hessians(gm, ctx, [u[0] for u in units]) if rounding == "gptq" and units else {}
    # the float weights each int4 node stands for, by node id: finetune_quantized starts from them
    floats = state.setdefault("float_weights", {})
    for node, name, weight in units:
        floats[node.meta.get(ID)] = weight
        h = hessians.get(node.meta.get(ID))
        _quantize(gm, node, name, weight, group_size, h)
        stats["int4"] += 1
        stats["gptq"] += h is not None
    # the options as resolved (ctx-wide ones included): a recompile (fxopt.finetune) repeats them
    return PassResult(stats["int4"] > 0, {**stats, "group_size": group_size, "rounding": rounding})


def _hessians(gm, ctx, nodes) -> dict:
    """{node id: X^T X / rows} of each linear's input over the calibration data (one pass)."""
    data = calibration_inputs(ctx.example_args, ctx.example_kwargs, ctx.state.get("calibration_data"),
                              lambda message: None, ctx.options.get("calibration_nonfinite", "error"),
                              ctx.options.get("calibration_outliers", "drop"))
    observers = {n.meta["fxopt_id"]: HessianObserver() for n in nodes if n.meta.get("fxopt_id")}
    observe(gm, data, inputs=observers, progress=False)
    return {nid: obs.hessian() for nid, obs in observers.items() if obs.hessian() is not None}


def _divisor(k: int) -> int | None:
    return next((g for g in reversed(GROUP_SIZES) if k % g == 0), None)


def _quantize_embedding(gm, node, name: str, group_size: int) -> int:
    """An int4 table (weight-only, scales per group along the row); 0 if left to quantize_int8."""
    table = node.args[0]
    if not is_weight(table) or arg(node, 4, "sparse", False):
        return 0
    weight = get_weight(gm, table)
    if weight.dim() != 2 or weight.shape[1] % group_size:
        return 0
    q, s = qops.quantize_weight_groups(weight.detach().float(), bits=4, group_size=group_size)
    buffers = kernel_ops.pack_embedding_int4(q, s)
    packed = add_weight(gm, f"{name}.weight_int4", buffers["packed"], before=node)
    scale = add_weight(gm, f"{name}.weight_scale", buffers["w_scale"], before=node)
    new = insert_call(gm, node, kernel_ops.embedding_int4, (packed, scale, node.args[1]), like=node)
    new.meta[QUANT] = {"int8": True, "bits": 4, "group_size": group_size, "mode": "weight-only",
                       "reason": f"int4 table, a scale per group of {group_size} along the row"}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return 1


def _quantize(gm, node, name: str, weight, group_size: int, hessian=None) -> None:
    if hessian is None:
        w_q, w_scale = qops.quantize_weight_groups(weight.detach().float(), bits=4, group_size=group_size)
    else:
        w_q, w_scale = gptq_groups(weight.detach().float(), hessian, group_size)
    rounding = "round to nearest" if hessian is None else "GPTQ rounding"
    wq_node = add_weight(gm, f"{name}.weight_int4", w_q, before=node)
    ws_node = add_weight(gm, f"{name}.weight_scale", w_scale, before=node)
    x, _, b, act, act_args = node.args
    new = insert_call(gm, node, qops.quantized_linear, (x, wq_node, ws_node, b, act, act_args, 0.0, 0), like=node)
    new.meta["fxopt_activation"] = node.meta.get("fxopt_activation", "none")
    new.meta[QUANT] = {"int8": True, "bits": 4, "group_size": group_size, "mode": "dynamic", "a_scale": 0.0,
                       "a_zp": 0, "rounding": "nearest" if hessian is None else "gptq",
                       "reason": f"int4 weights in groups of {group_size} along K ({rounding}), "
                                 f"per-row dynamic int8 activations"}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
