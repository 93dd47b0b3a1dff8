"""Per-op dimension maps for pruning-group tracing (used by fxopt.pruning.dependency).

A traced dimension is (dim, unit, reps): group index i covers `unit`
consecutive elements of dim `dim`, in each of `reps` tiles. For every op the
maps say where a traced input dim lands in the output (output_of) and which
input dims an output dim comes from (inputs_of). An op they cannot prove
safe raises Unsafe; Coarsen and Retile ask the tracer to restart with a
coarser unit (whole heads) or more tiles (a fused QKV split).
"""
from __future__ import annotations

import math

import sympy
import torch
from torch.fx import Node

from fxopt.core.ops import (OpKind, attention_parts, batch_norm_parts, is_expand, kind_of,
                       layer_norm_parts, padded_dims, permutation, reduced_dims,
                       shape_list_arg, split_dim)


class Unsafe(Exception):
    """The group cannot be proven safe to prune; the message says why."""


class Coarsen(Exception):
    """Restart with the unit `factor` times coarser (e.g. whole attention heads)."""
    def __init__(self, factor):
        self.factor = factor


class Retile(Exception):
    """The traced dim holds `factor` times more copies of the index space (a split
    or concat along it): restart with the seed's dim seen as that many tiles."""
    def __init__(self, factor):
        self.factor = factor


def group_widths(node, layout):
    """(input, output) channels per conv group of a grouped conv."""
    w = layout.weight.meta["val"].shape
    return int(w[1]), int(w[0]) // layout.groups


# --- per-op dimension maps ----------------------------------------------------------
# A map says which input dims an op's output dim comes from. Ops that keep each
# dim (elementwise, norms, pools, permutes) are handled by _links; reshapes,
# which may merge or split the traced dim, by _map_reshape.

def output_of(node, src, dim, unit, reps):
    kind = kind_of(node)
    if kind is OpKind.RESHAPE:
        out_dim, out_unit = _reshape_forward(node, src, dim, unit)
        _check_tiling_kept(node, reps, _shape(src)[dim], _shape(node)[out_dim])
        return out_dim, out_unit, reps
    if _splits_traced(node, dim, src):
        return dim, unit, reps          # the split node stands for its input
    if kind is OpKind.GETITEM and _splits_traced(src, dim):
        part, whole = _size(node, dim), _size(src.args[0], dim)
        return dim, unit, _tiles(reps * part, whole, node, retile=True)
    if kind is OpKind.CONCAT and _concat_dim(node) == dim:
        return dim, unit, _tiles(reps * _size(node, dim), _size(src, dim), node, retile=True)
    rank = rank_of(node) if kind is not OpKind.SPLIT else rank_of(src)
    first = None
    for out_dim in range(rank):
        try:
            links = _links(node, out_dim)
        except Unsafe as e:
            first = first or e
            continue
        if any(inp is src and in_dim == dim for inp, in_dim, _ in links):
            return out_dim, unit, reps
    raise first or Unsafe(f"{node.name} ({_opname(node)}) does not carry dim {dim} of {src.name}")


def inputs_of(node, dim, unit, reps):
    kind = kind_of(node)
    if kind is OpKind.RESHAPE:
        src = node.args[0]
        in_dim, in_unit = _reshape_backward(node, src, dim, unit)
        _check_tiling_kept(node, reps, _shape(src)[in_dim], _shape(node)[dim])
        return [(src, in_dim, in_unit, reps)]
    if _splits_traced(node, dim):
        return [(node.args[0], dim, unit, reps)]
    if kind is OpKind.GETITEM and _splits_traced(node.args[0], dim):
        split = node.args[0]
        whole, part = _size(split.args[0], dim), _size(node, dim)
        return [(split, dim, unit, _tiles(reps * whole, part, node, retile=False))]
    if kind is OpKind.CONCAT and _concat_dim(node) == dim:
        total = _size(node, dim)
        return [(t, dim, unit, _tiles(reps * _size(t, dim), total, node, retile=True))
                for t in node.args[0]]
    found = [(inp, in_dim, unit, reps) for inp, in_dim, out_dim in _links(node, dim) if out_dim == dim]
    if not found:
        raise Unsafe(f"{node.name} ({_opname(node)}) does not carry dim {dim} back to an input")
    return found


# --- splits and concats along the traced dim: the dim holds several tiles -----------

def _splits_traced(node, dim, src=None) -> bool:
    """A split/chunk of the traced dim (not unbind, which drops the dim)."""
    if not isinstance(node, Node) or kind_of(node) is not OpKind.SPLIT or _opname(node) == "unbind":
        return False
    x = node.args[0]
    return (src is None or x is src) and split_dim(node) % rank_of(x) == dim


def _concat_dim(node) -> int:
    return (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank_of(node)


def _tiles(numerator, denominator, node, retile) -> int:
    """numerator / denominator tiles; when not whole, retile the group so it is."""
    numerator, denominator = int(numerator), int(denominator)
    if numerator % denominator == 0:
        return numerator // denominator
    if retile:
        raise Retile(denominator // math.gcd(numerator, denominator))
    raise Unsafe(f"{node.name} splits or concatenates the pruned dim unevenly")


def _check_tiling_kept(node, reps, size_in, size_out):
    if reps != 1 and not _eq(size_in, size_out):
        raise Unsafe(f"{node.name} reshapes a dim made of several tiles")


def _size(node, dim) -> int:
    return _int(_expr(_shape(node)[dim]))


def _links(node, out_dim):
    """(input, input dim, output dim) triples of a dim-preserving op for output dim
    out_dim. Raises Unsafe for ops it cannot prove safe.
    """
    kind = kind_of(node)
    x = node.args[0] if node.args else None
    rank = rank_of(node) if kind is not OpKind.SPLIT else rank_of(x)
    dims = [out_dim]
    if kind in (OpKind.ACTIVATION, OpKind.DROPOUT, OpKind.IDENTITY, OpKind.SPLIT):
        if kind is OpKind.SPLIT and split_dim(node) % rank in dims:
            raise Unsafe(f"{node.name} splits along the pruned dim")
        return [(x, d, d) for d in dims]
    if kind is OpKind.GETITEM:
        if kind_of(x) is not OpKind.SPLIT:
            raise Unsafe(f"{node.name} indexes the output of {x.name}")
        return [(x, d, d) for d in dims]
    if kind is OpKind.ELEMENTWISE:
        return _broadcast_links(node, dims)
    if kind is OpKind.BATCH_NORM:
        return _batch_norm_links(node, dims)
    if kind is OpKind.LAYER_NORM:
        return _layer_norm_links(node, dims, rank)
    if kind is OpKind.POOL:
        return [(x, d, d) for d in dims if d < 2] + _refuse_dims(node, [d for d in dims if d >= 2])
    if kind is OpKind.PAD:
        return [(x, d, d) for d in dims if d not in padded_dims(node, rank)] + \
            _refuse_dims(node, [d for d in dims if d in padded_dims(node, rank)])
    if kind is OpKind.PERMUTE:
        perm = permutation(node, rank)
        return [(x, perm[d], d) for d in dims]
    if kind is OpKind.REDUCE:
        return _reduce_links(node, dims)
    if kind is OpKind.CONCAT:
        return _concat_links(node, dims)
    if kind is OpKind.ATTENTION:
        return _attention_links(node, dims)
    raise Unsafe(f"{node.name} ({_opname(node)}) has no pruning rule")


def _refuse_dims(node, dims):
    if dims:
        raise Unsafe(f"{node.name} ({_opname(node)}) mixes the pruned dim spatially")
    return []


def _broadcast_links(node, dims):
    rank = rank_of(node)
    links = []
    for inp in _tensor_args(node):
        shape = _shape(inp)
        for d in dims:
            in_dim = d - (rank - len(shape))
            if in_dim >= 0 and shape[in_dim] != 1:
                links.append((inp, in_dim, d))
    return links


def _batch_norm_links(node, dims):
    x, w, b, mean, var, _ = batch_norm_parts(node)
    links = [(x, d, d) for d in dims]
    if 1 in dims:
        links += [(p, 0, 1) for p in (w, b, mean, var) if isinstance(p, Node)]
    return links


def _layer_norm_links(node, dims, rank):
    parts = layer_norm_parts(node)
    if parts is None:
        raise Unsafe(f"{node.name} (group norm) mixes channels")
    x, shape, w, b = parts
    links = [(x, d, d) for d in dims]
    normalized = [d for d in dims if d >= rank - len(shape)]
    if normalized:
        if len(shape) != 1:
            raise Unsafe(f"{node.name} normalizes over several dims including the pruned one")
        links += [(p, 0, rank - 1) for p in (w, b) if isinstance(p, Node)]
    return links


def _reduce_links(node, dims):
    x = node.args[0]
    rank = rank_of(x)
    spec = reduced_dims(node, rank)
    if spec is None:
        raise Unsafe(f"{node.name} reduces every dim")
    reduced, keep = spec
    kept = [d for d in range(rank) if keep or d not in reduced]
    links = []
    for d in dims:
        in_dim = d if keep else kept[d]
        if in_dim in reduced:
            raise Unsafe(f"{node.name} reduces over the pruned dim")
        links.append((x, in_dim, d))
    return links


def _concat_links(node, dims):
    tensors = list(node.args[0])
    cat_dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank_of(node)
    if rank_of(tensors[0]) != rank_of(node):
        raise Unsafe(f"{node.name} stacks tensors")
    if cat_dim in dims:
        raise Unsafe(f"{node.name} concatenates along the pruned dim")
    return [(t, d, d) for t in tensors for d in dims]


def _attention_links(node, dims):
    q, k, v, mask = attention_parts(node)
    if any(d != 1 for d in dims) or rank_of(q) != 4:
        raise Unsafe(f"{node.name} would be cut inside a head (only whole heads are pruned)")
    links = [(q, 1, 1), (k, 1, 1), (v, 1, 1)]
    if isinstance(mask, Node) and _shape(mask)[1 - (4 - rank_of(mask))] != 1:
        raise Unsafe(f"{node.name} has a per-head attention mask")
    return links


# --- reshapes ---------------------------------------------------------------------

def _reshape_forward(node, src, dim, unit):
    if node.args[0] is not src:
        raise Unsafe(f"{node.name} uses {src.name} as a size")
    return _map_reshape(node, _shape(src), _shape(node), dim, unit, forward=True)


def _reshape_backward(node, src, dim, unit):
    return _map_reshape(node, _shape(node), _shape(src), dim, unit, forward=False)


def _map_reshape(node, from_shape, to_shape, dim, unit, forward):
    """Where dim `dim` (unit `unit`) of from_shape lands in to_shape (row-major reshape)."""
    if is_expand(node):
        shift = len(to_shape) - len(from_shape)
        to_dim = dim + shift
        if to_dim < 0 or not _eq(from_shape[dim], to_shape[to_dim]):
            raise Unsafe(f"{node.name} broadcasts the pruned dim")
        return to_dim, unit
    if kind_of(node) is OpKind.RESHAPE and shape_list_arg(node) is None and not _is_simple(node):
        raise Unsafe(f"{node.name} ({_opname(node)}) has literal sizes with no rewrite rule")
    size = from_shape[dim]
    prefix = _prod(from_shape[:dim])
    candidates = [o for o in range(len(to_shape)) if _eq(_prod(to_shape[:o]), prefix)]
    candidates = [o for o in candidates if not _eq(to_shape[o], 1)] or candidates
    if not candidates:
        raise Unsafe(f"{node.name} reshapes across the pruned dim")
    o = candidates[0]
    if _eq(to_shape[o], size):
        return o, unit
    # merged with trailing dims: one index now covers `inner` times more elements
    for k in range(dim + 2, len(from_shape) + 1):
        if _eq(_prod(from_shape[dim:k]), to_shape[o]):
            return o, unit * _int(_prod(from_shape[dim + 1:k]))
    # split into (to_shape[o], inner...): an index must cover whole rows of the inner dims
    for k in range(o + 2, len(to_shape) + 1):
        if _eq(_prod(to_shape[o:k]), size):
            inner = _int(_prod(to_shape[o + 1:k]))
            if unit % inner:
                raise Coarsen(lcm(unit, inner) // unit)
            return o, unit // inner
    raise Unsafe(f"{node.name} reshapes the pruned dim irregularly")


def _is_simple(node) -> bool:
    # flatten / unsqueeze / squeeze carry no literal sizes
    name = _opname(node)
    return name in ("flatten", "unsqueeze", "squeeze")


# --- shapes ------------------------------------------------------------------------

def _shape(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, Node) else None
    if not isinstance(val, torch.Tensor):
        raise Unsafe(f"{getattr(node, 'name', node)} has no tensor shape")
    return tuple(val.shape)


def rank_of(node) -> int:
    return len(_shape(node))


def _tensor_args(node):
    return [a for a in node.args if isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)]


def _expr(size):
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def _prod(sizes):
    out = sympy.Integer(1)
    for s in sizes:
        out = out * _expr(s)
    return out


def _eq(a, b) -> bool:
    return sympy.expand(_expr(a) if not isinstance(a, sympy.Expr) else a) == \
        sympy.expand(_expr(b) if not isinstance(b, sympy.Expr) else b)


def _int(expr) -> int:
    if not expr.is_Integer:
        raise Unsafe(f"symbolic block size {expr}")
    return int(expr)


def lcm(a, b) -> int:
    return a * b // math.gcd(a, b)


def _opname(node) -> str:
    target = getattr(node, "target", None)
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[1]
    return getattr(target, "__name__", str(target))
