"""Share weights: each linear/conv unit's nonzero weights take at most 2**bits values.

Runs on the fused units just before calibrate_ranges and quantize_int8 (after
batch-norm folding and SmoothQuant, which would otherwise rescale shared values
apart). Each unit's codebook is k-means (linear init) on its int8 grid; the unit
records its one scale in node.meta["fxopt_shared"], which quantize_int8 uses,
so the int8 weights are the codebook. gm.meta["fxopt_shared"]: per layer, bits
and codebook size, for the report.

    share_weights{bits={'linear': 5, 'conv': 8}}
"""
from __future__ import annotations

from fxopt.core import fxops
from fxopt.core.ir import add_weight, get_weight, is_weight
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.quant.weight_sharing import SHARED, check_bits, share

PASS = PassInfo("share_weights", requires=("fuse_epilogues",), options={"bits": {"linear": 5, "conv": 8}},
                doc="weight sharing: k-means codebook of 2**bits int8 values per layer")


def run(gm, ctx, bits=None) -> PassResult:
    bits = check_bits(bits)
    table = {}
    for node in list(gm.graph.nodes):
        kind = {fxops.linear_act: "linear", fxops.conv2d_act: "conv"}.get(node.target)
        if kind is None or kind not in bits or not is_weight(node.args[1]):
            continue
        weight = get_weight(gm, node.args[1])
        shared, scale = share(weight, bits[kind])
        layer = node.meta.get("fxopt_layer", node.name)
        new = add_weight(gm, f"{layer}.weight_shared", shared, before=node)
        node.args = (node.args[0], new, *node.args[2:])
        node.meta[SHARED] = {"scale": scale, "bits": bits[kind]}
        table[layer] = {"bits": bits[kind], "values": int(shared.unique().ne(0).sum()),
                        "kept": int(shared.ne(0).sum()), "total": shared.numel()}
    gm.meta["fxopt_shared"] = table
    return PassResult(bool(table), {"layers": len(table)})
