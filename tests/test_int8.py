"""cpu-int8 end to end: the zoo stays close to fp32, digits keep their accuracy, the report explains."""
import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.core.drift import drift
from fxopt.core.errors import CalibrationError, PassError
from fxopt.examples import DigitsCNN, DigitsMLP, accuracy, digits, train
from fxopt.quant import qops
from fxopt.runtime import kernel_ops
from zoo import ZOO, zoo_params


def call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


@pytest.mark.parametrize("name", zoo_params(fast=("mlp",)))
def test_zoo_int8_close_to_fp32(name):
    model, example, other = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrating on the example inputs warns; expected here
        fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example, other],
                              latency_repeats=0)
    with torch.no_grad():
        for inputs in (example, other):  # other: another batch size (and sequence length)
            d = drift(call(model, inputs), call(fast, inputs))
            assert d.cosine >= 0.99, (name, str(d))
    stats = fast.fxopt_report.record("quantize_int8").stats
    assert stats["linear"] + stats["conv2d"] > 0
    for row in fast.fxopt_report.layers:
        assert row["precision"] == "int8", row          # depthwise convs too (kernels/depthwise.py)


@pytest.mark.slow
def test_lowered_kernels_match_reference_ops():
    model, example, _ = ZOO["bert"]()
    reference = fxopt.optimize(model, example, target=fxopt.TARGETS["cpu-fp32"] + ",quantize_int8",
                               latency_repeats=0)
    lowered = fxopt.optimize(model, example, target=fxopt.TARGETS["cpu-fp32"] + ",quantize_int8,lower_to_kernels",
                             latency_repeats=0)
    targets = {n.target for n in lowered.graph.nodes}
    assert kernel_ops.linear_int8 in targets and qops.quantized_linear not in targets
    with torch.no_grad():
        d = drift(call(reference, example), call(lowered, example))
    # same quantized numbers; only the float epilogue's rounding order differs
    assert d.sqnr_db > 80, str(d)


@pytest.fixture(scope="module")
def digits_models():
    data = digits()
    return data, train(DigitsCNN(), data, epochs=12), train(DigitsMLP(), data, epochs=25)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_digits_accuracy_within_half_point(digits_models, which):
    data, cnn, mlp = digits_models
    model = cnn if which == "cnn" else mlp
    calib = [x for x, _ in data.batches(batch_size=64)][:8]
    fast = fxopt.optimize(model, (data.x_train[:32],), target="cpu-int8", calibration_data=[(x,) for x in calib],
                          latency_repeats=0)
    before = accuracy(model, data.x_test, data.y_test)
    after = accuracy(fast, data.x_test, data.y_test)
    assert before > 0.9
    assert after >= before - 0.005, (before, after)


def test_skip_and_per_layer_keep_fp32_with_reason():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = (torch.randn(4, 16),)
    fast = fxopt.optimize(model, x, target=fxopt.TARGETS["cpu-int8"].replace(
        "quantize_int8", "quantize_int8{skip=('0',),per_layer={'4': 'fp32'}}"), latency_repeats=0)
    rows = {r["layer"]: r for r in fast.fxopt_report.layers}
    assert rows["0"]["precision"] == "fp32" and "skip" in rows["0"]["why"]
    assert rows["4"]["precision"] == "fp32" and "per_layer" in rows["4"]["why"]
    assert rows["2"]["precision"] == "int8"
    torch.testing.assert_close(fast(*x), model(*x), rtol=0.05, atol=0.05)
    assert "layers:" in str(fast.fxopt_report) and "size:" in str(fast.fxopt_report)


class _PaddedStem(nn.Module):
    """A TensorFlow-style "same" stem (an explicit asymmetric pad), then a second conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.body(torch.relu(self.stem(nn.functional.pad(x, (0, 1, 0, 1)))))


def test_image_stem_fp32_keeps_only_the_first_conv_fp32():
    torch.manual_seed(0)
    model = _PaddedStem().eval()
    x = torch.randn(4, 3, 16, 16)
    calib = [(torch.randn(4, 3, 16, 16),)]
    target = fxopt.TARGETS["cpu-int8"].replace("quantize_int8", "quantize_int8{image_stem=fp32}")
    fast = fxopt.optimize(model, (x,), target=target, calibration_data=calib, latency_repeats=0, latency_aware=False)
    rows = {r["layer"]: r for r in fast.fxopt_report.layers}
    assert rows["stem"]["precision"] == "fp32" and "image_stem" in rows["stem"]["why"]
    assert rows["body"]["precision"] == "int8"
    with torch.no_grad():
        want, other = model(x), model(torch.randn(4, 3, 16, 16))
        assert (want - other).abs().max() > 0.5                 # the output depends on the input
        # int8 against fp32 by cosine, as the zoo test above: element-wise, one value past the
        # calibrated range (these inputs are random) sits off by more than any fixed atol
        assert drift(want, fast(x)).cosine >= 0.999
    default = fxopt.optimize(model, (x,), target="cpu-int8", calibration_data=calib, latency_repeats=0,
                             latency_aware=False)
    assert {r["layer"]: r["precision"] for r in default.fxopt_report.layers} == {"stem": "int8", "body": "int8"}
    with pytest.raises(fxopt.PassError, match="image_stem=.int4.; use fp32 or int8"):
        fxopt.optimize(model, (x,), target=target.replace("image_stem=fp32", "image_stem=int4"), latency_repeats=0)


def test_a_tf_same_stem_reads_the_input_with_its_pads_folded():
    """The stem's asymmetric pad folds into the int8 conv as four pads, and the conv reads the
    model's float NCHW input as it comes (no pad, no NHWC copy): the result is that of the
    same layers given the input padded outside, bit for bit."""
    torch.manual_seed(0)
    model = _PaddedStem().eval()
    unpadded = nn.Sequential(model.stem, nn.ReLU(), model.body).eval()

    def pad(t):
        return nn.functional.pad(t, (0, 1, 0, 1))
    x, other, calib = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(8, 3, 16, 16)
    kw = dict(target="cpu-int8", latency_repeats=0, latency_aware=False)
    fast = fxopt.optimize(model, (x,), calibration_data=[(calib,)], **kw)
    ref = fxopt.optimize(unpadded, (pad(x),), calibration_data=[(pad(calib),)], **kw)
    assert fast.fxopt_report.record("lower_to_kernels").stats["pads_folded"] == 1
    assert not any("pad" in str(n.target) for n in fast.graph.nodes)
    stem = next(n for n in fast.graph.nodes if n.target is kernel_ops.conv2d_int8)
    assert stem.args[0].op == "placeholder" and list(stem.args[7]) == [0, 0, 1, 1]
    with torch.no_grad():
        assert (model(x) - model(other)).abs().max() > 0.5                 # the output depends on the input
        for inp in (x, other):
            assert torch.equal(fast(inp), ref(pad(inp)))
        assert drift(model(x), fast(x)).cosine >= 0.999


def test_bad_calibration_data_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    with pytest.raises(CalibrationError) as info:
        fxopt.optimize(model, x, target="cpu-int8", calibration_data=[(torch.randn(2, 5, 8, 8),)])
    assert "item 0" in str(info.value)


def test_missing_calibration_warns_and_still_works():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    with pytest.warns(UserWarning, match="calibration_data"):
        fast = fxopt.optimize(model, x, target="cpu-int8", latency_repeats=0)
    torch.testing.assert_close(fast(*x), model(*x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("groups,stride,k", [(1, 1, 3), (2, 2, 3), (8, 1, 3), (1, 1, 1), (1, 2, 5)])
def test_lowered_conv_matches_reference_op(groups, stride, k):
    torch.manual_seed(0)
    cin = 8
    model = nn.Sequential(nn.Conv2d(cin, 16 if groups != cin else cin, k, stride=stride, padding=k // 2,
                                    groups=groups), nn.ReLU()).eval()
    x = (torch.rand(3, cin, 10, 10),)
    base = fxopt.TARGETS["cpu-fp32"] + ",quantize_int8{activations=dynamic,depthwise=int8}"
    reference = fxopt.optimize(model, x, target=base, latency_repeats=0)
    lowered = fxopt.optimize(model, x, target=base + ",lower_to_kernels", latency_repeats=0)
    assert kernel_ops.conv2d_int8 in {n.target for n in lowered.graph.nodes}
    with torch.no_grad():
        ref_out, got = reference(*x), lowered(*x)
    # same quantized numbers (per image, as the kernel does); only float rounding differs
    assert drift(ref_out, got).sqnr_db > 70
    assert drift(model(*x), got).cosine > 0.999


def test_conv_output_feeds_view_and_residual():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8 * 6 * 6, 3)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = y + self.b(y)                   # residual add on channels_last tensors
            return self.fc(y.view(y.shape[0], -1))

    torch.manual_seed(0)
    model, x = M().eval(), (torch.randn(2, 4, 6, 6),)
    fast = fxopt.optimize(model, x, target="cpu-int8", calibration_data=[x], latency_repeats=0)
    with torch.no_grad():
        assert drift(model(*x), fast(*x)).cosine > 0.999
        other = torch.randn(5, 4, 6, 6)
        assert drift(model(other), fast(other)).cosine > 0.999


@pytest.mark.slow
def test_static_linears_chain_in_uint8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = (torch.randn(32, 16),)
    static = fxopt.TARGETS["cpu-int8"].replace("quantize_int8", "quantize_int8{activations=static}")
    reference = fxopt.optimize(model, x, target=static.replace("lower_to_kernels,", ""), calibration_data=[x],
                               latency_repeats=0)
    chained = fxopt.optimize(model, x, target=static, calibration_data=[x], latency_repeats=0)
    assert chained.fxopt_report.record("lower_to_kernels").stats["chained"] == 2
    dtypes = [n.meta["val"].dtype for n in chained.graph.nodes if n.target is kernel_ops.linear_int8]
    assert dtypes == [torch.uint8, torch.uint8, torch.float32]
    with torch.no_grad():
        # the reference quantizes the float value the same way the epilogue requantizes it
        assert drift(reference(*x), chained(*x)).sqnr_db > 80
        assert drift(model(*x), chained(*x)).cosine > 0.999
        other = torch.randn(3, 16)
        assert drift(model(other), chained(other)).cosine > 0.99
    # the saturation monitor counts a linear handed uint8 as if its input were float
    plain = fxopt.optimize(model, x, target=static.replace("lower_to_kernels", "lower_to_kernels{chain=False}"),
                           calibration_data=[x], latency_repeats=0)
    with fxopt.saturation_monitor(chained) as counts:
        chained(x[0] * 8)
    with fxopt.saturation_monitor(plain) as unchained:
        plain(x[0] * 8)
    assert counts == unchained and len(counts) == 3 and all(clipped > 0 for clipped, _ in counts.values())


def _chained_and_plain(model, data):
    """model optimized for cpu-int8 (calibrated on 4 batches of the digits) with its int8
    layers chained, and with every hand-over in float (chain=False); and the batches."""
    calib = [(x,) for x, _ in data.batches(batch_size=64)][:4]
    target = fxopt.TARGETS["cpu-int8"]
    fast = fxopt.optimize(model, (data.x_train[:32],), target=target, calibration_data=calib, latency_repeats=0)
    plain = fxopt.optimize(model, (data.x_train[:32],), target=target.replace("lower_to_kernels",
                           "lower_to_kernels{chain=False}"), calibration_data=calib, latency_repeats=0)
    return fast, plain, calib


def _near_float_hand_overs_and_fp32(model, fast, plain, data):
    """On two batches of test digits whose logits differ (the check means something): the
    chained model within 30 dB of every hand-over in float and at most one class apart
    from it, near fp32's logits, its accuracy within half a point of fp32's."""
    x, other = data.x_test[:100], data.x_test[100:200]
    with torch.no_grad():
        assert drift(model(x), model(other)).cosine < 0.5         # the logits depend on the input
        for batch in (x, other):
            got, want = fast(batch), plain(batch)
            assert drift(want, got).sqnr_db > 30, drift(want, got)
            assert (got.argmax(1) != want.argmax(1)).sum() <= 1
        assert drift(model(x), fast(x)).cosine > 0.999
    before, after = accuracy(model, data.x_test, data.y_test), accuracy(fast, data.x_test, data.y_test)
    assert before > 0.9 and after >= before - 0.005, (before, after)


@pytest.mark.slow
def test_trained_cnn_convs_chain_in_uint8_through_the_residual_block(digits_models):
    """The digits CNN's stem feeds its residual block twice: the block's first conv reads
    it, the block's last conv adds it (relu(x + block(x))). Chained, the stem writes uint8
    codes once, the first conv reads them as its input and the last adds the floats they
    stand for, then hands uint8 to the downsampling conv: 3 hand-overs in uint8 instead of
    1 before. The residual is now quantized (8 bits, the scale calibrated for the block's
    first conv), so the logits are near, not equal to, those of every hand-over in float
    (chain=False; a hand-over without a residual is bit-exact but for rounding ties: see the
    max-pool test below). The report's per-layer rows compare the values the codes stand
    for with the float model's."""
    data, cnn, _ = digits_models
    fast, plain, calib = _chained_and_plain(cnn, data)
    assert fast.fxopt_report.record("lower_to_kernels").stats["chained"] == 3
    assert plain.fxopt_report.record("lower_to_kernels").stats["chained"] == 0
    stem, first, last, down = [n for n in fast.graph.nodes if n.target is kernel_ops.conv2d_int8]
    assert [n.meta["val"].dtype for n in (stem, first, last, down)] == [torch.uint8] * 3 + [torch.float32]
    assert last.args[13] is stem and (last.args[16], last.args[17]) == (stem.args[14], stem.args[15])
    assert (stem.args[14], stem.args[15]) == (first.args[11], first.args[12])   # one scale for both readers
    _near_float_hand_overs_and_fp32(cnn, fast, plain, data)
    for conv in (stem, last):
        row = next(r for r in fast.fxopt_report.layers if r["layer"] == conv.meta["fxopt_layer"])
        assert row["cosine"] > 0.99, row


class _PooledDigitsCNN(nn.Module):
    """ResNet's first stage in small: stem, max pool, a bottleneck and its shortcut conv
    both reading the pooled value (8x8 digits)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a, self.b = nn.Conv2d(32, 32, 1), nn.Conv2d(32, 64, 3, padding=1)
        self.shortcut = nn.Conv2d(32, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        y = torch.relu(self.b(torch.relu(self.a(x))) + self.shortcut(x))
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.slow
def test_a_max_pool_between_chained_convs_runs_on_the_codes(tmp_path):
    """The stem hands uint8 through the max pool (fxopt.max_pool2d on the codes) to the two
    convs reading the pooled value, which take one scale; the logits are those of every
    hand-over in float (chain=False) on nearly every image (see the test above)."""
    data = digits()
    model = train(_PooledDigitsCNN(), data, epochs=20)
    fast, plain, calib = _chained_and_plain(model, data)
    assert fast.fxopt_report.record("lower_to_kernels").stats["chained"] == 2     # stem (through the pool), a
    pools = [n for n in fast.graph.nodes if n.target is kernel_ops.max_pool2d]
    assert len(pools) == 1 and pools[0].meta["val"].dtype == torch.uint8
    assert not any(n.target is kernel_ops.max_pool2d for n in plain.graph.nodes)
    x, other = data.x_test[:100], data.x_test[100:200]
    with torch.no_grad():
        assert drift(model(x), model(other)).cosine < 0.5
        for batch in (x, other):
            got, want = fast(batch), plain(batch)
            assert (got != want).any(dim=1).sum() <= 2
            assert drift(want, got).sqnr_db > 60
    before, after = accuracy(model, data.x_test, data.y_test), accuracy(fast, data.x_test, data.y_test)
    assert before > 0.9 and after >= before - 0.005, (before, after)
    fxopt.save(fast, tmp_path / "pooled.fxopt")              # the artifact keeps the op and the chain
    with torch.no_grad():
        assert torch.equal(fxopt.load(tmp_path / "pooled.fxopt")(x), fast(x))


class _ShortcutDigitsCNN(nn.Module):
    """Two ResNet blocks in small: the first with a shortcut conv (read only by the add), the
    second with an identity shortcut, then a strided conv (8x8 digits)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.a, self.b = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 64, 3, padding=1)
        self.shortcut = nn.Sequential(nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64))
        self.c, self.d = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 3, padding=1)
        self.down = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.b(torch.relu(self.a(x))) + self.shortcut(x))
        x = torch.relu(self.d(torch.relu(self.c(x))) + x)
        return self.head(torch.relu(self.down(x)).mean(dim=(2, 3)))


@pytest.mark.slow
def test_a_shortcut_conv_hands_its_residual_on_in_uint8():
    """Every hand-over of the two blocks is uint8: the shortcut conv, read by nothing but the
    first block's add, writes codes with the scale calibrated on its own output; each
    block's last conv adds the floats its residual's codes stand for. Fidelity on the trained
    net: the float model's logits and accuracy, near those of every hand-over in float."""
    data = digits()
    torch.manual_seed(0)
    model = train(_ShortcutDigitsCNN(), data, epochs=15)
    fast, plain, calib = _chained_and_plain(model, data)
    convs = {n.meta["fxopt_layer"]: n for n in fast.graph.nodes if n.target is kernel_ops.conv2d_int8}
    assert [layer for layer, n in convs.items() if n.meta["val"].dtype == torch.uint8] == [
        "stem.0", "a", "shortcut.0", "b", "c", "d"]
    shortcut, b, d = convs["shortcut.0"], convs["b"], convs["d"]
    assert b.args[13] is shortcut and d.args[13] is b
    assert (b.args[16], b.args[17]) == (shortcut.args[14], shortcut.args[15])
    # the shortcut's scale is its own output's calibrated range (minmax): measured here on the float model
    seen = []
    hook = model.shortcut.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for (x,) in calib:
            model(x)
    hook.remove()
    lo, hi = min(float(t.min()) for t in seen), max(float(t.max()) for t in seen)
    scale, zp = qops.qparams_from_range(min(lo, 0.0), max(hi, 0.0))
    assert shortcut.args[14] == pytest.approx(scale, rel=1e-3) and abs(shortcut.args[15] - zp) <= 1
    x, other = data.x_test[:100], data.x_test[100:200]
    with torch.no_grad():
        assert drift(model(x), model(other)).cosine < 0.5
        for batch in (x, other):
            assert drift(model(batch), fast(batch)).cosine > 0.999
            assert drift(plain(batch), fast(batch)).sqnr_db > 30
    before, after = accuracy(model, data.x_test, data.y_test), accuracy(fast, data.x_test, data.y_test)
    assert before > 0.9 and after >= before - 0.005, (before, after)


@pytest.mark.slow
def test_depthwise_convs_are_int8_unless_kept_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1)).eval()
    x = (torch.randn(2, 8, 6, 6),)
    fast = fxopt.optimize(model, x, calibration_data=[x], latency_repeats=0)
    assert all(r["precision"] == "int8" for r in fast.fxopt_report.layers)
    kept = fxopt.optimize(model, x, calibration_data=[x], latency_repeats=0, target=fxopt.TARGETS["cpu-int8"]
                          .replace("quantize_int8", "quantize_int8{depthwise=fp32}"))
    rows = {r["layer"]: r for r in kept.fxopt_report.layers}
    assert rows["0"]["precision"] == "fp32" and "depthwise" in rows["0"]["why"]
    assert rows["2"]["precision"] == "int8"
    with torch.no_grad():
        assert drift(model(*x), fast(*x)).cosine > 0.999 and drift(model(*x), kept(*x)).cosine > 0.999
    with pytest.raises(PassError, match="depthwise='int4'; use int8 or fp32"):
        fxopt.optimize(model, x, calibration_data=[x], latency_repeats=0,
                       target=fxopt.TARGETS["cpu-int8"].replace("quantize_int8", "quantize_int8{depthwise=int4}"))


class _InvertedResidual(nn.Module):
    """MobileNetV2's block as Hugging Face writes it: 1x1 expansion, depthwise 3x3 whose
    stride-2 form pads TensorFlow's "same" way (bottom and right only, a pad op of its own),
    1x1 projection; ReLU6."""

    def __init__(self, c, out, stride):
        super().__init__()
        e = 4 * c
        self.stride = stride
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, stride, padding=0 if stride == 2 else 1, groups=e, bias=False),
                                nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = self.expand(x)
        if self.stride == 2:
            y = nn.functional.pad(y, (0, 1, 0, 1))
        return self.project(self.dw(y))


class _DigitsMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.a = _InvertedResidual(16, 24, 2)         # 8x8 -> 4x4
        self.b = _InvertedResidual(24, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.b(self.a(self.stem(x))).mean(dim=(2, 3)))


@pytest.mark.slow
def test_trained_depthwise_separable_cnn_runs_uint8_from_stem_to_head(digits_models):
    """A MobileNetV2-style net trained on the digits: its stride-2 depthwise conv's pad
    (TensorFlow "same": bottom and right) folds into the conv, and every conv hands uint8 to
    the next, the depthwise ones too (kernels/depthwise.py). Its logits stay within 30 dB of
    every hand-over in float (chain=False), its accuracy within half a point of fp32's."""
    data = digits_models[0]
    model = train(_DigitsMobileNet(), data, epochs=12)
    fast, plain, calib = _chained_and_plain(model, data)
    stats = fast.fxopt_report.record("lower_to_kernels").stats
    assert stats["pads_folded"] == 1 and stats["chained"] == 6
    assert not any(n.target is torch.ops.aten.pad.default or n.target is torch.ops.aten.constant_pad_nd.default
                   for n in fast.graph.nodes)
    convs = [n for n in fast.graph.nodes if n.target is kernel_ops.conv2d_int8]
    depthwise = [n for n in convs if n.args[5][5]]
    assert len(convs) == 7 and len(depthwise) == 2
    assert [list(n.args[7]) for n in depthwise] == [[0, 0, 1, 1], [1, 1]]
    assert [n.meta["val"].dtype for n in convs] == [torch.uint8] * 6 + [torch.float32]
    _near_float_hand_overs_and_fp32(model, fast, plain, data)


class _Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expands joined by a concat."""

    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU())
        self.expand1, self.expand3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s))], 1)


class _DigitsSqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.a, self.b = _Fire(32, 16, 32), _Fire(64, 16, 32)
        self.pool = nn.MaxPool2d(2)
        self.head, self.fc = nn.Conv2d(64, 32, 1), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.head(self.b(self.pool(self.a(self.stem(x)))))).mean(dim=(2, 3)))


@pytest.mark.slow
def test_trained_fire_modules_join_uint8_codes(digits_models):
    """A SqueezeNet-style net trained on the digits: each fire module's two expand convs
    write uint8 codes with the scale their reader quantizes the concat with, the concat
    joins codes and the max pool between the modules runs on them. Its logits stay within
    30 dB of every hand-over in float (chain=False), its accuracy within half a point of fp32's."""
    data = digits_models[0]
    torch.manual_seed(0)
    model = train(_DigitsSqueezeNet(), data, epochs=12)
    fast, plain, calib = _chained_and_plain(model, data)
    assert fast.fxopt_report.record("lower_to_kernels").stats["chained"] == 7    # stem, squeezes, expands
    cats = [n for n in fast.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(cats) == 2 and all(n.meta["val"].dtype == torch.uint8 for n in cats)
    pools = [n.target for n in fast.graph.nodes if "max_pool2d" in str(n.target)]
    assert pools == [kernel_ops.max_pool2d]
    plain_cats = [n for n in plain.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(plain_cats) == 2 and all(n.meta["val"].dtype == torch.float32 for n in plain_cats)
    _near_float_hand_overs_and_fp32(model, fast, plain, data)


class _DigitsSENet(nn.Module):
    """EfficientNet's block in small: a 1x1 expansion and a depthwise 3x3 with SiLU, a
    squeeze-excite (global pool, 1x1 reduce with SiLU, 1x1 expand with sigmoid, channel
    scale), a 1x1 projection; a mean over H and W before the classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 8, 1), nn.SiLU(), nn.Conv2d(8, 64, 1),
                                nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(64, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        h = self.dw(self.expand(self.stem(x)))
        return self.fc(self.project(h * self.se(h)).mean(dim=(2, 3)))


@pytest.mark.slow
def test_trained_squeeze_excite_runs_on_the_kernels(digits_models):
    """A squeeze-excite net trained on the digits (SiLU in the conv epilogues): its global
    pools of conv outputs (the SE block's and the head's mean) run as fxopt.global_avg_pool.
    Near fp32 and within 30 dB of every hand-over in float; the plan and the graph runtime
    give the same bits; the op equals torch's pool on channels_last and other tensors."""
    data = digits_models[0]
    torch.manual_seed(0)
    model = train(_DigitsSENet(), data, epochs=12)
    fast, plain, calib = _chained_and_plain(model, data)
    pools = [n for n in fast.graph.nodes if n.target is kernel_ops.global_avg_pool]
    assert [n.args[1] for n in pools] == [True, False]                        # the SE's; the head's mean
    stats = fast.fxopt_report.record("lower_to_kernels").stats
    assert stats["global_pools"] == 2
    assert not [n for n in fast.graph.nodes if n.target in (torch.ops.aten.adaptive_avg_pool2d.default,
                                                            torch.ops.aten.mean.dim)]
    _near_float_hand_overs_and_fp32(model, fast, plain, data)
    on_graph = fxopt.optimize(model, (data.x_train[:32],), target=fxopt.TARGETS["cpu-int8"], calibration_data=calib,
                              latency_repeats=0, runtime="graph")
    with torch.no_grad():
        x = data.x_test[:64]
        torch.testing.assert_close(fast(x), on_graph(x), rtol=0, atol=0)
    h = torch.randn(3, 40, 6, 5)
    want = torch.nn.functional.adaptive_avg_pool2d(h, 1)
    for t in (h.contiguous(memory_format=torch.channels_last), h):          # the kernel; torch's mean
        for keepdim in (True, False):
            torch.testing.assert_close(kernel_ops.global_avg_pool(t, keepdim), want if keepdim else want.flatten(1))


class _Residual(nn.Module):
    """Three adds: a residual (fusable), a broadcast bias-like add and an add of a linear
    that has a second user (neither fusable)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 48), nn.Linear(48, 32), nn.Linear(32, 32)
        self.shift = nn.Parameter(torch.randn(32))

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x))) + x          # fused into fc2's epilogue
        g = self.fc3(h)
        return (g + self.shift) * (g + h)                    # broadcast; fc3 has two users


def test_residual_add_fuses_into_the_linear_epilogue(monkeypatch):
    from fxopt.passes import lower_to_kernels
    torch.manual_seed(0)
    model, x = _Residual().eval(), (torch.randn(2, 5, 32),)
    fused = fxopt.optimize(model, x, latency_repeats=0)
    assert fused.fxopt_report.record("lower_to_kernels").stats["residual_adds"] == 1
    residuals = [n for n in fused.graph.nodes if n.target is kernel_ops.linear_int8 and len(n.args) > 13]
    assert len(residuals) == 1 and residuals[0].args[13] is not None
    monkeypatch.setattr(lower_to_kernels, "_fuse_residual_adds", lambda gm: 0)
    separate = fxopt.optimize(model, x, latency_repeats=0)
    with torch.no_grad():
        for inp in (x[0], torch.randn(3, 7, 32)):   # other batch and sequence sizes too
            # one float32 add either way: in the epilogue or as aten.add
            torch.testing.assert_close(fused(inp), separate(inp), rtol=0, atol=0)
            assert drift(model(inp), fused(inp)).cosine > 0.999


class _ResBlock(nn.Module):
    """Two ResNet-style block ends: relu(bn(conv(x)) + x) and an in-place conv += skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)) + x)   # fused: add, then relu, in the epilogue
        y = self.conv2(h)
        y += h                                         # fused too: in place, y is read nowhere else
        return y


@pytest.mark.slow
def test_conv_residual_and_relu_fuse_into_the_epilogue(monkeypatch):
    from fxopt.examples import randomize_batchnorm
    from fxopt.passes import lower_to_kernels
    torch.manual_seed(0)
    model = randomize_batchnorm(_ResBlock()).eval()
    x = (torch.randn(2, 16, 10, 10),)
    fused = fxopt.optimize(model, x, calibration_data=[x], latency_repeats=0)
    assert fused.fxopt_report.record("lower_to_kernels").stats["residual_adds"] == 2
    convs = [n for n in fused.graph.nodes if n.target is kernel_ops.conv2d_int8]
    assert [n.args[9] for n in convs] == ["relu", "none"] and all(n.args[13] is not None for n in convs)
    aten = torch.ops.aten
    assert not any(n.target in (aten.add.Tensor, aten.add_.Tensor, aten.relu.default) for n in fused.graph.nodes)
    monkeypatch.setattr(lower_to_kernels, "_fuse_conv_residuals", lambda gm: 0)
    separate = fxopt.optimize(model, x, calibration_data=[x], latency_repeats=0)
    with torch.no_grad():
        for inp in (x[0], torch.randn(3, 16, 10, 10)):   # other batch sizes too
            torch.testing.assert_close(fused(inp), separate(inp), rtol=0, atol=0)
            assert drift(model(inp), fused(inp)).cosine > 0.999


# --- attention ------------------------------------------------------------------------

def _identical(got, expected):
    leaves = torch.utils._pytree.tree_leaves
    return all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(leaves(got), leaves(expected)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "distilbert", "vit"])
def test_attention_lowered_saved_and_loaded(name, tmp_path):
    model, example, other = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibrating on the example inputs warns; expected here
        fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example, other],
                              latency_repeats=0)
    targets = [n.target for n in fast.graph.nodes]
    assert targets.count(kernel_ops.attention_int8) == 2
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    # LayerNorms run on the kernels' pool too (saved and loaded like the int8 ops)
    assert kernel_ops.layer_norm in targets and torch.ops.aten.layer_norm.default not in targets
    rows = [r for r in fast.fxopt_report.layers if r["op"] == "attention"]
    assert len(rows) == 2 and all(r["precision"] == "int8" and "Q.K^T" in r["why"] for r in rows)
    fxopt.save(fast, tmp_path / "m.fxopt")
    loaded = fxopt.load(tmp_path / "m.fxopt")
    assert kernel_ops.attention_int8 in {n.target for n in loaded.graph.nodes}
    with torch.no_grad():
        for inputs in (example, other):  # other: another batch size (and sequence length)
            assert drift(call(model, inputs), call(fast, inputs)).cosine >= 0.99
            assert _identical(call(loaded, inputs), call(fast, inputs))


@pytest.mark.slow
def test_attention_fp32_option_and_per_layer_keep_sdpa_with_reason():
    model, example, other = ZOO["bert"]()
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    layer0 = "bert.encoder.layer.0.attention.self"
    for options, fp32_layers in (("attention=fp32", 2), (f"per_layer={{'{layer0}': 'fp32'}}", 1)):
        target = fxopt.TARGETS["cpu-int8"].replace("quantize_int8", f"quantize_int8{{{options}}}")
        fast = fxopt.optimize(model, example, target=target, calibration_data=[example], latency_repeats=0)
        targets = [n.target for n in fast.graph.nodes]
        assert targets.count(sdpa) == fp32_layers and targets.count(kernel_ops.attention_int8) == 2 - fp32_layers
        rows = {r["layer"]: r for r in fast.fxopt_report.layers if r["op"] == "attention"}
        assert rows[layer0]["precision"] == "fp32"
        assert ("attention='fp32'" if fp32_layers == 2 else "per_layer") in rows[layer0]["why"]
        with torch.no_grad():
            assert drift(call(model, other), call(fast, other)).cosine >= 0.99


class _Attention(nn.Module):
    """One attention call on a fused QKV projection, as transformer blocks make it."""

    def __init__(self, heads=2, dim=32, **sdpa):
        super().__init__()
        self.heads, self.qkv, self.sdpa = heads, nn.Linear(dim, 3 * dim), sdpa

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa)
        return out.transpose(1, 2).reshape(b, s, -1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is static")  # the (2, 1, 10, 10) mask fixes the sequence
@pytest.mark.parametrize("case", ["causal", "float_mask", "dropout"])
def test_attention_variants(case):
    torch.manual_seed(0)
    model = _Attention(**({"is_causal": True} if case == "causal" else
                          {"dropout_p": 0.1} if case == "dropout" else {})).eval()
    x = torch.randn(2, 10, 32)
    mask = torch.zeros(2, 1, 10, 10)
    mask[1, ..., 7:] = float("-inf")
    inputs = (x, mask) if case == "float_mask" else (x,)
    fast = fxopt.optimize(model, inputs, target="cpu-int8", calibration_data=[inputs], latency_repeats=0)
    row, = [r for r in fast.fxopt_report.layers if r["op"] == "attention"]
    if case == "dropout":
        # the graph keeps dropout_p > 0 (it samples even in eval): it stays fp32, with the reason
        assert row["precision"] == "fp32" and "dropout" in row["why"]
        return
    assert row["precision"] == "int8"
    reference = fxopt.optimize(model, inputs, latency_repeats=0,
                               target=fxopt.TARGETS["cpu-fp32"] + ",quantize_int8")
    with torch.no_grad():
        assert drift(model(*inputs), fast(*inputs)).cosine >= 0.999
        # the kernel computes the reference op's integers; only exp and float rounding differ
        assert drift(reference(*inputs), fast(*inputs)).sqnr_db > 80


@pytest.mark.parametrize("mask_shape,dtype", [(None, None), ((2, 1, 1, 12), torch.bool),
                                              ((2, 1, 9, 12), torch.bool), ((9, 12), torch.float32),
                                              ((2, 3, 9, 1), torch.bool), ((2, 1, 9, 12), torch.float16)])
def test_attention_op_matches_reference_op(mask_shape, dtype):
    torch.manual_seed(0)
    fused = torch.randn(2, 12, 3 * 3 * 16)           # q/k/v as views of one projection
    q, k, v = (t.view(2, 12, 3, 16).transpose(1, 2) for t in fused.split(48, dim=-1))
    q = q[:, :, :9]
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape) > 0.3 if dtype == torch.bool else torch.randn(mask_shape).to(dtype)
    got = kernel_ops.attention_int8(q, k, v, mask)
    ref = qops.quantized_attention(q, k, v, mask)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask is None or
                                                             mask.dtype == torch.bool else mask.float())
    assert got.shape == exact.shape and got.stride() == exact.stride() == ref.stride()
    assert drift(ref, got).sqnr_db > 80
    assert drift(exact, got).cosine > 0.999


@pytest.mark.parametrize("shape", [(2, 5, 32), (7, 768), (3, 1)])
def test_layer_norm_op_matches_torch(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    for args, kw in (((w, b), {"eps": 1e-12}), ((None, None), {})):
        want = torch.nn.functional.layer_norm(x, (shape[-1],), *args, **kw)
        torch.testing.assert_close(kernel_ops.layer_norm(x, *args, **kw), want, rtol=1e-5, atol=1e-5)
    strided = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)      # not contiguous
    torch.testing.assert_close(kernel_ops.layer_norm(strided, w, b),
                               torch.nn.functional.layer_norm(strided, (shape[-1],), w, b))
