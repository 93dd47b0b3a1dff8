"""conv2d and batched attention matmul against numpy references."""
import numpy as np
import pytest

from fxopt import kernels as K
from fxopt.kernels import reference as R

CONVS = [  # (C, O, kernel, stride, padding, dilation, groups, H)
    (3, 8, (3, 3), 1, 1, 1, 1, 9),
    (16, 16, (3, 3), 2, 1, 1, 16, 10),      # depthwise, direct kernel
    (8, 12, (3, 3), 1, 2, 2, 4, 11),        # grouped, dilated
    (32, 16, (1, 1), 1, 0, 1, 1, 7),        # 1x1
    (5, 7, (2, 3), (2, 1), (0, 1), 1, 1, 8),
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


@pytest.mark.parametrize("isa", ["avx512_vnni", "portable"])
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


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2", "portable"])
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


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2"])
@pytest.mark.parametrize("transpose_b", [True, False])
def test_bmm_matches_reference(isa, transpose_b):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 10, 17)).astype(np.float32)
    shape = (2, 3, 70, 17) if transpose_b else (2, 3, 17, 70)
    b = rng.standard_normal(shape).astype(np.float32)
    with K.use_isa(isa):
        got = K.bmm_f32_int8(a, b, transpose_b=transpose_b)
    ref = R.bmm_f32_int8(a.reshape(6, 10, 17), b.reshape(6, *shape[2:]), transpose_b)
    np.testing.assert_allclose(got.reshape(6, 10, 70), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    exact = a @ (np.swapaxes(b, -1, -2) if transpose_b else b)
    assert np.abs(got - exact).max() < 0.03 * np.abs(exact).max()


def test_bmm_shape_errors():
    with pytest.raises(K.KernelError, match="inner"):
        K.bmm_f32_int8(np.ones((2, 3, 4), np.float32), np.ones((2, 5, 6), np.float32))
    with pytest.raises(K.KernelError, match="batch"):
        K.bmm_f32_int8(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 6), np.float32))


def test_pack_conv_int8_weights_as_given():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    q, s = R.quantize_weights_s8(w.reshape(8, -1))
    q[:, 0] = 5   # channels whose max |q| is not 127 must be kept as given
    x = rng.standard_normal((1, 4, 7, 7)).astype(np.float32)
    from_int8 = K.pack_conv_weights_s8(q.reshape(w.shape), scales=s)
    y = K.conv2d_f32(x, from_int8, padding=1)
    wd = (q * s[:, None]).reshape(w.shape)
    ref = _dequantized_conv(x, wd, None, 1, 1, 1, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(K.KernelError, match="int8"):
        K.pack_conv_weights_s8(w, scales=s)


@pytest.mark.parametrize("case", [CONVS[0], CONVS[1], CONVS[3]])
def test_conv2d_static_activation_scale(case):
    c, o, k, stride, padding, dilation, groups, h = case
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, c, h, h)).astype(np.float32)
    w = rng.standard_normal((o, c // groups, *k)).astype(np.float32)
    scale, zp = 0.03, 100   # clips the tails on purpose: static ranges are not the image's own
    pc = K.pack_conv_weights_s8(w, groups)
    y = K.conv2d_f32(x, pc, None, stride, padding, dilation, a_scale=scale, a_zero_point=zp)
    q = R.quantize_tensor_f32_u8(x.reshape(1, -1), scale, zp).reshape(x.shape)
    xd = (q.astype(np.float64) - zp) * scale
    wq, ws = R.quantize_weights_s8(w.reshape(o, -1))
    ref = R.conv2d_f32(xd, (wq * ws[:, None].astype(np.float64)).reshape(w.shape), None, stride, padding,
                       dilation, groups)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
