"""The closed set of operators a saved model may call, and the arguments each accepts.

A model file is data, but its graph names the operators it runs: an operator that
opens a file (aten::from_file), writes into memory it shares with one (copy_ into
such a tensor), hands back uninitialized memory (empty), seeds or reads random state,
or moves tensors to another device would let a file read, write or leak what the user
never asked for. So loading accepts only the overloads listed here: the ops torch.export
leaves in the models fxopt optimizes, pure tensor math, and fxopt's own ops. Their
arguments are checked against each schema: tensors must be values of the graph, a
string must be one of the listed values, a device must be the CPU. An in-place
overload may only write a tensor the graph itself computed, never a weight, an input
or a view of one.

    check_graph(graph)          # ArtifactError naming the node and the op, or None

save runs the same check, so a model that saves is a model that loads.
"""
from __future__ import annotations

import torch
from torch import fx

from fxopt.artifact.graph_json import PY_FUNCTIONS
from fxopt.core.errors import ArtifactError
from fxopt.core.ir import storage_roots
from fxopt.core.ops import FUSABLE_ACTIVATIONS

ANY = None   # any string: a message, never a path or a name that is looked up

_PAD_MODES = ("constant", "reflect", "replicate", "circular")
_ACT = {"act": ("none", *FUSABLE_ACTIVATIONS, "relu6")}

# overload -> {string argument: allowed values}. Grouped by what the ops do.
ATEN = {name: {} for name in """
    linear.default conv2d.default addmm.default mm.default bmm.default matmul.default baddbmm.default
    scaled_dot_product_attention.default embedding.default dropout.default batch_norm.default
    layer_norm.default group_norm.default
    relu.default silu.default sigmoid.default tanh.default hardtanh.default hardswish.default
    hardsigmoid.default leaky_relu.default elu.default softplus.default mish.default relu6.default
    add.Tensor add.Scalar sub.Tensor sub.Scalar mul.Tensor mul.Scalar div.Tensor div.Scalar rsub.Scalar
    neg.default abs.default exp.default log.default sqrt.default rsqrt.default reciprocal.default
    pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar erf.default sin.default cos.default floor.default
    ceil.default round.default sign.default clamp.default clamp.Tensor clamp_min.default clamp_max.default
    maximum.default minimum.default where.self where.ScalarSelf where.ScalarOther where.Scalar
    eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor le.Scalar gt.Tensor gt.Scalar
    ge.Tensor ge.Scalar __and__.Tensor __or__.Tensor logical_not.default logical_and.default
    logical_or.default bitwise_not.default
    sum.dim_IntList sum.default mean.dim mean.default amax.default amin.default max.dim min.dim
    argmax.default argmin.default softmax.int _softmax.default log_softmax.int cumsum.default
    max_pool2d.default avg_pool2d.default adaptive_avg_pool2d.default adaptive_avg_pool1d.default
    upsample_nearest2d.vec upsample_bilinear2d.vec
    view.default reshape.default permute.default transpose.int t.default unsqueeze.default squeeze.dim
    squeeze.dims squeeze.default flatten.using_ints unflatten.int expand.default expand_as.default
    repeat.default contiguous.default clone.default slice.Tensor select.int narrow.default index.Tensor
    index_select.default gather.default cat.default stack.default split.Tensor split_with_sizes.default
    chunk.default unbind.int constant_pad_nd.default flip.default roll.default tril.default triu.default
    masked_fill.Scalar masked_fill.Tensor
    arange.default arange.start arange.start_step zeros.default ones.default full.default new_ones.default
    new_zeros.default new_full.default zeros_like.default ones_like.default full_like.default
    to.dtype to.dtype_layout to.device type_as.default _to_copy.default alias.default detach.default
    lift_fresh_copy.default sym_size.int sym_numel.default sym_stride.int
    _assert_tensor_metadata.default
    add_.Tensor mul_.Tensor relu_.default
""".split()}
ATEN.update({"gelu.default": {"approximate": ("none", "tanh")},
             "div.Tensor_mode": {"rounding_mode": ("trunc", "floor")},
             "pad.default": {"mode": _PAD_MODES},
             "_assert_scalar.default": {"assert_msg": ANY}})

FXOPT = {"linear_act.default": _ACT, "conv2d_act.default": _ACT, "quantized_linear.default": _ACT,
         "quantized_conv2d.default": _ACT, "linear_int8.default": _ACT, "linear_int8_sparse.default": _ACT,
         "linear_int4.default": _ACT, "linear_bf16.default": _ACT, "embedding_int4.default": {},
         "conv2d_int8.default": _ACT, "max_pool2d.default": {}, "global_avg_pool.default": {},
         "embedding_int8.default": {}, "quantized_attention.default": {}, "attention_int8.default": {},
         "layer_norm.default": {}, "nonfinite_samples.default": {}, "poison_samples_.default": {}}

ALLOWED = {**{f"aten::{k}": v for k, v in ATEN.items()}, **{f"fxopt::{k}": v for k, v in FXOPT.items()}}
ACT_ARGS = {"hardtanh": 2, "relu6": 2}   # activations that take (min, max); the rest take none
_PY_IDS = {id(fn) for fn in PY_FUNCTIONS.values()}   # plain functions: graph_json's fixed table


def overload_name(target) -> str | None:
    """'aten::linear.default' for an operator overload, None for anything else."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    return None


def check_graph(graph: fx.Graph) -> None:
    """Every call in `graph` is an allowed overload with arguments its schema and this module
    accept, or one of graph_json's fixed table of plain functions (operator.getitem, ...)."""
    for node in graph.nodes:
        if node.op != "call_function" or id(node.target) in _PY_IDS:
            continue
        name = overload_name(node.target)
        if name is None:
            raise ArtifactError(f"node {node.name} calls {node.target!r:.80}, which is not an operator "
                                "overload (e.g. 'aten::linear.default'); fxopt loads only the overloads "
                                "of fxopt.artifact.opset.ALLOWED")
        if name not in ALLOWED:
            raise ArtifactError(
                f"node {node.name} calls {name}, which is not among the operators fxopt loads "
                "(fxopt.artifact.opset.ALLOWED: tensor math and fxopt's own ops; nothing that "
                "opens files, touches devices or random state, or writes weights)")
        _check_arguments(node, node.target._schema, ALLOWED[name])


def _check_arguments(node: fx.Node, schema, strings: dict) -> None:
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(node.args) > len(positional):
        _refuse(node, f"takes at most {len(positional)} positional arguments, got {len(node.args)}")
    by_name = {a.name: a for a in schema.arguments}
    unknown = set(node.kwargs) - set(by_name)
    if unknown:
        _refuse(node, f"has no argument(s) {', '.join(sorted(unknown))}")
    given = dict(zip((a.name for a in positional), node.args))
    twice = set(given) & set(node.kwargs)
    if twice:
        _refuse(node, f"gets argument(s) {', '.join(sorted(twice))} twice")
    given.update(node.kwargs)
    for argument in schema.arguments:
        if argument.name not in given:
            if argument.default_value is None and not _optional(argument):
                _refuse(node, f"misses argument '{argument.name}'")
            continue
        value = given[argument.name]
        if not _fits(str(argument.real_type), value):
            _refuse(node, f"argument '{argument.name}' ({argument.type}) got {_show(value)}")
        if isinstance(value, str) and strings.get(argument.name, ()) is not ANY \
                and value not in strings.get(argument.name, ()):
            _refuse(node, f"argument '{argument.name}' = {value!r:.60} is not one of "
                          f"{strings.get(argument.name, ())}")
        if argument.alias_info is not None and argument.alias_info.is_write:
            _check_written(node, argument.name, value)
    if "act" in given and len(given.get("act_args") or ()) != ACT_ARGS.get(given["act"], 0):
        _refuse(node, f"activation {given['act']!r} takes {ACT_ARGS.get(given['act'], 0)} "
                      f"act_args, got {_show(given.get('act_args'))}")


def _optional(argument) -> bool:
    return str(argument.real_type).startswith("Optional[")


_SCALAR = (int, float, bool)
_KINDS = {
    "Tensor": lambda v: isinstance(v, fx.Node) or type(v) in _SCALAR,   # a number wraps to 0-dim
    "int": lambda v: (type(v) is int) or isinstance(v, fx.Node),
    "SymInt": lambda v: (type(v) is int) or isinstance(v, fx.Node),
    "float": lambda v: type(v) in (int, float) or isinstance(v, fx.Node),
    "bool": lambda v: type(v) is bool,
    "number": lambda v: type(v) in _SCALAR or isinstance(v, fx.Node),   # a Scalar
    "str": lambda v: isinstance(v, str),
    "ScalarType": lambda v: isinstance(v, torch.dtype),
    "Layout": lambda v: isinstance(v, torch.layout),
    "MemoryFormat": lambda v: isinstance(v, torch.memory_format),
    "Device": lambda v: isinstance(v, torch.device) and v.type == "cpu",
}


def _fits(kind: str, value) -> bool:
    """Whether `value` (decoded from a file) has the kind a schema type names."""
    if kind.startswith("Optional["):
        return value is None or _fits(kind[len("Optional["):-1], value)
    if kind.startswith("List["):
        return isinstance(value, (list, tuple)) and all(_fits(kind[len("List["):-1], v) for v in value)
    check = _KINDS.get(kind)
    return check is not None and check(value)


def _check_written(node: fx.Node, name: str, value) -> None:
    """An in-place op may write only a tensor the graph computed afresh."""
    roots = storage_roots(value) if isinstance(value, fx.Node) else {value}
    if any(not isinstance(r, fx.Node) or r.op != "call_function" for r in roots):
        _refuse(node, f"writes its argument '{name}' in place, and that tensor is (a view of) a "
                      "weight or an input; a loaded model may not change either")


def _show(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _refuse(node: fx.Node, why: str):
    raise ArtifactError(f"node {node.name} ({overload_name(node.target)}) {why}")
