"""Make NaN and inf in a sample's float inputs give NaN in that sample's float outputs.

int8 kernels clamp NaN and inf to integers, so without this an int8 model answers a
corrupt input with plausible numbers (see fxopt.runtime.nonfinite). The rewrite adds one
check of the float inputs whose first dimension is the dynamic batch, and marks the
float outputs that share that batch dimension.
"""
from __future__ import annotations

from fxopt.core.ir import infer_meta, storage_roots
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.runtime.nonfinite import nonfinite_samples, poison_samples_

PASS = PassInfo("propagate_nonfinite", doc="NaN/inf in a sample's inputs -> NaN in its outputs")


def run(gm, ctx) -> PassResult:
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder" and _batched_float(n) and not _mask_only(n)]
    batch = {_batch(n) for n in inputs}
    if len(batch) != 1:
        why = "no float input with a dynamic batch dim" if not batch else "inputs disagree on the batch dim"
        return PassResult(changed=False, stats={"skipped": why})
    output = next(n for n in graph.nodes if n.op == "output")
    fresh = [n for n in output.all_input_nodes if _batched_float(n) and _batch(n) in batch
             and all(r.op == "call_function" for r in storage_roots(n))]
    if not fresh:
        return PassResult(changed=False, stats={"skipped": "no float output shares the batch dim"})
    with graph.inserting_before(_first_call(graph)):
        bad = graph.call_function(nonfinite_samples, (inputs,))
    infer_meta(gm, bad)
    for node in fresh:
        with graph.inserting_before(output):
            marked = graph.call_function(poison_samples_, (node, bad))
        marked.meta.update(node.meta)
        output.replace_input_with(node, marked)
    gm.recompile()
    return PassResult(changed=True, stats={"inputs": len(inputs), "outputs": len(fresh)})


_ATTENTION = ("aten::scaled_dot_product_attention", "fxopt::attention_int8", "fxopt::quantized_attention")
_METADATA = ("aten::sym_size", "aten::sym_numel", "aten::sym_stride", "aten::_assert_tensor_metadata")


def _mask_only(start) -> bool:
    """Whether an input reaches the model only as attention masks: -inf there means "do not
    attend", not a bad value. Walks forward; entering an attention op through its attn_mask
    argument ends a path, reaching the output or any other argument of one does not."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            schema = getattr(user.target, "_schema", None)
            if user.op == "output":
                return False
            if schema is not None and schema.name in _METADATA:
                continue                              # reads the shape, not the values
            if schema is not None and schema.name in _ATTENTION:
                values = dict(zip((a.name for a in schema.arguments), user.args), **user.kwargs)
                if any(v is node for k, v in values.items() if k != "attn_mask"):
                    return False
                continue
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return True


def _batched_float(node) -> bool:
    val = node.meta.get("val")
    return hasattr(val, "dtype") and val.dtype.is_floating_point and val.dim() >= 1 \
        and not str(val.shape[0]).isdigit()


def _batch(node) -> str:
    return str(node.meta["val"].shape[0])


def _first_call(graph):
    return next(n for n in graph.nodes if n.op == "call_function")   # after the input check
