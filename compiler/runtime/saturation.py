"""An opt-in count of the activations a static int8 scale clips, per layer.

A static scale comes from calibration; inputs beyond the calibrated range saturate at
0 or 255, as int8 must. Counting them shows when live data has drifted away from the
calibration data. Off by default: when off, the kernel ops pay one context-variable
look-up per call.

    with fxopt.saturation_monitor(fast) as counts:
        fast(x)
    counts    # {"conv1": (clipped, total), ...} for the layers with a static scale
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
    layers = {}
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.name in STATIC_OPS:
            packed = node.args[1]
            if isinstance(packed, torch.fx.Node) and packed.op == "get_attr":
                layers[id(gm.get_buffer(packed.target))] = node.meta.get("fxopt_layer", node.name)
    counts: dict = {}
    token = _ACTIVE.set((layers, counts))
    try:
        yield counts
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether a monitor is counting in this context."""
    return _ACTIVE.get() is not None


def count(packed: torch.Tensor, x: torch.Tensor, scale: float, zero_point: int) -> None:
    """Called by a static-scale kernel op with its input: adds its clipped values, if on."""
    state = _ACTIVE.get()
    if state is None or scale <= 0 or x.dtype == torch.uint8:
        return
    layers, counts = state
    layer = layers.get(id(packed))
    if layer is None:
        return
    q = torch.round(x.detach().float() / scale) + zero_point
    clipped = int(((q < 0) | (q > 255) | torch.isnan(q)).sum())
    before = counts.get(layer, (0, 0))
    counts[layer] = (before[0] + clipped, before[1] + x.numel())
