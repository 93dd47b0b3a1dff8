"""The report's model summary: size and latency say which way they went."""
import os

import pytest
import torch

from fxopt.cli import main
from fxopt.report.model_report import change, format_summary

ZOO = os.path.join(os.path.dirname(__file__), "zoo.py")


def test_size_and_latency_lines_say_which_way_they_went():
    assert change(2.0, 1.0, "smaller", "larger") == "2.00x smaller"
    assert change(1.0, 1.37, "smaller", "larger") == "1.37x larger"
    assert change(5.0, 5.0, "faster", "slower") == "1.00x faster"
    text = format_summary({"fp32_bytes": 20_000, "optimized_bytes": 27_400, "macs_original": 1e6,
                           "macs_optimized": 1e6, "int8_macs": 1e6, "latency_original": 1e-3,
                           "latency_optimized": 4e-3, "latency_repeats": 5})
    assert "size: 0.02 MB fp32 -> 0.03 MB (1.37x larger)" in text
    assert "1.00 ms -> 4.00 ms (4.00x slower)" in text


@pytest.mark.slow
def test_a_model_that_grows_is_reported_larger(capsys):
    # a model this small grows when int8: packed weights and column sums outweigh its fp32 weights
    assert main(["bisect", f"{ZOO}:cnn_bn_residual", "--target", "cpu-int8", "--tol", "1"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("size:"))
    assert line.endswith("x larger)"), line


def test_the_report_says_which_input_sizes_may_change_and_which_the_model_fixed():
    import warnings
    from torch import nn
    import fxopt
    x = torch.randn(2, 3, 32, 32)
    pooled = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    flat = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        any_size = fxopt.optimize(pooled.eval(), (x,), "cpu-fp32", latency_repeats=0).fxopt_report
        fixed = fxopt.optimize(flat.eval(), (x,), "cpu-fp32", latency_repeats=0).fxopt_report
    assert "inputs (* = any size): input [*, 3, *, *]" in any_size.sections["model"]
    assert "fixed by" not in any_size.sections["model"]
    assert ("inputs (* = any size): input [*, 3, 32, 32]; fixed by the model: input dims 2, 3 "
            "(optimize again with inputs of the size you will call it with)") in fixed.sections["model"]
