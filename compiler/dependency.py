"""Which dimensions of a captured graph must be pruned together.

A group is a set of tensor dimensions that index the same channels: the
output features of the weighted ops that produce them, every op that carries
them along (activations, batch/layer norm, residual adds, reshapes, head
views and transposes, attention), and the input features of every weighted op
that consumes them. Group index i covers `unit` consecutive elements of each
member's dimension: 1 for a channel or neuron, head_dim for an attention head
(Q/K/V/O of one head are one index), H*W for a conv channel flattened into a
classifier.

    analysis = analyze(gm)
    for g in analysis.groups: print(g.name, g.kind, g.count, g.unit)
    for name, why in analysis.unsafe: print(name, why)    # left alone

Anything the tracer does not understand (model inputs or outputs, an op of
unknown semantics, a split or concat along the channel dim, a weight shared
elsewhere) makes the whole group unsafe: it is reported, never pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
from torch.fx import GraphModule, Node

from fxopt.ops import (OpKind, attention_parts, batch_norm_parts, is_expand, kind_of,
                       layer_norm_parts, padded_dims, permutation, reduced_dims,
                       shape_list_arg, split_dim, weight_layout)

ROLES = ("out", "in", "grouped", "param")


@dataclass(frozen=True)
class Member:
    """One weight a group cuts. role: out (a producer's weight rows and bias),
    in (a consumer's weight columns), grouped (a grouped or depthwise conv the group
    passes through: whole conv groups of rows, bias, and the groups argument),
    param (a weight the data path reads: BN/LN params, layer scale, position tables).
    `axis` is the weight axis cut, `unit` the elements per group index along it, and
    `reps` how many copies of the index space the axis holds (3 for a fused QKV
    projection that is split into Q, K and V). Reshape and split sizes and layer-norm
    shapes on the path are rewritten from `Group.slots`."""
    node: Node
    role: str
    axis: int
    unit: int
    reps: int = 1


@dataclass
class Group:
    name: str
    kind: str                     # "channels", "neurons" or "heads"
    count: int                    # prunable indices
    unit: int                     # elements per index at the producers
    members: list = field(default_factory=list)
    slots: dict = field(default_factory=dict)   # node -> (dim, unit, reps) on the data path

    @property
    def layers(self) -> list[str]:
        return sorted({_layer(m.node) for m in self.members if m.role in ("out", "in", "grouped")})

    def of_role(self, *roles) -> list[Member]:
        return [m for m in self.members if m.role in roles]


@dataclass
class Analysis:
    groups: list
    unsafe: list                  # (group name, reason)
    graph: nx.Graph = None        # one vertex per traced node, edges along the data path


class Unsafe(Exception):
    """The group cannot be proven safe to prune; the message says why."""


class _Coarsen(Exception):
    def __init__(self, factor):
        self.factor = factor


def analyze(gm: GraphModule, protect=(), heads: bool = True) -> Analysis:
    """Group every prunable dimension of `gm`; protected layer-name prefixes are never cut."""
    groups, unsafe, seen = [], [], set()
    dep_graph = nx.Graph()
    for node in gm.graph.nodes:
        layout = weight_layout(node)
        if layout is None or node in seen or layout.groups != 1:
            continue
        name = _layer(node)
        try:
            group = _trace_group(node, layout)
        except Unsafe as e:
            unsafe.append((name, str(e)))
            seen.add(node)
            continue
        seen.update(group.slots)
        seen.update(m.node for m in group.of_role("out"))
        reason = _refuse(group, protect, heads)
        if reason:
            unsafe.append((group.name, reason))
            continue
        dep_graph.add_edges_from(_edges(group))
        groups.append(group)
    return Analysis(groups, unsafe, dep_graph)


def _refuse(group, protect, heads) -> str | None:
    hit = [layer for layer in group.layers if any(_under(layer, p) for p in protect)]
    if hit:
        return f"protected layer {hit[0]}"
    if group.kind == "heads" and not heads:
        return "attention heads (heads=False)"
    if group.count < 2:
        return "fewer than two prunable indices"
    return None


def _under(layer: str, prefix: str) -> bool:
    return layer == prefix or layer.startswith(prefix + ".")


def _edges(group):
    for node in group.slots:
        for user in node.users:
            if user in group.slots:
                yield node.name, user.name


def _layer(node: Node) -> str:
    return node.meta.get("fxopt_layer") or node.name


# --- tracing -------------------------------------------------------------------

def _trace_group(seed: Node, layout) -> Group:
    out_dim = _rank(seed) - 1 if kind_of(seed) is not OpKind.CONV else 1
    width = int(layout.weight.meta["val"].shape[layout.out_axis])
    unit, reps = 1, 1
    for _ in range(8):
        try:
            tracer = _Tracer()
            tracer.run(seed, out_dim, unit, reps)
            return tracer.group(seed, width, unit, reps)
        except _Coarsen as c:
            unit *= c.factor
        except _Retile as r:
            reps *= r.factor
        if width % (unit * reps):
            raise Unsafe(f"block size {unit} x {reps} tiles does not divide width {width}") from None
    raise Unsafe("could not settle the pruning unit")


class _Retile(Exception):
    """The traced dim holds `factor` times more copies of the index space (a split
    or concat along it): restart with the seed's dim seen as that many tiles."""
    def __init__(self, factor):
        self.factor = factor


class _Tracer:
    def __init__(self):
        self.slots: dict = {}
        self.members: list = []
        self.queue: list = []

    def run(self, seed, dim, unit, reps):
        self.queue.append((seed, dim, unit, reps))
        while self.queue:
            node, dim, unit, reps = self.queue.pop()
            if node in self.slots:
                old_dim, old_unit, old_reps = self.slots[node]
                if old_dim != dim or old_reps != reps:
                    raise Unsafe(f"{node.name} is reached along two different dims or tilings")
                if old_unit != unit:
                    raise _Coarsen(_lcm(old_unit, unit) // min(old_unit, unit))
                continue
            self.slots[node] = (dim, unit, reps)
            self._backward(node, dim, unit, reps)
            for user in list(node.users):
                self._forward(user, node, dim, unit, reps)

    def group(self, seed, width, unit, reps) -> Group:
        kinds = {kind_of(n) for n in self.slots}
        producers = [m for m in self.members if m.role == "out"]
        kind = ("heads" if OpKind.ATTENTION in kinds else
                "channels" if any(kind_of(m.node) is OpKind.CONV for m in producers) else "neurons")
        members = list(dict.fromkeys(self.members))
        return Group(_layer(seed), kind, width // (unit * reps), unit, members, dict(self.slots))

    def push(self, node, dim, unit, reps):
        self.queue.append((node, dim, unit, reps))

    # A node's output carries the group at (dim, unit, reps): walk to its inputs.
    def _backward(self, node, dim, unit, reps):
        kind = kind_of(node)
        if kind is OpKind.INPUT:
            raise Unsafe(f"reaches model input {node.name}")
        if kind is OpKind.WEIGHT:
            self.members.append(Member(node, "param", dim, unit, reps))
            return
        layout = weight_layout(node)
        if layout is not None:
            self._producer(node, layout, dim, unit, reps)
            return
        for inp, in_dim, in_unit, in_reps in _inputs_of(node, dim, unit, reps):
            self.push(inp, in_dim, in_unit, in_reps)

    def _producer(self, node, layout, dim, unit, reps):
        channel_dim = 1 if kind_of(node) is OpKind.CONV else _rank(node) - 1
        if dim != channel_dim:
            raise Unsafe(f"{node.name} is reached along a non-feature dim {dim}")
        _check_private(layout.weight, node)
        if layout.bias is not None:
            _check_private(layout.bias, node)
        if layout.groups != 1:
            # a grouped conv passes whole conv groups through: rows out, groups in
            cin_g, cout_g = _group_widths(node, layout)
            if reps != 1:
                raise Unsafe(f"grouped conv {node.name} on a tiled dim")
            if unit % cout_g:
                raise _Coarsen(_lcm(unit, cout_g) // unit)
            self.members.append(Member(node, "grouped", 0, unit))
            self.push(layout.x, 1, unit // cout_g * cin_g, 1)
            return
        self.members.append(Member(node, "out", layout.out_axis, unit, reps))

    # `src` carries the group at (dim, unit, reps) and `user` reads it.
    def _forward(self, user, src, dim, unit, reps):
        kind = kind_of(user)
        if kind is OpKind.OUTPUT:
            raise Unsafe(f"reaches model output (via {src.name})")
        if kind is OpKind.SHAPE:
            if user.args[1] % _rank(src) == dim:
                raise Unsafe(f"{user.name} reads the pruned size")
            return
        layout = weight_layout(user)
        if layout is not None:
            self._consumer(user, layout, src, dim, unit, reps)
            return
        self.push(user, *_output_of(user, src, dim, unit, reps))

    def _consumer(self, user, layout, src, dim, unit, reps):
        if src is not layout.x:
            raise Unsafe(f"{src.name} is used as a weight by {user.name}")
        feature_dim = 1 if kind_of(user) is OpKind.CONV else _rank(src) - 1
        if dim != feature_dim:
            raise Unsafe(f"{user.name} reads the group along dim {dim}, not its features")
        if layout.groups != 1:
            cin_g, cout_g = _group_widths(user, layout)
            if reps != 1:
                raise Unsafe(f"grouped conv {user.name} on a tiled dim")
            if unit % cin_g:
                raise _Coarsen(_lcm(unit, cin_g) // unit)
            self.push(user, 1, unit // cin_g * cout_g, 1)
            return
        _check_private(layout.weight, user)
        self.members.append(Member(user, "in", layout.in_axis, unit, reps))


def _group_widths(node, layout):
    """(input, output) channels per conv group of a grouped conv."""
    w = layout.weight.meta["val"].shape
    return int(w[1]), int(w[0]) // layout.groups


def _check_private(weight, node):
    if len(weight.users) != 1:
        raise Unsafe(f"weight {weight.target} of {node.name} is shared with other ops")


# --- per-op dimension maps ----------------------------------------------------------
# A map says which input dims an op's output dim comes from. Ops that keep each
# dim (elementwise, norms, pools, permutes) are handled by _links; reshapes,
# which may merge or split the traced dim, by _map_reshape.

def _output_of(node, src, dim, unit, reps):
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
    rank = _rank(node) if kind is not OpKind.SPLIT else _rank(src)
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


def _inputs_of(node, dim, unit, reps):
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
    return (src is None or x is src) and split_dim(node) % _rank(x) == dim


def _concat_dim(node) -> int:
    return (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % _rank(node)


def _tiles(numerator, denominator, node, retile) -> int:
    """numerator / denominator tiles; when not whole, retile the group so it is."""
    numerator, denominator = int(numerator), int(denominator)
    if numerator % denominator == 0:
        return numerator // denominator
    if retile:
        raise _Retile(denominator // math.gcd(numerator, denominator))
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
    rank = _rank(node) if kind is not OpKind.SPLIT else _rank(x)
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
    rank = _rank(node)
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
    rank = _rank(x)
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
    cat_dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % _rank(node)
    if _rank(tensors[0]) != _rank(node):
        raise Unsafe(f"{node.name} stacks tensors")
    if cat_dim in dims:
        raise Unsafe(f"{node.name} concatenates along the pruned dim")
    return [(t, d, d) for t in tensors for d in dims]


def _attention_links(node, dims):
    q, k, v, mask = attention_parts(node)
    if any(d != 1 for d in dims) or _rank(q) != 4:
        raise Unsafe(f"{node.name} would be cut inside a head (only whole heads are pruned)")
    links = [(q, 1, 1), (k, 1, 1), (v, 1, 1)]
    if isinstance(mask, Node) and _shape(mask)[1 - (4 - _rank(mask))] != 1:
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
                raise _Coarsen(_lcm(unit, inner) // unit)
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


def _rank(node) -> int:
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


def _lcm(a, b) -> int:
    return a * b // math.gcd(a, b)


def _opname(node) -> str:
    target = getattr(node, "target", None)
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[1]
    return getattr(target, "__name__", str(target))
