"""A GraphModule's graph as plain JSON data, and back, without running code from the data.

Values are JSON where JSON is unambiguous (None, bool, int, str) and tagged
objects otherwise, so a tuple stays a tuple and a dtype a dtype:

    encode_value((1, 2.5, torch.float32))
    # {"tuple": [1, {"float": 2.5}, {"dtype": "float32"}]}

Call targets are strings: "aten::linear.default", "fxopt::linear_act.default",
"operator.getitem". Decoding resolves them only through torch.ops.aten,
torch.ops.fxopt and the fixed table PY_FUNCTIONS below; every other name, and
every malformed value, raises ArtifactError. Pytree specs are encoded here
too: torch's treespec_loads may import any module named in the data (enum
contexts), so it is not used on files.
"""
from __future__ import annotations

import keyword
import math
import operator
import re

import torch
import torch.utils._pytree as pytree
from torch import fx

from fxopt.core.errors import ArtifactError
from fxopt.core.ir import DTYPE, dtype_text, parse_dtype_text

OP_NAMESPACES = ("aten", "fxopt")

# Plain Python functions export puts in graphs (getitem on multi-output ops,
# sym-int arithmetic on shapes). The only non-operator targets a file may name.
_PY_MODULES = {
    "operator": (operator, ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod",
                            "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge",
                            "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")),
    "math": (math, ("ceil", "floor", "trunc", "sqrt")),
    "torch": (torch, ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite",
                      "sym_sqrt", "sym_sum", "_sym_sqrt", "_check", "_check_is_size",
                      "_assert")),
}
PY_FUNCTIONS = {f"{mod}.{name}": getattr(m, name)
                for mod, (m, names) in _PY_MODULES.items() for name in names if hasattr(m, name)}
_PY_NAMES = {id(fn): name for name, fn in PY_FUNCTIONS.items()}

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ATTR_PART = re.compile(r"^[A-Za-z0-9_]+$")
_OP_NAME = re.compile(r"^(\w+)::(\w+)(?:\.(\w+))?$")

_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


# --- values ------------------------------------------------------------------

def encode_value(v, where: str = "value"):
    """A node argument (or any plain value) as JSON data; ArtifactError if it has no encoding."""
    if v is None or isinstance(v, (bool, str)) or type(v) is int:
        return v
    if isinstance(v, float):
        return {"float": v if math.isfinite(v) else repr(v)}
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, (list, tuple)) and type(v) in (list, tuple, torch.Size,
                                                     fx.immutable_collections.immutable_list):
        tag = "tuple" if isinstance(v, tuple) else "list"
        return {tag: [encode_value(x, where) for x in v]}
    if isinstance(v, dict) and type(v) in (dict, fx.immutable_collections.immutable_dict):
        return {"dict": [[encode_value(k, where), encode_value(x, where)] for k, x in v.items()]}
    for tag, cls in _ENUMS.items():
        if isinstance(v, cls):
            return {tag: str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, slice):
        return {"slice": [encode_value(x, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": None}
    raise ArtifactError(f"cannot save {where}: a {type(v).__module__}.{type(v).__qualname__} "
                        f"({v!r:.60}) has no portable encoding; fxopt saves numbers, strings, "
                        "lists, tuples, dicts, dtypes, devices, layouts and memory formats.")


def decode_value(d, nodes: dict | None = None):
    """Inverse of encode_value; `nodes` maps node names to the fx.Node already decoded."""
    if d is None or isinstance(d, (bool, str)) or type(d) is int:
        return d
    if not (isinstance(d, dict) and len(d) == 1):
        raise ArtifactError(f"corrupt graph data: unexpected value {d!r:.80}")
    (tag, x), = d.items()
    if tag == "float" and (isinstance(x, (int, float)) and not isinstance(x, bool)):
        return float(x)
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag in ("list", "tuple") and isinstance(x, list):
        items = [decode_value(y, nodes) for y in x]
        return items if tag == "list" else tuple(items)
    if tag == "dict" and isinstance(x, list) and all(isinstance(p, list) and len(p) == 2 for p in x):
        return {decode_value(k, nodes): decode_value(v, nodes) for k, v in x}
    if tag == "node" and isinstance(x, str):
        if nodes is None or x not in nodes:
            raise ArtifactError(f"corrupt graph data: reference to unknown or later node {x!r}")
        return nodes[x]
    if tag in _ENUMS and isinstance(x, str) and _IDENT.match(x):
        value = getattr(torch, x, None)
        if isinstance(value, _ENUMS[tag]):
            return value
    if tag == "device" and isinstance(x, str):
        try:
            return torch.device(x)
        except (RuntimeError, ValueError):
            pass
    if tag == "slice" and isinstance(x, list) and len(x) == 3:
        return slice(*(decode_value(y, nodes) for y in x))
    if tag == "ellipsis" and x is None:
        return Ellipsis
    raise ArtifactError(f"corrupt graph data: bad or unknown tagged value {d!r:.80}")


# --- call targets ----------------------------------------------------------------

def encode_target(target, node_name: str) -> str:
    """'aten::linear.default' for an operator, 'operator.getitem' for an allowed function."""
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        qualified = f"{ns}::{name}.{target._overloadname}"
    elif isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::")
        qualified = f"{ns}::{name}"
    elif id(target) in _PY_NAMES:
        return _PY_NAMES[id(target)]
    else:
        raise ArtifactError(
            f"cannot save node {node_name}: it calls {target!r}, which is neither an aten/fxopt "
            f"operator nor one of the functions fxopt can save ({', '.join(sorted(PY_FUNCTIONS))}).")
    if ns not in OP_NAMESPACES:
        raise ArtifactError(f"cannot save node {node_name}: operator {qualified} is outside the "
                            f"namespaces fxopt can load ({', '.join(OP_NAMESPACES)}).")
    return qualified


def resolve_target(qualified, node_name: str):
    """The operator or allowed function a target string names; ArtifactError otherwise."""
    if not isinstance(qualified, str):
        raise ArtifactError(f"corrupt graph data: node {node_name} has target {qualified!r:.80}")
    if qualified in PY_FUNCTIONS:
        return PY_FUNCTIONS[qualified]
    found = _OP_NAME.match(qualified)
    if not found or found[1] not in OP_NAMESPACES:
        raise ArtifactError(
            f"node {node_name} calls {qualified!r:.80}, which fxopt refuses to load: a saved "
            f"graph may only call torch.ops.{'/'.join(OP_NAMESPACES)} operators and a fixed set "
            "of shape functions (operator.*, math.*, torch.sym_*; see graph_json.PY_FUNCTIONS). "
            "The file was not written by fxopt.save or was tampered with; do not use it.")
    ns, name, overload = found[1], found[2], found[3]
    packet = getattr(getattr(torch.ops, ns), name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        raise ArtifactError(
            f"node {node_name} calls operator {ns}::{name}, which is not defined in this "
            f"process (torch {torch.__version__}). The file needs a newer fxopt or torch: "
            "upgrade to the versions that saved it.")
    if overload is None:
        return packet
    op = getattr(packet, overload, None)
    if not isinstance(op, torch._ops.OpOverload):
        raise ArtifactError(f"node {node_name} calls {qualified}, but {ns}::{name} has no "
                            f"overload {overload!r} here; upgrade torch/fxopt to the saver's.")
    return op


# --- names -----------------------------------------------------------------

def check_identifier(name, what: str) -> str:
    """`name` if it is a plain Python identifier (FX writes it into generated code)."""
    if not (isinstance(name, str) and _IDENT.match(name) and not keyword.iskeyword(name)):
        raise ArtifactError(f"corrupt graph data: {what} {name!r:.80} is not a valid identifier")
    return name


def check_attr_path(name, what: str = "weight name") -> str:
    """`name` if it is a dotted attribute path like 'encoder.layer.0.weight'."""
    parts = name.split(".") if isinstance(name, str) else [""]
    if not all(_ATTR_PART.match(p) and not p.startswith("__") for p in parts):
        raise ArtifactError(f"corrupt graph data: {what} {name!r:.80} is not a valid attribute path")
    return name


# --- pytree specs ------------------------------------------------------------

_BUILTIN_TYPES = {"builtins.tuple": tuple, "builtins.list": list, "builtins.dict": dict,
                  "collections.OrderedDict": __import__("collections").OrderedDict}
_TYPE_NAMES = {t: n for n, t in _BUILTIN_TYPES.items()}
# Container classes defined outside these packages are refused: loading one
# would mean importing a module the file names.
SPEC_PACKAGES = ("transformers",)


def encode_spec(spec):
    """A pytree TreeSpec as JSON: None for a leaf, else {"type", "context", "children"}."""
    if spec is None:
        return None
    if spec.is_leaf():
        return {"leaf": True}
    typ = spec.type
    name = _TYPE_NAMES.get(typ) or f"{typ.__module__}.{typ.__qualname__}"
    if typ not in _TYPE_NAMES and (name.split(".")[0] not in SPEC_PACKAGES
                                   or typ not in pytree.SUPPORTED_NODES):
        raise ArtifactError(
            f"cannot save a model whose inputs or outputs contain a {name}: fxopt saves "
            "tuples, lists, dicts and Hugging Face ModelOutput classes. Return one of those.")
    return {"type": name, "context": encode_value(spec.context, "a pytree context"),
            "children": [encode_spec(c) for c in spec.children()]}


def decode_spec(d):
    """Inverse of encode_spec. Classes come only from the allowed packages' registered nodes."""
    if d is None:
        return None
    if d == {"leaf": True}:
        return pytree.treespec_leaf()
    if not (isinstance(d, dict) and set(d) == {"type", "context", "children"}
            and isinstance(d["children"], list)):
        raise ArtifactError(f"corrupt pytree spec {d!r:.80}")
    typ = _spec_type(d["type"])
    children = [decode_spec(c) for c in d["children"]]
    return pytree.TreeSpec(typ, decode_value(d["context"]), children)


def _spec_type(name):
    if name in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[name]
    module = name.rpartition(".")[0] if isinstance(name, str) else ""
    if module.split(".")[0] not in SPEC_PACKAGES or not all(_IDENT.match(p) for p in module.split(".")):
        raise ArtifactError(f"the saved model's inputs/outputs use type {name!r:.80}; fxopt only "
                            f"loads tuples, lists, dicts and {'/'.join(SPEC_PACKAGES)} classes.")
    found = _registered(name)
    if found is None:
        # Why import: ModelOutput classes register as pytree nodes when their
        # module is imported; modeling_outputs holds the common ones.
        import importlib
        for mod in ("transformers.modeling_outputs", module):
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise ArtifactError(f"the saved model returns a {name}; install the package "
                                    f"that defines it ({e}).") from e
            found = _registered(name)
            if found is not None:
                break
    if found is None:
        raise ArtifactError(f"{name} is not a registered pytree container in this transformers "
                            "version; install the transformers version that saved the model.")
    return found


def _registered(name):
    for typ in list(pytree.SUPPORTED_NODES):
        if isinstance(typ, type) and f"{typ.__module__}.{typ.__qualname__}" == name:
            return typ
    return None


# --- graphs ------------------------------------------------------------------

GUARD_MODULE = "_guards_fn"  # export's input check: generated code, so dropped on save
NODE_META = ("fxopt_id", "fxopt_layer", DTYPE)


def encode_graph(gm: fx.GraphModule) -> dict:
    """The graph as {"nodes": [...], "orig_args", "in_spec", "out_spec"}.

        data = encode_graph(gm); data["nodes"][0]
        # {"op": "placeholder", "name": "x", "target": "x", "args": {"tuple": []}, ...}
    """
    nodes = [_encode_node(n) for n in gm.graph.nodes
             if not (n.op == "call_module" and n.target == GUARD_MODULE)]
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return {"nodes": nodes,
            "orig_args": list(info.orig_args) if info else None,
            "in_spec": encode_spec(info.in_spec) if info else None,
            "out_spec": encode_spec(info.out_spec) if info else None}


def _encode_node(n: fx.Node) -> dict:
    if n.op == "call_function":
        target = encode_target(n.target, n.name)
    elif n.op in ("placeholder", "get_attr", "output"):
        target = str(n.target)
    else:
        raise ArtifactError(f"cannot save node {n.name}: {n.op} {n.target} nodes are not "
                            "supported (fxopt saves graphs of call_function nodes and weights).")
    meta = {k: n.meta[k] for k in NODE_META if isinstance(n.meta.get(k), str)}
    dtypes = dtype_text(n)          # the plan reads them (numpy or torch steps); fake values are not saved
    if dtypes is None:
        meta.pop(DTYPE, None)
    else:
        meta[DTYPE] = dtypes
    return {"op": n.op, "name": n.name, "target": target,
            "args": encode_value(tuple(n.args), f"node {n.name}"),
            "kwargs": encode_value(dict(n.kwargs), f"node {n.name}"), "meta": meta}


def decode_graph(data: dict, weights: set) -> fx.Graph:
    """Rebuild the fx.Graph of encode_graph; get_attr targets must be in `weights`."""
    graph = fx.Graph()
    nodes: dict = {}
    try:
        for d in data["nodes"]:
            node = _decode_node(graph, d, nodes, weights)
            nodes[node.name] = node
        outputs = [n for n in graph.nodes if n.op == "output"]
        if len(outputs) != 1 or outputs[0] is not graph.output_node() or len(outputs[0].args) != 1:
            raise ArtifactError("corrupt graph data: the graph must end in one output node")
        if data["orig_args"] is not None:
            orig_args = [check_identifier(a, "input name") for a in data["orig_args"]]
            in_spec = _check_input_keys(decode_spec(data["in_spec"]))
            info = fx.graph._PyTreeInfo(orig_args, in_spec, decode_spec(data["out_spec"]))
            graph._codegen = fx.graph._PyTreeCodeGen(info)
        graph.lint()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError) as e:
        raise ArtifactError(f"corrupt graph data ({type(e).__name__}: {e}); the file is "
                            "damaged or was not written by fxopt.save. Save the model again.") from e
    return graph


def _check_input_keys(spec):
    """`spec` if every key in it is an identifier or an int.

    Why: FX writes the input spec's keyword names into the generated forward
    unescaped, so a crafted key would be code.
    """
    if spec is None or spec.is_leaf():
        return spec
    ctx = spec.context
    for key in ctx if isinstance(ctx, list) else [] if ctx is None else [ctx]:
        if type(key) is not int:
            check_identifier(key, "input keyword")
    for child in spec.children():
        _check_input_keys(child)
    return spec


def _decode_node(graph: fx.Graph, d: dict, nodes: dict, weights: set) -> fx.Node:
    op, name = d["op"], check_identifier(d["name"], "node name")
    if name in nodes:
        raise ArtifactError(f"corrupt graph data: node name {name} appears twice")
    if op == "call_function":
        target = resolve_target(d["target"], name)
    elif op == "placeholder":
        target = check_identifier(d["target"], "input name")
    elif op == "get_attr":
        target = check_attr_path(d["target"])
        if target not in weights:
            raise ArtifactError(f"corrupt file: node {name} reads weight {target!r}, "
                                "which the file does not hold")
    elif op == "output":
        target = "output"
    else:
        raise ArtifactError(f"corrupt graph data: node {name} has op {op!r:.40}; fxopt files "
                            "hold only placeholder, get_attr, call_function and output nodes")
    args, kwargs = decode_value(d["args"], nodes), decode_value(d["kwargs"], nodes)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise ArtifactError(f"corrupt graph data: node {name} has malformed args/kwargs")
    for key in kwargs:
        check_identifier(key, f"keyword of node {name}")
    node = graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name:
        raise ArtifactError(f"corrupt graph data: node name {name} is reserved")
    meta = d.get("meta", {})
    node.meta.update({k: meta[k] for k in NODE_META if isinstance(meta.get(k), str)})
    if DTYPE in node.meta and parse_dtype_text(node.meta[DTYPE]) is None:
        raise ArtifactError(f"corrupt graph data: node {name} has dtypes {node.meta[DTYPE]!r:.60}, "
                            f"not a list of torch dtype names")
    return node
