"""Stream calibration data through the graph and record activation statistics.

For the input of every linear/conv unit this records, in one pass over the data:
  ctx.state["calibrate_ranges"] = {input node id: (lo, hi)}  for static quantization
  ctx.state["calibrate_inputs"] = {input node id: InputStats} channel means and a
                                  small sample, for bias correction
and for the output of every conv unit that a residual add takes (a ResNet stage's
shortcut conv, read by nothing else):
  ctx.state["calibrate_outputs"] = {conv node id: (lo, hi)}  so that it can be handed
                                  on as uint8 codes to the conv that adds it
Memory stays bounded whatever the number of samples: observers keep running
statistics or fixed-size histograms, never all activations. Without
calibration data the example inputs serve, and a warning says so.
"""
from __future__ import annotations

import torch
from torch.fx import Node

from fxopt.core import fxops
from fxopt.core.errors import CalibrationError
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.quant.bias_correction import InputStats
from fxopt.quant.calibrate import calibration_inputs, observe
from fxopt.quant.observers import Tee, make_observer

aten = torch.ops.aten

PASS = PassInfo("calibrate_ranges", requires=("fuse_epilogues",),
                options={"observer": "minmax", "progress": True, "max_samples": 0},
                doc="record activation ranges on calibration data (minmax, percentile, mse, entropy)")


def run(gm, ctx, observer="minmax", progress=True, max_samples=0) -> PassResult:
    units = [n for n in gm.graph.nodes if n.target in (fxops.linear_act, fxops.conv2d_act)]
    inputs = {n.args[0].meta["fxopt_id"]: n.args[0] for n in units}
    if not inputs:
        return PassResult(False, {"observed": 0})
    # only convs default to static ranges; a model of linears alone (dynamic) need not warn
    has_static = any(n.target is fxops.conv2d_act for n in units)
    data = calibration_inputs(ctx.example_args, ctx.example_kwargs, ctx.state.get("calibration_data"),
                              ctx.warn if has_static else (lambda message: None),
                              ctx.options.get("calibration_nonfinite", "error"),
                              ctx.options.get("calibration_outliers", "drop"))
    if max_samples:
        data = list(_take(data, max_samples))
    added = {op.meta["fxopt_id"] for op in _residual_convs(gm)}
    ranges = {nid: make_observer(observer) for nid in inputs.keys() | added}
    # a conv's channels are dim 1, a linear's the last (also on a 4-D NHWC input, as in ConvNeXt)
    conv_inputs = {n.args[0].meta["fxopt_id"] for n in units if n.target is fxops.conv2d_act}
    stats = {nid: InputStats(conv=nid in conv_inputs) for nid in inputs}
    outputs = {nid: Tee(ranges[nid], stats[nid]) if nid in stats else ranges[nid] for nid in ranges}
    observe(gm, data, outputs=outputs, progress=progress)
    ctx.state["calibrate_ranges"] = {nid: _range(nid, ranges[nid]) for nid in inputs}
    ctx.state["calibrate_outputs"] = {nid: _range(nid, ranges[nid]) for nid in added}
    ctx.state["calibrate_inputs"] = stats
    return PassResult(False, {"observed": len(ranges), "observer": observer})


def _residual_convs(gm):
    """Conv units that are an operand of an add of two conv units (a residual block's end,
    whose shortcut is a conv), a plain add or the in-place one eager code writes."""
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and len(n.args) == 2 and not n.kwargs
            and n.target in (aten.add.Tensor, aten.add_.Tensor)
            and all(isinstance(a, Node) and a.target is fxops.conv2d_act for a in n.args)]
    return {a for add in adds for a in add.args}


def _range(nid, obs):
    try:
        return obs.range()
    except CalibrationError as e:
        raise CalibrationError(f"no usable values reached the input of node {nid}: {e}") from e


def _take(data, n):
    for i, item in enumerate(data):
        if i >= n:
            return
        yield item
