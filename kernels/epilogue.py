"""Fused GEMM epilogues, applied to one int32 tile while it is in L1.

float:   y = (acc - zp_a[i] * colsum[j]) * (scale_a[i] * scale_w[j]) + bias[j]
         then act(y), act in ACTIVATIONS
uint8:   q = clip(rint(y / out_scale) + out_zp, 0, 255) after act
int32:   raw acc

``ep`` is a float32 parameter vector: [act code, p0, p1, out_scale, out_zp].
exp/erf/tanh are written with polynomials so the loops vectorize (libm
calls would cost more than the GEMM for GELU at BERT shapes).
"""
import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

KERNEL_VERSION = "epilogue-1"

ACTIVATIONS = {"none": 0, "relu": 1, "hardtanh": 2, "relu6": 2,
               "gelu": 3, "gelu_tanh": 4, "silu": 5}
EP_ACT, EP_P0, EP_P1, EP_OSCALE, EP_OZP = range(5)

_F0, _F1, _F2, _HALF = (np.float32(v) for v in (0.0, 1.0, 2.0, 0.5))
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)
_INV_SQRT2 = np.float32(0.7071067811865476)
_SQRT_2_PI = np.float32(0.7978845608028654)
_GELU_C = np.float32(0.044715)
# Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(v) for v in
               (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if x.bitwidth != 32:
            v = builder.trunc(v, ir.IntType(32)) if x.bitwidth > 32 else builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(x), codegen


@njit(inline="always")
def exp_f32(x):
    x = min(max(x, _EXP_LO), _EXP_HI)
    n = np.rint(x * _LOG2E)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _F1 + r * (_F1 + r * (np.float32(1 / 2) + r * (np.float32(1 / 6) + r * (
        np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720))))))
    return p * _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def erf_f32(x):
    z = abs(x)
    t = _F1 / (_F1 + _ERF_P * z)
    a1, a2, a3, a4, a5 = _ERF_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    y = _F1 - poly * exp_f32(-z * z)
    return y if x >= _F0 else -y


@njit(inline="always")
def tanh_f32(x):
    return _F1 - _F2 / (exp_f32(_F2 * x) + _F1)


@njit(cache=True)
def apply_activation(v, act, p0, p1):
    """In place on a 1-D float32 view; act is an ACTIVATIONS code."""
    if act == 1:
        for j in range(v.shape[0]):
            v[j] = max(v[j], _F0)
    elif act == 2:
        for j in range(v.shape[0]):
            v[j] = min(max(v[j], p0), p1)
    elif act == 3:
        for j in range(v.shape[0]):
            x = v[j]
            v[j] = _HALF * x * (_F1 + erf_f32(x * _INV_SQRT2))
    elif act == 4:
        for j in range(v.shape[0]):
            x = v[j]
            v[j] = _HALF * x * (_F1 + tanh_f32(_SQRT_2_PI * (x + _GELU_C * x * x * x)))
    elif act == 5:
        for j in range(v.shape[0]):
            x = v[j]
            v[j] = x / (_F1 + exp_f32(-x))


@njit(cache=True)
def dequant_row(t, t_off, ncols, zp, sa, colsum, wscale, bias, n0, y):
    """y[:ncols] = (t - zp*colsum) * sa*wscale (+ bias) for one tile row."""
    if bias.shape[0] > 0:
        for j in range(ncols):
            acc = t[t_off + j] - zp * colsum[n0 + j]
            y[j] = np.float32(acc) * (sa * wscale[n0 + j]) + bias[n0 + j]
    else:
        for j in range(ncols):
            acc = t[t_off + j] - zp * colsum[n0 + j]
            y[j] = np.float32(acc) * (sa * wscale[n0 + j])


@njit(cache=True)
def store_tile_f32(t, ldt, mr, m0, n0, ncols, colsum, ascale, azp, wscale,
                   bias, ep, out):
    act = np.int32(ep[EP_ACT])
    for r in range(mr):
        row = out[m0 + r, n0:n0 + ncols]
        dequant_row(t, r * ldt, ncols, azp[m0 + r], ascale[m0 + r], colsum,
                    wscale, bias, n0, row)
        if act != 0:
            apply_activation(row, act, ep[EP_P0], ep[EP_P1])


@njit(cache=True)
def store_tile_u8(t, ldt, mr, m0, n0, ncols, colsum, ascale, azp, wscale,
                  bias, ep, out, y):
    act = np.int32(ep[EP_ACT])
    inv = _F1 / ep[EP_OSCALE]
    ozp = ep[EP_OZP]
    for r in range(mr):
        dequant_row(t, r * ldt, ncols, azp[m0 + r], ascale[m0 + r], colsum,
                    wscale, bias, n0, y)
        if act != 0:
            apply_activation(y[:ncols], act, ep[EP_P0], ep[EP_P1])
        for j in range(ncols):
            q = np.rint(y[j] * inv) + ozp
            out[m0 + r, n0 + j] = np.uint8(min(max(q, _F0), np.float32(255.0)))


@njit(cache=True)
def store_tile_s32(t, ldt, mr, m0, n0, ncols, out):
    for r in range(mr):
        for j in range(ncols):
            out[m0 + r, n0 + j] = t[r * ldt + j]
