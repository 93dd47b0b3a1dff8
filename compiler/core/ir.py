"""IR helpers: the captured graph is a torch.fx GraphModule of ATen ops.

Every node carries `meta["val"]` (a fake tensor with symbolic shapes) and a
stable id `meta["fxopt_id"]` that rewrites carry over to replacement nodes, so
reports and per-layer comparisons line up before and after any pass.

    w = add_weight(gm, "conv1.weight_folded", tensor)       # new get_attr node
    new = insert_call(gm, anchor, aten.linear.default, (x, w, b), like=old)
    replace_node(old, new)
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import re

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxopt.core.errors import PassError
from fxopt.core.ops import OpKind, kind_of

ID = "fxopt_id"
LAYER = "fxopt_layer"


# --- ids and names ------------------------------------------------------------

def ensure_ids(gm: GraphModule) -> None:
    """Give every node a stable id and a layer name, keeping the ones it has."""
    taken = {n.meta[ID] for n in gm.graph.nodes if ID in n.meta}
    fresh = (f"n{i}" for i in itertools.count() if f"n{i}" not in taken)
    for node in gm.graph.nodes:
        if ID not in node.meta:
            node.meta[ID] = next(fresh)
        if LAYER not in node.meta:
            node.meta[LAYER] = layer_name(node)


def layer_name(node: Node) -> str:
    """The qualified name of the innermost nn.Module a node came from, or its FX name."""
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack") or {}
    # export marks helper nodes with a fake "_empty_nn_module_stack..." entry
    real = [path for key, (path, _) in stack.items() if not str(key).startswith("_empty_nn_module_stack")]
    return _clean_path(real[-1]) if real else node.name


def _clean_path(path: str) -> str:
    # export writes paths like "L['self'].encoder.layer[0]"; keep "encoder.layer.0"
    for junk in ("L['self'].", "L['self']"):
        path = path.replace(junk, "")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def node_id(node: Node) -> str:
    return node.meta.get(ID, node.name)


# --- weights ----------------------------------------------------------------

def get_weight(gm: GraphModule, node: Node) -> torch.Tensor:
    """The tensor behind a get_attr node."""
    if node.op != "get_attr":
        raise PassError(f"node {node.name} is a {node.op}, not a weight (get_attr)")
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def is_weight(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def add_weight(gm: GraphModule, name: str, tensor: torch.Tensor, before: Node | None = None) -> Node:
    """Register `tensor` as a new buffer of gm under a fresh name; return its get_attr node.

    Names never collide with an existing attribute, so the graph a pass started
    from keeps pointing at unchanged weights (passes never edit weights in place).
    """
    tensor = tensor.detach()  # weights derived from parameters must not carry autograd history
    base = re.sub(r"\W", "_", name)  # attribute names must be identifiers (layer names may hold '+')
    unique = base
    for i in itertools.count(1):
        if not hasattr(gm, unique):
            break
        unique = f"{base}_{i}"
    gm.register_buffer(unique, tensor.contiguous())
    anchor = before if before is not None else _first_compute_node(gm)
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(unique)
    node.meta["val"] = _fake_like(gm, tensor)
    node.meta[LAYER] = name.rsplit(".", 1)[0]
    return node


def _first_compute_node(gm: GraphModule) -> Node:
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            return node
    raise PassError("graph has no output node")


def _fake_like(gm: GraphModule, tensor: torch.Tensor):
    mode = fake_mode(gm)
    if mode is None:
        return tensor.detach()
    return mode.from_tensor(tensor, static_shapes=True)


def fake_mode(gm: GraphModule):
    """The FakeTensorMode whose fake tensors the graph's metadata holds (or None)."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    return torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


# --- rewriting -----------------------------------------------------------------

def insert_call(gm: GraphModule, before: Node, target, args: tuple, kwargs=None,
                like: Node | None = None) -> Node:
    """Insert `target(*args, **kwargs)` before `before`, with fresh metadata.

    `like` is the node the new one stands for: it inherits that node's id,
    layer name and source metadata.
    """
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
    if like is not None:
        for key in (ID, LAYER, "nn_module_stack", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    infer_meta(gm, node)
    return node


def replace_node(old: Node, new: Node) -> None:
    """Send every user of `old` to `new` and erase `old` (new keeps old's id if it has none)."""
    for key in (ID, LAYER):
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def float_value(node: Node, value):
    """The float values a chained int8 op's uint8 output stands for, (q - out_zp) * out_scale
    (ops whose schema has out_scale, such as fxopt's linear and conv kernels); any other
    value as it is. What per-layer comparisons set against a float reference."""
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8
            and isinstance(node.target, torch._ops.OpOverload)):
        return value
    names = [a.name for a in node.target._schema.arguments]
    if "out_scale" not in names:
        return value
    bound = {**dict(zip(names, node.args)), **node.kwargs}
    scale, zp = float(bound.get("out_scale", 0.0)), int(bound.get("out_zp", 0))
    return (value.float() - zp) * scale if scale > 0 else value


def infer_meta(gm: GraphModule, node: Node) -> None:
    """Compute `node.meta["val"]` by running its op on the fake values of its inputs."""
    if node.op != "call_function":
        return
    mode = fake_mode(gm)

    def val(a):
        return a.meta["val"] if isinstance(a, Node) else a

    args = torch.fx.node.map_aggregate(node.args, val)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
    if mode is None:
        node.meta["val"] = node.target(*args, **kwargs)
        return
    # Why suppress guards: a fake op may branch on a size (conv's backend choice asks
    # "batch < 16"), and a guard recorded here would narrow the captured range of the
    # model's inputs (a pruned CNN then refused batch 449). Rewrites add no input limits.
    env = mode.shape_env
    with mode, (env.suppress_guards() if env is not None else contextlib.nullcontext()):
        node.meta["val"] = node.target(*args, **kwargs)


def refresh_meta(gm: GraphModule) -> None:
    """Recompute the metadata of every call node in order (after shape-changing rewrites)."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            infer_meta(gm, node)


def finish(gm: GraphModule) -> GraphModule:
    """Tidy a graph after a rewrite: drop unused weights, regenerate code."""
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    gm.delete_all_unused_submodules()
    _drop_unused_buffers(gm)
    gm.recompile()
    return gm


def _impure(node: Node) -> bool:
    # export's shape guard and runtime asserts must stay even though nothing uses them
    return node.op in ("placeholder", "output", "call_module") or node.is_impure()


def _drop_unused_buffers(gm: GraphModule) -> None:
    """Forget weights no node reads (e.g. fp32 weights replaced by packed int8 ones), so the
    optimized model does not hold both."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    names += [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    for name in names:
        if name in used:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)


# --- inspection --------------------------------------------------------------

def users(node: Node) -> list:
    return list(node.users)


def storage_roots(start: Node) -> set:
    """The nodes whose storage `start` may be a view of: walks back through every op whose
    schema says its result aliases an argument (views, reshape, split + getitem, ...)."""
    roots, seen, todo = set(), set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        sources = _aliased_arguments(node)
        if sources is None:
            roots.add(node)
        todo.extend(sources or ())
    return roots


def storage_roots_of(args) -> set:
    """storage_roots of every node in args (a node, or nested lists, tuples and dicts of
    them): the storage those values may be views of."""
    roots: set = set()
    map_arg(args, lambda n: roots.update(storage_roots(n)))
    return roots


def _aliased_arguments(node: Node):
    """The graph values `node`'s result may alias, or None if its storage is its own."""
    if node.op != "call_function":
        return None
    if not isinstance(node.target, torch._ops.OpOverload):      # getitem: a piece of its source
        return [a for a in node.args if isinstance(a, Node)] or None
    schema = node.target._schema
    sets = {s for r in schema.returns if r.alias_info for s in r.alias_info.before_set}
    if not sets:
        return None
    values = dict(zip((a.name for a in schema.arguments), node.args), **node.kwargs)
    out = []
    for argument in schema.arguments:
        if argument.alias_info and set(argument.alias_info.before_set) & sets:
            value = values.get(argument.name)
            out += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, Node)]
    return out


# The dtypes of a node's value, kept where a graph is saved (fxopt.save writes no fake
# values): "float32" for a tensor, "list:float32,float32" for a list of tensors.
DTYPE = "fxopt_dtype"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool)}


def dtype_text(node: Node) -> str | None:
    """node's value's dtypes as DTYPE text (value_dtypes'); None when it holds no tensors,
    is unknown, or has a dtype DTYPE does not name."""
    known = value_dtypes(node)
    names = [str(d).removeprefix("torch.") for d in known[1]] if known else [None]
    if not all(name in _DTYPES for name in names):
        return None
    return ("list:" if known[0] else "") + ",".join(names)


def parse_dtype_text(text: str) -> tuple[bool, tuple] | None:
    """(a list?, its dtypes) from DTYPE text; None if the text is not one."""
    many = text.startswith("list:")
    names = text.removeprefix("list:").split(",")
    if not all(name in _DTYPES for name in names):
        return None
    return many, tuple(_DTYPES[name] for name in names)


def value_dtypes(node) -> tuple[bool, tuple] | None:
    """(whether node's value is a list of tensors, their dtypes), from its fake value, or
    from the dtypes a loaded graph kept (DTYPE); None if it is not a tensor or unknown."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return False, (val.dtype,)
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return True, tuple(v.dtype for v in val)
    text = node.meta.get(DTYPE)
    return parse_dtype_text(text) if val is None and isinstance(text, str) else None


def shape_of(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def node_counts(gm: GraphModule) -> dict:
    """Count of call nodes by op name, e.g. {"linear": 4, "relu": 3}."""
    counts = collections.Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(counts.items()))


def op_name(node: Node) -> str:
    target = node.target
    if hasattr(target, "_schema"):
        ns, name = target._schema.name.split("::")
        return name if ns == "aten" else f"{ns}.{name}"
    return getattr(target, "__name__", str(target))


def lint(gm: GraphModule) -> None:
    """Check that a graph is well formed; raise PassError naming the first problem."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError with the node in the message
        raise PassError(f"malformed graph: {e}") from e
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                get_weight(gm, node)
            except AttributeError as e:
                raise PassError(f"node {node.name} reads missing attribute {node.target}") from e
        if node.op in ("call_function", "placeholder", "get_attr") and "val" not in node.meta:
            if kind_of(node) not in (OpKind.GETITEM, OpKind.OTHER, OpKind.SHAPE):
                raise PassError(f"node {node.name} ({op_name(node)}) has no shape metadata (meta['val'])")
