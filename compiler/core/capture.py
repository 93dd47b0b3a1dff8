"""Capture a PyTorch model into fxopt's one IR: an ATen-level FX graph.

The IR is the unlifted module of a non-strict ``torch.export``: weights are
``get_attr`` nodes, ops are ATen (``aten.linear.default``, ``aten.conv2d``,
``aten.batch_norm``, ``aten.scaled_dot_product_attention``, ...), and the
module is called like the original model and returns the same structure
(tensor, tuple, dict, Hugging Face ``ModelOutput``).

    gm = capture(model, {"input_ids": ids, "attention_mask": mask})
    gm(input_ids=ids, attention_mask=mask)   # same outputs as model(...)
    gm.meta["fxopt_capture"]["dynamic_dims"]  # {"input_ids": {0: "s0", 1: "s1"}, ...}
    capture(cnn, (torch.randn(2, 3, 224, 224),))(torch.randn(2, 3, 160, 200))   # any image size
"""
import copy
import inspect
import linecache
import re
import threading
import traceback
import warnings

import sympy
import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fxopt.core.errors import CaptureError, FxoptError

__all__ = ["capture", "normalize_inputs", "CAPTURE_META", "TRACE_LOCK"]

CAPTURE_META = "fxopt_capture"

# torch.export is not thread-safe: non-strict export swaps builtins.max, builtins.min and
# math.pow for its own while it traces (two exports at once restore each other's swaps and
# leave torch's in place for the rest of the process), and concurrent traces fail
# ("Trying to pop empty mode stack", "... is not tracked with proxy"). capture() and the
# compile driver (whose passes run fake-tensor propagation) hold this one lock.
TRACE_LOCK = threading.RLock()

SPATIAL_DIMS = (2, 3)     # height and width of an NCHW image input
_TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def normalize_inputs(example_inputs):
    """Turn example inputs into ``(args_tuple, kwargs_dict)``.

    A dict is keyword arguments, a tuple/list positional arguments, and a
    single tensor a 1-tuple.

        normalize_inputs(x)                    # -> ((x,), {})
        normalize_inputs((x, y))               # -> ((x, y), {})
        normalize_inputs({"input_ids": ids})   # -> ((), {"input_ids": ids})
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("example_inputs as a dict must map argument names (str) to values, "
                            f"got keys {list(example_inputs)!r}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple/list of positional arguments or a dict "
        f"of keyword arguments, got {type(example_inputs).__name__}. Wrap a single input as "
        f"(x,) or pass keyword inputs as a dict, e.g. {{'input_ids': ids}}.")


def _check_inputs(model, args, kwargs):
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs a torch.nn.Module, got {type(model).__name__}; "
                        "wrap a plain function in an nn.Module whose forward calls it.")
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise FxoptError("example_inputs holds no tensor: pass at least one example tensor "
                         "the model takes, e.g. capture(model, (torch.randn(2, 16),)).")


# --------------------------------------------------------------- input names

def _param_names(model):
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    return positional, var_pos


def _leaf_name(path, positional, var_pos):
    """Readable name of one flattened input, e.g. 'input_ids' or 'x[0]'."""
    which, key, *rest = path
    if which.idx == 0:  # positional argument number key.idx
        i = key.idx
        if i < len(positional):
            base = positional[i]
        else:
            base = f"{var_pos or 'args'}[{i - len(positional)}]"
    else:
        base = key.key
    return base + pytree.keystr(tuple(rest))


def input_names(model, args, kwargs):
    """Names of the flattened inputs, in the order of the graph's placeholders."""
    positional, var_pos = _param_names(model)
    flat, _ = pytree.tree_flatten_with_path((args, kwargs))
    return [_leaf_name(path, positional, var_pos) for path, _ in flat]


# ------------------------------------------------------------- dynamic shapes

def _wanted_dims(t):
    """Dims of one input tensor we try to make dynamic: batch, sequence, image height and width.

    Why these: dim 0 is the batch of every input; dim 1 is a sequence for
    token-like inputs [batch, seq] and for [batch, seq, hidden] features;
    dims 2 and 3 of a floating [batch, channels, height, width] input are an
    image's size, which vision models usually take at any resolution.
    Image channels and feature widths are baked into the weights.
    """
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return ()
    if t.dim() >= 2 and (t.dtype in _TOKEN_DTYPES or (t.is_floating_point() and t.dim() == 3)):
        return (0, 1)
    if t.is_floating_point() and t.dim() == 4:
        return (0,) + SPATIAL_DIMS
    return (0,)


def _dynamic_shapes(model, args, kwargs, fixed=frozenset()):
    """dynamic_shapes for export: Dim.AUTO on the wanted dims of every tensor, but for the
    height and width of the tensors in `fixed` (by id)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def spec(leaf):
        if not isinstance(leaf, torch.Tensor):
            return None
        dims = _wanted_dims(leaf)
        if id(leaf) in fixed:
            dims = [d for d in dims if d not in SPATIAL_DIMS]
        return {d: Dim.AUTO for d in dims}

    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _tied_images(gm, args, kwargs):
    """Ids of the image inputs whose height or width the graph ties by an equation, e.g. a
    Flatten into a Linear sized C*H*W: ``4*(((H - 1)//2) + 1)*(((W - 1)//2) + 1) == 1024``.

    Why: export keeps such a dim symbolic and checks the equation in generated code, which
    a saved model cannot carry and whose error names no input. Exported again with those
    dims static, the entry check names the input, the dim and the size the model takes.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols, env = {}, None
    for node, leaf in zip(placeholders, pytree.tree_leaves((args, kwargs))):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or SPATIAL_DIMS[0] not in _wanted_dims(leaf):
            continue
        for d in SPATIAL_DIMS:
            size = val.shape[d]
            if isinstance(size, torch.SymInt) and not is_concrete_int(size):
                env = size.node.shape_env
                symbols.setdefault(id(leaf), set()).update(size.node.expr.free_symbols)
    if env is None:
        return frozenset()
    tied = set()
    for guard in env.guards:
        # Why not symbol == symbol (a square image): export gives both dims one symbol,
        # and the entry check holds dims sharing a symbol equal
        expr = guard.expr
        if isinstance(expr, sympy.Eq) and not (expr.lhs.is_Symbol and expr.rhs.is_Symbol):
            tied |= expr.free_symbols
    return frozenset(i for i, found in symbols.items() if found & tied)
def _name_extra_kwargs(model, kwargs):
    """Give ``model.forward`` a signature naming each keyword that lands in ``**kwargs``.

    Why: export matches dynamic_shapes to the forward signature, and cannot
    take a spec for a non-tensor (``return_dict=False``) nested in the
    ``**kwargs`` dict. Naming those keywords as parameters of their own makes
    every input a top-level argument. ``model`` must be our private copy:
    the bound method is shadowed by an instance attribute.
    """
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    var_kw = next((p for p in params if p.kind == p.VAR_KEYWORD), None)
    extra = [k for k in kwargs if k not in sig.parameters]
    if var_kw is None or not extra:
        return model
    named = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in extra]
    forward = model.forward

    def forward_named(*args, **kw):
        return forward(*args, **kw)

    forward_named.__signature__ = sig.replace(
        parameters=[p for p in params if p is not var_kw] + named + [var_kw])
    model.forward = forward_named
    return model


def _widen_size_one(args, kwargs):
    """Copy of the inputs with every wanted dim of size 1 repeated to size 2.

    Why: export specializes dims of size 0/1, so a batch-1 example would give
    a graph that only takes batch 1. Batch and sequence are widened together
    across inputs so that inputs sharing a dim stay consistent. Returns None
    when nothing needs widening.
    """
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    widen = set()
    for axis in (0, 1):
        sizes = {x.shape[axis] for x in leaves if axis in _wanted_dims(x)}
        if sizes == {1}:
            widen.add(axis)
    if not widen:
        return None

    def grow(x):
        if not isinstance(x, torch.Tensor):
            return x
        for axis in sorted(widen & set(_wanted_dims(x))):
            if x.shape[axis] == 1:
                x = torch.cat([x, x], dim=axis)
        return x

    return pytree.tree_map(grow, (args, kwargs))


def _dim_record(gm, names, wanted):
    """Which wanted dims came out dynamic (symbol name), the range of each (lowest, highest
    or None) and which wanted dims came out static (size)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dynamic, ranges, static = {}, {}, {}
    for node, name in zip(placeholders, names):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d in wanted.get(name, ()):
            size = val.shape[d]
            # Why is_concrete_int: a dim export specialized can still be a SymInt
            # whose value is a constant.
            if isinstance(size, torch.SymInt) and not is_concrete_int(size):
                dynamic.setdefault(name, {})[d] = str(size)
                ranges.setdefault(name, {})[d] = _range(size)
            else:
                static.setdefault(name, {})[d] = int(size)
    return dynamic, ranges, static


def _range(size):
    """(lowest, highest or None if unbounded) export found a dynamic size may take."""
    node = size.node
    bound = node.shape_env.bound_sympy(node.expr)
    # Why is_Integer: torch's integer infinity (int_oo) claims to be finite
    upper = int(bound.upper) if bound.upper.is_Integer else None
    return int(bound.lower) if bound.lower.is_Integer else 0, upper


def _warn_static(static, model_name):
    """Warn of batch and sequence dims export fixed. Why not image sizes: a model that
    fixes its image size (a Flatten into a Linear, a position table) is common and
    intended; the entry check names the size when a call breaks it."""
    for name, dims in static.items():
        for d, size in dims.items():
            if d in SPATIAL_DIMS:
                continue
            what = "batch" if d == 0 else "sequence"
            warnings.warn(
                f"fxopt.capture({model_name}): input '{name}' dim {d} ({what}) is static "
                f"(size {size}): torch.export specialized it, so the captured graph only "
                f"accepts size {size} there. Check the model for code that fixes this size "
                f"or give an example with size >= 2.", stacklevel=4)


# ------------------------------------------------------------------ node meta

def _layer_name(node):
    """Qualified name of the innermost module a node came from, or None."""
    if node.op == "get_attr":
        return node.target.rpartition(".")[0] or None
    # Why the filter: export tags its own helper nodes (sym_size, the guard
    # call) with a placeholder stack entry that is no module of the model.
    names = [qualname for qualname, _ in (node.meta.get("nn_module_stack") or {}).values()
             if not qualname.startswith("_empty_nn_module_stack")]
    return names[-1] if names and names[-1] else None


def _output_val(node):
    return pytree.tree_map_only(fx.Node, lambda n: n.meta.get("val"), node.args[0])


def annotate(gm):
    """Give every node ``meta['val']``, a unique ``meta['fxopt_id']`` ('n0', 'n1', ... in
    graph order) and, when known, ``meta['fxopt_layer']`` (e.g. 'encoder.layer.0.output.dense').
    """
    for i, node in enumerate(gm.graph.nodes):
        node.meta["fxopt_id"] = f"n{i}"
        layer = _layer_name(node)
        if layer:
            node.meta["fxopt_layer"] = layer
        if "val" not in node.meta:
            # Why: export leaves the output node and the `_guards_fn` input-check
            # call without a value; passes may rely on every node having one.
            node.meta["val"] = _output_val(node) if node.op == "output" else None
    return gm


# --------------------------------------------------------------------- errors

_HINTS = [
    ((r"Found <class '[^']*Cache'>", "past_key_values", "DynamicCache"),
     "The output holds a cache object (past_key_values). Pass use_cache=False "
     "(config.use_cache=False, or use_cache=False in example_inputs)."),
    (("data-dependent", "GuardOnDataDependent", "data dependent"),
     "The model branches on, or sizes a tensor by, the value of a tensor (data-dependent "
     "control flow). Make the branch static (decide it from shapes or config), or rewrite "
     "it with torch.cond; for sizes, use torch._check / torch._check_is_size."),
    (("in output, which is not a known type", "register a pytree", "pytree"),
     "The output contains a type torch.export cannot flatten. Return tensors, tuples, "
     "lists or dicts, or register the type with torch.utils._pytree.register_pytree_node."),
    (("Constraints violated", "specialized", "ConstraintViolation"),
     "A dynamic dim was forced to a constant or a relation; capture with dynamic=False, or "
     "fix the model code that ties that size."),
    (("not supported", "Unsupported", "unsupported"),
     "An op or Python construct is not supported by torch.export; replace it with a "
     "torch op or move it out of forward."),
]


# The first three hints (cache, data-dependence, output type) are failures
# that exporting with static shapes would not fix.
_STATIC_CANNOT_FIX = _HINTS[:3]


def _user_frame(exc):
    """'file:line in func: code' of the innermost frame outside torch, or None."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and not f.filename.endswith("capture.py")
              and not f.filename.startswith("<")]
    text = str(exc)
    marker = "The following call raised this error:"
    if marker in text:
        where = text.split(marker, 1)[1].strip().splitlines()[0].strip()
        found = re.match(r'File "(.+)", line (\d+)', where)
        code = linecache.getline(found[1], int(found[2])).strip() if found else ""
        return f"{where}: {code}" if code else where
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"
    return None


def _headline(exc):
    """First meaningful line of a torch export error."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith("def ") and "Traceback" not in line:
            return line[:300]
    return type(exc).__name__


def capture_error(exc, model_name):
    """A CaptureError naming the failing construct, where it is, and what to do."""
    text = f"{type(exc).__name__} {exc}"
    hint = next((h for keys, h in _HINTS if any(re.search(k, text) for k in keys)),
                "See the torch.export error below; torch.export.draft_export(model, args, "
                "kwargs) lists every problem at once.")
    where = _user_frame(exc)
    msg = [f"torch.export could not capture {model_name}: {_headline(exc)}"]
    if where:
        msg.append(f"  where: {where}")
    msg.append(f"What to do: {hint}")
    return CaptureError("\n".join(msg))


# -------------------------------------------------------------------- capture

def _may_be_shape_related(exc):
    """False for failures static shapes cannot fix: caches, outputs, data-dependence."""
    text = f"{type(exc).__name__} {exc}"
    return not any(re.search(k, text) for keys, _ in _STATIC_CANNOT_FIX for k in keys)


def _export(model, args, kwargs, dynamic_shapes):
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    return ep.module()


def _export_auto(model, args, kwargs):
    """Export with Dim.AUTO on the wanted dims; image dims the graph ties by an equation
    are exported again as static (see _tied_images)."""
    gm = _export(model, args, kwargs, _dynamic_shapes(model, args, kwargs))
    tied = _tied_images(gm, args, kwargs)
    if tied:
        gm = _export(model, args, kwargs, _dynamic_shapes(model, args, kwargs, tied))
    return gm


def _export_dynamic(model, args, kwargs, name):
    """Export with batch/sequence/image size dynamic; widen size-1 examples; else go static."""
    widened = _widen_size_one(args, kwargs)
    if widened is not None:
        try:
            return _export_auto(model, *widened)
        except Exception as e:  # noqa: BLE001 - retried below on the user's own inputs
            warnings.warn(f"fxopt.capture({name}): export with size-1 dims widened to 2 "
                          f"failed ({_headline(e)}); exporting the example as given, so "
                          f"its size-1 dims will be static.", stacklevel=3)
    try:
        return _export_auto(model, args, kwargs)
    except Exception as e:  # noqa: BLE001
        if not _may_be_shape_related(e):
            raise capture_error(e, name) from e
        first = e
    try:
        gm = _export(model, args, kwargs, None)
    except Exception:  # noqa: BLE001 - the dynamic error is the more telling one
        raise capture_error(first, name) from first
    warnings.warn(f"fxopt.capture({name}): dynamic export failed ({_headline(first)}); "
                  f"captured with every shape static.", stacklevel=3)
    return gm


def capture(model: nn.Module, example_inputs, dynamic: bool = True) -> fx.GraphModule:
    """Capture ``model`` into an ATen-level ``fx.GraphModule`` with torch.export.

    The result is called exactly like ``model`` and returns the same output
    structure. Batch (dim 0 of every tensor input), sequence (dim 1 of
    token inputs and of [batch, seq, hidden] inputs) and image height and
    width (dims 2 and 3 of 4-D float inputs) are dynamic unless
    ``dynamic=False``; batch and sequence dims export had to fix are reported
    with a warning, image sizes the model fixes only in ``static_dims``.
    ``gm.meta['fxopt_capture']`` records ``dynamic_dims``
    (``{input: {dim: symbol}}``), ``dynamic_ranges`` (``{input: {dim: (lowest,
    highest or None)}}`` as export found them; the entry check enforces the
    highest), ``static_dims`` (wanted dynamic but fixed:
    ``{input: {dim: size}}``) and ``input_names``. The user's model is not
    modified: it is deep-copied before export. Thread-safe: captures from several
    threads take turns (TRACE_LOCK).

        gm = capture(model, (torch.randn(4, 32),))
        gm(torch.randn(7, 32))                    # another batch size
    """
    args, kwargs = normalize_inputs(example_inputs)
    _check_inputs(model, args, kwargs)
    name = type(model).__name__
    # Why deepcopy: export runs forward on the model and the graph shares its
    # parameters; a pass folding weights in place must not reach the user's model.
    try:
        private = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"could not deep-copy {name} before export ({e}); make the model "
                           "copyable (copy.deepcopy) or move non-copyable state out of it.") from e
    private = _name_extra_kwargs(private.eval(), kwargs)
    with TRACE_LOCK:
        try:
            if dynamic:
                gm = _export_dynamic(private, args, kwargs, name)
            else:
                gm = _export(private, args, kwargs, None)
        except FxoptError:
            raise
        except Exception as e:  # noqa: BLE001 - every torch failure becomes a CaptureError
            raise capture_error(e, name) from e
        return _finish(gm, private, args, kwargs, dynamic, name)


def _finish(gm, model, args, kwargs, dynamic, name):
    names = input_names(model, args, kwargs)
    flat = pytree.tree_leaves((args, kwargs))
    wanted = {n: _wanted_dims(x) for n, x in zip(names, flat)} if dynamic else {}
    dynamic_dims, ranges, static_dims = _dim_record(gm, names, wanted)
    _warn_static(static_dims, name)
    annotate(gm)
    gm.meta[CAPTURE_META] = {"dynamic_dims": dynamic_dims, "dynamic_ranges": ranges,
                             "static_dims": static_dims, "input_names": names}
    return gm
