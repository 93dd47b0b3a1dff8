"""One stable printed form of the IR, for dumps, diffs and golden tests.

Values are renamed %0, %1, ... in graph order and weights print as @name, so
two graphs that compute the same thing print the same whatever FX named their
nodes:

    %0 = input x : f32[s0, 8]
    %1 = linear(%0, @fc.weight, @fc.bias) : f32[s0, 4]
    return %1
"""
from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node

from fxopt.core.ir import op_name

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "bool", torch.float64: "f64"}


def format_ir(gm: GraphModule, ids: bool = False) -> str:
    """The graph as text: one line per value, weights and guards left out.

    ids=True appends each node's stable fxopt id, for lining up two stages.
    """
    names: dict[Node, str] = {}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            names[node] = f"@{node.target}"
            continue
        if node.op == "call_module":  # export's input guard, not part of the computation
            continue
        if node.op == "output":
            lines.append(f"return {_fmt_arg(node.args[0], names)}")
            continue
        names[node] = f"%{len([n for n in names.values() if n.startswith('%')])}"
        lines.append(_fmt_node(node, names, ids))
    return _normalize_symbols("\n".join(lines) + "\n")


def _normalize_symbols(text: str) -> str:
    """Rename export's shape symbols (s77, s31, ...) to s0, s1, ... by first appearance."""
    mapping: dict[str, str] = {}

    def rename(m):
        return mapping.setdefault(m.group(0), f"s{len(mapping)}")

    return re.sub(r"\bs\d+\b", rename, text)


def _fmt_node(node: Node, names: dict, ids: bool) -> str:
    if node.op == "placeholder":
        body = f"input {node.target}"
    else:
        args = [_fmt_arg(a, names) for a in node.args]
        args += [f"{k}={_fmt_arg(v, names)}" for k, v in sorted(node.kwargs.items())]
        body = f"{op_name(node)}({', '.join(args)})"
    line = f"{names[node]} = {body} : {format_type(node.meta.get('val'))}"
    if ids and "fxopt_id" in node.meta:
        line += f"  # {node.meta['fxopt_id']}"
    return line


def _fmt_arg(a, names: dict) -> str:
    if isinstance(a, Node):
        return names.get(a, f"?{a.name}")
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x, names) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return f"{a:.6g}"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    return repr(a) if isinstance(a, str) else str(a)


def format_type(val) -> str:
    """f32[s0, 8] for a tensor, the value's type name otherwise."""
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    if val is None:
        return "?"
    return type(val).__name__ if not isinstance(val, torch.SymInt) else f"sym({val})"
