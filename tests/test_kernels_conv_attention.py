"""conv2d and fused int8 attention against numpy references."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fxopt.kernels import api as K, reference as R

# the paths this CPU can run, fastest first (avx512_vnni is absent on AVX2-only CPUs)
ISAS = K.available_isas()

CONVS = [  # (C, O, kernel, stride, padding, dilation, groups, H)
    (3, 8, (3, 3), 1, 1, 1, 1, 9),
    (3, 8, (7, 7), 2, 3, 1, 1, 16),         # a stem: kernel rows copied whole inside the image
    (16, 16, (3, 3), 2, 1, 1, 16, 10),      # depthwise, direct kernel
    (40, 40, (5, 3), 1, (2, 1), (1, 2), 40, 9),  # depthwise: channel tails of 16, dilated
    (8, 12, (3, 3), 1, 2, 2, 4, 11),        # grouped, dilated
    (32, 16, (1, 1), 1, 0, 1, 1, 7),        # 1x1
    (5, 7, (2, 3), (2, 1), (0, 1), 1, 1, 8),
    (64, 70, (3, 3), 1, 1, 1, 1, 15),       # AMX, NHWC: the implicit GEMM (conv_amx), a column tail
]


def _dequantized_conv(x, w, b, stride, padding, dilation, groups):
    """Float64 conv of the int8-quantized-then-dequantized x and w: what the
    kernel computes, up to float rounding."""
    xd = np.empty_like(x, dtype=np.float64)
    for i, img in enumerate(x):
        q, s, z = R.quantize_rows_f32_u8(img.reshape(1, -1))
        xd[i] = ((q.astype(np.float64) - z[0]) * s[0]).reshape(img.shape)
    q, s = R.quantize_weights_s8(w.reshape(w.shape[0], -1))
    wd = (q * s[:, None].astype(np.float64)).reshape(w.shape)
    return R.conv2d_f32(xd, wd, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("isa", sorted({ISAS[0], "portable"}))
@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv2d_matches_quantized_reference(isa, case, layout):
    c, o, k, stride, padding, dilation, groups, h = case
    rng = np.random.default_rng(c * o + h)
    x = rng.standard_normal((2, c, h, h + 1)).astype(np.float32)
    w = rng.standard_normal((o, c // groups, *k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    pc = K.pack_conv_weights_s8(w, groups)
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    with K.use_isa(isa):
        y = K.conv2d_f32(xin, pc, b, stride, padding, dilation, act="relu", layout=layout)
    if layout == "NHWC":
        y = y.transpose(0, 3, 1, 2)
    ref = np.maximum(_dequantized_conv(x, w, b, stride, padding, dilation, groups), 0)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    exact = np.maximum(R.conv2d_f32(x, w, b, stride, padding, dilation, groups), 0)
    assert np.abs(y - exact).max() < 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "avx_vnni"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("n,o", [(1, 64), (2, 70)])   # one image; a column tail
def test_conv2d_fused_residual_goes_before_the_activation(isa, layout, n, o):
    """act(conv(x) + b + r), exactly the separate add and relu of a ResNet block."""
    rng = np.random.default_rng(o + n)
    x = rng.standard_normal((n, 8, 9, 7)).astype(np.float32)
    pc = K.pack_conv_weights_s8(rng.standard_normal((o, 8, 3, 3)).astype(np.float32))
    b = rng.standard_normal(o).astype(np.float32)
    nhwc = layout == "NHWC"
    xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x
    with K.use_isa(isa):
        plain = K.conv2d_f32(xin, pc, b, padding=1, layout=layout)
        r = rng.standard_normal(plain.shape).astype(np.float32)
        fused = K.conv2d_f32(xin, pc, b, padding=1, act="relu", layout=layout, residual=r)
        np.testing.assert_array_equal(fused, np.maximum(plain + r, 0))
        clamped = K.conv2d_f32(xin, pc, b, padding=1, act="relu6", layout=layout, residual=r)
        np.testing.assert_array_equal(clamped, np.clip(plain + r, 0, 6))
        # SiLU runs on the stored tile, not in registers: the residual still goes first
        silu = K.conv2d_f32(xin, pc, b, padding=1, act="silu", layout=layout, residual=r)
        s = (plain + r).astype(np.float64)
        np.testing.assert_allclose(silu, s / (1 + np.exp(-s)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", sorted({ISAS[0], "portable"}))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("k,c,h", [(1, 24, 9), (1, 128, 5), (3, 8, 7), (1, 7000, 3)])  # 128+: into the rows; 7000: threaded
def test_conv2d_static_scale_matches_quantized_reference(isa, layout, k, c, h):
    """With a calibrated (static) input scale every image uses it; a 1x1 NHWC conv
    quantizes straight into the GEMM's rows."""
    rng = np.random.default_rng(k * c + h)
    x = rng.standard_normal((2, c, h, h)).astype(np.float32)
    w = rng.standard_normal((16, c, k, k)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    scale, zp = 0.02, 120    # clips x beyond [-2.4, 2.7]: saturation is part of the contract
    xin = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    with K.use_isa(isa):
        y = K.conv2d_f32(xin, K.pack_conv_weights_s8(w), b, padding=k // 2, layout=layout,
                         a_scale=scale, a_zero_point=zp)
    if layout == "NHWC":
        y = y.transpose(0, 3, 1, 2)
    q = R.quantize_tensor_f32_u8(x.reshape(2, -1), scale, zp).reshape(x.shape)
    xd = (q.astype(np.float64) - zp) * scale
    wq, ws = R.quantize_weights_s8(w.reshape(16, -1))
    wd = (wq * ws[:, None].astype(np.float64)).reshape(w.shape)
    ref = R.conv2d_f32(xd, wd, b, 1, k // 2, 1, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 8])     # dense, grouped (conv2d_f32 itself), depthwise
def test_bound_conv_equals_conv2d_f32_bit_for_bit(static, groups):
    """bind_conv2d (the runtime's per-layer conv): conv2d_f32's NHWC result bit for bit,
    with and without a residual, at two input sizes and a batch; its errors are conv2d_f32's."""
    rng = np.random.default_rng(groups + 10 * static)
    w = rng.standard_normal((8, 8 // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    pc = K.pack_conv_weights_s8(w, groups=groups)
    q = {"a_scale": 0.03, "a_zero_point": 110} if static else {}
    call = K.bind_conv2d(pc, b, stride=(2, 1), padding=1, act="relu", **q)
    for shape in ((1, 9, 7, 8), (3, 12, 12, 8), (1, 9, 7, 8)):
        x = rng.standard_normal(shape).astype(np.float32)
        want = K.conv2d_f32(x, pc, b, (2, 1), 1, act="relu", layout="NHWC", **q)
        assert np.array_equal(call(x), want)
        if groups == 1:
            r = rng.standard_normal(want.shape).astype(np.float32)
            want = K.conv2d_f32(x, pc, b, (2, 1), 1, act="relu", layout="NHWC", residual=r, **q)
            assert np.array_equal(call(x, r, 2), want)
    with pytest.raises(K.KernelError, match="channels"):
        call(np.ones((1, 8, 8, 5), np.float32))
    with pytest.raises(K.KernelError, match="larger"):
        K.bind_conv2d(pc, b, padding=0)(np.ones((1, 2, 2, 8), np.float32))
    with pytest.raises(K.KernelError, match="a_zero_point"):
        K.bind_conv2d(pc, b, a_scale=0.1, a_zero_point=300)


def test_rgb_images_quantize_into_the_pixel_rows_of_any_chw_image():
    from fxopt.kernels import conv as C
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 37, 41)).astype(np.float32) * 3       # 1517 pixels: a block and a tail
    s, z = np.array([0.02, 0.05], np.float32), np.array([128, 3], np.int32)
    want = np.empty((2 * 37 * 41, 3), np.uint8)
    C.quantize_chw_rows(x.reshape(2, 3, -1), s, z, want)
    got = np.empty_like(want)
    C.quantize_rgb_rows(x.reshape(2, 3, -1), s, z, got.reshape(-1))
    assert np.array_equal(got, want) and 0 < (got == 0).mean() and (got == 255).any()
    hwc = np.empty_like(want)
    C.quantize_hwc_rows(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(2, -1, 3), s, z, hwc)
    assert np.array_equal(got, hwc)


# (C, O, kernel, stride, padding (top, left, bottom, right)): a TF "same" stem of stride 2 (RGB,
# K = 27), stride 1 padded below and right only, a 1x1 with a border, and pads on one side each
FOUR_PADS = [(3, 32, 3, 2, (0, 0, 1, 1)), (16, 24, 3, 1, (0, 0, 2, 2)), (8, 16, 1, 1, (1, 1, 1, 1)),
             (12, 8, (3, 5), (2, 1), (2, 0, 0, 3))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c, o, k, stride, pads", FOUR_PADS)
def test_bound_dense_conv_takes_four_pads_and_nchw_images(isa, c, o, k, stride, pads):
    """A dense conv bound with padding (top, left, bottom, right) is the conv of the image
    padded so with zeros (np.pad) and no padding, bit for bit: with a static scale the pads'
    zeros are the zero point either way. Float NCHW images (layout="NCHW", quantized as
    they are read) give the NHWC images' result, bit for bit; uint8 output alike."""
    rng = np.random.default_rng(c + o)
    kh, kw = (k, k) if np.isscalar(k) else k
    w = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    pc = K.pack_conv_weights_s8(w)
    x = rng.standard_normal((2, 13, 11, c)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    q = {"stride": stride, "act": "relu", "a_scale": 0.02, "a_zero_point": 120}
    nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    with K.use_isa(isa):
        four = K.bind_conv2d(pc, b, padding=pads, **q)
        want = K.bind_conv2d(pc, b, padding=0, **q)(padded)
        got = four(x)
        assert got.shape == want.shape and np.array_equal(got, want)
        assert np.array_equal(four(nchw, None, None, "NCHW"), want)
        codes = K.bind_conv2d(pc, b, padding=pads, **q, out_scale=0.05, out_zero_point=3)
        assert np.array_equal(codes(nchw, None, None, "NCHW"), codes(x))
        if c == 8:      # a channels-last view and uint8 codes in NCHW are copied NHWC first
            assert np.array_equal(four(x.transpose(0, 3, 1, 2), None, None, "NCHW"), want)
            u8 = rng.integers(0, 256, x.shape).astype(np.uint8)
            assert np.array_equal(four(np.ascontiguousarray(u8.transpose(0, 3, 1, 2)), None, None, "NCHW"), four(u8))
    with pytest.raises(K.KernelError, match="layout"):
        four(x, None, None, "CHWN")
    with pytest.raises(K.KernelError, match="negative"):
        K.bind_conv2d(pc, b, padding=(0, -1, 1, 1))
    grouped = K.pack_conv_weights_s8(np.ones((4, 2, 3, 3), np.float32), groups=2)
    with pytest.raises(K.KernelError, match="four numbers"):
        K.bind_conv2d(grouped, padding=(0, 0, 1, 1))
    sym = K.bind_conv2d(grouped, padding=(1, 1, 1, 1))(np.ones((1, 5, 5, 4), np.float32))   # the same on all sides
    assert np.array_equal(sym, K.bind_conv2d(grouped, padding=1)(np.ones((1, 5, 5, 4), np.float32)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c, o, k, stride", [(64, 96, 3, 1), (24, 40, 3, 2), (32, 64, 1, 1), (1024, 64, 1, 1)])
def test_bound_conv_takes_and_gives_uint8(isa, c, o, k, stride):
    """Chained convs: uint8 NHWC input gives the result of the float image its codes stand
    for, bit for bit (3x3 through im2col, 1x1 read in place); uint8 output is that float
    result requantized, clip(rint(y / out_scale) + zp, 0, 255), up to one code where y sits
    within an ulp of a tie (the float epilogue fuses scale and bias in one multiply-add)."""
    rng = np.random.default_rng(c + o + k)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    pc = K.pack_conv_weights_s8(w)
    q = {"stride": stride, "padding": k // 2, "act": "relu", "a_scale": 0.03, "a_zero_point": 7}
    codes = rng.integers(0, 256, (2, 11, 9, c)).astype(np.uint8)
    x = ((codes.astype(np.float32) - 7) * np.float32(0.03)).astype(np.float32)
    with K.use_isa(isa):
        floats = K.bind_conv2d(pc, b, **q)
        chained = K.bind_conv2d(pc, b, **q, out_scale=0.05, out_zero_point=3)
        y = floats(x)
        assert np.array_equal(floats(codes), y)
        assert np.abs(y).max() > 0.5 * 255 * 0.05                 # the outputs reach the clip too
        for inputs in (codes, x):
            got = chained(inputs)
            assert got.dtype == np.uint8 and got.shape == y.shape
            want = np.clip(np.rint(y * (np.float32(1) / np.float32(0.05))) + 3, 0, 255)
            diff = np.abs(got.astype(np.int32) - want)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        with pytest.raises(K.KernelError, match="uint8 residual"):
            chained(codes, np.zeros(y.shape, np.uint8))            # bound without res_scale
        with pytest.raises(K.KernelError, match="uint8 residual"):
            K.bind_conv2d(pc, b, **q, res_scale=0.1)(codes, np.zeros(y.shape, np.uint8))   # float output
    grouped = K.pack_conv_weights_s8(np.ones((4, 2, 3, 3), np.float32), groups=2)
    with pytest.raises(K.KernelError, match="uint8 output"):
        K.bind_conv2d(grouped, out_scale=0.1)
    with pytest.raises(K.KernelError, match="uint8 input"):
        K.bind_conv2d(grouped, a_scale=0.1)(np.zeros((1, 5, 5, 4), np.uint8))
    with pytest.raises(K.KernelError, match="uint8 input"):
        K.bind_conv2d(pc)(codes)                                   # a dynamic scale: codes of what?


# (C, kernel, stride, padding, dilation): padding of four is (top, left, bottom, right)
DEPTHWISE = [(32, (3, 3), 1, 1, 1),
             (48, (3, 3), 2, (0, 0, 1, 1), 1),          # TensorFlow "same", stride 2: bottom and right only
             (40, (5, 3), 1, (2, 1), (1, 2)),           # a channel tail of 8, dilated
             (16, (2, 4), (1, 2), (1, 0, 0, 2), 1)]     # even kernel widths: no zero tap in the pairs


# activations: in registers (none, relu, a clamp, SiLU) on whole 16-channel vectors, else staged
DEPTHWISE_ACTS = {"relu6": ((0.0, 6.0), lambda t: t.clamp(0, 6)), "relu": ((), lambda t: t.clamp(min=0)),
                  "none": ((), lambda t: t), "silu": ((), lambda t: t * t.sigmoid())}


@pytest.mark.parametrize("act", sorted(DEPTHWISE_ACTS))
@pytest.mark.parametrize("c, k, stride, padding, dilation", DEPTHWISE)
def test_bound_depthwise_conv_takes_and_gives_uint8(c, k, stride, padding, dilation, act):
    """A depthwise conv bound for a chain (kernels/depthwise.py): on uint8 codes it is the
    float64 conv of the values the codes stand for with the int8 taps (torch, the image
    padded with zeros first), activated, up to float32 rounding; on the float images of
    those codes the same bits; with uint8 output that float result requantized, up to one
    code at a rounding tie (SiLU's polynomial is the kernels' own: within 1e-5 of torch)."""
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(c)
    w = rng.standard_normal((c, 1, *k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    pc = K.pack_conv_weights_s8(w, groups=c)
    act_args, fn = DEPTHWISE_ACTS[act]
    q = {"stride": stride, "padding": padding, "dilation": dilation, "act": act, "act_args": act_args,
         "a_scale": 0.03, "a_zero_point": 7}
    codes = rng.integers(0, 256, (2, 11, 9, c)).astype(np.uint8)
    x = ((codes.astype(np.float32) - 7) * np.float32(0.03)).astype(np.float32)
    floats = K.bind_conv2d(pc, b, **q)
    y = floats(codes)
    pads = padding if np.ndim(padding) and len(padding) == 4 else 2 * tuple(np.broadcast_to(padding, 2))
    taps = pc.dw_q.reshape(c, 1, *k).astype(np.float64) * pc.dw_scales.astype(np.float64)[:, None, None, None]
    xt = F.pad(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2), (pads[1], pads[3], pads[0], pads[2]))
    ref = F.conv2d(xt, torch.from_numpy(taps), torch.from_numpy(b.astype(np.float64)), stride, 0, dilation, c)
    assert 0.1 < (ref < 0).float().mean() < 0.9 and (ref > 6).any()     # the activations cut, not everything
    ref = fn(ref).permute(0, 2, 3, 1).numpy()
    assert y.shape == ref.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(floats(x), y)
    chained = K.bind_conv2d(pc, b, **q, out_scale=0.025, out_zero_point=3)
    want = np.clip(np.rint(y * (np.float32(1) / np.float32(0.025))) + 3, 0, 255)
    for inputs in (codes, x):
        got = chained(inputs)
        assert got.dtype == np.uint8 and got.shape == y.shape
        diff = np.abs(got.astype(np.int32) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    with pytest.raises(K.KernelError, match="residual"):
        chained(codes, np.zeros(y.shape, np.uint8))
    with pytest.raises(K.KernelError, match="uint8 input"):
        K.bind_conv2d(pc, b, padding=padding)(codes)                   # a dynamic scale: codes of what?


@pytest.mark.parametrize("c, h, k", [(64, 15, 1), (64, 14, 3), (72, 6, 3)])   # AMX blocks; implicit 3x3; im2col
def test_bound_conv_adds_a_uint8_residual(c, h, k):
    """A ResNet block's end with its output and residual chained: uint8 in, a uint8
    residual (the previous block's codes) added before the relu, uint8 out. It is the
    output of the float residual those codes stand for, bit for bit, and the float
    result with that residual, requantized (up to a code at a rounding tie)."""
    rng = np.random.default_rng(c + h + k)
    o = 64 + 8 * (k == 1)                                          # a column tail on the 1x1
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    pc = K.pack_conv_weights_s8(w)
    b = rng.standard_normal(o).astype(np.float32)
    q = {"padding": k // 2, "act": "relu", "a_scale": 0.03, "a_zero_point": 7}
    x = rng.integers(0, 256, (2, h, h + 1, c)).astype(np.uint8)
    codes = rng.integers(0, 256, (2, h, h + 1, o)).astype(np.uint8)
    floats = K.residual_floats(codes, 0.2, 120)
    out = {"out_scale": 0.3, "out_zero_point": 4}
    chained = K.bind_conv2d(pc, b, **q, **out, res_scale=0.2, res_zero_point=120)
    got = chained(x, codes)
    np.testing.assert_array_equal(got, chained(x, floats))
    assert not np.array_equal(got, chained(x, np.zeros_like(floats)))     # the residual counts
    y = K.bind_conv2d(pc, b, **q)(x, floats)                        # float output, float residual
    want = np.clip(np.rint(y * (np.float32(1) / np.float32(0.3))) + 4, 0, 255)
    diff = np.abs(got.astype(np.int32) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert 0.05 < (got == 4).mean() < 0.95 and (got > 4).mean() > 0.05   # relu's zeros and values


@pytest.mark.parametrize("shape, k, stride, padding, dilation, ceil_mode", [
    ((2, 12, 12, 64), (3, 3), (2, 2), (1, 1), (1, 1), False),    # ResNet's stem pool
    ((1, 13, 13, 24), (3, 3), (2, 2), (0, 0), (1, 1), True),     # SqueezeNet's: the last window overhangs
    ((2, 9, 10, 5), (3, 2), (2, 1), (1, 0), (2, 2), True),
    ((1, 7, 7, 3), (2, 2), None, (0, 0), (1, 1), False),         # stride defaults to the kernel
])
def test_max_pool_on_uint8_codes_is_torchs_max_pool(shape, k, stride, padding, dilation, ceil_mode):
    import torch
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 256, shape).astype(np.uint8)
    got = K.max_pool2d_nhwc(x, k, stride, padding, dilation, ceil_mode)
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2), k,
                                          stride, padding, dilation, ceil_mode=ceil_mode)
    assert got.dtype == np.uint8 and np.array_equal(got, want.permute(0, 2, 3, 1).numpy())
    with pytest.raises(K.KernelError, match="padding at most half"):
        K.max_pool2d_nhwc(x, (2, 2), (1, 1), (2, 2))
    with pytest.raises(K.KernelError, match="larger than the padded input"):
        K.max_pool2d_nhwc(x, (20, 20), (1, 1), (0, 0))


@pytest.mark.parametrize("shape", [(1, 56, 56, 144), (3, 7, 7, 1280), (2, 1, 3, 5), (1, 1, 1, 8)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_global_average_pool_is_the_mean_of_every_pixel(shape, threads):
    """global_avg_pool_nhwc: each image's channel means, against numpy's in float64, for
    more threads than pixels too; non-contiguous input is copied, a wrong one named."""
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    got = K.global_avg_pool_nhwc(x, threads)
    want = x.astype(np.float64).mean((1, 2))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    strided = np.asfortranarray(x)
    np.testing.assert_allclose(K.global_avg_pool_nhwc(strided, threads), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(K.KernelError, match="float32 NHWC"):
        K.global_avg_pool_nhwc(x.astype(np.float64))


@pytest.mark.skipif("amx_int8" not in ISAS, reason="the implicit 3x3 conv runs on AMX tiles")
@pytest.mark.parametrize("n, h, w, c, o", [(1, 14, 14, 64, 96), (2, 15, 17, 128, 70), (3, 16, 40, 64, 64)])
def test_implicit_3x3_conv_equals_im2col(monkeypatch, n, h, w, c, o):
    """conv_amx (3x3 stride 1 on AMX tiles, no im2col): the int32 sums of im2col's GEMM at
    every pixel, images and rows of any width (blocks straddle rows and images); float
    output an ulp apart at most (which rows the epilogue finishes in registers differs),
    with a residual too; uint8 output bit for bit; a dynamic scale alike."""
    from fxopt.kernels import conv_amx
    rng = np.random.default_rng(n * h + c)
    pc = K.pack_conv_weights_s8(rng.standard_normal((o, c, 3, 3)).astype(np.float32))
    b = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    codes = rng.integers(0, 256, x.shape).astype(np.uint8)
    r = rng.standard_normal((n, h, w, o)).astype(np.float32)
    static = {"a_scale": 0.03, "a_zero_point": 9}
    calls = {"float": K.bind_conv2d(pc, b, padding=1, act="relu", **static),
             "dynamic": K.bind_conv2d(pc, b, padding=1, act="relu"),
             "uint8": K.bind_conv2d(pc, b, padding=1, act="relu", **static, out_scale=0.2, out_zero_point=4)}

    def run(min_side):
        monkeypatch.setattr(conv_amx, "MIN_SIDE", min_side)
        with K.use_isa("amx_int8"):
            return [calls["float"](x), calls["float"](codes), calls["float"](x, r), calls["dynamic"](x),
                    calls["uint8"](codes)]
    implicit, im2col = run(1), run(10 ** 6)
    for got, want in zip(implicit, im2col):
        assert got.dtype == want.dtype and got.shape == want.shape == (n, h, w, o)
        if got.dtype == np.uint8:
            assert np.array_equal(got, want)
        else:  # acc * scale + bias rounded once or twice: an ulp of the sums' size apart
            np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.spacing(np.abs(want).max()))
            assert (got == want).mean() > 0.9


@pytest.mark.skipif("amx_int8" not in ISAS, reason="K is padded for AMX tiles only")
def test_bound_stem_padded_to_whole_amx_tiles_equals_conv2d_f32():
    """A 7x7 RGB stem (K = 147) is bound with K padded to 192 so that AMX tiles run it:
    conv2d_f32's result (K = 148 on vpdpbusd) up to the epilogue's rounding, and its
    uint8 output alike."""
    rng = np.random.default_rng(7)
    pc = K.pack_conv_weights_s8(rng.standard_normal((64, 3, 7, 7)).astype(np.float32))
    b = rng.standard_normal(64).astype(np.float32)
    x = rng.standard_normal((2, 40, 36, 3)).astype(np.float32)
    q = {"stride": 2, "padding": 3, "act": "relu", "a_scale": 0.02, "a_zero_point": 128}
    with K.use_isa("amx_int8"):
        got = K.bind_conv2d(pc, b, **q)(x)
        codes = K.bind_conv2d(pc, b, **q, out_scale=0.1, out_zero_point=0)(x)
        want = K.conv2d_f32(x, pc, b, layout="NHWC", **q)
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.spacing(np.abs(want).max()))
    expected = np.clip(np.rint(want * (np.float32(1) / np.float32(0.1))), 0, 255)
    assert np.abs(codes.astype(np.int32) - expected).max() <= 1 and (codes != expected).mean() < 1e-3


def test_conv2d_residual_errors():
    x = np.ones((1, 4, 6, 6), np.float32)
    grouped = K.pack_conv_weights_s8(np.ones((4, 2, 3, 3), np.float32), groups=2)
    with pytest.raises(K.KernelError, match="dense conv"):
        K.conv2d_f32(x, grouped, padding=1, residual=np.zeros((1, 4, 6, 6), np.float32))
    dense = K.pack_conv_weights_s8(np.ones((4, 4, 3, 3), np.float32))
    with pytest.raises(K.KernelError, match="residual must have the output's shape"):
        K.conv2d_f32(x, dense, padding=1, residual=np.zeros((1, 4, 5, 6), np.float32))


def test_conv2d_errors():
    pc = K.pack_conv_weights_s8(np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(K.KernelError, match="channels"):
        K.conv2d_f32(np.ones((1, 5, 8, 8), np.float32), pc)
    with pytest.raises(K.KernelError, match="larger"):
        K.conv2d_f32(np.ones((1, 3, 2, 2), np.float32), pc)
    with pytest.raises(K.KernelError, match="divisible"):
        K.pack_conv_weights_s8(np.ones((5, 1, 3, 3), np.float32), groups=2)


# --- fused int8 attention ----------------------------------------------------------


def _qkv(rng, b, h, sq, sk, d, dv, strided=True):
    """q, k, v as the graph hands them: views of one fused projection (B, S, 3*H*D)
    reshaped to (B, S, H, D) and transposed to (B, H, S, D); or contiguous."""
    if not strided:
        return (rng.standard_normal((b, h, sq, d), dtype=np.float32),
                rng.standard_normal((b, h, sk, d), dtype=np.float32),
                rng.standard_normal((b, h, sk, dv), dtype=np.float32))
    fused = rng.standard_normal((b, max(sq, sk), h * (2 * d + dv)), dtype=np.float32)
    q = fused[:, :sq, :h * d].reshape(b, sq, h, d).transpose(0, 2, 1, 3)
    k = fused[:, :sk, h * d:2 * h * d].reshape(b, sk, h, d).transpose(0, 2, 1, 3)
    v = fused[:, :sk, 2 * h * d:].reshape(b, sk, h, dv).transpose(0, 2, 1, 3)
    return q, k, v


def _softmax_attention(q, k, v, mask=None, scale=None, is_causal=False):
    """float64 softmax(q k^T * scale + mask) v, fully masked rows 0 (torch's rule);
    also returns the probabilities."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    keep = np.ones(s.shape, bool)
    if is_causal:
        keep = np.broadcast_to(np.tril(np.ones(s.shape[-2:], bool)), s.shape)
    elif mask is not None and mask.dtype == bool:
        keep = np.broadcast_to(mask, s.shape)
    elif mask is not None:
        s = s + mask
    s = np.where(keep, s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    total = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return p @ v, p


def _error_bound(q, k, v, p, scale=None):
    """Worst-case |int8 - exact| per output element, from the quantization steps.

    Q rows (uint8, step sq_i; an extreme value may clip: error <= sq_i), K rows
    (int8, step sk_j: error <= sk_j / 2) perturb each score by at most
    E_ij = scale * (sq_i |k_j|_1 + sk_j / 2 |q_i|_1 + D sq_i sk_j / 2); a row's
    probabilities then move by a factor within exp(+-2 E_i), E_i = max_j E_ij.
    P is rounded to 1/255 of its row max: <= pmax_i e^(2 E_i) / 510 each. V
    columns (int8, step sv_d) add <= sv_d / 2 times the (<= 1 + Sk c_i) mass.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    sq = (np.maximum(q.max(-1), 0) - np.minimum(q.min(-1), 0)) / 255
    sk = np.abs(k).max(-1) / 127
    sv = np.abs(v).max(-2) / 127
    d = q.shape[-1]
    e = scale * (sq[..., :, None] * np.abs(k).sum(-1)[..., None, :]
                 + sk[..., None, :] / 2 * np.abs(q).sum(-1)[..., :, None]
                 + d * sq[..., :, None] * sk[..., None, :] / 2)
    grow = np.exp(2 * np.where(p > 0, e, 0).max(-1, keepdims=True))
    c = p.max(-1, keepdims=True) * grow / 510
    weights = p * (grow - 1) + c * (p.max(-1, keepdims=True) > 0)
    mass = 1 + k.shape[-2] * c
    bound = weights @ np.abs(v) + mass * sv[..., None, :] / 2
    return bound + 1e-5 * np.abs(v).max()   # float32 arithmetic and exp_f32 (~1e-7 relative)


def _check(q, k, v, mask=None, scale=None, is_causal=False, n_threads=None):
    got = K.attention_int8(q, k, v, mask, scale, is_causal, n_threads=n_threads)
    exact, p = _softmax_attention(q, k, v, mask, scale, is_causal)
    assert got.shape == exact.shape and got.dtype == np.float32
    err = np.abs(got - exact)
    bound = _error_bound(q, k, v, p, scale)
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"
    # the numpy twin computes the same integers: only rounding flips of P (exp_f32
    # against np.exp) may differ, each moving an output by <= 127 * pscale * vscale
    twin, pscale = R.attention_int8(q, k, v, mask, scale, is_causal)
    sv = np.abs(np.asarray(v, np.float64)).max(-2) / 127
    flips = 2 * 127 * pscale[..., None] * sv[..., None, :]
    assert (np.abs(got - twin) <= flips + 1e-6 * np.abs(twin).max()).all()
    return got, exact


# (B, H, Sq, Sk, D, Dv): tails of the 6-row tile, the 4-key group and the 64-column block
ATTENTION_SHAPES = [(1, 1, 1, 1, 32, 32), (2, 3, 37, 29, 64, 64), (1, 2, 70, 131, 80, 80),
                    (2, 1, 13, 64, 32, 48), (1, 12, 128, 128, 64, 64), (3, 2, 5, 7, 64, 32)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("strided", [True, False])
def test_attention_matches_reference(shape, strided):
    b, h, sq, sk, d, dv = shape
    rng = np.random.default_rng(sq * sk + d)
    q, k, v = _qkv(rng, b, h, sq, sk, d, dv, strided)
    _check(q, k, v)


def _masks(rng, b, h, sq, sk):
    pad = np.ones((b, 1, 1, sk), bool)
    pad[0, ..., sk // 2:] = False                      # key padding, as BERT's
    full = rng.random((b, 1, sq, sk)) > 0.3
    full[-1, 0, sq // 2, :] = False                    # one fully masked query row
    additive = np.where(rng.random((b, h, sq, sk)) > 0.2, rng.standard_normal((b, h, sq, sk)),
                        -np.inf).astype(np.float32)
    empty = np.ones((b, 1, 1, sk), bool)
    empty[-1] = False                                  # a sequence that is all padding
    return {"pad": pad, "full": full, "float": additive, "empty": empty,
            "float_pad": np.where(pad, 0, np.finfo(np.float32).min).astype(np.float32),
            "float_2d": rng.standard_normal((sq, sk)).astype(np.float32),
            "bool_rows": rng.random((b, 1, sq, 1)) > 0.2,   # repeats along the keys: expanded
            "scalar": np.array(True)}


@pytest.mark.parametrize("which", ["pad", "full", "empty", "float", "float_pad", "float_2d",
                                   "bool_rows", "scalar"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 29, 64, 64), (2, 2, 9, 70, 80, 80)])
def test_attention_masks(which, shape):
    b, h, sq, sk, d, dv = shape
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, b, h, sq, sk, d, dv)
    got, _ = _check(q, k, v, _masks(rng, b, h, sq, sk)[which])
    if which == "empty":
        assert np.all(got[-1] == 0)   # every query of the all-padding sequence: 0, as torch


@pytest.mark.parametrize("sq,sk", [(20, 20), (9, 30), (30, 9)])
def test_attention_causal(sq, sk):
    rng = np.random.default_rng(sq + sk)
    q, k, v = _qkv(rng, 2, 2, sq, sk, 32, 32)
    _check(q, k, v, is_causal=True, scale=0.3)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_every_isa(isa, threads):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 3, 37, 70, 64, 64)
    mask = _masks(rng, 2, 3, 37, 70)["full"]
    with K.use_isa(isa):
        got, _ = _check(q, k, v, mask, n_threads=threads)
    # same integers on every path; each compiled entry may sum exp in another order
    np.testing.assert_allclose(got, K.attention_int8(q, k, v, mask), rtol=1e-6, atol=1e-6)


def test_attention_fully_masked_rows_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 2, 6, 8, 32, 32)
    bool_mask = np.ones((2, 1, 6, 8), bool)
    bool_mask[1, 0, 2] = False
    float_mask = np.where(bool_mask, 0, -np.inf).astype(np.float32)
    for mask in (bool_mask, float_mask):
        got = K.attention_int8(q, k, v, mask)
        ref = F.scaled_dot_product_attention(*(torch.from_numpy(x) for x in (q, k, v, mask))).numpy()
        assert np.all(got[1, :, 2] == 0) and np.all(ref[1, :, 2] == 0)
        assert np.abs(got - ref).max() < 0.05


def test_attention_output_is_a_view_of_bshd():
    q, k, v = _qkv(np.random.default_rng(5), 2, 3, 10, 12, 32, 32)
    out = K.attention_int8(q, k, v)
    assert out.shape == (2, 3, 10, 32) and out.transpose(0, 2, 1, 3).flags.c_contiguous


def test_attention_errors():
    q = np.ones((1, 2, 3, 8), np.float32)
    with pytest.raises(K.KernelError, match="not both"):
        K.attention_int8(q, q, q, np.ones((3, 3), bool), is_causal=True)
    with pytest.raises(K.KernelError, match="broadcast"):
        K.attention_int8(q, q, q, np.ones((2, 3), bool))
    with pytest.raises(K.KernelError, match="bool"):
        K.attention_int8(q, q, q, np.ones((3, 3), np.int64))
    with pytest.raises(K.KernelError, match="match"):
        K.attention_int8(q, np.ones((1, 2, 3, 4), np.float32), q)
    with pytest.raises(K.KernelError, match="4-D"):
        K.attention_int8(q[0], q[0], q[0])


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), sq=st.integers(1, 70), sk=st.integers(1, 70),
       d=st.sampled_from([8, 32, 64, 80]), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_property(b, h, sq, sk, d, masked, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b, h, sq, sk, d, d)
    mask = rng.random((b, 1, sq, sk)) > 0.3 if masked else None
    _check(q, k, v, mask)


@pytest.mark.parametrize("n", [1, 13, 16, 48, 100])   # 16-column vectors and a scalar tail
def test_absmax_cols_matches_numpy_on_strided_rows(n):
    """The per-column range that V's int8 scales come from, read from rows of a
    wider (fused QKV-like) buffer."""
    from numba import njit
    from fxopt.kernels.rowops import absmax_cols

    @njit
    def run(x, off, stride, rows, n, out):
        absmax_cols(x, off, stride, rows, n, out)
    rows, stride, off = 37, 2 * n + 5, 3
    x = np.random.default_rng(n).standard_normal(off + rows * stride).astype(np.float32)
    out = np.full(n, -1.0, np.float32)
    run(x, off, stride, rows, n, out)
    want = np.abs(x[off:off + rows * stride].reshape(rows, stride)[:, :n]).max(0)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("c,h,w", [(70, 12, 13), (3, 20, 17), (256, 9, 15)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])   # uint16: the AVX2 GEMM's A rows
def test_nchw_images_quantize_into_pixel_rows_exactly(c, h, w, dtype):
    """quantize_chw_rows (blocks of 128 pixels x 32 channels, here with tails in both)
    against the numpy reference quantizing each image whole, then laid out HWC."""
    from fxopt.kernels import conv as KC
    rng = np.random.default_rng(c + h)
    x = (rng.standard_normal((2, c, h, w)) * 3 + 1).astype(np.float32)
    scales, zps = np.empty(2, np.float32), np.empty(2, np.int32)
    KC.image_ranges(x.reshape(2, -1), scales, zps)
    kp = (c + 3) & ~3
    rows = np.full((2 * h * w, kp + 5), 7, dtype)
    KC.quantize_chw_rows(x.reshape(2, c, -1), scales, zps, rows)
    for i in range(2):
        q, s, z = R.quantize_rows_f32_u8(x[i].reshape(1, -1))
        assert (s[0], z[0]) == (scales[i], zps[i])
        got = rows[i * h * w:(i + 1) * h * w]
        np.testing.assert_array_equal(got[:, :c], q.reshape(c, h * w).T)
        assert (got[:, c:kp] == z[0]).all() and (got[:, kp:] == 7).all()   # pad, untouched


@pytest.mark.parametrize("p,o", [(3136, 256), (37, 70), (1, 5)])
def test_pixel_rows_transpose_to_chw(p, o):
    from fxopt.kernels import conv as KC
    y = np.random.default_rng(p).standard_normal((2, p, o)).astype(np.float32)
    out = np.empty((2, o, p), np.float32)
    KC.rows_to_chw(y, out)
    np.testing.assert_array_equal(out, y.transpose(0, 2, 1))


@pytest.mark.parametrize("isa", sorted({ISAS[0], "portable"}))
@pytest.mark.parametrize("c,o,k,h", [(256, 64, 1, 20), (70, 40, 3, 13), (64, 256, 1, 14)])
def test_conv2d_nchw_equals_nhwc_bit_for_bit(isa, c, o, k, h):
    """The NCHW path (quantized straight into pixel rows, output transposed back) and the
    NHWC path give the same numbers: the same quantization, the same GEMM."""
    rng = np.random.default_rng(c * k)
    x = rng.standard_normal((2, c, h, h + 3)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    with K.use_isa(isa):
        pc = K.pack_conv_weights_s8(w)
        y = K.conv2d_f32(x, pc, b, padding=k // 2, act="relu")
        y_nhwc = K.conv2d_f32(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), pc, b,
                              padding=k // 2, act="relu", layout="NHWC")
    np.testing.assert_array_equal(y, y_nhwc.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("c,p", [(70, 156), (3, 40000), (64, 33)])   # 3 x 40000: several runs
@pytest.mark.parametrize("wide", [False, True])   # a plain HWC image, or the GEMM's wider A rows
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_nhwc_images_quantize_into_pixel_rows_exactly(c, p, wide, dtype):
    from fxopt.kernels import conv as KC
    rng = np.random.default_rng(c + p)
    x = (rng.standard_normal((2, p, c)) * 3 - 1).astype(np.float32)
    scales, zps = np.empty(2, np.float32), np.empty(2, np.int32)
    KC.image_ranges(x.reshape(2, -1), scales, zps)
    kp = (c + 3) & ~3
    rows = np.full((2 * p, kp + 5 if wide else c), 7, dtype)
    KC.quantize_hwc_rows(x, scales, zps, rows)
    for i in range(2):
        q, s, z = R.quantize_rows_f32_u8(x[i].reshape(1, -1))
        got = rows[i * p:(i + 1) * p]
        np.testing.assert_array_equal(got[:, :c], q.reshape(p, c))
        if wide:
            assert (got[:, c:kp] == z[0]).all() and (got[:, kp:] == 7).all()


@pytest.mark.parametrize("act", sorted(DEPTHWISE_ACTS))
def test_depthwise_registers_equal_the_staged_epilogue(act):
    """A depthwise conv's channels finish in registers where they are whole 16-channel
    vectors (pair_outputs) and staged in a row of sums otherwise (a channel tail makes
    the whole row staged): the same operations, so the same bits, float and uint8 out.
    The first 32 channels of a 40-channel conv (staged) against the same 32 alone."""
    rng = np.random.default_rng(41)
    w = rng.standard_normal((40, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    wide, narrow = K.pack_conv_weights_s8(w, groups=40), K.pack_conv_weights_s8(w[:32], groups=32)
    assert np.array_equal(wide.dw_q[:32], narrow.dw_q) and np.array_equal(wide.dw_scales[:32], narrow.dw_scales)
    codes = rng.integers(0, 256, (2, 12, 10, 40)).astype(np.uint8)
    q = {"padding": 1, "act": act, "act_args": DEPTHWISE_ACTS[act][0], "a_scale": 0.03, "a_zero_point": 7}
    for out in ({}, {"out_scale": 0.025, "out_zero_point": 3}):
        staged = K.bind_conv2d(wide, b, **q, **out)(codes)[..., :32]
        in_regs = K.bind_conv2d(narrow, b[:32], **q, **out)(np.ascontiguousarray(codes[..., :32]))
        assert len(np.unique(in_regs)) > 100                     # not all clipped
        np.testing.assert_array_equal(in_regs, staged)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])      # uint16: the avx2 GEMM's A rows
@pytest.mark.parametrize("c, kh, kw, stride, pads, width", [
    (3, 3, 3, 2, (0, 0), 28),       # the 3x3 stems: kernel rows of 9 values copied whole
    (3, 7, 7, 2, (3, 3), 160),      # ResNet's stem: runs of 21
    (3, 3, 3, 1, (1, 1), 64),
    (16, 3, 3, 1, (1, 1), 144),     # runs of 48
    (2, 1, 3, 1, (0, 1), 8),        # runs of 6, rows as wide as K
])
def test_im2col_copies_every_patch_exactly(dtype, c, kh, kw, stride, pads, width):
    """im2col_batch_u8 against numpy's patches of the zero-point-padded images: every column
    of every row written (zero points past K), nothing past the batch's rows."""
    from fxopt.kernels import conv as C
    rng = np.random.default_rng(c * kh + width)
    n, h, w = 3, 13, 11
    x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    zps = np.array([7, 130, 255], np.int32)
    oh, ow = (h + 2 * pads[0] - kh) // stride + 1, (w + 2 * pads[1] - kw) // stride + 1
    out = np.full((n * oh * ow + 1, width), 99, dtype)    # one row past the batch: must stay 99
    C.im2col_batch_u8(x, c, kh, kw, stride, stride, pads[0], pads[1], 1, 1, zps, out, oh, ow)
    for i in range(n):
        padded = np.pad(x[i], ((pads[0], kh), (pads[1], kw), (0, 0)), constant_values=zps[i])
        want = np.full((oh * ow, width), zps[i], dtype)
        for oy in range(oh):
            for ox in range(ow):
                patch = padded[oy * stride:oy * stride + kh, ox * stride:ox * stride + kw]
                want[oy * ow + ox, :kh * kw * c] = patch.reshape(-1)
        np.testing.assert_array_equal(out[i * oh * ow:(i + 1) * oh * ow], want)
    assert (out[-1] == 99).all()
