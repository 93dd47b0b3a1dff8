"""NaN and inf in a model's inputs reach its outputs, as they would in eager torch.

The int8 kernels quantize NaN and inf away (a quantized value is a clamped integer), so
an int8 model would answer a sample holding NaN with finite numbers. The
propagate_nonfinite pass marks, once per call, the samples whose float inputs hold
NaN or inf, and sets those samples' float outputs to NaN: one isfinite pass over the
inputs, nothing more when every sample is finite. Where eager would give inf we give
NaN; where eager would keep part of a sample's outputs finite (a model that ignores
some input) we make all of them NaN: never a finite answer from a non-finite input.

    bad = torch.ops.fxopt.nonfinite_samples([x])        # bool (B,)
    y = torch.ops.fxopt.poison_samples_(y, bad)         # rows b of y with bad[b]: NaN, in place
"""
from __future__ import annotations

import torch

from fxopt.core.fxops import _lib

_lib.define("nonfinite_samples(Tensor[] xs) -> Tensor")
_lib.define("poison_samples_(Tensor(a!) y, Tensor bad) -> Tensor(a!)")


def _nonfinite_samples(xs):
    bad = torch.zeros(xs[0].shape[0], dtype=torch.bool)
    for x in xs:
        bad |= ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    return bad


def _poison_samples_(y, bad):
    if bad.any():
        y[bad] = float("nan")
    return y


_lib.impl("nonfinite_samples", _nonfinite_samples, "CPU")
_lib.impl("poison_samples_", _poison_samples_, "CPU")


@torch.library.register_fake("fxopt::nonfinite_samples")
def _nonfinite_samples_fake(xs):
    return xs[0].new_empty((xs[0].shape[0],), dtype=torch.bool)


@torch.library.register_fake("fxopt::poison_samples_")
def _poison_samples_fake(y, bad):
    return y


nonfinite_samples = torch.ops.fxopt.nonfinite_samples.default
poison_samples_ = torch.ops.fxopt.poison_samples_.default
