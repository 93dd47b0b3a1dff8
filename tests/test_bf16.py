"""bf16 linears (target cpu-bf16): y = bf16(x) @ bf16(W)^T in fp32, + bias, then the epilogue.

Reference: torch's F.linear on x.bfloat16().float() and w.bfloat16().float() (fp32 math). The
kernels differ from it in the order of the fp32 sums only, so the tolerance is that of the
order: 1e-5 of the row's |x|.|w| sum (plus 2e-6 of the value where a float32 activation
follows), on every ISA path this CPU can run.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.core.errors import ArtifactError, PipelineError
from fxopt.core.ops import apply_activation
from fxopt.core.pipeline import TARGETS, Pipeline
from fxopt.examples import DigitsMLP, accuracy, digits, train
from fxopt.kernels import bf16 as B
from fxopt.kernels.dispatch import KernelError, available_isas, use_isa
from fxopt.runtime import kernel_ops
from fxopt.runtime.kernel_args import BadKernelArgs, check_bf16_linear
from fxopt.search.budget import with_fp32_layers

PATHS = [p for p in ("avx2", "portable") if p in available_isas()]
ACTS = [("none", ()), ("relu", ()), ("gelu", ()), ("gelu_tanh", ()), ("hardtanh", (-0.5, 0.75)), ("silu", ())]


def _bf(t):
    return t.to(torch.bfloat16).float()


def _reference(x, w, b=None, act="none", act_args=()):
    """(torch reference, its tolerance) for x (M, K), w (N, K) float32 tensors."""
    pre = F.linear(_bf(x), _bf(w), b)
    ref = apply_activation(pre, act, act_args)
    tol = 1e-5 * (_bf(x).abs() @ _bf(w).abs().t()) + (2e-6 * ref.abs() if act != "none" else 0) + 1e-30
    return ref, tol


def _assert_within(got, ref, tol):
    err = (torch.as_tensor(got).float() - ref).abs()
    assert bool((err <= tol).all()), f"max error / tolerance {float((err / tol).max()):.3g}"


def test_rounding_is_torchs_round_to_nearest_even():
    # ties both ways, the largest finite values (one rounds to inf), subnormals, inf, NaN, signed zero
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001,
                     0x807FFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0x12345678, 0xC0490FDB], np.uint32)
    x = bits.view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(B.to_bf16_bits(x), want)
    nan = B.to_bf16_bits(np.array([np.nan, -np.nan], np.float32).view(np.uint32).__or__(np.uint32(0xFFFF))
                         .view(np.float32))
    assert np.isnan(B.from_bf16_bits(nan)).all()            # a NaN stays a NaN (no carry into the sign)


def test_pack_unpack_is_exact_on_odd_shapes():
    g = np.random.default_rng(0)
    for n, k in ((1, 1), (17, 5), (33, 130)):
        w = g.standard_normal((n, k)).astype(np.float32)
        pw = B.pack_bf16(w)
        assert pw.data.shape == (-(-n // 16) * 16 * k,)
        np.testing.assert_array_equal(B.unpack_bits(pw), B.to_bf16_bits(w))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 17, 130])   # every tile shape and remainder
def test_kernel_against_torch(isa, m):
    g = torch.Generator().manual_seed(m)
    for i, (k, n) in enumerate(((13, 5), (37, 70), (100, 129))):
        x, w = torch.randn(m, k, generator=g) * 3, torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if i % 2 == 0 else None
        act, act_args = ACTS[(i + m) % len(ACTS)]
        pw = B.pack_bf16(w.numpy())
        ref, tol = _reference(x, w, b, act, act_args)
        with use_isa(isa):
            for threads in (1, 2):
                got = B.linear_bf16_f32(x.numpy(), pw, None if b is None else b.numpy(), act, act_args,
                                        n_threads=threads)
                _assert_within(got, ref, tol)


@pytest.mark.parametrize("isa", PATHS)
def test_kernel_epilogues_residual_and_uint8_output(isa):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(9, 45, generator=g), torch.randn(21, 45, generator=g), torch.randn(21, generator=g)
    r = torch.randn(9, 21, generator=g)
    pw = B.pack_bf16(w.numpy())
    with use_isa(isa):
        for act, act_args in ACTS:
            ref, tol = _reference(x, w, b, act, act_args)
            call = B.bind_linear_bf16(pw, b.numpy(), act, act_args)
            _assert_within(call(x.numpy()), ref, tol)
            _assert_within(call(x.numpy(), residual=r.numpy()), ref + r, tol + 1e-6 * (ref + r).abs())
        # uint8 output (a bf16 linear feeding a static int8 one): the reference quantized the same way
        ref, _ = _reference(x, w, b, "relu")
        q = B.bind_linear_bf16(pw, b.numpy(), "relu", (), out_scale=0.05, out_zero_point=3)(x.numpy())
        want = torch.clamp(torch.round(ref / 0.05) + 3, 0, 255)
        assert q.dtype == np.uint8 and (torch.from_numpy(q).float() - want).abs().max() <= 1
        assert (torch.from_numpy(q).float() == want).float().mean() > 0.99


def test_the_op_and_its_torch_fallback():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 7, 300, generator=g), torch.randn(50, 300, generator=g), torch.randn(50, generator=g)
    buf = kernel_ops.pack_linear_bf16(w)
    assert buf["packed"].dtype == torch.bfloat16
    args = (buf["packed"], buf["w_scale"], buf["col_sums"], b, 50, 300, "gelu", [], 0.0, 0)
    y = kernel_ops.linear_bf16(x, *args)
    ref, tol = _reference(x.reshape(-1, 300), w, b, "gelu")
    _assert_within(y.reshape(-1, 50), ref, tol)
    _assert_within(kernel_ops.linear_bf16_reference(x, *args).reshape(-1, 50), ref, tol)
    with pytest.raises(TypeError, match=r"linear_bf16: x is torch.int64.*\.float\(\)"):
        kernel_ops.linear_bf16(x.long(), *args)
    with pytest.raises(ValueError, match="a_scale must be 0"):
        kernel_ops.linear_bf16(x, *args[:-2], 0.1, 128)
    with pytest.raises(KernelError, match="x must be float32"):
        B.linear_bf16_f32(x.double().numpy(), B.pack_bf16(w.numpy()))
    with pytest.raises(BadKernelArgs, match="packed must be a contiguous torch.bfloat16"):
        check_bf16_linear(buf["packed"].float(), buf["w_scale"], buf["col_sums"], b, 50, 300)


# --- through optimize ------------------------------------------------------------------

def _quick(model, example, target="cpu-bf16", **options):
    return fxopt.optimize(model, example, target, latency_repeats=0, drift=False, **options)


@pytest.fixture(scope="module")
def mlp():
    """The trained digits MLP, its data and its cpu-bf16 compile."""
    data = digits()
    model = train(DigitsMLP(), data, epochs=3)
    return model, data, _quick(model, (data.x_test[:64],))


def _layerwise(model, x):
    """The digits MLP with every linear in bf16 (torch math): what cpu-bf16 computes."""
    h = x.flatten(1)
    for mod in model.net:
        if isinstance(mod, torch.nn.Linear):
            h = F.linear(_bf(h), _bf(mod.weight), mod.bias)
        elif not isinstance(mod, (torch.nn.Flatten, torch.nn.Dropout)):
            h = mod(h)
    return h


def test_one_layer_through_optimize_is_the_bf16_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 70)
    model = torch.nn.Sequential(lin, torch.nn.GELU()).eval()
    x = torch.randn(17, 37) * 2
    fast = _quick(model, (x,))
    assert [n.target for n in fast.graph.nodes if n.op == "call_function"].count(kernel_ops.linear_bf16) == 1
    ref, tol = _reference(x, lin.weight.detach(), lin.bias.detach(), "gelu")
    with torch.no_grad():
        _assert_within(fast(x), ref, tol)
        assert (model(x) - ref).abs().max() > 20 * tol.max()      # fp32 is not what it computes


def test_cpu_bf16_digits_mlp(mlp):
    model, data, fast = mlp
    x = data.x_test[:64]
    ops = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert ops.count(kernel_ops.linear_bf16) == 3 and kernel_ops.linear_int8 not in ops
    with torch.no_grad():
        got, ref, fp32 = fast(x), _layerwise(model, x), model(x)
    # an element's bf16 rounding may flip where a sum lands on a rounding tie, so the model is
    # held to the layerwise reference loosely, and to fp32 by less than the reference itself
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    assert (got - ref).abs().mean() * 10 < (fp32 - ref).abs().mean()
    assert abs(accuracy(fast, data.x_test, data.y_test) - accuracy(model, data.x_test, data.y_test)) <= 0.01
    rows = fast.fxopt_report.layers
    assert [r["precision"] for r in rows] == ["bf16"] * 3 and all("fp32 accumulation" in r["why"] for r in rows)


def test_cpu_bf16_saves_half_and_loads_the_same(mlp, tmp_path):
    model, data, fast = mlp
    x = data.x_test[:64]
    fxopt.save(fast, tmp_path / "bf16.fxopt")
    fxopt.save(_quick(model, (x,), "cpu-fp32"), tmp_path / "fp32.fxopt")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    padding = sum((-m.out_features % 16) * m.in_features for m in linears)    # N padded to 16 columns
    saved = (tmp_path / "fp32.fxopt").stat().st_size - (tmp_path / "bf16.fxopt").stat().st_size
    # 2 of every weight's 4 bytes, less the padding and what the graph and report add in text
    assert saved >= sum(m.weight.numel() for m in linears) * 2 - padding * 2 - 8192
    loaded = fxopt.load(tmp_path / "bf16.fxopt")
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
    packed = [b for name, b in loaded.named_buffers() if name.endswith("weight_bf16")]
    assert len(packed) == 3 and all(p.dtype == torch.bfloat16 for p in packed)


def test_skip_keeps_a_layer_fp32_and_says_so(mlp):
    model, data, _ = mlp
    target = TARGETS["cpu-bf16"].replace("quantize_bf16", "quantize_bf16{skip=('net.6',)}")
    fast = _quick(model, (data.x_test[:8],), target)
    rows = {r["layer"]: r for r in fast.fxopt_report.layers}
    assert [r["precision"] for r in rows.values()] == ["bf16", "bf16", "fp32"]
    assert "skip" in rows["net.6"]["why"]


def test_skip_naming_no_layer_is_an_error(mlp):
    model, data, _ = mlp
    target = TARGETS["cpu-bf16"].replace("quantize_bf16", "quantize_bf16{skip=('net.7',)}")
    with pytest.raises(PipelineError, match=r"quantize_bf16: skip names 'net.7', not a layer of this model.*"
                                            r"its linear layers: net.1, net.4, net.6"):
        _quick(model, (data.x_test[:8],), target)


def test_the_latency_guard_keeps_fp32_through_skip():
    p = with_fp32_layers(Pipeline.parse(TARGETS["cpu-bf16"]), ["b", "a"])
    assert "quantize_bf16{skip=('a', 'b')}" in str(p)


def test_quantize_int8_after_it_leaves_the_bf16_linears_alone(mlp):
    """The mixed pipeline's contract: quantize_bf16 first takes all but `skip`, quantize_int8
    after it takes the rest; a static int8 layer after a bf16 one gets uint8 straight from it."""
    model, data, _ = mlp
    target = TARGETS["cpu-int8"].replace("quantize_int8", "quantize_bf16{skip=('net.6',)},"
                                         "quantize_int8{activations='static'}")
    x = data.x_test[:64]
    fast = _quick(model, (x,), target, calibration_data=[(data.x_train[:256],)])
    rows = {r["layer"]: r["precision"] for r in fast.fxopt_report.layers}
    assert rows == {"net.1": "bf16", "net.4": "bf16", "net.6": "int8"}
    chained = [n for n in fast.graph.nodes if n.target is kernel_ops.linear_bf16 and len(n.args) > 11
               and n.args[11] > 0]
    assert len(chained) == 1                                 # net.4 hands uint8 to net.6
    assert abs(accuracy(fast, data.x_test, data.y_test) - accuracy(model, data.x_test, data.y_test)) <= 0.02


def test_a_bf16_layer_slower_than_fp32_goes_back_to_fp32_and_says_why(monkeypatch):
    """cpu-int8's latency-aware lowering, unchanged, on cpu-bf16 (clocks stubbed as in
    test_latency_guard): the one bf16 layer that measured slower is compiled fp32 again."""
    from fxopt.report import model_report
    from fxopt.search import latency_guard, sensitivity
    monkeypatch.setattr(model_report, "latency_pair", lambda model, optimized, args, kwargs, repeats:
                        (1e-3, 2e-3 if "wide" in model_report.int8_layers(optimized) else 0.9e-3))
    monkeypatch.setattr(sensitivity, "plan_layer_latency",
                        lambda a, b, args, kwargs, **timing: {"wide": (3e-3, 1e-3), "head": (1e-5, 1e-5)})
    monkeypatch.setattr(latency_guard, "_turns", lambda a, b, args, kwargs: (2e-3, 0.9e-3))
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("wide", torch.nn.Linear(64, 32))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("head", torch.nn.Linear(32, 3))
    fast = fxopt.optimize(model.eval(), (torch.randn(4, 64),), "cpu-bf16", drift=False)
    rows = {r["layer"]: r for r in fast.fxopt_report.layers}
    assert rows["head"]["precision"] == "bf16" and rows["wide"]["precision"] == "fp32"
    assert rows["wide"]["why"] == "latency-aware lowering: bf16 not faster here (3.000 ms vs 1.000 ms fp32)"
    assert fast.fxopt_report.sections["latency_aware"].startswith(
        "latency-aware lowering: 1 of 2 bf16 layers measured slower than fp32 and went back to fp32")
