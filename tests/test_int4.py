"""int4 weights: grouped symmetric quantization (the numbers every int4 path must compute)."""
import numpy as np
import pytest
import torch

from fxopt.quant import qops


def test_groups_match_numpy_and_bound_the_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[2, 32:] = 0.0                                  # an all-zero group keeps scale 1, q 0
    q, s = qops.quantize_weight_groups(w, bits=4, group_size=32)
    wn = w.numpy().reshape(6, 2, 32)
    amax = np.abs(wn).max(axis=2)
    s_ref = np.where(amax > 0, amax / np.float32(7), 1).astype(np.float32)
    q_ref = np.clip(np.rint(wn / s_ref[:, :, None]), -7, 7).astype(np.int8).reshape(6, 64)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7
    deq = (q.float().reshape(6, 2, 32) * s[:, :, None]).reshape(6, 64)
    assert float((deq - w).abs().max()) <= float(s.max()) / 2 + 1e-6


@pytest.mark.parametrize("shape, bits, group, match", [
    ((4, 48), 4, 32, "not a multiple of group_size 32"),
    ((4, 2, 32), 4, 32, "2-d"),
    ((4, 64), 1, 32, "bits must be"),
])
def test_bad_groupings_are_named(shape, bits, group, match):
    with pytest.raises(ValueError, match=match):
        qops.quantize_weight_groups(torch.ones(shape), bits=bits, group_size=group)


# --- packing --------------------------------------------------------------------------

from fxopt.kernels import api as K                      # noqa: E402
from fxopt.kernels import int4 as kint4                 # noqa: E402
from fxopt.kernels import int4_pack, reference          # noqa: E402
from fxopt.kernels.dispatch import KernelError, available_isas, use_isa   # noqa: E402

ISAS = [isa for isa in ("avx2", "portable") if isa in available_isas()]


def _weights(n, k, group, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-7, 8, (n, k)).astype(np.int8)
    q[0, :group] = 7                                   # the grid's edges: a nibble of 15 and of 1
    q[-1, -group:] = -7
    s = (rng.random((n, k // group)) * 0.1 + 0.01).astype(np.float32)
    return q, s


@pytest.mark.parametrize("n, k, group", [(1, 32, 32), (13, 64, 32), (8, 256, 128), (21, 192, 64)])
def test_pack_unpack_is_exact_and_the_sums_come_from_the_bytes(n, k, group):
    q, s = _weights(n, k, group)
    pw = K.pack_int4(q, s, group)
    assert pw.data.dtype == np.uint8 and pw.data.size == -(-n // 8) * 8 * k // 2     # two weights a byte
    np.testing.assert_array_equal(K.unpack_int4(pw.data, n, k), q)
    scales, _ = pw.natural()
    np.testing.assert_array_equal(scales, s)
    sums = q.astype(np.int32).reshape(n, k // group, group).sum(axis=2)
    again = int4_pack.PackedInt4.from_arrays(pw.data, s, np.empty(0, np.int32), n, k)
    np.testing.assert_array_equal(again.natural()[1], sums)
    np.testing.assert_array_equal(again.col_sums, pw.col_sums)


def test_packing_refuses_what_it_cannot_hold():
    q, s = _weights(8, 64, 32)
    with pytest.raises(KernelError, match="must be one of"):
        K.pack_int4(q, s, 16)
    with pytest.raises(KernelError, match=r"\[-7, 7\]"):
        K.pack_int4(np.full((8, 64), -8, np.int8), s, 32)
    with pytest.raises(KernelError, match="not a multiple of the group size 64"):
        K.pack_int4(np.zeros((8, 96), np.int8), np.ones((8, 1), np.float32), 64)
    pw = K.pack_int4(q, s, 32)
    with pytest.raises(KernelError, match="group sums"):
        int4_pack.PackedInt4.from_arrays(pw.data, s, np.zeros((8, 2), np.int32), 8, 64)
    with pytest.raises(KernelError, match="uint8 bytes"):
        int4_pack.PackedInt4.from_arrays(pw.data[:-1], s, np.empty(0, np.int32), 8, 64)


# --- the kernel against its numpy twin, every path --------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, n, k, group, threads", [(1, 20, 64, 32, 1), (6, 33, 128, 64, 2),
                                                    (5, 16, 256, 128, 2), (9, 8, 32, 32, 1)])
def test_kernel_equals_numpy_bit_for_bit(isa, m, n, k, group, threads, monkeypatch):
    monkeypatch.setattr(kint4, "PARALLEL_MIN_MACS", 0)        # small shapes take the threaded entry too
    q, s = _weights(n, k, group, seed=m)
    rng = np.random.default_rng(m)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, :5] = 0.0
    bias = rng.standard_normal(n).astype(np.float32)
    ref = reference.linear_int4_f32(x, q, s, group, bias)
    with use_isa(isa):
        got = K.bind_linear_int4(K.pack_int4(q, s, group), bias)(x, n_threads=threads)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_epilogues_static_rows_and_uint8_chaining(isa):
    n, k, group, m = 24, 96, 32, 3
    q, s = _weights(n, k, group, seed=3)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    a_scale, a_zp = 0.02, 120
    aq = reference.quantize_tensor_f32_u8(x, a_scale, a_zp)
    acc = reference.int4_group_sums(aq, np.full(m, a_zp), q, group)
    pre = reference.int4_epilogue(acc, np.full(m, a_scale, np.float32), s, bias)
    pw = K.pack_int4(q, s, group)
    with use_isa(isa):
        static = K.bind_linear_int4(pw, bias, "none", (), a_scale, a_zp)
        np.testing.assert_array_equal(static(x), pre)            # float rows, quantized with the static scale
        np.testing.assert_array_equal(static(aq), pre)           # rows already uint8
        gelu = K.bind_linear_int4(pw, bias, "gelu")(x, residual=res)
        want = reference.linear_int4_f32(x, q, s, group, bias, "gelu") + res
        np.testing.assert_allclose(gelu, want, rtol=1e-5, atol=2e-5)
        u8 = K.bind_linear_int4(pw, bias, "relu", (), a_scale, a_zp, 0.05, 7)(x)
    inv = np.float32(1) / np.float32(0.05)                  # the epilogue's float32 reciprocal
    want_u8 = np.clip(np.rint(np.maximum(pre, 0) * inv) + 7, 0, 255).astype(np.uint8)
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, want_u8)


# --- lowering: target cpu-int4 ----------------------------------------------------------

import fxopt                                            # noqa: E402
from fxopt.examples import DigitsMLP, accuracy, digits, train   # noqa: E402
from fxopt.runtime import kernel_ops                    # noqa: E402


def _quick(model, example, target="cpu-int4", **options):
    return fxopt.optimize(model, example, target, latency_repeats=0, drift=False, latency_aware=False, **options)


@pytest.fixture(scope="module")
def mlp4():
    """The trained digits MLP, its data and its cpu-int4 compile."""
    data = digits()
    model = train(DigitsMLP(), data, epochs=3)
    return model, data, _quick(model, (data.x_test[:64],))


def test_lowered_op_is_grouped_int4_through_the_int8_activation_math():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 128, generator=g) * 0.05, torch.randn(40, generator=g)
    x = torch.randn(3, 5, 128, generator=g) * 2
    q, s = qops.quantize_weight_groups(w, bits=4, group_size=64)
    buf = kernel_ops.pack_linear_int4(q, s)
    y = kernel_ops.linear_int4(x, buf["packed"], buf["w_scale"], buf["col_sums"], b, 40, 128, "none", [], 0.0, 0)
    xq, sa, zp = qops.quantize_rows(x.reshape(-1, 128))            # the int8 linear's activations
    deq = q.double() * s.double().repeat_interleave(64, dim=1)
    want = ((xq.double() - zp.double()[:, None]) @ deq.t()) * sa.double()[:, None] + b.double()
    torch.testing.assert_close(y.reshape(-1, 40).double(), want, rtol=1e-5, atol=1e-5)
    # and the reference op (what quantize_int4 leaves for lower_to_kernels) computes the same
    ref = qops.quantized_linear(x, q, s, b, "none", [], 0.0, 0)
    torch.testing.assert_close(ref.double(), y.double(), rtol=1e-5, atol=1e-5)


def test_cpu_int4_mlp_agrees_with_fp32(mlp4):
    model, data, fast = mlp4
    x = data.x_test[:64]
    ops = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert ops.count(kernel_ops.linear_int4) == 3 and kernel_ops.linear_int8 not in ops
    with torch.no_grad():
        ref, got = model(x), fast(x)
        # two inputs' outputs differ by far more than int4 moves one: the check below means something
        assert (model(data.x_test[64:128]) - ref).abs().mean() > 10 * (got - ref).abs().mean()
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert float(cos.min()) > 0.99
    assert abs(accuracy(fast, data.x_test, data.y_test) - accuracy(model, data.x_test, data.y_test)) <= 0.02
    rows = fast.fxopt_report.layers
    assert [r["precision"] for r in rows] == ["int4"] * 3
    assert all("groups of 32" in r["why"] for r in rows)


def test_cpu_int4_saves_half_the_weight_bytes_and_loads_the_same(mlp4, tmp_path):
    model, data, fast = mlp4
    x = data.x_test[:64]
    fxopt.save(fast, tmp_path / "mlp4.fxopt")
    fxopt.save(_quick(model, (x,), "cpu-int8", report_layers=False), tmp_path / "mlp8.fxopt")
    # the files differ by the weights alone: int8 minus (nibbles + float32 scales) per weight
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    saved = (tmp_path / "mlp8.fxopt").stat().st_size - (tmp_path / "mlp4.fxopt").stat().st_size
    assert saved >= weights * (1 - 0.5 - 4 / 32) - 4096
    loaded = fxopt.load(tmp_path / "mlp4.fxopt")
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


def test_a_linear_whose_k_the_group_does_not_divide_stays_int8_and_says_so():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    fast = _quick(model, (torch.randn(4, 48),))
    rows = {r["layer"]: r for r in fast.fxopt_report.layers}
    assert [r["precision"] for r in rows.values()] == ["int8", "int4"]
    assert "K=48 is not a multiple of the int4 group size 32" in rows["0"]["why"]
    with pytest.raises(ValueError, match="group_size=48 is not supported.*32, 64, 128"):
        _quick(model, (torch.randn(4, 48),), group_size=48)
    fast64 = _quick(torch.nn.Sequential(torch.nn.Linear(128, 8)).eval(), (torch.randn(2, 128),), group_size=64)
    assert "groups of 64" in fast64.fxopt_report.layers[0]["why"]


# --- GPTQ rounding ----------------------------------------------------------------------

from fxopt.quant.gptq import HessianObserver, gptq_groups   # noqa: E402


def test_gptq_keeps_the_format_and_lowers_the_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    mix = torch.randn(128, 128, generator=g) / 8 + torch.eye(128)    # correlated input features
    x = torch.randn(1024, 128, generator=g) @ mix
    obs = HessianObserver()
    for chunk in x.split(256):
        obs.update(chunk)
    q, s = gptq_groups(w, obs.hessian(), group_size=32)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 7 and s.dtype == torch.float32 and s.shape == (64, 4)
    q0, s0 = qops.quantize_weight_groups(w, bits=4, group_size=32)

    def out_err(q, s):
        return float(((x @ (q.float() * s.repeat_interleave(32, dim=1)).t() - x @ w.t()) ** 2).mean())
    assert out_err(q, s) < 0.8 * out_err(q0, s0)
    # the kernel computes GPTQ's weights as it computes any int4 weights
    buf = kernel_ops.pack_linear_int4(q, s)
    y = kernel_ops.linear_int4(x[:4], buf["packed"], buf["w_scale"], buf["col_sums"], None, 64, 128, "none", [],
                               0.0, 0)
    torch.testing.assert_close(y, qops.quantized_linear(x[:4], q, s, None, "none", [], 0.0, 0), rtol=1e-5,
                               atol=1e-5)


def test_cpu_int4_with_calibration_data_takes_gptq_and_says_so(mlp4):
    model, data, _ = mlp4
    x = data.x_test[:64]
    fast = _quick(model, (x,), calibration_data=[(data.x_train[i:i + 128],) for i in range(0, 512, 128)])
    assert all("GPTQ rounding" in r["why"] for r in fast.fxopt_report.layers)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(fast(x), model(x), dim=1)
    assert float(cos.min()) > 0.99


def test_cpu_int4_compressed_file_loads_the_same(mlp4, tmp_path):
    # compress="huffman" took linear_int4's nibbles for int8 GEMM bytes and failed to reshape them
    _, data, fast = mlp4
    x = data.x_test[:64]
    fxopt.save(fast, tmp_path / "mlp4c.fxopt", compress="huffman")
    fxopt.save(fast, tmp_path / "mlp4.fxopt")
    assert (tmp_path / "mlp4c.fxopt").stat().st_size < (tmp_path / "mlp4.fxopt").stat().st_size
    loaded = fxopt.load(tmp_path / "mlp4c.fxopt")
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
