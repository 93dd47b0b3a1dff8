"""SmoothQuant (smooth_activations): same function in fp32, less int8 error where outliers exist."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.core.drift import drift
from zoo import ZOO

INT8 = fxopt.TARGETS["cpu-int8"]
FP32 = fxopt.TARGETS["cpu-fp32"]


class OutlierBlock(nn.Module):
    """A pre-LN block whose LayerNorm output has a few huge channels, as trained LLMs do."""

    def __init__(self, d=64):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        with torch.no_grad():
            self.ln.weight[:3] = 40.0

    def forward(self, x):
        h = self.ln(x)
        return self.out(torch.relu(self.fc(h))) + self.q(h) * self.k(h)


def _block():
    torch.manual_seed(0)
    return OutlierBlock().eval(), (torch.randn(4, 16, 64),)


def test_smoothing_keeps_fp32_function():
    model, x = _block()
    smoothed = fxopt.optimize(model, x, target=FP32 + ",smooth_activations{mode=on}", latency_repeats=0)
    assert smoothed.fxopt_report.record("smooth_activations").stats["smoothed"] == 1
    torch.testing.assert_close(smoothed(*x), model(*x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smoothing_cuts_int8_error_on_outliers():
    model, x = _block()
    plain = fxopt.optimize(model, x, target=INT8.replace("smooth_activations,", ""), latency_repeats=0)
    smooth = fxopt.optimize(model, x, target=INT8, latency_repeats=0)
    assert smooth.fxopt_report.record("smooth_activations").stats["smoothed"] == 1
    with torch.no_grad():
        before, after = drift(model(*x), plain(*x)), drift(model(*x), smooth(*x))
    assert after.sqnr_db > before.sqnr_db + 3, (str(before), str(after))


@pytest.mark.slow
def test_post_ln_residual_is_left_alone():
    # BERT's LayerNorm outputs also feed the residual add: a scale could not be folded away
    model, example, _ = ZOO["bert"]()
    fast = fxopt.optimize(model, example, target=FP32 + ",smooth_activations{mode=on}", latency_repeats=0)
    assert fast.fxopt_report.record("smooth_activations").stats == {"smoothed": 0, "not_helpful": 0,
                                                                    "candidates": 0}


def test_auto_mode_skips_where_it_does_not_help():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32)).eval()  # no outliers at all
    x = (torch.randn(8, 32),)
    results = {}
    for mode in ("auto", "on", "off"):
        fast = fxopt.optimize(model, x, target=INT8.replace("smooth_activations", f"smooth_activations{{mode={mode}}}"),
                              latency_repeats=0)
        with torch.no_grad():
            results[mode] = drift(model(*x), fast(*x)).sqnr_db
    # auto keeps whichever of the two gives the lower int8 error
    assert results["auto"] in (results["on"], results["off"])
    assert results["auto"] >= max(results["on"], results["off"]) - 0.5, results
