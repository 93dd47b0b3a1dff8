"""Quantization-aware fine-tuning: fake quantization equals the kernels, training moves it,
and optimize/finetune give int8 models that run on the kernels."""
import warnings

import pytest
import torch

import fxopt
from fxopt import examples as ex
from fxopt.quant import fake_quant, qat, qops
from fxopt.runtime import kernel_ops

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return ex.digits()


@pytest.fixture(scope="module")
def trained(digits):
    torch.set_num_threads(1)
    torch.manual_seed(0)            # the initial weights; train() seeds the training
    cnn = ex.train(ex.DigitsCNN(width=8), digits, epochs=4)
    mlp = ex.train(ex.DigitsMLP(hidden=64), digits, epochs=8)
    return {"cnn": cnn, "mlp": mlp}


def _calib(d, n=4):
    return [x for i, (x, _) in enumerate(d.batches(64, seed=1)) if i < n]


def _boundary_values(scale, zp):
    """Inputs at and next to every rounding boundary x * (1/scale) = k + 0.5, and beyond the grid."""
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    k = torch.arange(-zp - 3, 258 - zp, dtype=torch.float32) + 0.5
    x = k / inv
    return torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1), torch.tensor([-1e3, 1e3])])


# --- the fake-quant functions compute qops' (the kernels') numbers ----------------------

@pytest.mark.parametrize("lo, hi", [(-0.3, 1.7), (0.0, 6.0), (-2.5, 0.1)])
def test_static_activations_equal_qops_at_every_rounding_boundary(lo, hi):
    scale, zp = qops.qparams_from_range(lo, hi)
    x = _boundary_values(scale, zp)
    want = (qops.quantize_tensor(x, scale, zp) - zp) * torch.tensor(scale, dtype=torch.float32)
    got = fake_quant.static(x, torch.tensor(scale, dtype=torch.float32), zp)
    assert torch.equal(got, want)          # exact: same codes, same float32 product


def test_dynamic_rows_and_images_equal_qops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=g) * torch.tensor([0.1, 1, 10, 100, 0]).unsqueeze(1)
    q, s, z = qops.quantize_rows(x)
    assert torch.equal(fake_quant.dynamic_rows(x), (q - z[:, None]) * s[:, None])
    imgs = torch.rand(3, 2, 4, 4, generator=g) * 3 - 1
    for img, got in zip(imgs, fake_quant.dynamic_images(imgs)):
        sc, zp = qops.dynamic_tensor_qparams(img)
        assert torch.equal(got, (qops.quantize_tensor(img, sc, zp) - zp) * torch.tensor(sc, dtype=torch.float32))


def test_weights_per_channel_and_in_groups_equal_qops():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, 3, 3, generator=g)
    w[2] = 0.0
    q, s = qops.quantize_weight_per_channel(w)
    assert torch.equal(fake_quant.weight_codes(w, s), q)
    assert torch.equal(fake_quant.weight_per_channel(w, s), q.float() * s[:, None, None, None])
    w2 = torch.randn(6, 128, generator=g)
    for bits, group in ((4, 32), (4, 128), (3, 64)):
        q4, s4 = qops.quantize_weight_groups(w2, bits, group)
        assert torch.equal(fake_quant.group_codes(w2, s4, bits, group), q4)
        want = (q4.float().reshape(6, -1, group) * s4[:, :, None]).reshape(6, 128)
        assert torch.equal(fake_quant.weight_groups(w2, s4, bits, group), want)
    with pytest.raises(ValueError, match="not a multiple of group_size 32"):
        fake_quant.weight_groups(torch.ones(2, 48), torch.ones(2, 1), 4, 32)


def test_ste_passes_gradients_and_lsq_steps_get_the_lsq_gradient():
    x = torch.tensor([0.26, 0.74, 200.0, -5.0], requires_grad=True)  # in, in, above, below the grid
    step = torch.tensor(0.5, requires_grad=True)
    fake_quant.static(x, step, 2).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]                 # clamped inputs get none
    v = x.detach() / 0.5
    # LSQ: round(v) - v inside the grid, the bound (qmax - zp, qmin - zp) outside, times
    # g = 1 / sqrt(elements per sample * qmax); x is a batch of 4 scalars
    g = 1.0 / 255 ** 0.5
    want = ((v[0].round() - v[0]) + (v[1].round() - v[1]) + (255 - 2) + (0 - 2)) * g
    assert float(step.grad) == pytest.approx(float(want), rel=1e-5)
    w = torch.randn(4, 16, requires_grad=True)
    s = (w.detach().abs().amax(1) / 127).requires_grad_(True)
    (fake_quant.weight_per_channel(w, s) * torch.randn(4, 16)).sum().backward()
    assert w.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


# --- the trained fake-quant model is what the kernels compute ------------------------------

def _quantized(model, x, calib):
    """(graph after quantize_int8, {node id: the float weight each int8 op stands for})."""
    from fxopt.driver.compile import compile_model
    options = dict(stop_after="quantize_int8", latency_repeats=0, drift=False, report_layers=False)
    gm, _, manager = compile_model(model, (x,), "cpu-int8", calib, True, options, keep=True)
    return gm, manager.ctx.state["quantize_int8"]["float_weights"]


def _assert_same_model(fake, exact):
    """Each op's codes equal the kernels' (the tests above are exact). The sums are not: the
    kernels add int8 products exactly in int32 and scale once (GELU by a polynomial, the next
    layer's static quantization fused in the epilogue), the fake graph adds float32 products.
    Most samples therefore agree to fp32 round-off (< 1e-6 of the logit range measured); a
    few see a static activation land on the other side of a rounding boundary in a later
    layer, and differ by about one activation step's effect (<= 1.3e-3 measured)."""
    err = (fake - exact).abs().amax(1) / exact.abs().max()
    assert float((err <= 1e-5).float().mean()) >= 0.98
    assert float(err.max()) <= 5e-3
    assert float((fake.argmax(1) == exact.argmax(1)).float().mean()) >= 0.995


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_fake_quant_graph_equals_the_kernels(trained, digits, name):
    """The fake-quant graph computes what the kernels QAT lowers to compute: float residual
    adds (with_qat's lower_to_kernels{residual_codes=False}; by default the CNN's would be
    8-bit, which the fake graph does not model)."""
    model, x, calib = trained[name], digits.x_train[:8], _calib(digits)
    target = fxopt.TARGETS["cpu-int8"].replace("lower_to_kernels", "lower_to_kernels{residual_codes=False}")
    lowered = fxopt.optimize(model, (x,), target=target, calibration_data=calib, latency_repeats=0,
                             latency_aware=False, drift=False, report_layers=False)
    gm, floats = _quantized(model, x, calib)
    units = qat.prepare(gm, floats)
    assert units.fake and not units.frozen
    with torch.no_grad():
        _assert_same_model(gm(digits.x_test), lowered(digits.x_test))
    # untrained, convert hands back exactly the PTQ codes
    stats = qat.convert(gm, units)
    assert stats["codes_changed"] == 0 and stats["int8_ops"] == len(units.fake)


def test_training_moves_codes_and_steps_and_the_int8_ops_follow(trained, digits):
    model, x, calib = trained["cnn"], digits.x_train[:8], _calib(digits)
    gm, floats = _quantized(model, x, calib)
    units = qat.prepare(gm, floats)
    before = {n: getattr(gm, n).detach().clone() for n in units.steps}
    from fxopt.pruning.finetune import finetune
    finetune(gm, model, calib, epochs=1, lr=1e-3, progress=False, after_step=units.clamp_steps,
             param_lr=units.step_lrs(1e-3))
    moved = [n for n in units.steps if not torch.equal(before[n], getattr(gm, n).detach())]
    assert len(moved) == len(units.steps)                     # every step size was learned
    assert any("act_step" in n for n in units.steps)          # the convs' static input scales
    with torch.no_grad():
        fake = gm(digits.x_test)
    stats = qat.convert(gm, units)
    assert stats["codes_changed"] > 0
    with torch.no_grad():
        _assert_same_model(fake, gm(digits.x_test))           # the int8 ops on the trained numbers


# --- optimize(finetune=...) and fxopt.finetune ----------------------------------------------

def test_optimize_with_finetune_does_qat_and_keeps_accuracy(trained, digits, tmp_path):
    model = trained["cnn"]          # the MLP goes through it in the fxopt.finetune test below
    acc = lambda m: ex.accuracy(m, digits.x_test, digits.y_test)  # noqa: E731
    fast = fxopt.optimize(model, (digits.x_train[:8],), calibration_data=_calib(digits, 8),
                          finetune={"epochs": 1}, latency_repeats=0)
    names = [r.name for r in fast.fxopt_report.records]
    assert names.index("quantize_int8") < names.index("finetune_quantized") < names.index("lower_to_kernels")
    stats = fast.fxopt_report.record("finetune_quantized").stats
    assert stats["int8_ops"] == 6 and stats["codes_changed"] > 0      # 4 convs, 2 linears
    ops = {str(n.target) for n in fast.graph.nodes if n.op == "call_function"}
    assert any("int8" in o for o in ops) and not any("fake_quant" in o for o in ops)
    convs = [n for n in fast.graph.nodes if n.target is kernel_ops.conv2d_int8]
    assert any(len(n.args) > 13 and n.args[13] is not None for n in convs)   # the block's residual add, fused
    assert not any(len(n.args) > 16 and n.args[16] > 0 for n in convs)  # and float, as it was trained
    assert acc(fast) >= acc(model) - 0.01
    assert "quantization-aware trained" in fast.fxopt_report.sections["layers"]
    path = tmp_path / "qat.fxopt"
    fxopt.save(fast, path)
    with torch.no_grad():
        assert torch.equal(fxopt.load(path)(digits.x_test), fast(digits.x_test))


@pytest.mark.parametrize("target", ["cpu-fp32", "fold_batchnorm,fuse_epilogues"])
def test_finetune_without_pruning_or_quantization_is_an_error(trained, digits, target):
    with pytest.raises(ValueError, match="neither.*prune=.*cpu-int8"):
        fxopt.optimize(trained["mlp"], (digits.x_train[:8],), target=target, finetune={"epochs": 1})


def test_finetune_of_an_optimized_int8_model_retrains_it_from_the_teacher(trained, digits):
    model, calib = trained["mlp"], _calib(digits, 8)
    fast = fxopt.optimize(model, (digits.x_train[:8],), calibration_data=calib, latency_repeats=0)
    torch.set_num_threads(1)           # Numba's OpenMP launch set torch's count to its own (2)
    tuned = fxopt.finetune(fast, model, calib, epochs=1)
    assert tuned is not fast and tuned.fxopt_report.record("finetune_quantized").stats["codes_changed"] > 0
    assert ex.accuracy(tuned, digits.x_test, digits.y_test) >= ex.accuracy(model, digits.x_test, digits.y_test) - 0.01
    other = ex.train(ex.DigitsMLP(hidden=64), digits, epochs=1, seed=3)
    with pytest.raises(ValueError, match="weight scales differ.*not the model that was optimized"):
        fxopt.finetune(fast, other, calib, epochs=1)


def test_finetune_of_a_model_neither_pruned_nor_quantized_is_an_error(trained, digits):
    calib = _calib(digits, 2)
    fp32 = fxopt.optimize(trained["mlp"], (digits.x_train[:8],), target="cpu-fp32", latency_repeats=0)
    for student in (fp32, ex.DigitsMLP(hidden=64)):
        with pytest.raises(ValueError, match="neither: prune it first .*target='cpu-int8'"):
            fxopt.finetune(student, trained["mlp"], calib)


def test_where_finetune_puts_qat_and_distillation():
    from fxopt.core.pipeline import target_pipeline
    int8, fp32 = target_pipeline("cpu-int8"), target_pipeline("cpu-fp32")
    p, rest = qat.with_qat(int8, {"epochs": 2}, pruned=False)
    names = p.names
    assert names[names.index("quantize_int8") + 1] == "finetune_quantized" and rest == {"epochs": 2}
    assert p.passes[names.index("finetune_quantized")].options == {"epochs": 2}
    p, rest = qat.with_qat(int8, {"epochs": 2}, pruned=True)          # distillation only, as before
    assert "finetune_quantized" not in p.names and rest == {"epochs": 2}
    p, rest = qat.with_qat(int8, {"epochs": 2, "qat": True}, pruned=True)
    assert "finetune_quantized" in p.names and rest == {"epochs": 2}
    with pytest.raises(ValueError, match="has no quantize_int8"):
        qat.with_qat(fp32, {"epochs": 2, "qat": True}, pruned=True)
    with pytest.raises(fxopt.PipelineError, match="finetune: pass finetune_quantized has no option epoch"):
        qat.with_qat(int8, {"epoch": 2}, pruned=False)


def test_grouped_int4_linears_train_as_groups_and_convert_to_their_codes(trained, digits):
    """What cpu-int4's quantize_int4 makes (quantized_linear with a 2-d scale, the numbers of
    quantize_weight_groups(w, 4, group)) trains as groups and converts back to that form."""
    from fxopt.core.ir import ID
    model, calib = trained["mlp"], _calib(digits)
    gm, floats = _quantized(model, digits.x_train[:8], calib)
    want = {}
    for node in gm.graph.nodes:
        if node.target is qops.quantized_linear:          # stand in for quantize_int4
            q, s = qops.quantize_weight_groups(floats[node.meta[ID]], 4, 32)
            setattr(gm, str(node.args[1].target), q)
            setattr(gm, str(node.args[2].target), s)
            want[node.meta[ID]] = (q, s)
    units = qat.prepare(gm, floats)
    assert [n.target for n, _ in units.fake] == [fake_quant.linear_groups] * 3
    with torch.no_grad():
        acc = float((gm(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert acc >= ex.accuracy(model, digits.x_test, digits.y_test) - 0.02
    qat.convert(gm, units)
    got = {n.meta[ID]: (getattr(gm, str(n.args[1].target)), getattr(gm, str(n.args[2].target)))
           for n in gm.graph.nodes if n.target is qops.quantized_linear}
    assert got.keys() == want.keys()
    for nid, (q, s) in want.items():
        assert torch.equal(got[nid][0], q) and torch.equal(got[nid][1], s)
    with pytest.raises(NotImplementedError, match="simulated grouped"):   # prepare(linear_bits=4)
        qat.convert(gm, qat.Units(simulated=1))


def test_qat_after_weight_pruning_keeps_the_pruned_weights_zero(trained, digits):
    gm = fxopt.optimize(trained["mlp"], (digits.x_train[:8],), calibration_data=_calib(digits),
                        latency_repeats=0, drift=False, report_layers=False, stop_after="finetune_quantized",
                        prune={"structure": "weights", "ratio": 0.8},
                        finetune={"epochs": 1, "lr": 1e-3, "qat": True})
    names = [r.name for r in gm.fxopt_report.records]
    assert "distill_pruned" in names and "finetune_quantized" in names
    assert gm.fxopt_report.record("finetune_quantized").stats["codes_changed"] > 0
    codes = [getattr(gm, str(n.args[1].target)) for n in gm.graph.nodes if n.target is qops.quantized_linear]
    total = sum(c.numel() for c in codes)
    assert sum(int((c == 0).sum()) for c in codes) >= round(0.8 * total)


def test_qat_of_cpu_int4_trains_the_int4_codes_and_the_kernels_compute_them(trained, digits):
    """cpu-int4 with finetune=: quantize_int4's grouped linears start from their float weights,
    train, and lower to linear_int4; the lowered model computes the trained int4 ops; and
    fxopt.finetune retrains a cpu-int4 model (its int4 layers match the recompile)."""
    from fxopt.runtime import kernel_ops
    model, x, calib = trained["mlp"], digits.x_train[:8], _calib(digits, 8)
    options = dict(finetune={"epochs": 1}, latency_repeats=0, int4_rounding="nearest")
    fast = fxopt.optimize(model, (x,), target="cpu-int4", calibration_data=calib, **options)
    linears = lambda gm: [n.target for n in gm.graph.nodes if n.target in kernel_ops.LINEARS]  # noqa: E731
    assert len(linears(fast)) == 3 and set(linears(fast)) == {kernel_ops.linear_int4}
    stats = fast.fxopt_report.record("finetune_quantized").stats
    assert stats["codes_changed"] > 0
    from fxopt.driver.compile import compile_model
    trained_ops, _ = compile_model(model, (x,), "cpu-int4", calib, True,
                                   dict(options, stop_after="finetune_quantized", drift=False, report_layers=False))
    with torch.no_grad():
        _assert_same_model(trained_ops(digits.x_test), fast(digits.x_test))
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="already quantization-aware trained"):
        fxopt.finetune(fast, model, calib, epochs=1)
    ptq = fxopt.optimize(model, (x,), target="cpu-int4", calibration_data=calib, latency_repeats=0,
                         int4_rounding="nearest")
    torch.set_num_threads(1)
    tuned = fxopt.finetune(ptq, model, calib, epochs=1)
    assert set(linears(tuned)) == {kernel_ops.linear_int4}
    acc = lambda m: ex.accuracy(m, digits.x_test, digits.y_test)  # noqa: E731
    assert acc(tuned) >= acc(ptq) - 0.01


def test_int4_qat_recovers_what_int4_ptq_loses_on_a_tiny_mlp():
    """The issue's figure, as bench/qat_digits.py --int4-splits 6 measures it: TinyMLP (four
    hidden layers of 32) trained on each of 6 train/test splits of the digits loses over a
    point on average in int4 PTQ with round to nearest; QAT from those codes (5 epochs of
    distillation) comes back within 0.5 point of the fp32 model on average. Measured: PTQ
    -1.26 +- 0.58, QAT +0.07 +- 0.61 points (Xeon with AMX). One split alone is not the
    figure: which images flip depends on the CPU's float rounding in training (split 1, the
    worst: QAT -0.67 there, -0.45 or better elsewhere)."""
    from fxopt.bench.qat_digits import int4_split
    runs = [int4_split(seed, runs=("PTQ nearest", "QAT")) for seed in range(6)]   # test accuracy (%), int4 kernels
    mean = lambda key: sum(r[key] - r["fp32"] for r in runs) / len(runs)  # noqa: E731
    assert mean("PTQ nearest") < -1.0
    assert mean("QAT") >= -0.5
