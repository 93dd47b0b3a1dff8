"""Calibration survives real data: a batch holding NaN is a clear error (or left out on
request), and one outlier batch cannot stretch every static range."""
import functools
import re
import warnings

import pytest
import torch

import fxopt
from fxopt.core.drift import tensor_drift
from fxopt.core.errors import CalibrationError
from fxopt.examples import DigitsCNN, digits, train

FAST = {"latency_repeats": 0, "report_layers": False, "drift": False}


@functools.lru_cache(maxsize=None)
def trained_cnn():
    """A digits CNN (static int8 convs), its data, and 4 clean calibration batches."""
    data = digits()
    model = train(DigitsCNN(), data, epochs=3).eval()
    batches = [(data.x_train[i * 64:(i + 1) * 64],) for i in range(4)]
    return model, data, batches


def _optimize(batches, **options):
    model, data, _ = trained_cnn()
    return fxopt.optimize(model, (data.x_test[:8],), target="cpu-int8", calibration_data=batches,
                          **FAST, **options)


def _sqnr(fast):
    model, data, _ = trained_cnn()
    with torch.no_grad():
        return tensor_drift(model(data.x_test), fast(data.x_test)).sqnr_db


@pytest.mark.slow
def test_a_nan_pixel_in_a_batch_is_a_clear_error():
    _, _, batches = trained_cnn()
    bad = [b[0].clone() for b in batches]
    bad[2][5, 0, 3, 3] = float("nan")
    with pytest.raises(CalibrationError, match=r"calibration batch 2, input #0: 1 of its 4096 values are NaN, "
                                               r".*calibration_nonfinite='skip'"):
        _optimize([(b,) for b in bad])


@pytest.mark.slow
def test_skipping_nonfinite_batches_is_calibrating_without_them():
    _, data, batches = trained_cnn()
    bad = [b[0].clone() for b in batches]
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="calibration batch 1 left out: input #0 holds 1 NaN"):
        skipped = _optimize([(b,) for b in bad], calibration_nonfinite="skip")
    without = _optimize([batches[0], batches[2], batches[3]])
    x = data.x_test[:32]
    assert torch.equal(skipped(x), without(x))


@pytest.mark.slow
@pytest.mark.parametrize("factor", [30.0, 1e30])
def test_one_outlier_batch_is_left_out_and_named(factor):
    _, data, batches = trained_cnn()
    outlier = [batches[0], (batches[1][0] * factor,), batches[2], batches[3]]
    clean = _sqnr(_optimize(batches))
    with pytest.warns(UserWarning, match=rf"calibration batch 1 reaches \|x\| = {re.escape(f'{factor:.3g}')}.*left out"):
        robust = _optimize(outlier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = _sqnr(_optimize(outlier, calibration_outliers="keep"))
    without = _optimize([batches[0], batches[2], batches[3]])
    x = data.x_test[:32]
    assert torch.equal(robust(x), without(x))
    assert clean > 25 and abs(_sqnr(robust) - clean) < 1, (clean, _sqnr(robust))
    assert kept < clean - 10, (kept, clean)      # what the default protects against


@pytest.mark.slow
def test_saturation_monitor_counts_what_static_scales_clip():
    _, data, batches = trained_cnn()
    fast = _optimize(batches)
    stem = next(n for n in fast.graph.nodes if "conv2d_int8" in str(n.target))
    scale, zero_point = stem.args[11], stem.args[12]
    x = data.x_test[:64] * 4                      # past the calibrated range
    with fxopt.saturation_monitor(fast) as counts:
        fast(x)
    layer = stem.meta["fxopt_layer"]
    q = torch.round(x / scale) + zero_point       # the stem reads the model input itself
    assert counts[layer] == (int(((q < 0) | (q > 255)).sum()), x.numel()) and counts[layer][0] > 0
    assert set(counts) == {n.meta["fxopt_layer"] for n in fast.graph.nodes if "conv2d_int8" in str(n.target)}
    # a conv handed uint8 (chained) is counted by its producer: as if its input were float
    assert any(n.meta["val"].dtype == torch.uint8 for n in fast.graph.nodes if "conv2d_int8" in str(n.target))
    plain = fxopt.optimize(*trained_cnn()[:1], (data.x_test[:8],), target=fxopt.TARGETS["cpu-int8"].replace(
        "lower_to_kernels", "lower_to_kernels{chain=False}"), calibration_data=batches, **FAST)
    with fxopt.saturation_monitor(plain) as unchained:
        plain(x)
    # the same counts, but where a conv adds a uint8 residual (quantized, where plain adds
    # floats): what its readers clip may differ by the values near the range's ends
    convs = [n for n in fast.graph.nodes if "conv2d_int8" in str(n.target)]
    near = {u.meta["fxopt_layer"] for n in convs if len(n.args) > 16 and n.args[16] > 0 for u in n.users}
    assert near and set(counts) == set(unchained)
    for name, (clipped, total) in counts.items():
        want = unchained[name]
        assert total == want[1] and (clipped == want[0] if name not in near
                                     else abs(clipped - want[0]) <= max(2, want[0] // 100)), (name, counts, unchained)
    with fxopt.saturation_monitor(fast) as calm:
        fast(data.x_test[:64])
    assert calm[layer][0] < counts[layer][0]
    fast(x)                                        # off again: nothing counted
    assert counts[layer][1] == x.numel()
