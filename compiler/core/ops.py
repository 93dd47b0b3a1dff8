"""The one place that knows the op set.

Every ATen target a pass cares about is classified here into a small enum of
op kinds; passes match on kinds and the helpers below, never on raw
``node.target`` comparisons of their own.

    >>> kind_of(node) is OpKind.CONV
    >>> activation_of(gelu_node)
    Activation(name='gelu', args=())
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

aten = torch.ops.aten


class OpKind(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"
    WEIGHT = "weight"              # get_attr: a parameter, buffer or constant
    LINEAR = "linear"
    CONV = "conv"
    BATCH_NORM = "batch_norm"
    LAYER_NORM = "layer_norm"
    ACTIVATION = "activation"
    DROPOUT = "dropout"
    IDENTITY = "identity"          # clone / alias / detach: value-preserving copies
    ELEMENTWISE = "elementwise"    # add, mul, sub, div, ...
    MATMUL = "matmul"              # activation x activation products
    ATTENTION = "attention"        # scaled_dot_product_attention
    SOFTMAX = "softmax"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    CONCAT = "concat"
    SPLIT = "split"
    GETITEM = "getitem"
    POOL = "pool"
    REDUCE = "reduce"
    EMBEDDING = "embedding"
    SHAPE = "shape"                # sym_size and friends: shape arithmetic
    PAD = "pad"                    # constant/reflect padding of trailing dims
    FXOPT = "fxopt"                # an op of fxopt's own namespace
    OTHER = "other"


def _overloads(*packets) -> set:
    """All overloads of the given op packets, so `aten.add` covers add.Tensor etc."""
    out = set()
    for packet in packets:
        for name in packet.overloads():
            out.add(getattr(packet, name))
    return out


_KINDS: dict[OpKind, set] = {
    OpKind.LINEAR: _overloads(aten.linear),
    OpKind.CONV: _overloads(aten.conv2d, aten.conv1d, aten.convolution),
    OpKind.BATCH_NORM: _overloads(aten.batch_norm, aten._native_batch_norm_legit_no_training),
    OpKind.LAYER_NORM: _overloads(aten.layer_norm, aten.group_norm),
    OpKind.ACTIVATION: _overloads(
        aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.hardtanh, aten.hardtanh_,
        aten.relu6, aten.silu, aten.silu_, aten.sigmoid, aten.tanh, aten.hardswish,
        aten.hardsigmoid,
    ),
    OpKind.DROPOUT: _overloads(aten.dropout, aten.feature_dropout, aten.alpha_dropout),
    OpKind.IDENTITY: _overloads(aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy),
    OpKind.ELEMENTWISE: _overloads(
        aten.add, aten.add_, aten.sub, aten.mul, aten.mul_, aten.div, aten.neg,
        aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.where, aten.masked_fill,
    ),
    OpKind.MATMUL: _overloads(aten.matmul, aten.bmm, aten.mm, aten.addmm, aten.baddbmm),
    OpKind.ATTENTION: _overloads(aten.scaled_dot_product_attention),
    OpKind.SOFTMAX: _overloads(aten.softmax, aten._softmax, aten.log_softmax),
    OpKind.RESHAPE: _overloads(
        aten.view, aten.reshape, aten.flatten, aten.unflatten, aten.unsqueeze,
        aten.squeeze, aten.expand, aten._unsafe_view,
    ),
    OpKind.PERMUTE: _overloads(aten.permute, aten.transpose, aten.t),
    OpKind.CONCAT: _overloads(aten.cat, aten.stack),
    OpKind.SPLIT: _overloads(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind),
    OpKind.POOL: _overloads(
        aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.max_pool1d,
        aten.avg_pool1d, aten.adaptive_avg_pool1d,
    ),
    OpKind.REDUCE: _overloads(aten.mean, aten.sum, aten.amax),
    OpKind.EMBEDDING: _overloads(aten.embedding),
    OpKind.SHAPE: _overloads(aten.sym_size, aten.sym_numel, aten.sym_stride),
    OpKind.PAD: _overloads(aten.pad, aten.constant_pad_nd),
}
_KIND_OF_TARGET = {target: kind for kind, targets in _KINDS.items() for target in targets}


def kind_of(node: Node) -> OpKind:
    """The OpKind of an FX node."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "get_attr":
        return OpKind.WEIGHT
    if node.op != "call_function":
        return OpKind.OTHER
    if node.target is operator.getitem:
        return OpKind.GETITEM
    kind = _KIND_OF_TARGET.get(node.target)
    if kind is not None:
        return kind
    if getattr(node.target, "namespace", None) == "fxopt":
        return OpKind.FXOPT
    return OpKind.OTHER


def is_kind(node, *kinds: OpKind) -> bool:
    return isinstance(node, Node) and kind_of(node) in kinds


# --- activations -------------------------------------------------------------

@dataclass(frozen=True)
class Activation:
    """An elementwise activation an epilogue can apply: name plus float params.

    name is one of: relu, gelu (erf), gelu_tanh, hardtanh (args=(min, max)), silu.
    relu6 is hardtanh(0, 6).
    """
    name: str
    args: tuple = ()

    def __str__(self) -> str:
        return self.name if not self.args else f"{self.name}{list(self.args)}"


FUSABLE_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "hardtanh", "silu")


def activation_of(node: Node) -> Activation | None:
    """The epilogue-fusable activation a node computes, or None."""
    if not is_kind(node, OpKind.ACTIVATION):
        return None
    name = node.target._schema.name.split("::")[1].rstrip("_")
    if name == "relu":
        return Activation("relu")
    if name == "silu":
        return Activation("silu")
    if name == "relu6":
        return Activation("hardtanh", (0.0, 6.0))
    if name == "hardtanh":
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return Activation("hardtanh", (float(lo), float(hi)))
    if name == "gelu":
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return Activation("gelu_tanh" if approximate == "tanh" else "gelu")
    return None


def apply_activation(x: torch.Tensor, name: str, args=()) -> torch.Tensor:
    """Reference fp32 implementation of a fusable activation (used by fused ops)."""
    if name == "none" or not name:
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "hardtanh":
        return torch.nn.functional.hardtanh(x, float(args[0]), float(args[1]))
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {FUSABLE_ACTIVATIONS}")


# --- argument access -----------------------------------------------------------

def arg(node: Node, index: int, name: str, default=None):
    """Argument `name` of a call node, whether passed by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_eval_batch_norm(node: Node) -> bool:
    """A batch norm that normalises with running statistics (eval mode)."""
    if not is_kind(node, OpKind.BATCH_NORM):
        return False
    if node.target in _overloads(aten._native_batch_norm_legit_no_training):
        return True
    return arg(node, 5, "training", True) is False


def batch_norm_parts(node: Node):
    """(input, weight, bias, running_mean, running_var, eps) of an eval batch norm."""
    if node.target in _overloads(aten._native_batch_norm_legit_no_training):
        x, w, b, mean, var, _momentum, eps = node.args[:7]
    else:
        x, w, b, mean, var = node.args[:5]
        eps = arg(node, 7, "eps", 1e-5)
    return x, w, b, mean, var, eps


def conv_parts(node: Node) -> dict:
    """Normalised arguments of a conv node: input, weight, bias, stride, padding, dilation, groups."""
    if node.target in _overloads(aten.convolution):
        x, w, b, stride, padding, dilation, transposed, _out_pad, groups = node.args[:9]
        return dict(x=x, weight=w, bias=b, stride=stride, padding=padding,
                    dilation=dilation, groups=groups, transposed=transposed)
    return dict(
        x=node.args[0], weight=node.args[1], bias=arg(node, 2, "bias"),
        stride=arg(node, 3, "stride", 1), padding=arg(node, 4, "padding", 0),
        dilation=arg(node, 5, "dilation", 1), groups=arg(node, 6, "groups", 1),
        transposed=False,
    )


# --- weighted ops and shape arguments (used by structured pruning) -------------

@dataclass(frozen=True)
class WeightLayout:
    """Where a weighted op keeps its operands: input x, weight, bias, and which
    weight axis indexes output features (out_axis) and input features (in_axis).

    linear: W[out, in]; conv: W[out, in/groups, k...]; addmm/mm with a weight
    as second operand (GPT-2's Conv1D): W[in, out].
    """
    x: Node
    weight: Node
    bias: Node | None
    out_axis: int
    in_axis: int
    groups: int = 1


def weight_layout(node: Node) -> WeightLayout | None:
    """The WeightLayout of a linear, conv, or weight-times-activation addmm/mm; else None."""
    kind = kind_of(node) if isinstance(node, Node) else None
    if kind is OpKind.LINEAR:
        return WeightLayout(node.args[0], node.args[1], arg(node, 2, "bias"), 0, 1)
    if kind is OpKind.CONV:
        parts = conv_parts(node)
        if parts["transposed"]:
            return None
        return WeightLayout(parts["x"], parts["weight"], parts["bias"], 0, 1, int(parts["groups"]))
    if kind is OpKind.MATMUL and node.target in _overloads(aten.addmm):
        bias, x, w = node.args[:3]
        if len(node.args) > 3 or node.kwargs:
            return None  # beta/alpha scaling
        return WeightLayout(x, w, bias, 1, 0) if _is_attr(w) else None
    if kind is OpKind.MATMUL and node.target in _overloads(aten.mm):
        x, w = node.args[:2]
        return WeightLayout(x, w, None, 1, 0) if _is_attr(w) else None
    return None


def _is_attr(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


_SIZED_RESHAPES = _overloads(aten.view, aten.reshape, aten._unsafe_view, aten.expand)


def shape_list_arg(node: Node) -> int | None:
    """Index of the target-size list argument of view/reshape/expand (one entry per
    output dim, may hold -1 and symbolic sizes); None for other reshapes."""
    return 1 if isinstance(node, Node) and node.target in _SIZED_RESHAPES else None


def is_expand(node: Node) -> bool:
    return isinstance(node, Node) and node.target in _overloads(aten.expand)


def permutation(node: Node, rank: int) -> list | None:
    """For a permute/transpose/t node: perm with output dim o = input dim perm[o]."""
    if not is_kind(node, OpKind.PERMUTE):
        return None
    if node.target in _overloads(aten.permute):
        return [d % rank for d in node.args[1]]
    perm = list(range(rank))
    if node.target in _overloads(aten.t):
        return perm[::-1]
    a, b = node.args[1] % rank, node.args[2] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def reduced_dims(node: Node, rank: int) -> tuple[set, bool] | None:
    """(reduced dims, keepdim) of a mean/sum/amax node; None when it reduces everything."""
    dims = arg(node, 1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return {d % rank for d in dims}, bool(arg(node, 2, "keepdim", False))


def pad_parts(node: Node) -> dict:
    """Normalised arguments of a pad node: input, amounts (pairs from the last dim
    backward), mode and fill value (0.0 where the op's default is zero)."""
    if node.target in _overloads(aten.constant_pad_nd):
        return dict(x=node.args[0], amounts=list(node.args[1]), mode="constant",
                    value=arg(node, 2, "value", 0.0))
    value = arg(node, 3, "value", None)
    return dict(x=node.args[0], amounts=list(node.args[1]), mode=arg(node, 2, "mode", "constant"),
                value=0.0 if value is None else value)


def is_conv2d(node: Node) -> bool:
    """An aten.conv2d node (the arguments conv_parts normalises, in that order)."""
    return isinstance(node, Node) and node.target in _overloads(aten.conv2d)


def padded_dims(node: Node, rank: int) -> set:
    """The trailing dims a pad node pads (pad lists pairs from the last dim backward)."""
    return {rank - 1 - i for i in range(len(node.args[1]) // 2)}


def split_dim(node: Node) -> int:
    """The dim a split/chunk/unbind node splits along."""
    if node.target in _overloads(aten.unbind):
        return arg(node, 1, "dim", 0)
    return arg(node, 2, "dim", 0)


def layer_norm_parts(node: Node):
    """(input, normalized_shape, weight, bias) of aten.layer_norm; None for group_norm."""
    if node.target not in _overloads(aten.layer_norm):
        return None
    return node.args[0], list(node.args[1]), arg(node, 2, "weight"), arg(node, 3, "bias")


def attention_parts(node: Node):
    """(q, k, v, attn_mask) of scaled_dot_product_attention."""
    return node.args[0], node.args[1], node.args[2], arg(node, 3, "attn_mask")


def set_conv_groups(node: Node, groups: int) -> None:
    """Rewrite the groups argument of a conv node (conv1d/conv2d/convolution)."""
    index = 8 if node.target in _overloads(aten.convolution) else 6
    if len(node.args) > index:
        args = list(node.args)
        args[index] = groups
        node.args = tuple(args)
    elif node.target in _overloads(aten.convolution):
        raise ValueError(f"{node.name}: convolution without a groups argument")
    else:
        node.kwargs = {**node.kwargs, "groups": groups}
