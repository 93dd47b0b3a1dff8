"""IR helpers: op kinds, the pattern matcher, stable ids, metadata, drift maths."""
import math

import numpy as np
import torch
from torch import nn

import fxopt
from fxopt.core.drift import tensor_drift
from fxopt.core.ops import Activation, OpKind, activation_of, is_eval_batch_norm, kind_of
from fxopt.core.pattern import Pat, find_all


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = nn.functional.relu6(self.bn(self.conv(x)))
        return nn.functional.gelu(self.fc(y.mean((2, 3))), approximate="tanh")


def _gm():
    return fxopt.capture(Net().eval(), (torch.randn(2, 3, 6, 6),))


def test_kinds_and_activations():
    gm = _gm()
    kinds = [kind_of(n) for n in gm.graph.nodes if n.op == "call_function"]
    assert OpKind.CONV in kinds and OpKind.BATCH_NORM in kinds and OpKind.LINEAR in kinds
    acts = [activation_of(n) for n in gm.graph.nodes if kind_of(n) is OpKind.ACTIVATION]
    assert acts == [Activation("hardtanh", (0.0, 6.0)), Activation("gelu_tanh")]


def test_pattern_matches_and_respects_single_user():
    gm = _gm()
    pat = Pat(is_eval_batch_norm, Pat(OpKind.CONV, name="conv", single_user=True), name="bn")
    (m,) = find_all(gm, pat)
    assert kind_of(m["conv"]) is OpKind.CONV and m["bn"].args[0] is m["conv"]
    assert find_all(gm, Pat(OpKind.LINEAR, Pat(OpKind.CONV))) == []


def test_ids_are_unique_and_survive_rewrites():
    model = Net().eval()
    gm = fxopt.capture(model, (torch.randn(2, 3, 6, 6),))
    ids = [n.meta["fxopt_id"] for n in gm.graph.nodes]
    assert len(ids) == len(set(ids))
    bn_id = next(n.meta["fxopt_id"] for n in gm.graph.nodes if kind_of(n) is OpKind.BATCH_NORM)
    fast = fxopt.optimize(model, (torch.randn(2, 3, 6, 6),), target="fold_batchnorm")
    conv = next(n for n in fast.graph.nodes if kind_of(n) is OpKind.CONV)
    # the folded conv now produces the batch norm's value, so it carries that value's id
    assert conv.meta["fxopt_id"] == bn_id and conv.meta["fxopt_layer"] == "conv"
    assert tuple(conv.meta["val"].shape)[1:] == (4, 4, 4)


def test_printer_is_stable_across_captures():
    from fxopt.core.printer import format_ir
    assert format_ir(_gm()) == format_ir(_gm())
    assert "%0 = input x : f32[s0, 3, s1, s2]" in format_ir(_gm())


def test_drift_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000)
    b = a + rng.standard_normal(1000) * 0.01
    d = tensor_drift(torch.tensor(a), torch.tensor(b))
    sqnr = 10 * np.log10((a ** 2).sum() / ((b - a) ** 2).sum())
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert math.isclose(d.sqnr_db, sqnr, rel_tol=1e-9) and math.isclose(d.cosine, cos, rel_tol=1e-12)
    assert d.max_abs == np.abs(b - a).max()
    exact = tensor_drift(torch.tensor(a), torch.tensor(a))
    assert exact.sqnr_db == math.inf and exact.max_abs == 0.0
    assert exact.exceeds(0.0) is False and d.exceeds(1e-6) is True and d.exceeds(30, "sqnr") is False
