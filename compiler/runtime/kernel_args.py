"""Checks of the weights and constants a lowered op hands to the Numba kernels.

The kernels trust their arguments (bounds checks would cost in the inner loops), and
a loaded model's buffers and op arguments come from a file. So every buffer a kernel
reads is checked against the sizes the op's arguments promise and the layout the
kernel reads, once per model: at load for every lowered op, and again when an op
first wraps its buffers (the cached wrap), whatever graph it came from.

    check_lowered(gm)        # ArtifactError naming the node if any op's buffers disagree
"""
from __future__ import annotations

import math

import torch
from torch import fx

from fxopt.core.errors import ArtifactError
from fxopt.kernels.dispatch import KernelError
from fxopt.kernels.pack import packed_nbytes
from fxopt.kernels.int4_pack import check_shapes as check_int4_shapes
from fxopt.kernels.bf16 import packed_size as packed_bf16_size
from fxopt.kernels.sparse import PackedSparse

# kernel ops whose named arguments must be weights of the graph
WEIGHT_ARGS = {"linear_int8": ("packed", "w_scale", "col_sums", "b"),
               "linear_int8_sparse": ("packed", "w_scale", "col_sums", "b"),
               "linear_int4": ("packed", "w_scale", "col_sums", "b"),
               "linear_bf16": ("packed", "w_scale", "col_sums", "b"),
               "conv2d_int8": ("packed", "w_scale", "col_sums", "b"),
               "embedding_int8": ("w_q", "w_scale"), "embedding_int4": ("packed", "w_scale"), "layer_norm": ("weight", "bias")}


class BadKernelArgs(ValueError):
    """A lowered op's buffers or constants do not fit the kernel; says which and how."""


def check_linear(packed, w_scale, col_sums, b, n, k) -> None:
    """linear_int8's buffers: packed (N x K int8 in the GEMM layout), per-channel scales,
    column sums and bias for N outputs."""
    _positive("n", n)
    _positive("k", k)
    _buffer("packed", packed, (torch.uint8, torch.int8), (packed_nbytes(n, k),))
    _per_channel(n, w_scale, col_sums, b)


def check_sparse_linear(packed, w_scale, col_sums, b, n, k) -> None:
    """linear_int8_sparse's buffers: packed (the slot layout's bytes, its indices inside
    K and N: kernels.sparse.PackedSparse.from_bytes checks them), scales, sums, bias."""
    _positive("n", n)
    _positive("k", k)
    if not (isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.dim() == 1
            and packed.device.type == "cpu" and packed.is_contiguous()):
        raise BadKernelArgs(f"packed must be a contiguous 1-D uint8 tensor (the sparse layout), got {_show(packed)}")
    _per_channel(n, w_scale, col_sums, b)
    try:
        PackedSparse.from_bytes(packed.numpy(), w_scale.numpy(), col_sums.numpy(), n, k, wide=False)
    except KernelError as e:
        raise BadKernelArgs(str(e)) from None


def check_int4_linear(packed, w_scale, col_sums, b, n, k) -> None:
    """linear_int4's buffers: packed nibbles (uint8, N padded to 8 by K / 2), scales float32
    (N, K / group) with a supported group size, col_sums int32 of that shape or empty, bias."""
    _positive("n", n)
    _positive("k", k)
    for name, t in (("packed", packed), ("w_scale", w_scale), ("col_sums", col_sums)):
        if not (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()):
            raise BadKernelArgs(f"{name} must be a contiguous CPU tensor, got {_show(t)}")
    try:
        check_int4_shapes(packed.numpy(), w_scale.numpy(), col_sums.numpy(), n, k)
    except KernelError as e:
        raise BadKernelArgs(str(e)) from None
    if b is not None:
        _buffer("bias", b, (torch.float32,), (n,))


def check_bf16_linear(packed, w_scale, col_sums, b, n, k) -> None:
    """linear_bf16's buffers: packed bf16 weights (1-D bfloat16, N padded to 16 by K), empty
    float32 scales and int32 sums (no quantization), bias."""
    _positive("n", n)
    _positive("k", k)
    _buffer("packed", packed, (torch.bfloat16,), (packed_bf16_size(n, k),))
    _buffer("w_scale", w_scale, (torch.float32,), (0,))
    _buffer("col_sums", col_sums, (torch.int32,), (0,))
    if b is not None:
        _buffer("bias", b, (torch.float32,), (n,))


def check_embedding_int4(packed, w_scale) -> None:
    """embedding_int4's table: packed uint8 (V, D / 2), scales float32 (V, D / group), group 32/64/128."""
    if not (isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8 and packed.dim() == 2
            and packed.is_contiguous()):
        raise BadKernelArgs(f"embedding_int4: packed must be a contiguous 2-D uint8 tensor, got {_show(packed)}")
    v, d = packed.shape[0], 2 * packed.shape[1]
    if not (isinstance(w_scale, torch.Tensor) and w_scale.dtype == torch.float32 and w_scale.dim() == 2
            and w_scale.shape[0] == v and w_scale.shape[1] > 0 and d % w_scale.shape[1] == 0
            and d // w_scale.shape[1] in (32, 64, 128)):
        raise BadKernelArgs(f"embedding_int4: w_scale must be float32 ({v}, {d} / group) with a group of "
                            f"32, 64 or 128, got {_show(w_scale)}")


def check_conv(packed, w_scale, col_sums, b, geometry, stride, padding, dilation) -> None:
    """conv2d_int8's buffers for geometry (O, C, kh, kw, groups, depthwise)."""
    if not (isinstance(geometry, (list, tuple)) and len(geometry) == 6):
        raise BadKernelArgs(f"geometry must be (O, C, kh, kw, groups, depthwise), got {geometry!r:.60}")
    o, c, kh, kw, groups, depthwise = geometry
    for name, v in zip(("O", "C", "kh", "kw", "groups"), geometry):
        _positive(name, v)
    if depthwise not in (0, 1) or c % groups or o % groups:
        raise BadKernelArgs(f"geometry {list(geometry)}: groups must divide O and C, depthwise be 0 or 1")
    for name, pair, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        sizes = (2, 4) if name == "padding" and (depthwise == 1 or groups == 1) else (2,)
        if not (isinstance(pair, (list, tuple)) and len(pair) in sizes
                and all(type(v) is int and low <= v < 2**31 for v in pair)):
            raise BadKernelArgs(f"{name} must be two ints >= {low} (padding of a dense or depthwise conv: or "
                                f"four, top, left, bottom, right), got {pair!r:.60}")
    if depthwise:
        if not groups == c == o:
            raise BadKernelArgs(f"a depthwise conv needs groups == C == O, got {list(geometry)}")
        _buffer("packed", packed, (torch.uint8, torch.int8), (o, kh * kw))   # int8 taps per channel
    else:
        per_group = packed_nbytes(o // groups, c // groups * kh * kw)
        _buffer("packed", packed, (torch.uint8, torch.int8), (groups, per_group))
    _per_channel(o, w_scale, col_sums, b)


def check_embedding(w_q, w_scale) -> None:
    if not (isinstance(w_q, torch.Tensor) and w_q.dtype == torch.int8 and w_q.dim() == 2):
        raise BadKernelArgs(f"the int8 table must be a 2-D int8 tensor, got {_show(w_q)}")
    _buffer("w_scale", w_scale, (torch.float32,), (w_q.shape[0],))


def check_lowered(gm: fx.GraphModule) -> None:
    """Every lowered kernel op of `gm` reads weights that fit its arguments."""
    for node in gm.graph.nodes:
        name = getattr(node.target, "_schema", None) and node.target._schema.name
        if node.op != "call_function" or not name or not name.startswith("fxopt::"):
            continue
        op = name.split("::")[1]
        try:
            _check_node(gm, node, op)
        except BadKernelArgs as e:
            raise ArtifactError(f"node {node.name} (fxopt::{op}): {e}") from None


def _check_node(gm, node, op) -> None:
    schema = node.target._schema
    given = dict(zip((a.name for a in schema.arguments), node.args), **node.kwargs)
    a = {arg.name: given.get(arg.name, arg.default_value) for arg in schema.arguments}
    for name in WEIGHT_ARGS.get(op, ()):
        if a[name] is not None:
            if not (isinstance(a[name], fx.Node) and a[name].op == "get_attr"):
                raise BadKernelArgs(f"{name} must be a weight of the model, got {a[name]!r:.40}")
            a[name] = _attr(gm, a[name].target)
    if op == "linear_int8":
        check_linear(a["packed"], a["w_scale"], a["col_sums"], a["b"], a["n"], a["k"])
        _quant_params(a["a_scale"], a["a_zp"])
        _quant_params(a["out_scale"], a["out_zp"])
    elif op == "linear_int8_sparse":
        check_sparse_linear(a["packed"], a["w_scale"], a["col_sums"], a["b"], a["n"], a["k"])
        _quant_params(a["a_scale"], a["a_zp"])
        _quant_params(a["out_scale"], a["out_zp"])
    elif op == "linear_int4":
        check_int4_linear(a["packed"], a["w_scale"], a["col_sums"], a["b"], a["n"], a["k"])
        _quant_params(a["a_scale"], a["a_zp"])
        _quant_params(a["out_scale"], a["out_zp"])
    elif op == "linear_bf16":
        check_bf16_linear(a["packed"], a["w_scale"], a["col_sums"], a["b"], a["n"], a["k"])
        if a["a_scale"] != 0:
            raise BadKernelArgs(f"a_scale must be 0 (the bf16 linear takes float activations), got {a['a_scale']!r:.40}")
        _quant_params(a["out_scale"], a["out_zp"])
    elif op == "conv2d_int8":
        check_conv(a["packed"], a["w_scale"], a["col_sums"], a["b"], a["geometry"], a["stride"],
                   a["padding"], a["dilation"])
        _quant_params(a["a_scale"], a["a_zp"])
    elif op == "embedding_int8":
        check_embedding(a["w_q"], a["w_scale"])
    elif op == "embedding_int4":
        check_embedding_int4(a["packed"], a["w_scale"])
    elif op == "layer_norm":
        for t in (a["weight"], a["bias"]):
            if t is not None and not (t.dtype == torch.float32 and t.dim() == 1):
                raise BadKernelArgs(f"layer_norm weight and bias must be 1-D float32, got {_show(t)}")


def _attr(gm, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _quant_params(scale, zero_point) -> None:
    if not (type(scale) in (int, float) and math.isfinite(scale)):
        raise BadKernelArgs(f"an activation scale must be a finite number, got {scale!r:.40}")
    if not (type(zero_point) is int and 0 <= zero_point <= 255):
        raise BadKernelArgs(f"an activation zero point must be an int in [0, 255], got {zero_point!r:.40}")


def _positive(name: str, v) -> None:
    if not (type(v) is int and 1 <= v < 2**31):
        raise BadKernelArgs(f"{name} must be a positive int, got {v!r:.40}")


def _per_channel(n: int, w_scale, col_sums, b) -> None:
    _buffer("w_scale", w_scale, (torch.float32,), (n,))
    _buffer("col_sums", col_sums, (torch.int32,), (n,))
    if b is not None:
        _buffer("bias", b, (torch.float32,), (n,))


def _buffer(name: str, t, dtypes: tuple, shape: tuple) -> None:
    """`t` a contiguous CPU tensor of one of `dtypes` and exactly `shape`."""
    if not (isinstance(t, torch.Tensor) and t.dtype in dtypes and tuple(t.shape) == shape
            and t.device.type == "cpu" and t.is_contiguous()):
        raise BadKernelArgs(f"{name} must be a contiguous {'/'.join(str(d) for d in dtypes)} tensor of "
                            f"shape {shape} for these sizes, got {_show(t)}")


def _show(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}"
    return f"{type(t).__name__} {t!r:.40}"
