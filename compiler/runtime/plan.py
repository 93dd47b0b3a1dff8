"""The call path of an optimized model: an execution plan built once from the lowered graph.

The lowered GraphModule is the IR: what passes rewrite, what the debugging tools print
and what fxopt.save writes. Calling it goes through torch's dispatcher for every op
(about 9 us per custom op), torch.export's generated guard and pytree glue. The plan
calls the same implementations without that: each graph node becomes one step, a
Python callable with its packed weights, scales and constants bound when the plan is
built, and the steps become one straight-line Python function (as FX generates
forward(), but calling the steps directly):

    plan = Plan(gm)
    y = plan(x)                 # == gm(x), bit for bit
    print(plan.profile(x))      # per step: op, layer, shapes, us, % of the call

install(gm) makes the plan the module's forward; gm.recompile() (any later graph edit)
puts the graph's own forward back. Inputs a plan cannot run (fake tensors, proxies,
tensor subclasses, anything requiring grad) take the graph path, so torch tools can
still trace and export an optimized model.
"""
from __future__ import annotations

import functools
import keyword
import operator
import statistics
import threading
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import fx

from fxopt.core import fxops
from fxopt.core.ir import storage_roots, storage_roots_of, value_dtypes
from fxopt.kernels import threads
from fxopt.kernels.finite import _nonfinite_sum
from fxopt.kernels.threads import launch_guard
from fxopt.quant import qops
from fxopt.runtime import kernel_ops, nonfinite
from fxopt.runtime.input_check import GUARD, InputCheck
from fxopt.runtime.memory import Memory, in_arena, planned_buffers
from fxopt.runtime.profile import Profile

__all__ = ["Plan", "install", "plan_of", "check_runtime", "RUNTIMES"]

RUNTIMES = ("plan", "graph")
PLAN_ATTR = "fxopt_plan"
aten = torch.ops.aten
Tensor = torch.Tensor

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)

# ATen ops whose Tensor-method form runs the same kernel with less Python glue
# (torch.ops.aten.view.default(x, s) costs about twice x.view(s)). Only exact equivalents.
_METHODS = {
    aten.view.default: Tensor.view,
    aten.reshape.default: Tensor.reshape,
    aten._unsafe_view.default: Tensor.view,
    aten.transpose.int: Tensor.transpose,
    aten.permute.default: Tensor.permute,
    aten.unsqueeze.default: Tensor.unsqueeze,
    aten.squeeze.dim: Tensor.squeeze,
    aten.expand.default: Tensor.expand,
    aten.select.int: Tensor.select,
    aten.contiguous.default: Tensor.contiguous,
    aten.clone.default: Tensor.clone,
    aten.split_with_sizes.default: Tensor.split_with_sizes,
    aten.sym_size.int: Tensor.size,
    aten.add.Tensor: operator.add,
    aten.sub.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul,
    aten.div.Tensor: operator.truediv,
    aten.relu.default: torch.relu,
    aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid,
}
# checks the tracer recorded about dtypes and devices it derived from the inputs, which the
# entry check (exact dtypes, CPU) already guarantees
_DROPPED = (aten._assert_tensor_metadata.default,)
_NO_KWARGS = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)


# --- the numpy domain --------------------------------------------------------------------
# Between kernels, activations stay numpy arrays: the kernels take and return them, and a
# view, transpose or split of an array costs a fraction of torch's (0.5 against 5 us
# measured for a view). Only layout ops, which move no value, run on both sides; every
# other op runs in torch, so the plan computes exactly what the graph computes.

def _np_unsqueeze(x, d):
    d = d if d >= 0 else d + x.ndim + 1
    return x.reshape(x.shape[:d] + (1,) + x.shape[d:])


def _np_split(x, sizes, dim=0):
    dim = dim if dim >= 0 else dim + x.ndim
    lead, parts, start = (slice(None),) * dim, [], 0
    for size in sizes:
        parts.append(x[lead + (slice(start, start + size),)])
        start += size
    return parts


def _np_split_size(x, size, dim=0):
    n = x.shape[dim]
    if not n or not size:
        return [x]
    return _np_split(x, [min(size, n - start) for start in range(0, n, size)], dim)


def _np_slice(x, dim=0, start=None, end=None, step=1):
    dim = dim if dim >= 0 else dim + x.ndim
    return x[(slice(None),) * dim + (slice(start, end, step),)]


def _np_select(x, dim, index):
    dim = dim if dim >= 0 else dim + x.ndim
    return x[(slice(None),) * dim + (index,)]


_NP_LAYOUT = {
    aten.view.default: np.ndarray.reshape,
    aten.reshape.default: np.ndarray.reshape,
    aten._unsafe_view.default: np.ndarray.reshape,
    aten.transpose.int: np.ndarray.swapaxes,
    aten.permute.default: np.ndarray.transpose,
    aten.unsqueeze.default: _np_unsqueeze,
    aten.split_with_sizes.default: _np_split,
    aten.split.Tensor: _np_split_size,
    aten.slice.Tensor: _np_slice,
    aten.select.int: _np_select,
    aten.sym_size.int: lambda x, d: x.shape[d],
}
# Integer and bool ops, which the attention masks of exported models are built with,
# compute the same values in numpy, at a fraction of torch's cost on such small
# tensors (an index of a 1x32 mask: about 50 us in torch inside a model's call).
# Each builder returns (fn, args, kwargs) on numpy arrays, or None where its case is
# not one numpy does the same way (then the op runs in torch).

def _numpy_twin(dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


def _np_to(gm, node):
    """to(x, dtype) on the CPU: x itself if it has that dtype (unless copy), else a cast."""
    bound = _bind(gm, node)
    device, layout = bound.get("device"), bound.get("layout")
    if (device is not None and torch.device(device).type != "cpu" or layout not in (None, torch.strided)
            or bound.get("memory_format") not in (None, torch.preserve_format) or bound.get("dtype") is None):
        return None
    dtype, copy = _numpy_twin(bound["dtype"]), bool(bound.get("copy"))
    return (lambda x: x.astype(dtype, copy=copy)), node.args[:1], {}


def _np_index(gm, node):
    """x[i, j, ...] with integer or bool index tensors (None: the whole dim), numpy's rules."""
    x, indices = node.args
    if any(isinstance(i, fx.Node) and _dtypes(i) not in _INDEX_DTYPES for i in indices):
        return None
    return (lambda x, idx: x[tuple(slice(None) if i is None else i for i in idx)]), (x, list(indices)), {}


def _np_and(gm, node):
    a, b = node.args
    if not all(isinstance(t, fx.Node) for t in (a, b)) or _dtypes(a) is None \
            or _dtypes(a) != _dtypes(b):
        return None
    return np.bitwise_and, (a, b), {}


def _np_expand(gm, node):
    """expand of an attention mask: the mask itself, which the attention kernel broadcasts
    to (B, H, Sq, Sk) as it reads it (stride 0 along each dim of size 1), as expand would."""
    if node.kwargs.get("implicit") or not all(
            u.target is kernel_ops.attention_int8 and u.kwargs.get("attn_mask") is node
            and node not in u.args for u in node.users):
        return None
    return _same_array, node.args[:1], {}


def _same_array(x):
    return x


_INDEX_DTYPES = tuple((False, (d,)) for d in (torch.int64, torch.int32, torch.bool))
_NP_EXACT = {aten.to.device: _np_to, aten.to.dtype_layout: _np_to, aten.to.dtype: _np_to,
             aten.index.Tensor: _np_index, aten.__and__.Tensor: _np_and, aten.bitwise_and.Tensor: _np_and,
             aten.expand.default: _np_expand}


def _integral(node: fx.Node, tensors: list) -> bool:
    """Whether node and its tensor arguments are integer or bool tensors, by their metadata."""
    found = [_dtypes(n) for n in [node] + tensors]
    return all(d is not None and not d[0] and not d[1][0].is_floating_point and not d[1][0].is_complex
               and d[1][0] in _NUMPY_DTYPES for d in found)


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.bool)


def _is_tensor(node) -> bool:
    """Whether node's value is a tensor (or a list of them): from its shape metadata, or, in
    a loaded graph, which has none, from its op's schema."""
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and bool(val)
                                                 and all(isinstance(v, torch.Tensor) for v in val))
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.target is operator.getitem:
        return _is_tensor(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is not None and bool(schema.returns) and all(
        str(r.type) in ("Tensor", "List[Tensor]") for r in schema.returns)


def _is_list(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, (list, tuple))
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(str(r.type) == "List[Tensor]" for r in schema.returns)


def _tensor_args(node: fx.Node) -> list:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _is_tensor(n) else None)
    return found


def _dtypes(node) -> tuple | None:
    """(whether node's value is a list of tensors, their dtypes), by its metadata (ir's
    value_dtypes); in a loaded graph, the dtypes the file kept, where its op's schema
    agrees that the value is a tensor, or a list of them (None where it does not)."""
    known = value_dtypes(node)
    if known is None or node.meta.get("val") is not None:
        return known
    return known if _is_tensor(node) and known[0] == _is_list(node) else None


def _numpy_dtype(node: fx.Node):
    """True if node's dtype has a numpy twin, False if not, None if unknown (no metadata)."""
    known = _dtypes(node)
    if known is None:
        return None
    return all(d in _NUMPY_DTYPES for d in known[1])


def _one_float(nodes) -> bool:
    """Whether `nodes` (a screen's inputs) is one float32 or float64 tensor, by its metadata."""
    if not isinstance(nodes, (list, tuple)) or len(nodes) != 1 or not isinstance(nodes[0], fx.Node):
        return False
    return _dtypes(nodes[0]) in ((False, (torch.float32,)), (False, (torch.float64,)))


def _float32(node: fx.Node) -> bool:
    return _dtypes(node) == (False, (torch.float32,))


def _to_numpy(t: torch.Tensor):
    """t as a numpy array (sharing memory), or a float32 copy for dtypes numpy lacks
    (bfloat16): for kernel inputs, which the kernels take as float32 anyway."""
    return t.numpy() if t.dtype in _NUMPY_DTYPES else t.float().numpy()


class Step:
    """One node of the graph as the plan calls it: fn(*args, **kwargs), where args hold
    nodes (the values of earlier steps) and constants; a kernel step's weights are bound
    into fn, so its args are the activations only."""
    __slots__ = ("node", "fn", "kernel", "args", "kwargs", "domain", "out_domain")

    def __init__(self, node: fx.Node, fn, kernel: bool, args=None, kwargs=None, domain="torch",
                 out_domain=None):
        self.node, self.fn, self.kernel, self.domain = node, fn, kernel, domain
        self.out_domain = out_domain or domain     # where its inputs are, where its output is
        self.args = node.args if args is None else args
        self.kwargs = node.kwargs if kwargs is None else kwargs

    @property
    def op(self) -> str:
        target = self.node.target
        return getattr(target, "__name__", str(target)) if self.node.op != "call_module" else "input check"


class Plan:
    """Straight-line Python over the graph's nodes, with weights bound once (see module doc)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.steps: list[Step] = []
        self._globals: dict = {"_fx_graph": None, "_fx_tree_flatten_spec": fx_pytree.tree_flatten_spec,
                               "_fx_tree_unflatten": pytree.tree_unflatten, "_fx_Tensor": torch.Tensor}
        self._globals["_fx_from_numpy"], self._globals["_fx_to_numpy"] = torch.from_numpy, _to_numpy
        self._globals["_fx_finite_sum"] = _nonfinite_sum
        forward = type(gm).forward
        if forward is not _planned_forward:       # the graph's own forward: the path for other inputs
            self._globals["_fx_graph"] = functools.partial(forward, gm)
        self.memory = None             # the activation arenas (see Memory)
        self._names: dict = {}
        self._home: dict = {}          # node -> the domain its step made it in: 'torch' or 'np'
        self._converted: dict = {}     # (node, domain) -> name of its value converted there
        self._checked: dict = {}       # graph input -> its rules in the input check already run
        params, body, calls = self._generate()
        head = f"({', '.join(params)}):\n    "
        timed = [line if i not in calls else calls[i] for i, line in enumerate(body)]
        self.source = "def _fx_run" + head + "\n    ".join(body) + "\n"
        source = self.source + "def _fx_run_timed" + head + "\n    ".join(timed) + "\n"
        exec(compile(source, "<fxopt plan>", "exec"), self._globals)   # our own source: names and calls
        self._run, self._run_timed = self._globals["_fx_run"], self._globals["_fx_run_timed"]

    # --- building --------------------------------------------------------------------

    def _const(self, value) -> str:
        name = f"_fx_c{len(self._globals)}"
        self._globals[name] = value
        return name

    def _generate(self):
        """(run()'s parameters, its body lines, {line: the same call timed})."""
        gm = self.gm
        info = getattr(gm.graph._codegen, "pytree_info", None)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        params, flat = _signature(info, placeholders)
        if not all(p.isidentifier() and not keyword.iskeyword(p) for p in params):
            raise ValueError(f"graph input names must be Python identifiers, got {params}")
        if any(p.startswith("_fx_") for p in params):
            raise ValueError(f"input names starting with _fx_ are reserved: {params}")
        for i, node in enumerate(placeholders):
            self._names[node] = params[i] if flat else f"_fx_a{i}"
            self._home[node] = "torch"
        leaves = [self._names[n] for n in placeholders]
        body, calls = [], {}
        self._body = body
        if not flat and leaves:
            body.append(f"{', '.join(leaves)}, = _fx_tree_flatten_spec({_packed_inputs(info, params)}, "
                        f"{self._const(info.in_spec)})")
        # inputs the plan cannot run take the graph path (fake tensors, proxies, grad)
        tensors = [v for n, v in zip(placeholders, leaves) if _is_tensor(n)]
        if tensors:
            test = " or ".join(f"type({v}) is not _fx_Tensor or {v}.requires_grad" for v in tensors)
            body.append(f"if {test}: return _fx_graph({', '.join(params)})")
        planned = planned_buffers(gm)
        slots = {node: j for j, node in enumerate(planned)}     # node -> its buffer in the arena
        shaped = self.shape_values = ShapeValues(gm, placeholders)
        if planned or shaped.frontier:          # the input shapes: what arenas and shape values are kept by
            body.append(f"_fx_k = ({''.join(f'{v}.shape, ' for v in tensors)})")
        if planned:
            self.memory = Memory(list(planned.values()))
            self._globals["_fx_arena"] = self.memory.arena
            body.append("_fx_m = _fx_arena(_fx_k)")
        screen = None       # a screen of one float input, held back in case the next step fuses it
        dead, pending = _last_uses(gm.graph), ()
        unpacked = False
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            # values whose last use was the step before are let go: the allocator hands their
            # memory, still in cache, to the next outputs (as torch.fx's own forward does)
            self._free(pending, body)
            pending = dead.get(node, ())
            if node.op == "get_attr":          # a weight: its name in the plan's globals, no line
                self._names[node], self._home[node] = self._const(_attr(gm, node.target)), "torch"
                continue
            if node in shaped.cached:          # computed once per input shapes (see ShapeValues)
                continue
            if shaped.frontier and not unpacked and any(a in shaped.frontier for a in node.all_input_nodes):
                body.append(shaped.line(self, leaves))
                unpacked = True
            name = self._names[node] = f"_fx_v{len(self._names)}"
            self._home[node] = "torch"
            step = self._step(node)
            if step is None:            # dropped check (it has no users)
                continue
            # a linear that quantizes the screened input whole tells whether it is finite
            fused = screen is not None and _reads_first(node, step, screen.node)
            if screen is not None and not fused:
                screen.emit(self, body, calls)
                screen = None
            index, fn = len(self.steps), f"_fx_s{len(self.steps)}"
            self.steps.append(step)
            if step.fn is _np_nonfinite and _one_float(node.args[0]):
                # one float input: its finite sum inline (0 when every value is finite), the
                # per-sample screen only when it is not; held back one step (see fused), its
                # arguments rendered then (a fused linear may read the input as a tensor)
                self._globals[fn] = step.fn
                self._home[node] = step.out_domain
                screen = _Screen(node.args[0][0], name, fn, index, step.args, step.kwargs)
                continue
            # a fused linear reading a graph input no step has made a numpy array of takes
            # the tensor (screened_tensor: no numpy view made, 0.55 us a call)
            tensor_in = fused and hasattr(step.fn, "screened_tensor") and self._only_torch(screen.node)
            call = (step.fn.screened_tensor if tensor_in else step.fn.screened) if fused else step.fn
            if tensor_in and self._checked_rows(screen.node, step.fn.k):
                call = step.fn.screened_checked      # what the input check holds it to, not again
            domain = "torch" if tensor_in else step.domain
            args = ([self._render(a, domain) for a in step.args]
                    + [f"{k}={self._render(v, domain)}" for k, v in step.kwargs.items()])
            if node in slots and step.domain == "np":     # its output goes in the arena
                call = step.fn = in_arena(call)
                args = ["_fx_m", str(slots[node])] + args
            self._globals[fn] = call
            self._home[node] = step.out_domain
            out = f"{name}, _fx_f{index}" if fused else name
            timed = f"{out} = _fx_timed({index}, {', '.join([fn] + args)})"
            calls[len(body)] = timed
            if fused:
                body.append(f"{out} = {fn}({', '.join(args)})")
                screen.emit(self, body, calls, f"_fx_f{index} == 0")
                screen = None
            elif node.target is nonfinite.poison_samples_ and len(args) == 2:    # no call when all is finite
                body.append(f"{name} = {args[0]} if {args[1]} is None else {fn}({', '.join(args)})")
            else:
                body.append(f"{name} = {fn}({', '.join(args)})")
        if screen is not None:
            screen.emit(self, body, calls)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        body.append(f"return {self._output(output.args[0], info)}")
        return params, body, calls

    def _free(self, nodes, body: list) -> None:
        """A line dropping the plan's names for `nodes` (and their conversions)."""
        names = [self._names[n] for n in nodes if n in self._names]      # not values kept per shape
        names += [v for (n, _), v in self._converted.items() if n in nodes]
        if names:
            body.append(" = ".join(names) + " = None")

    def _checked_rows(self, node: fx.Node, k: int) -> bool:
        """Whether the input check, run before, holds graph input node to a CPU float32
        (M, k) tensor (it checks every input's device)."""
        rules = self._checked.get(node)
        return rules is not None and rules[0] is torch.float32 and rules[1] == 2 and (1, k) in rules[2]

    def _only_torch(self, node: fx.Node) -> bool:
        """Whether the plan holds node's value as a torch tensor and no numpy view of it."""
        return self._home.get(node, "torch") == "torch" and (node, "np") not in self._converted

    def _in(self, node: fx.Node, domain: str, inline: fx.Node | None = None) -> str:
        """The name of node's value in `domain` ('torch' or 'np'), converting it (once, in
        the line after its first use needs it) where it was made in the other; for node
        `inline`, not yet converted, a numpy conversion in the expression instead."""
        if self._home.get(node, "torch") == domain or not _is_tensor(node):
            return self._names[node]
        if node is inline and domain == "np" and (node, domain) not in self._converted:
            return f"_fx_to_numpy({self._names[node]})"
        key = (node, domain)
        if key not in self._converted:
            name = self._converted[key] = f"_fx_{domain}{len(self._converted)}"
            source = self._names[node]
            if _is_list(node):        # a split's pieces: each converted
                convert = "_fx_from_numpy" if domain == "torch" else "_fx_to_numpy"
                line = f"{name} = [{convert}(t) for t in {source}]"
            elif domain == "torch":
                line = f"{name} = _fx_from_numpy({source})"
            elif _numpy_dtype(node):
                line = f"{name} = {source}.numpy()"
            else:
                line = f"{name} = _fx_to_numpy({source})"
            self._body.append(line)
        return self._converted[key]

    def _render(self, a, domain: str = "torch", inline: fx.Node | None = None) -> str:
        if isinstance(a, fx.Node):
            return self._in(a, domain, inline)
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self._render(x, domain, inline) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or type(a) in (bool, int):
            return repr(a)
        return self._const(a)

    def _output(self, out, info) -> str:
        rendered = self._render(out)
        if info is None or info.out_spec is None:
            return rendered
        spec = info.out_spec
        if spec.is_leaf():
            return f"{rendered}[0]" if isinstance(out, (list, tuple)) else rendered
        if spec.type in (tuple, list) and all(c.is_leaf() for c in spec.children()):
            return f"{'tuple' if spec.type is tuple else 'list'}({rendered})"
        return f"_fx_tree_unflatten({rendered}, {self._const(spec)})"

    def _step(self, node: fx.Node):
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if node.target == GUARD and isinstance(module, InputCheck):
                self._checked.update((x, r) for x, r in zip(node.args, module._rules) if r is not None)
                return Step(node, module.fast_check(), False)     # no nn.Module call around it
            return Step(node, module, False)
        if node.op == "call_method":
            return Step(node, operator.methodcaller(node.target), False)
        target = node.target
        if target in _DROPPED:
            return None
        tensors = _tensor_args(node)
        build = _NP_BUILDERS.get(target)
        if build is not None:                       # a kernel on numpy arrays
            fn, args, kwargs = build(self.gm, node)
            return Step(node, fn, True, args, kwargs, domain="np", out_domain=_NP_OUT.get(target, "np"))
        if target is aten.add.Tensor and not node.kwargs and len(tensors) == 2 and all(
                self._home.get(t) == "np" and _float32(t) for t in tensors):
            return Step(node, np.add, False, domain="np")       # IEEE float32 sum: the same bits
        if target is operator.getitem or target in _NP_LAYOUT:   # where its input already is
            made_in_numpy = bool(tensors) and self._home.get(tensors[0]) == "np"
            if made_in_numpy and target is operator.getitem:
                return Step(node, target, False, domain="np")
            if made_in_numpy:                       # kernel outputs: float32 or uint8
                return Step(node, _NP_LAYOUT[target], False, domain="np")
        build = _NP_EXACT.get(target)
        if build is not None and _integral(node, tensors):
            got = build(self.gm, node)
            if got is not None:                     # integer and bool ops: numpy's are the same
                return Step(node, got[0], False, got[1], got[2], domain="np")
        build = _BUILDERS.get(target)
        if build is not None:
            fn, args, kwargs = build(self.gm, node)
            return Step(node, fn, True, args, kwargs)
        if target in _METHODS and not (target in _NO_KWARGS and node.kwargs):
            return Step(node, _METHODS[target], False)
        return Step(node, target, False)

    # copies and pickles of the module run its graph (a plan holds compiled code)
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_none, ())

    # --- calling ---------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        if threads.THREADSAFE:              # known once a kernel ran: no turns to take
            return self._run(*args, **kwargs)
        with launch_guard():
            return self._run(*args, **kwargs)

    def profile(self, *args, repeats: int | None = None, **kwargs) -> "Profile":
        """Time each step over `repeats` calls after one warm-up call (see Profile): the
        median per step, of the steps' sum within a call, and of whole calls, timed and
        untimed. A step's time leaves out what reading the clock adds. repeats None: as
        many as fill about PROFILE_SECONDS, PROFILE_REPEATS[0] to [1] (the time outside
        the kernels is a small difference of two medians: BERT-base 1x32 gave 0.0-6.4 % of
        the call over 20 calls, 3.8-4.5 % over 180; AMD EPYC, a loaded VM)."""
        clock = time.perf_counter
        self(*args, **kwargs)
        if repeats is None:     # sized on a warm call: the first may compile or load kernels
            start = clock()
            self(*args, **kwargs)
            low, high = PROFILE_REPEATS
            repeats = int(min(high, max(low, PROFILE_SECONDS / 2 / max(clock() - start, 1e-9))))
        runs = []
        shapes = [None] * len(self.steps)
        ticks = [clock() for _ in range(101)]       # what reading the clock adds to each step
        tick = statistics.median(b - a for a, b in zip(ticks, ticks[1:]))

        def timed(_i, _f, /, *a, **k):
            start = clock()
            out = _f(*a, **k)
            steps[_i] += max(clock() - start - tick, 0.0)
            if shapes[_i] is None:     # its description, not the output: the plan lets outputs go
                shapes[_i] = _shape_of(out)
            return out
        self._globals["_fx_timed"] = timed
        calls, plain = [], []
        for _ in range(max(1, repeats)):
            steps = [0.0] * len(self.steps)
            with launch_guard():
                start = clock()
                self._run_timed(*args, **kwargs)
                calls.append(clock() - start)
            runs.append(steps)
            start = clock()
            self(*args, **kwargs)
            plain.append(clock() - start)
        self._globals["_fx_timed"] = None
        outputs = [("", "") if out is None else out for out in shapes]
        return Profile(self, runs, outputs, statistics.median_high(calls), statistics.median_high(plain))


PROFILE_SECONDS = 2.0          # Plan.profile's default length: timed and untimed calls
PROFILE_REPEATS = (20, 200)


def _last_uses(graph: fx.Graph) -> dict:
    """{node: the values (not inputs, weights or outputs) whose last use is node}."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    dead: dict = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr", "output") or not n.users \
                or any(u.op == "output" for u in n.users):
            continue
        dead.setdefault(max(n.users, key=order.__getitem__), []).append(n)
    return dead


class ShapeValues:
    """The values a graph computes from its inputs' shapes alone, once per input shapes.

    Exported models build position ids, masks and sizes from the input's shape: arange,
    new_ones, comparisons and views of them (BERT's attention mask: a dozen small torch
    ops per call). A node is shape-only when it is a pure ATen op (or getitem) whose
    arguments are weights, other shape-only values, or the size of an input. The plan
    computes them, the first time it sees a signature of input shapes, as the graph
    would (each op on its arguments), and keeps them (a few signatures, MAX_SIGNATURES;
    the oldest goes first). Values a graph output may alias or an op may write are not
    kept: the user gets fresh tensors, and nothing written is shared between calls."""
    MAX_SIGNATURES = 8

    def __init__(self, gm: fx.GraphModule, placeholders: list):
        self.gm, self.placeholders = gm, placeholders
        found = _shape_only(gm.graph)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        shared = storage_roots_of(output.args)        # storage a graph output may alias, or an op may write
        for node in gm.graph.nodes:
            if _writes(node):
                shared |= storage_roots_of((node.args, node.kwargs))
        self.computed = [n for n in gm.graph.nodes if n in found]       # what a fill evaluates
        self.cached = {n for n in found if n.op != "get_attr" and not storage_roots(n) & shared}
        self.frontier = [n for n in self.computed if n in self.cached
                         and any(u not in self.cached and u.target not in _DROPPED for u in n.users)]
        self.values: dict = {}        # input shapes -> the frontier's values
        self._lock = threading.Lock()

    def line(self, plan: "Plan", leaves: list) -> str:
        """The plan's line unpacking the kept values its later steps read (_fx_k: the call's
        input shapes)."""
        names = []
        for node in self.frontier:
            plan._names[node] = name = f"_fx_v{len(plan._names)}"
            plan._home[node] = "torch"
            names.append(name)
        fill = plan._const(self.fill)
        return f"{', '.join(names)}, = {plan._const(self.values)}.get(_fx_k) or {fill}(_fx_k, {', '.join(leaves)})"

    def fill(self, key, *inputs) -> tuple:
        """Evaluate the shape-only values for these inputs (each op as the graph calls it),
        keep the ones the plan reads, and return them."""
        env = dict(zip(self.placeholders, inputs))

        def value(a):
            return env[a]
        with torch.inference_mode(False), torch.no_grad():      # plain tensors, usable in any mode
            for node in self.computed:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
                env[node] = _attr(self.gm, node.target) if node.op == "get_attr" else node.target(*args, **kwargs)
        got = tuple(env[n] for n in self.frontier)
        with self._lock:                # threads may fill at once
            if len(self.values) >= self.MAX_SIGNATURES:
                self.values.pop(next(iter(self.values)), None)
            self.values[key] = got
        return got


def _shape_only(graph: fx.Graph) -> set:
    """Nodes whose values depend on the inputs' shapes alone (see ShapeValues), with the
    weights they read."""
    found = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            found.add(node)
        elif node.op != "call_function":
            continue
        elif node.target is aten.sym_size.int:
            if node.args[0].op == "placeholder" or node.args[0] in found:
                found.add(node)
        elif (node.target is operator.getitem or _pure(node.target)) and all(
                a in found for a in node.all_input_nodes):
            found.add(node)
    return {n for n in found if n.op != "get_attr" or any(u in found for u in n.users)}


def _pure(target) -> bool:
    """An ATen op that computes its result from its arguments alone: no writes, no random
    numbers, not a check the plan drops."""
    return (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
            and not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
            and target not in _DROPPED)


def _writes(node: fx.Node) -> bool:
    """Whether node's op may write one of its arguments (any op but getitem, an ATen op
    whose schema says it writes none, and the entry check)."""
    if node.op in ("placeholder", "get_attr", "output") or node.target is operator.getitem:
        return False
    if node.op == "call_module":
        return node.target != GUARD
    return not isinstance(node.target, torch._ops.OpOverload) or node.target._schema.is_mutable


class _Screen(NamedTuple):
    """A plan step screening one float input (node), held back until the next step: its
    line, `name = None if <finite> else fn(args)`, is emitted after it."""
    node: fx.Node
    name: str
    fn: str
    index: int
    args: tuple
    kwargs: dict

    def emit(self, plan: "Plan", body: list, calls: dict, finite: str | None = None):
        """The line, testing `finite` (a fused linear's flag), else the input's finite sum
        (the screen's own pass, timed as its step). With a flag, a node the plan holds only
        as a tensor is made a numpy array in the branch taken when it is not finite."""
        inline = self.node if finite is not None and plan._only_torch(self.node) else None
        args = ([plan._render(a, "np", inline) for a in self.args]
                + [f"{k}={plan._render(v, 'np', inline)}" for k, v in self.kwargs.items()])
        if finite is None:
            finite = f"_fx_finite_sum({plan._render(self.node, 'np')}.reshape(-1)) == 0"
            calls[len(body)] = f"{self.name} = _fx_timed({self.index}, {', '.join([self.fn] + args)})"
        body.append(f"{self.name} = None if {finite} else {self.fn}({', '.join(args)})")


def _reads_first(node: fx.Node, step: Step, screened: fx.Node) -> bool:
    """Whether `step` is an int8 linear (dense or sparse) whose only activation is `screened`
    (quantized whole by its kernel, which then tells whether it was finite: bind_linear's and
    bind_linear_sparse's screened)."""
    return (node.target in (kernel_ops.linear_int8, kernel_ops.linear_int8_sparse) and step.domain == "np"
            and len(step.args) == 1 and step.args[0] is screened and not step.kwargs and hasattr(step.fn, "screened"))


def _shape_of(value):
    """(shape, dtype) of a step's output as the profile shows it."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray) \
            and not isinstance(value[1], np.ndarray):        # a linear's (output, screen result)
        value = value[0]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return list(value.shape), str(value.dtype).removeprefix("torch.")
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (torch.Tensor, np.ndarray)):
        return [list(v.shape) for v in value], str(value[0].dtype).removeprefix("torch.")
    return "", type(value).__name__ if value is not None else ""


def _none():
    return None


def _attr(gm, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    # parameters: detached once, so no step records autograd history; buffers as they are
    # (the saturation monitor knows the packed weights by identity)
    return value.detach() if isinstance(value, torch.Tensor) and value.requires_grad else value


def _signature(info, placeholders):
    """(run()'s parameter names, whether they are the graph inputs themselves)."""
    n_leaves = len(placeholders)
    if info is None:                      # forward(self, <placeholders>)
        return [n.name for n in placeholders], True
    spec, orig = info.in_spec, list(info.orig_args)
    if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple \
            and spec.child(1).type is dict:
        children = spec.child(0).children() + spec.child(1).children()
        same_order = orig[spec.child(0).num_children:] == list(spec.child(1).context)
    else:
        children, same_order = spec.children(), True
    flat = same_order and len(orig) == len(children) == n_leaves and all(c.is_leaf() for c in children)
    return orig, flat


def _packed_inputs(info, params) -> str:
    """The structure graph codegen hands tree_flatten_spec (see torch.fx _PyTreeCodeGen)."""
    spec = info.in_spec
    if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple \
            and spec.child(1).type is dict:
        n = spec.child(0).num_children
        kwargs = ", ".join(f"{k!r}: {p}" for k, p in zip(spec.child(1).context, params[n:]))
        return f"([{', '.join(params[:n])}], {{{kwargs}}})"
    return f"[{', '.join(params)}]"


# --- kernel steps: the fxopt ops, called without the dispatcher ------------------------

def _value(gm, a):
    if isinstance(a, fx.Node):
        if a.op != "get_attr":
            raise TypeError(f"expected a weight, got node {a.name}")
        return _attr(gm, a.target)
    return a


def _conv(gm, node):
    """conv2d_int8 bound to its weights and epilogue (kernel_ops.conv_call): the activations are its args."""
    bound = _bind(gm, node)
    call = kernel_ops.conv_call(*(_value(gm, bound[name]) for name in ("packed", "w_scale", "col_sums", "b")),
                                *(bound[name] for name in ("geometry", "stride", "padding", "dilation", "act",
                                                           "act_args", "a_scale", "a_zp", "out_scale", "out_zp",
                                                           "res_scale", "res_zp")))
    residual = bound["residual"]
    return call, (bound["x"],) if residual is None else (bound["x"], residual), {}


def _same(fn):
    return lambda gm, node: (fn, node.args, node.kwargs)


def _poison_samples_(y, bad):
    return y if bad is None else nonfinite._poison_samples_(y, bad)


def _np_linear(gm, node):
    """linear_int8 (or linear_int8_sparse) on numpy arrays, bound to its weights and epilogue."""
    bound = _bind(gm, node)
    weights = [_value(gm, bound[name]) for name in ("packed", "w_scale", "col_sums", "b")]
    call = kernel_ops.linear_np_call(*weights, *(bound[a] for a in (
        "n", "k", "act", "act_args", "a_scale", "a_zp", "out_scale", "out_zp")),
        sparse=node.target is kernel_ops.linear_int8_sparse, int4=node.target is kernel_ops.linear_int4,
        bf16=node.target is kernel_ops.linear_bf16)
    residual = bound["residual"]
    return call, (bound["x"],) if residual is None else (bound["x"], residual), {}


def _np_layer_norm(gm, node):
    bound = _bind(gm, node)
    w, b = (_value(gm, bound[name]) for name in ("weight", "bias"))
    return kernel_ops.layer_norm_np_call(w, b, bound["eps"]), (bound["x"],), {}


def _np_attention(gm, node):
    """attention_int8 on numpy q/k/v (views of the QKV projection's output) and mask."""
    bound = _bind(gm, node)
    call = kernel_ops.attention_np_call(bound["scale"], bound["is_causal"])
    mask = bound["attn_mask"]
    return call, (bound["q"], bound["k"], bound["v"]) + (() if mask is None else (mask,)), {}


def _np_nonfinite(xs):
    """nonfinite_samples on numpy inputs, or None when every value is finite (one pass of
    kernels/finite.py per input, called past all_finite's checks, which the dtype test here
    makes; the per-sample check only when one is not)."""
    for x in xs:
        if x.dtype is not _F32 and x.dtype is not _F64:
            break
        s = _nonfinite_sum(x.reshape(-1))
        if s != s:
            break
    else:
        return None
    return nonfinite._nonfinite_samples([torch.from_numpy(x) for x in xs])


def _np_embedding(gm, node):
    """embedding_int8 on numpy indices, table and scales bound (the op's own arithmetic:
    an int8 row to float32, times its float32 scale)."""
    w_q, w_scale = (_value(gm, a) for a in node.args[:2])
    if w_q.dtype != torch.int8 or w_scale.dtype != torch.float32:       # the op itself, on arrays
        return (lambda indices: qops._embedding_int8(w_q, w_scale, torch.from_numpy(indices)).numpy(),
                node.args[2:], {})
    table, scales, rows = w_q.numpy(), w_scale.numpy(), w_q.shape[0]

    def call(indices):
        if indices.size and not (0 <= indices.min() and indices.max() < rows):
            return qops._embedding_int8(w_q, w_scale, torch.from_numpy(indices))   # its IndexError
        return table[indices].astype(np.float32) * scales[indices][..., None]
    return call, node.args[2:], {}


_NP_OUT = {nonfinite.nonfinite_samples: "torch"}    # None or a torch tensor
_NP_BUILDERS = {
    torch.ops.fxopt.embedding_int8.default: _np_embedding,
    kernel_ops.linear_int8: _np_linear,
    kernel_ops.linear_int8_sparse: _np_linear,
    kernel_ops.linear_int4: _np_linear,
    kernel_ops.linear_bf16: _np_linear,
    kernel_ops.layer_norm: _np_layer_norm,
    kernel_ops.attention_int8: _np_attention,
    nonfinite.nonfinite_samples: _same(_np_nonfinite),
}


def _bind(gm, node: fx.Node) -> dict:
    """node's arguments by their schema names, defaults filled in (torch.fx's normalization)."""
    bound = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if bound is None:
        raise TypeError(f"cannot bind the arguments of {node.format_node()} to {node.target}'s schema")
    return bound.kwargs


# kernels called on torch tensors (the ones in _NP_BUILDERS never get here);
# the fused fp32 units call their own implementation, past torch's dispatcher (~30 us a call)
_BUILDERS = {
    kernel_ops.conv2d_int8: _conv,
    nonfinite.poison_samples_: _same(_poison_samples_),
    fxops.linear_act: _same(fxops.linear_act_impl),
    fxops.conv2d_act: _same(fxops.conv2d_act_impl),
    kernel_ops.max_pool2d: _same(kernel_ops.max_pool2d_impl),
    kernel_ops.global_avg_pool: _same(kernel_ops.global_avg_pool_impl),
}


# --- installing --------------------------------------------------------------------------

def _planned_forward(self, *args, **kwargs):
    return self.fxopt_plan(*args, **kwargs)


_HOOKS = torch.nn.modules.module


def _planned_call(self, *args, **kwargs):
    """module(...) straight into the plan. nn.Module.__call__ (hooks, then forward) only when
    someone has added hooks since install: torch.export's own two pre-hooks check what the
    entry check and the plan's signature check (input structure), and cost tens of us."""
    plan = self.fxopt_plan
    if (len(self._forward_pre_hooks) != plan.hooks[0] or len(self._forward_hooks) != plan.hooks[1]
            or _HOOKS._global_forward_pre_hooks or _HOOKS._global_forward_hooks):
        return torch.nn.Module.__call__(self, *args, **kwargs)
    if threads.THREADSAFE:                  # Plan.__call__, one frame less
        return plan._run(*args, **kwargs)
    return plan(*args, **kwargs)


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def install(gm: fx.GraphModule, runtime: str = "plan") -> fx.GraphModule:
    """Make a plan built from `gm` its forward (runtime="plan"), or leave the graph's own
    forward (runtime="graph", for debugging). gm.recompile() undoes it."""
    check_runtime(runtime)
    if runtime == "graph":
        return gm
    plan = Plan(gm)
    plan.hooks = (len(gm._forward_pre_hooks), len(gm._forward_hooks))
    object.__setattr__(gm, PLAN_ATTR, plan)
    type(gm).forward = _planned_forward      # the class is gm's own (GraphModule makes one per instance)
    type(gm).__call__ = _planned_call
    return gm


def plan_of(gm) -> Plan | None:
    """The plan `gm` runs on, or None when it runs its graph."""
    plan = getattr(gm, PLAN_ATTR, None)
    if plan is None or type(gm).forward is not _planned_forward:
        return None
    return plan
