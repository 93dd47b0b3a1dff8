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

from dataclasses import dataclass, field

import networkx as nx
from torch.fx import GraphModule, Node

from fxopt.core.ops import OpKind, kind_of, weight_layout
from fxopt.pruning.dim_maps import (Coarsen, Retile, Unsafe, group_widths, inputs_of, lcm, output_of,
                            rank_of)

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
    out_dim = rank_of(seed) - 1 if kind_of(seed) is not OpKind.CONV else 1
    width = int(layout.weight.meta["val"].shape[layout.out_axis])
    unit, reps = 1, 1
    for _ in range(8):
        try:
            tracer = _Tracer()
            tracer.run(seed, out_dim, unit, reps)
            return tracer.group(seed, width, unit, reps)
        except Coarsen as c:
            unit *= c.factor
        except Retile as r:
            reps *= r.factor
        if width % (unit * reps):
            raise Unsafe(f"block size {unit} x {reps} tiles does not divide width {width}") from None
    raise Unsafe("could not settle the pruning unit")


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
                    raise Coarsen(lcm(old_unit, unit) // min(old_unit, unit))
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
        for inp, in_dim, in_unit, in_reps in inputs_of(node, dim, unit, reps):
            self.push(inp, in_dim, in_unit, in_reps)

    def _producer(self, node, layout, dim, unit, reps):
        channel_dim = 1 if kind_of(node) is OpKind.CONV else rank_of(node) - 1
        if dim != channel_dim:
            raise Unsafe(f"{node.name} is reached along a non-feature dim {dim}")
        _check_private(layout.weight, node)
        if layout.bias is not None:
            _check_private(layout.bias, node)
        if layout.groups != 1:
            # a grouped conv passes whole conv groups through: rows out, groups in
            cin_g, cout_g = group_widths(node, layout)
            if reps != 1:
                raise Unsafe(f"grouped conv {node.name} on a tiled dim")
            if unit % cout_g:
                raise Coarsen(lcm(unit, cout_g) // unit)
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
            if user.args[1] % rank_of(src) == dim:
                raise Unsafe(f"{user.name} reads the pruned size")
            return
        layout = weight_layout(user)
        if layout is not None:
            self._consumer(user, layout, src, dim, unit, reps)
            return
        self.push(user, *output_of(user, src, dim, unit, reps))

    def _consumer(self, user, layout, src, dim, unit, reps):
        if src is not layout.x:
            raise Unsafe(f"{src.name} is used as a weight by {user.name}")
        feature_dim = 1 if kind_of(user) is OpKind.CONV else rank_of(src) - 1
        if dim != feature_dim:
            raise Unsafe(f"{user.name} reads the group along dim {dim}, not its features")
        if layout.groups != 1:
            cin_g, cout_g = group_widths(user, layout)
            if reps != 1:
                raise Unsafe(f"grouped conv {user.name} on a tiled dim")
            if unit % cin_g:
                raise Coarsen(lcm(unit, cin_g) // unit)
            self.push(user, 1, unit // cin_g * cout_g, 1)
            return
        _check_private(layout.weight, user)
        self.members.append(Member(user, "in", layout.in_axis, unit, reps))


def _check_private(weight, node):
    if len(weight.users) != 1:
        raise Unsafe(f"weight {weight.target} of {node.name} is shared with other ops")
