"""Bias correction: the shift dW @ E[x] against numpy, and its effect on held-out inputs."""
import numpy as np
import pytest
import torch

import fxopt
from fxopt.core.drift import drift
from fxopt.quant import qops
from fxopt.quant.bias_correction import InputStats, weight_shift
from zoo import ZOO


def test_weight_shift_linear_matches_numpy():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    w_q, s = qops.quantize_weight_per_channel(w)
    mean = torch.rand(10)
    dw = w_q.numpy().astype(np.float64) * s.numpy()[:, None] - w.numpy()
    np.testing.assert_allclose(weight_shift(w, w_q, s, mean).numpy(), dw @ mean.numpy(), rtol=1e-4, atol=1e-6)


def test_weight_shift_grouped_conv_matches_sliding_window_mean():
    torch.manual_seed(0)
    w = torch.randn(8, 2, 3, 3)                # groups=2: 4 input channels
    w_q, s = qops.quantize_weight_per_channel(w)
    x = torch.rand(1, 4, 1, 1).expand(1, 4, 9, 9).contiguous()   # constant per channel
    stats = InputStats(conv=True)
    stats.update(x)
    dw = w_q.float() * s[:, None, None, None] - w
    # on a constant image the conv of dW is exactly the shift at every interior pixel
    expected = torch.nn.functional.conv2d(x, dw, groups=2)[0, :, 3, 3]
    torch.testing.assert_close(weight_shift(w, w_q, s, stats.mean(), groups=2), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_correction_helps_static_convs_on_held_out_inputs():
    model, example, other = ZOO["cnn_bn_residual"]()
    base = fxopt.TARGETS["cpu-int8"]
    off = fxopt.optimize(model, example, target=base.replace("quantize_int8", "quantize_int8{bias_correction=off}"),
                         calibration_data=[example], latency_repeats=0)
    auto = fxopt.optimize(model, example, target=base, calibration_data=[example], latency_repeats=0)
    assert auto.fxopt_report.record("quantize_int8").stats["bias_corrected"] > 0
    assert off.fxopt_report.record("quantize_int8").stats["bias_corrected"] == 0
    with torch.no_grad():
        d_off, d_auto = drift(model(*other), off(*other)), drift(model(*other), auto(*other))
    assert d_auto.sqnr_db > d_off.sqnr_db, (str(d_off), str(d_auto))
