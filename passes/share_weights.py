"""Share weights: each linear/conv unit's nonzero weights take at most 2**bits values.

Runs on the fused units just before calibrate_ranges and quantize_int8 (after
batch-norm folding and SmoothQuant, which would otherwise rescale shared values
apart). Each unit's codebook is k-means (linear init) on its int8 grid; the unit
records its one scale in node.meta["fxopt_shared"], which quantize_int8 uses,
so the int8 weights are the codebook. gm.meta["fxopt_shared"]: per layer, bits
and codebook size, for the report.

With finetune={...} the centroids are then trained (Deep Compression's trained
quantization): each centroid moves by the sum of its weights' gradients, by
distillation from the user's model on calibration_data, the model always on the
int8 grid (rounded centroids, straight-through gradients), so the kernels still
compute it exactly. bias_bits=b puts each bias on a grid of 2**(b-1)-1 steps per
side (trained with the centroids when finetune is given), which a compressed file
stores as small integers.

    share_weights{bits={'linear': 5, 'conv': 8}}
    share_weights{bits={'linear': 4},finetune={'epochs': 3, 'lr': 0.2},bias_bits=8}
"""
from __future__ import annotations

import torch
from torch import fx

from fxopt.core import fxops
from fxopt.core.errors import PassError
from fxopt.core.ir import add_weight, get_weight, is_weight
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.pruning.finetune import kd_loss
from fxopt.pruning.training import call, first_tensor, split_item
from fxopt.quant.weight_sharing import (SHARED, bias_on_grid, check_bits, cluster, grid_bias,
                                        shared_weight)

PASS = PassInfo("share_weights", requires=("fuse_epilogues",),
                options={"bits": {"linear": 5, "conv": 8}, "finetune": None, "bias_bits": None},
                doc="weight sharing: k-means codebook of 2**bits int8 values per layer")
TUNE = {"epochs": 2, "lr": 0.2, "temperature": 2.0}    # lr in int8 steps
IMPLS = {fxops.linear_act: fxops.linear_act_impl, fxops.conv2d_act: fxops.conv2d_act_impl}


def run(gm, ctx, bits=None, finetune=None, bias_bits=None) -> PassResult:
    bits = check_bits(bits)
    layers = _cluster_layers(gm, bits, bias_bits, finetune is not None)
    moved = _train(gm, ctx, layers, finetune) if finetune is not None and layers else 0
    table = {}
    for node, rec in layers.items():
        with torch.no_grad():
            shared = shared_weight(rec["centroids"].double(), rec["index"], rec["scale"])
        layer = node.meta.get("fxopt_layer", node.name)
        args = list(node.args)
        args[1] = add_weight(gm, f"{layer}.weight_shared", shared, before=node)
        table[layer] = {"bits": rec["bits"], "values": int(shared.unique().ne(0).sum()),
                        "kept": int(shared.ne(0).sum()), "total": shared.numel()}
        if "bias_units" in rec:
            args[2] = add_weight(gm, f"{layer}.bias_shared", bias_on_grid(rec["bias_units"], rec["bias_scale"]),
                                 before=node)
            table[layer]["bias_scale"] = rec["bias_scale"]
        elif "bias" in rec:
            args[2] = add_weight(gm, f"{layer}.bias_tuned", (rec["bias"] * rec["bias_step"]).float(), before=node)
        node.args = tuple(args)
        node.meta[SHARED] = {"scale": rec["scale"], "bits": rec["bits"]}
    gm.meta["fxopt_shared"] = table
    stats = {"layers": len(table)}
    if finetune is not None:
        stats["centroids_moved"] = moved
    return PassResult(bool(table), stats)


def _cluster_layers(gm, bits: dict, bias_bits, tune: bool) -> dict:
    """{unit node: its codebook (centroids, index, scale) and, with bias_bits, its bias grid
    (else, when the centroids are trained, its bias: trained with them)}."""
    layers = {}
    for node in gm.graph.nodes:
        kind = {fxops.linear_act: "linear", fxops.conv2d_act: "conv"}.get(node.target)
        if kind is None or kind not in bits or not is_weight(node.args[1]):
            continue
        centroids, index, scale = cluster(get_weight(gm, node.args[1]), bits[kind])
        rec = {"centroids": centroids, "index": index, "scale": scale, "bits": bits[kind]}
        if bias_bits is not None and is_weight(node.args[2]):
            rec["bias_scale"], rec["bias_units"] = grid_bias(get_weight(gm, node.args[2]), bias_bits)
        elif tune and is_weight(node.args[2]):
            # trained in the same units as the centroids (1/127 of its largest value): one lr fits all
            rec["bias_step"], rec["bias"] = grid_bias(get_weight(gm, node.args[2]), 8)
        layers[node] = rec
    return layers


def _train(gm, ctx, layers: dict, options: dict) -> int:
    """Distil the shared model from the user's: centroids and biases trained, the rest frozen. Returns how many centroids ended on another int8 value than k-means gave."""
    data, teacher = ctx.state.get("calibration_data"), ctx.state.get("teacher")
    if data is None or teacher is None:
        raise PassError("share_weights: finetune trains the centroids by distillation; it needs "
                        "calibration_data (optimize(..., calibration_data=loader)) and the user's model")
    unknown = set(options) - set(TUNE)
    if unknown:
        raise PassError(f"share_weights: unknown finetune option(s) {', '.join(sorted(unknown))}; "
                        f"use {', '.join(TUNE)}")
    opts = {**TUNE, **options}
    before = {n: torch.round(r["centroids"]).clamp(-127, 127) for n, r in layers.items()}
    params = []
    for rec in layers.values():
        for key in ("centroids", "bias_units", "bias"):
            if key in rec:
                rec[key] = rec[key].float().clone().requires_grad_(True)
                params.append(rec[key])
    student = _eager_twin(gm)
    opt = torch.optim.Adam(params, lr=float(opts["lr"]))
    torch.manual_seed(ctx.seed)
    teacher_was_training = teacher.training
    teacher.eval()
    try:
        for _ in range(int(opts["epochs"])):
            for item in data:
                _step(student, teacher, layers, split_item(item)[0], opt, float(opts["temperature"]))
    finally:
        teacher.train(teacher_was_training)
    for rec in layers.values():
        for key in ("centroids", "bias_units", "bias"):
            if key in rec:
                rec[key] = rec[key].detach()
    return sum(int((torch.round(r["centroids"]).clamp(-127, 127) != before[n]).sum()) for n, r in layers.items())


def _eager_twin(gm) -> fx.GraphModule:
    """gm with the fused units calling their Python implementations (differentiable), same weights."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    env = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in IMPLS:
            env[node].target = IMPLS[node.target]
    return fx.GraphModule(gm, graph)


def _step(student, teacher, layers, inputs, opt, temperature) -> None:
    params = {}
    for node, rec in layers.items():
        params[str(node.args[1].target)] = shared_weight(rec["centroids"], rec["index"], rec["scale"])
        if "bias_units" in rec:
            units = rec["bias_units"]
            grid = units + (torch.round(units) - units).detach()
            params[str(node.args[2].target)] = grid * rec["bias_scale"]
        elif "bias" in rec:
            params[str(node.args[2].target)] = rec["bias"] * rec["bias_step"]
    with torch.no_grad():
        target = first_tensor(call(teacher, inputs))
    loss = kd_loss(first_tensor(call(student, inputs, params)), target, temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
