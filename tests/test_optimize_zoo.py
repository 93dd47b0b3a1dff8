"""Every zoo model through optimize(target="cpu-fp32"): same outputs, same structure, any batch/sequence."""
import pytest
import torch

import fxopt
from zoo import ZOO, zoo_params


def call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _assert_same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got.keys()) == list(expected.keys())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # fp32 round-off only


@pytest.mark.parametrize("name", zoo_params(fast=("mlp",)))
def test_cpu_fp32_matches_original(name):
    model, example, other = ZOO[name]()
    fast = fxopt.optimize(model, example, target="cpu-fp32")
    with torch.no_grad():
        _assert_same(call(fast, example), call(model, example))
        _assert_same(call(fast, other), call(model, other))
    report = fast.fxopt_report
    assert report.records[-1].drift.cosine > 0.99999
    assert report.records[-1].nodes <= report.records[0].nodes
