"""Rewrite fp32 linears into int4-weight ops (target cpu-int4); everything else is left to quantize_int8.

Weights become qops.quantize_weight_groups' numbers: symmetric int4 (|q| <= 7) in groups of
`group_size` along K (32, 64 or 128), one scale per (output, group); activations stay the
int8 linear's (uint8, dynamic per row). The op is qops.quantized_linear with a 2-d scale
(N, K / group), which lower_to_kernels turns into fxopt.linear_int4. It runs before
quantize_int8, which then quantizes what is left (convs, embeddings, attention and the
linears this pass kept) to int8.

A linear whose K is not a multiple of the group size stays int8: its report row says so
(the reason is kept in ctx.state["quantize_int4"] for lower_to_kernels to attach).
"""
from __future__ import annotations

from fxopt.core import fxops
from fxopt.core.ir import add_weight, get_weight, insert_call, is_weight, layer_name
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.quant import qops

PASS = PassInfo("quantize_int4", requires=("fuse_epilogues",), options={"group_size": None, "skip": ()},
                doc="int4 weights in groups along K (int8 activations) for linears")

GROUP_SIZES = (32, 64, 128)
QUANT = "fxopt_quant"


def check_group_size(group_size) -> int:
    """The group size, or a ValueError naming the allowed ones."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"quantize_int4: group_size={group_size!r} is not supported; the int4 kernel "
                         f"takes {', '.join(map(str, GROUP_SIZES))} (weights per scale along K)")
    return int(group_size)


def run(gm, ctx, group_size=None, skip=()) -> PassResult:
    group_size = check_group_size(ctx.get("group_size", 32) if group_size is None else group_size)
    kept = ctx.state.setdefault("quantize_int4", {})
    stats = {"int4": 0, "kept_int8": 0}
    for node in list(gm.graph.nodes):
        if node.target is not fxops.linear_act:
            continue
        name = node.meta.get("fxopt_layer") or layer_name(node)
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
        _quantize(gm, node, name, weight, group_size)
        stats["int4"] += 1
    return PassResult(stats["int4"] > 0, stats)


def _divisor(k: int) -> int | None:
    return next((g for g in reversed(GROUP_SIZES) if k % g == 0), None)


def _quantize(gm, node, name: str, weight, group_size: int) -> None:
    w_q, w_scale = qops.quantize_weight_groups(weight.detach().float(), bits=4, group_size=group_size)
    wq_node = add_weight(gm, f"{name}.weight_int4", w_q, before=node)
    ws_node = add_weight(gm, f"{name}.weight_scale", w_scale, before=node)
    x, _, b, act, act_args = node.args
    new = insert_call(gm, node, qops.quantized_linear, (x, wq_node, ws_node, b, act, act_args, 0.0, 0), like=node)
    new.meta["fxopt_activation"] = node.meta.get("fxopt_activation", "none")
    new.meta[QUANT] = {"int8": True, "bits": 4, "group_size": group_size, "mode": "dynamic", "a_scale": 0.0,
                       "a_zp": 0, "rounding": "nearest",
                       "reason": f"int4 weights in groups of {group_size} along K (round to nearest), "
                                 f"per-row dynamic int8 activations"}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
