"""Find the first pass, then the first node within it, whose drift exceeds a tolerance.

    found = fxopt.bisect(model, (x,), target="cpu-fp32", tol=1e-4)
    found.pass_name, found.node_layer, found.node_drift

The pass is the first whose whole-model drift (against the unoptimized model
on the example inputs) exceeds `tol`. Within it, both the graph before and
the graph after the pass are run on the example inputs and every value is
compared by its stable id; the first node, in execution order, whose value
drifted past `tol` is the culprit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx._pytree as fx_pytree
from torch.fx import GraphModule, Interpreter

from fxopt.core.drift import Drift, tensor_drift
from fxopt.core.ir import ID, LAYER, float_value, op_name


@dataclass
class BisectResult:
    pass_name: str | None
    pass_index: int | None
    pass_drift: Drift | None
    node_name: str | None = None
    node_id: str | None = None
    node_layer: str | None = None
    node_op: str | None = None
    node_drift: Drift | None = None
    rewired_from: list | None = None   # layers the node read before the pass and no longer reads
    report: object = None

    @property
    def found(self) -> bool:
        return self.pass_name is not None

    def __str__(self) -> str:
        if not self.found:
            return "no pass drifted past the tolerance"
        text = f"first pass over tolerance: #{self.pass_index} {self.pass_name} ({self.pass_drift})"
        if self.node_name:
            text += (f"\nfirst node over tolerance: {self.node_name} [{self.node_op}] "
                     f"layer={self.node_layer} id={self.node_id} ({self.node_drift})")
            if self.rewired_from:
                text += f"\n  it no longer reads: {', '.join(self.rewired_from)} (removed or rewired by the pass)"
        else:
            text += "\nno single node drifted past the tolerance (the drift is spread out)"
        return text


def locate(gm: GraphModule, report, manager, tol: float, metric: str) -> BisectResult:
    """The first pass of a finished run (kept snapshots) whose drift exceeds `tol`, then
    the first node within it; `gm` is the run's final graph."""
    for record in report.records:
        if record.drift is not None and record.index > 0 and record.drift.exceeds(tol, metric):
            before = manager.snapshots[record.index]
            later = [i for i in manager.snapshots if i > record.index]
            after = manager.snapshots[min(later)] if later else gm
            result = BisectResult(record.name, record.index, record.drift, report=report)
            _first_node(result, before, after, manager.ctx, tol, metric)
            return result
    return BisectResult(None, None, None, report=report)


def _first_node(result: BisectResult, before: GraphModule, after: GraphModule, ctx, tol, metric):
    old = record_values(before, *ctx.probe_inputs)
    new_values = record_values(after, *ctx.probe_inputs)
    for node in after.graph.nodes:
        nid = node.meta.get(ID)
        if node.op != "call_function" or nid not in old or nid not in new_values:
            continue
        a, b = old[nid], new_values[nid]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            continue
        if not a.is_floating_point():
            continue
        d = tensor_drift(a, b)
        if d.exceeds(tol, metric):
            result.node_name, result.node_id = node.name, nid
            result.node_layer, result.node_op = node.meta.get(LAYER), op_name(node)
            result.node_drift = d
            result.rewired_from = _lost_inputs(before, node)
            return


def _lost_inputs(before: GraphModule, node) -> list:
    """Layers of the inputs the same node (by id) read before the pass but not after it."""
    twin = next((n for n in before.graph.nodes if n.meta.get(ID) == node.meta.get(ID)), None)
    if twin is None:
        return []
    now = {n.meta.get(ID) for n in node.all_input_nodes}
    return [f"{n.meta.get(LAYER)} [{op_name(n)}]" for n in twin.all_input_nodes
            if n.meta.get(ID) not in now and n.op == "call_function"]


def record_values(gm: GraphModule, args: tuple, kwargs: dict, keep=None) -> dict:
    """Every node's value on the given inputs, keyed by stable id (only ids in `keep` if given)."""
    values = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if ID in n.meta and (keep is None or n.meta[ID] in keep):
                values[n.meta[ID]] = float_value(n, out)
            return out

    flat = flat_inputs(gm, args, kwargs)
    with torch.no_grad():
        Recorder(gm).run(*flat)
    return values


def flat_inputs(gm: GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call gm(*args, **kwargs)."""
    spec = gm.graph._codegen.pytree_info.in_spec
    return fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), spec)
