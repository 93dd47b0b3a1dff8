"""An opt-in count of the activations a static int8 scale clips, per layer.

A static scale comes from calibration; inputs beyond the calibrated range saturate at
0 or 255, as int8 must. Counting them shows when live data has drifted away from the
calibration data. Off by default: when off, the kernel ops pay one context-variable
look-up per call.

    with fxopt.saturation_monitor(fast) as counts:
        fast(x)
    counts    # {"conv1": (clipped, total), ...} for the layers with a static scale

A layer handed uint8 by the layer before it (chained: its input never exists in float) is
counted by that layer, which computes its float output once more while a monitor is on and
counts what the requantization to the next layer's scale clips (before a max pool between
two convs, if any).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fxopt_saturation", default=None)

STATIC_OPS = ("fxopt::linear_int8", "fxopt::linear_int8_sparse", "fxopt::linear_int4", "fxopt::conv2d_int8")


@contextlib.contextmanager
def monitor(gm: torch.fx.GraphModule):
    """Count, while the block runs, the inputs each static-scale int8 layer of `gm` clips."""
    layers, feeds = {}, {}
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.name in STATIC_OPS:
            packed = _packed_of(gm, node)
            if packed is not None:
                layers[id(packed)] = node.meta.get("fxopt_layer", node.name)
                source = _chained_source(node.args[0])
                if source is not None and _packed_of(gm, source) is not None:
                    feeds.setdefault(id(_packed_of(gm, source)), []).append(layers[id(packed)])
    counts: dict = {}
    token = _ACTIVE.set((layers, counts, feeds))
    try:
        yield counts
    finally:
        _ACTIVE.reset(token)


def _packed_of(gm, node):
    packed = node.args[1] if len(node.args) > 1 else None
    if isinstance(packed, torch.fx.Node) and packed.op == "get_attr":
        return gm.get_buffer(packed.target)
    return None


# where a kernel op's out_scale is (> 0: its output is uint8, chained to the next layer)
_OUT_SCALE_ARG = {"fxopt::conv2d_int8": 14, "fxopt::linear_int8": 11, "fxopt::linear_int8_sparse": 11,
                  "fxopt::linear_int4": 11, "fxopt::linear_bf16": 11}


def _chained_source(x):
    """The chained layer whose uint8 output x is (directly or through fxopt's max pool), or None."""
    if _op_name(x) == "fxopt::max_pool2d":
        x = x.args[0]
    i = _OUT_SCALE_ARG.get(_op_name(x))
    if i is None or len(x.args) <= i or not x.args[i] > 0:
        return None
    return x


def _op_name(x):
    schema = getattr(x.target, "_schema", None) if isinstance(x, torch.fx.Node) else None
    return schema.name if schema is not None else None


def active() -> bool:
    """Whether a monitor is counting in this context."""
    return _ACTIVE.get() is not None


def count(packed: torch.Tensor, x: torch.Tensor, scale: float, zero_point: int) -> None:
    """Called by a static-scale kernel op with its input: adds its clipped values, if on."""
    state = _ACTIVE.get()
    if state is None or scale <= 0 or x.dtype == torch.uint8:
        return
    layers, counts, _ = state
    layer = layers.get(id(packed))
    if layer is not None:
        _add(counts, layer, x, scale, zero_point)


def count_chained(packed: torch.Tensor, y: torch.Tensor, scale: float, zero_point: int) -> None:
    """Called by a chained conv with its float output, if a monitor is on: the layers it
    hands uint8 add what its requantization to (scale, zero_point) clips."""
    state = _ACTIVE.get()
    if state is not None:
        for layer in state[2].get(id(packed), ()):
            _add(state[1], layer, y, scale, zero_point)


def _add(counts, layer, x, scale, zero_point):
    q = torch.round(x.detach().float() / scale) + zero_point
    clipped = int(((q < 0) | (q > 255) | torch.isnan(q)).sum())
    before = counts.get(layer, (0, 0))
    counts[layer] = (before[0] + clipped, before[1] + x.numel())
