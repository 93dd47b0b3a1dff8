"""A GraphModule's weights as raw storage blobs plus a JSON table, and back.

Each distinct storage becomes one uint8 blob; each weight records which blob,
its dtype, shape, stride and offset, and whether it was a parameter, a
buffer (persistent or not) or a plain tensor attribute. So tied weights stay
tied, views and non-contiguous strides come back as they were (strides can
change which kernel runs, hence the bits of the result), and any dtype
round-trips, packed int8/uint8/int32 weights included.

    blobs, table = collect_weights(gm)     # [uint8 tensors], {"fc.weight": {...}}
    weights = rebuild_weights(table, blobs)
    assign_weight(module, "fc.weight", *weights["fc.weight"])
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn

from fxopt.artifact.graph_json import check_attr_path
from fxopt.core.errors import ArtifactError

KINDS = ("parameter", "buffer", "constant")


def collect_weights(gm: fx.GraphModule) -> tuple[list, dict]:
    """The storage blobs and the weight table of every tensor a get_attr node reads."""
    blobs, index, table = [], {}, {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in table:
            continue
        name = str(node.target)
        owner, field = _owner(gm, name)
        t = getattr(owner, field)
        _check_savable(name, t)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else ("empty", name)
        if key not in index:
            index[key] = len(blobs)
            blobs.append(torch.empty(0, dtype=torch.uint8).set_(storage).detach())
        table[name] = {"storage": index[key], "dtype": str(t.dtype).removeprefix("torch."),
                       "shape": list(t.shape), "stride": list(t.stride()),
                       "offset": t.storage_offset(), "kind": _kind(owner, field, t),
                       "requires_grad": bool(t.requires_grad),
                       "persistent": field not in getattr(owner, "_non_persistent_buffers_set", ())}
    return blobs, table


def _owner(gm: nn.Module, name: str):
    *path, field = name.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, field


def _check_savable(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"cannot save weight {name}: it is a {type(t).__name__}, not a tensor")
    if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
        raise ArtifactError(f"cannot save weight {name}: a {t.device.type} {t.layout} tensor"
                            f"{' (quantized)' if t.is_quantized else ''}; fxopt saves dense CPU "
                            "tensors. Move the model to CPU (model.cpu()) before saving.")


def _kind(owner: nn.Module, field: str, t: torch.Tensor) -> str:
    if isinstance(t, nn.Parameter):
        return "parameter"
    return "buffer" if field in owner._buffers else "constant"


def rebuild_weights(table: dict, blobs: list) -> dict:
    """{name: (tensor, kind, persistent)} from a weight table and its blobs."""
    weights = {}
    for name, rec in _checked_table(table).items():
        check_attr_path(name)
        try:
            weights[name] = (_view(rec, blobs, name), rec["kind"], bool(rec["persistent"]))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ArtifactError(f"corrupt weight table entry for {name} ({e}); the file is "
                                "damaged. Save the model again.") from e
    return weights


def _checked_table(table) -> dict:
    if not isinstance(table, dict):
        raise ArtifactError("corrupt file: the weight table is not a mapping")
    return table


def _view(rec: dict, blobs: list, name: str) -> torch.Tensor:
    dtype = getattr(torch, rec["dtype"], None) if isinstance(rec["dtype"], str) else None
    if not isinstance(dtype, torch.dtype) or rec["kind"] not in KINDS:
        raise ValueError(f"dtype {rec['dtype']!r}, kind {rec['kind']!r}")
    shape, stride, offset = rec["shape"], rec["stride"], rec["offset"]
    ints = list(shape) + list(stride) + [offset]
    if len(shape) != len(stride) or not all(type(i) is int and i >= 0 for i in ints):
        raise ValueError(f"shape {shape}, stride {stride}, offset {offset}")
    index = rec["storage"]
    if not (type(index) is int and 0 <= index < len(blobs)):
        raise ValueError(f"storage {index!r:.20} is not one of the file's {len(blobs)} storages")
    blob = blobs[index]
    extent = offset + sum((s - 1) * st for s, st in zip(shape, stride)) + 1
    if math.prod(shape) and extent * dtype.itemsize > blob.numel():
        raise ValueError(f"needs {extent * dtype.itemsize} bytes, storage has {blob.numel()}")
    t = torch.empty(0, dtype=dtype).set_(blob.untyped_storage(), offset, shape, stride)
    if rec["kind"] == "parameter":
        return nn.Parameter(t, requires_grad=bool(rec["requires_grad"]) and dtype.is_floating_point)
    return t


def assign_weight(root: nn.Module, name: str, t: torch.Tensor, kind: str, persistent: bool) -> None:
    """Put `t` at dotted `name` under `root` as a parameter, buffer or plain attribute."""
    *path, field = name.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, nn.Module):
            raise ArtifactError(f"corrupt weight table: {name} nests under a tensor")
    if hasattr(type(owner), field):
        raise ArtifactError(f"corrupt weight table: {name} would replace the module's own "
                            f"attribute {field!r}")
    # Why the deletes: fx.GraphModule registers every tensor it copies as a
    # buffer; the saved kind must win.
    for registry in (owner._parameters, owner._buffers):
        registry.pop(field, None)
    owner._non_persistent_buffers_set.discard(field)
    if kind == "parameter":
        owner.register_parameter(field, t)
    elif kind == "buffer":
        owner.register_buffer(field, t, persistent=persistent)
    else:
        setattr(owner, field, t)
