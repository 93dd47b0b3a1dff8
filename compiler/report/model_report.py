"""The model-level part of the report: per layer precision and error, size, MACs, latency.

    rows = layer_rows(original_gm, optimized_gm, args, kwargs)
    summary = model_summary(model, optimized_gm, original_gm, args, kwargs)

Errors per layer compare each layer's output in the optimized model with the
same value (matched by stable id) in the unoptimized graph, both run on the
example inputs; they include the error that flows in from earlier layers,
which is what a user of the optimized model sees.
"""
from __future__ import annotations

import collections
import math
import statistics
import time

import torch
from torch.fx import GraphModule, Node

from fxopt.core import fxops
from fxopt.core.bisect import record_values
from fxopt.core.drift import tensor_drift
from fxopt.core.ir import ID, LAYER, get_weight, op_name
from fxopt.core.macs import concrete_shape, macs_of
from fxopt.core.ops import OpKind, attention_parts, kind_of
from fxopt.quant import qops
from fxopt.report.timing import interleaved_medians
from fxopt.runtime import kernel_ops
from fxopt.runtime.input_check import input_specs

_FP32_UNITS = {fxops.linear_act: "linear", fxops.conv2d_act: "conv2d"}
_INT8_UNITS = {qops.quantized_linear: "linear", qops.quantized_conv2d: "conv2d",
               kernel_ops.linear_int8: "linear", kernel_ops.linear_int8_sparse: "linear",
               kernel_ops.linear_int4: "linear", kernel_ops.embedding_int4: "embedding",
               kernel_ops.linear_bf16: "linear",
               kernel_ops.conv2d_int8: "conv2d",
               qops.embedding_int8: "embedding", qops.quantized_attention: "attention",
               kernel_ops.attention_int8: "attention"}


def layer_kind(node: Node) -> str | None:
    """linear / conv2d / embedding / attention for a layer node in any of its forms, else None."""
    if node.op != "call_function":
        return None
    if node.target in _FP32_UNITS:
        return _FP32_UNITS[node.target]
    if node.target in _INT8_UNITS:
        return _INT8_UNITS[node.target]
    kind = kind_of(node)
    return {OpKind.LINEAR: "linear", OpKind.CONV: "conv2d", OpKind.EMBEDDING: "embedding",
            OpKind.ATTENTION: "attention"}.get(kind)


def int8_layers(gm: GraphModule) -> list[str]:
    """Names of the layers `gm` runs in int8, in graph order."""
    return [n.meta.get(LAYER, n.name) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _INT8_UNITS]


def node_macs(node: Node) -> int:
    """Multiply-accumulates of a node at the example sizes, whatever form it is in."""
    out = concrete_shape(node)
    if not out:
        return 0
    numel = math.prod(out)
    t = node.target
    if t in (fxops.linear_act, qops.quantized_linear):
        return numel * concrete_shape(node.args[1])[1]
    if t in kernel_ops.LINEARS:    # the dense count: what the layer computes (zeros included)
        return numel * int(node.args[6])
    if t in (fxops.conv2d_act, qops.quantized_conv2d):
        return numel * math.prod(concrete_shape(node.args[1])[1:])
    if t is kernel_ops.conv2d_int8:
        o, c, kh, kw, groups = node.args[5][:5]
        return numel * (c // groups) * kh * kw
    if t in (qops.quantized_attention, kernel_ops.attention_int8):
        q, k, _, _ = attention_parts(node)
        qs, ks = concrete_shape(q), concrete_shape(k)
        return math.prod(qs[:-1]) * ks[-2] * (qs[-1] + out[-1])
    try:
        return macs_of(node)
    except Exception:  # an op macs does not know: counted as cheap
        return 0


def layer_rows(original: GraphModule, optimized: GraphModule, args: tuple, kwargs: dict) -> list[dict]:
    """One row per linear/conv/embedding/attention layer of the optimized graph."""
    ids = {n.meta.get(ID) for n in optimized.graph.nodes if layer_kind(n) is not None}
    ref = record_values(original, args, kwargs, keep=ids)
    got = record_values(optimized, args, kwargs, keep=ids)
    rows = []
    for node in optimized.graph.nodes:
        kind = layer_kind(node)
        if kind is None:
            continue
        info = node.meta.get("fxopt_quant", {})
        int8 = node.target in _INT8_UNITS or info.get("int8", False)
        row = {"layer": node.meta.get(LAYER, node.name), "op": kind, "out_shape": list(concrete_shape(node)),
               "precision": _precision(node, info, int8),
               "why": info.get("reason") or ("no int8 rule for this op" if not int8 else ""),
               "macs": node_macs(node), "sqnr_db": None, "cosine": None}
        a, b = ref.get(node.meta.get(ID)), got.get(node.meta.get(ID))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
            d = tensor_drift(a.float(), b.float())
            row["sqnr_db"], row["cosine"] = d.sqnr_db, d.cosine
        rows.append(row)
    return rows


def _precision(node: Node, info: dict, int8: bool) -> str:
    """fp32, int8, int4 (weights; activations int8; the why column gives the group size) or
    bf16 (weights and activations, fp32 accumulation)."""
    if node.target is kernel_ops.linear_bf16:
        return "bf16"
    if node.target is kernel_ops.linear_int4 or info.get("bits") == 4:
        return "int4"
    return "int8" if int8 else "fp32"


def fp32_ops(optimized: GraphModule) -> dict:
    """Count of the remaining compute ops that run in fp32 (not layers), by op name."""
    compute = {OpKind.ATTENTION, OpKind.MATMUL, OpKind.LAYER_NORM, OpKind.BATCH_NORM, OpKind.SOFTMAX,
               OpKind.ACTIVATION, OpKind.ELEMENTWISE, OpKind.POOL, OpKind.REDUCE}
    counts = collections.Counter(op_name(n) for n in optimized.graph.nodes
                                 if n.op == "call_function" and kind_of(n) in compute and layer_kind(n) is None)
    return dict(counts.most_common())


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def graph_bytes(gm: GraphModule) -> int:
    """Bytes of the weights the graph actually reads."""
    seen = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = get_weight(gm, node)
            if isinstance(t, torch.Tensor):
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def median_latency(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() after `warmup` warm-up calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Why an op without an int8 layer rule stays fp32, where we measured it. Attention has a
# rule now (quantize_int8 -> fused int8 kernel); its rows in the layer table say int8 or
# fp32 and why.
FP32_WHY = {
    "matmul": "activation x activation products outside scaled_dot_product_attention have no "
              "int8 kernel",
    "bmm": "activation x activation products outside scaled_dot_product_attention have no "
           "int8 kernel",
}


def format_layers(rows: list[dict], fp32: dict) -> str:
    header = ("layer", "op", "out shape", "prec", "MMACs", "sqnr dB", "cosine", "why")
    table = [header]
    for r in rows:
        table.append((r["layer"], r["op"], "x".join(map(str, r["out_shape"])), r["precision"],
                      f"{r['macs'] / 1e6:.2f}", "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}",
                      "-" if r["cosine"] is None else f"{r['cosine']:.5f}", r["why"]))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if fp32:
        lines.append("other ops kept fp32: " + ", ".join(f"{k} x{v}" for k, v in fp32.items()))
        lines += [f"  {op}: {why}" for op, why in FP32_WHY.items() if op in fp32]
    return "\n".join(lines)


def change(before: float, after: float, less: str, more: str) -> str:
    """How `after` compares with `before`, as a factor in the right direction.

        change(2.0, 1.0, "smaller", "larger") -> "2.00x smaller"
        change(1.0, 1.37, "smaller", "larger") -> "1.37x larger"
    """
    if after > before:
        return f"{after / max(before, 1e-30):.2f}x {more}"
    return f"{before / max(after, 1e-30):.2f}x {less}"


def format_summary(s: dict) -> str:
    lines = [f"size: {s['fp32_bytes'] / 1e6:.2f} MB fp32 -> {s['optimized_bytes'] / 1e6:.2f} MB "
             f"({change(s['fp32_bytes'], s['optimized_bytes'], 'smaller', 'larger')})",
             f"MACs: {s['macs_original'] / 1e6:.1f} M -> {s['macs_optimized'] / 1e6:.1f} M "
             f"({100 * s['int8_macs'] / max(s['macs_optimized'], 1):.0f}% in int8)"]
    if s.get("inputs"):
        lines.append(format_inputs(s["inputs"], s.get("fixed_dims") or {}))
    if s.get("latency_original") is not None:
        lines.append(f"latency (example inputs, median of {s['latency_repeats']}): "
                     f"{s['latency_original'] * 1e3:.2f} ms -> {s['latency_optimized'] * 1e3:.2f} ms "
                     f"({change(s['latency_original'], s['latency_optimized'], 'faster', 'slower')})")
    return "\n".join(lines)


def format_inputs(specs: list, fixed: dict) -> str:
    """What sizes the optimized model takes: * for a dim that may change between calls, and
    the dims the model fixed although fxopt asked for them dynamic (a Flatten into a sized
    Linear fixes an image's height and width).

        format_inputs([{"name": "x", "shape": ["s0", 3, 32, 32]}], {"x": {2: 32, 3: 32}})
        -> "inputs (* = any size): x [*, 3, 32, 32]; fixed by the model: x dims 2, 3 (optimize
           again with inputs of the size you will call it with)"
    """
    shown = [f"{spec['name']} [{', '.join('*' if isinstance(d, str) or d is None else str(d) for d in spec['shape'])}]"
             for spec in specs if spec]
    text = "inputs (* = any size): " + ", ".join(shown)
    fixed = {name: dims for name, dims in fixed.items() if dims}
    if fixed:
        text += ("; fixed by the model: " + ", ".join(f"{name} dim{'s' if len(d) > 1 else ''} "
                                                       f"{', '.join(map(str, sorted(d)))}" for name, d in fixed.items())
                 + " (optimize again with inputs of the size you will call it with)")
    return text


def model_summary(model, original: GraphModule, optimized: GraphModule, args: tuple, kwargs: dict,
                  rows: list[dict], latency_repeats: int = 0) -> dict:
    """Size, MACs and (when latency_repeats > 0) median latency before and after."""
    macs_original = sum(node_macs(n) for n in original.graph.nodes if n.op == "call_function")
    macs_optimized = sum(node_macs(n) for n in optimized.graph.nodes if n.op == "call_function")
    summary = {"fp32_bytes": model_bytes(model), "optimized_bytes": graph_bytes(optimized),
               "macs_original": macs_original, "macs_optimized": macs_optimized,
               "int8_macs": sum(r["macs"] for r in rows if r["precision"] in ("int8", "int4")),
               "latency_original": None, "latency_optimized": None, "latency_repeats": latency_repeats,
               "inputs": input_specs(optimized) or [],
               "fixed_dims": optimized.meta.get("fxopt_capture", {}).get("static_dims", {})}
    if latency_repeats:
        summary["latency_original"], summary["latency_optimized"] = latency_pair(
            model, optimized, args, kwargs, latency_repeats)
    return summary


def latency_pair(model, optimized, args: tuple, kwargs: dict, repeats: int) -> tuple[float, float]:
    """Median seconds per call of `model` (eval mode) and `optimized`, timed taking turns, so
    that a change of machine load hits both alike and their ratio stays meaningful."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            med = interleaved_medians({"before": lambda: model(*args, **kwargs),
                                       "after": lambda: optimized(*args, **kwargs)},
                                      repeats=repeats, min_batch_s=1e-3, warmup=1)
    finally:
        model.train(was_training)
    return med["before"], med["after"]
