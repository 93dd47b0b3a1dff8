"""Stream calibration data through the graph and record activation ranges.

The ranges of the inputs of every linear/conv unit go to
ctx.state["calibrate_ranges"] = {input node id: (lo, hi)}, for the ops that
quantize their activations statically. Memory stays bounded whatever the
number of samples: observers keep running statistics or fixed-size
histograms, never activations. Without calibration data the example inputs
serve, and a warning says so.
"""
from __future__ import annotations

from fxopt import fxops
from fxopt.calibrate import calibrate, calibration_inputs
from fxopt.pass_base import PassInfo, PassResult

PASS = PassInfo("calibrate_ranges", requires=("fuse_epilogues",),
                options={"observer": "minmax", "progress": True, "max_samples": 0},
                doc="record activation ranges on calibration data (minmax, percentile, mse, entropy)")


def run(gm, ctx, observer="minmax", progress=True, max_samples=0) -> PassResult:
    units = [n for n in gm.graph.nodes if n.target in (fxops.linear_act, fxops.conv2d_act)]
    ids = sorted({n.args[0].meta["fxopt_id"] for n in units})
    if not ids:
        return PassResult(False, {"observed": 0})
    # only convs default to static ranges; a model of linears alone (dynamic) need not warn
    has_static = any(n.target is fxops.conv2d_act for n in units)
    data = calibration_inputs(ctx.example_args, ctx.example_kwargs, ctx.state.get("calibration_data"),
                              ctx.warn if has_static else (lambda message: None))
    if max_samples:
        data = _take(data, max_samples)
    ranges = calibrate(gm, data, ids, observer=observer, progress=progress)
    ctx.state["calibrate_ranges"] = ranges
    return PassResult(False, {"observed": len(ranges), "observer": observer})


def _take(data, n):
    for i, item in enumerate(data):
        if i >= n:
            return
        yield item
