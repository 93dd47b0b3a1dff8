"""Fused GEMM epilogues, applied to one int32 tile while it is in L1.

float:   y = (acc - zp_a[i] * colsum[j]) * (scale_a[i] * scale_w[j]) + bias[j]
         then act(y), act in ACTIVATIONS, then + res[i, j] if a residual is given
uint8:   q = clip(rint(y * (1 / out_scale)) + out_zp, 0, 255) after act, in float32
int32:   raw acc

``ep`` is a float32 parameter vector: [act code, p0, p1, out_scale, out_zp,
residual first, res_scale, res_zp]. A residual is added after the activation (a
transformer's `dense(x) + h`), or before it when "residual first" is set (a ResNet's
`relu(conv(x) + h)`). It is float32, or uint8 codes standing for
(float32(code) - res_zp) * res_scale (a chained block's output; residual_value).
exp/erf/tanh are written with polynomials so the loops vectorize (libm
calls would cost more than the GEMM for GELU at BERT shapes).
"""
import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

from ._cache import CACHE  # package-wide cache locators, before any @njit(cache=CACHE)

KERNEL_VERSION = "epilogue-11"

ACTIVATIONS = {"none": 0, "relu": 1, "hardtanh": 2, "relu6": 2,
               "gelu": 3, "gelu_tanh": 4, "silu": 5}
_GELU_TANH = ACTIVATIONS["gelu_tanh"]
EP_ACT, EP_P0, EP_P1, EP_OSCALE, EP_OZP, EP_RES_FIRST, EP_RSCALE, EP_RZP = range(8)

_F0, _F1, _F2, _HALF, _F255 = (np.float32(v) for v in (0.0, 1.0, 2.0, 0.5, 255.0))
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)
_INV_SQRT2 = np.float32(0.7071067811865476)
_SQRT_2_PI = np.float32(0.7978845608028654)
_GELU_C = np.float32(0.044715)
_ERF_ZMAX = np.float32(6.0)   # erf(6) = 1 in float32
# Abramowitz & Stegun 7.1.28, erf(z) = 1 - (1 + a1 z + ... + a6 z^6)^-16 for z >= 0
# (|error| < 3e-7 in exact arithmetic, < 2e-6 in float32): no exp, one division
_ERF_A = tuple(np.float32(v) for v in
               (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638))


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
    z = min(abs(x), _ERF_ZMAX)
    a1, a2, a3, a4, a5, a6 = _ERF_A
    p = _F1 + z * (a1 + z * (a2 + z * (a3 + z * (a4 + z * (a5 + z * a6)))))
    p *= p
    p *= p
    p *= p
    p *= p
    y = _F1 - _F1 / p
    return y if x >= _F0 else -y


@njit(inline="always")
def tanh_f32(x):
    return _F1 - _F2 / (exp_f32(_F2 * x) + _F1)


@njit(cache=CACHE, error_model="numpy")
def apply_activation(v, i, j0, n, act, p0, p1):
    """In place on v[i, j0:j0+n] (float32); act is an ACTIVATIONS code.

    Indices are unsigned so Numba emits no negative-index wraparound, which
    would turn these loops into gathers; no slices, as a view costs two
    atomic refcount updates per tile row.
    """
    ui, uj = np.uint64(i), np.uint64(j0)
    if act == 1:
        for j in range(n):
            k = uj + np.uint64(j)
            v[ui, k] = max(v[ui, k], _F0)
    elif act == 2:
        for j in range(n):
            k = uj + np.uint64(j)
            v[ui, k] = min(max(v[ui, k], p0), p1)
    elif act == 3:
        for j in range(n):
            k = uj + np.uint64(j)
            x = v[ui, k]
            v[ui, k] = _HALF * x * (_F1 + erf_f32(x * _INV_SQRT2))
    elif act == 4:
        for j in range(n):
            k = uj + np.uint64(j)
            x = v[ui, k]
            v[ui, k] = _HALF * x * (_F1 + tanh_f32(_SQRT_2_PI * (x + _GELU_C * x * x * x)))
    elif act == 5:
        for j in range(n):
            k = uj + np.uint64(j)
            x = v[ui, k]
            v[ui, k] = x / (_F1 + exp_f32(-x))


@njit(inline="always")
def in_registers(act):
    """Whether the tile epilogues (simd.tile_f32, tile_u8, staged_f32, staged_u8) apply the
    activation with code act in registers: all but tanh GELU, which runs on stored rows
    (apply_activation) after them."""
    return act != _GELU_TANH


def residual_value(res, i, k, ep):
    """The float32 value of res[i, k]: itself, or for uint8 codes
    (float32(code) - res_zp) * res_scale; simd._Residual.vec computes the same bits."""
    raise NotImplementedError  # compiled through the overload below


@overload(residual_value, inline="always")
def _residual_value(res, i, k, ep):
    if res.dtype == types.uint8:
        return lambda res, i, k, ep: (np.float32(res[i, k]) - ep[EP_RZP]) * ep[EP_RSCALE]
    return lambda res, i, k, ep: res[i, k]


@njit(cache=CACHE)
def add_row(out, res, i, j0, n, ep):
    """out[i, j0:j0+n] += the residual's values there (the fused residual add)."""
    ui, uj = np.uint64(i), np.uint64(j0)
    for j in range(n):
        k = uj + np.uint64(j)
        out[ui, k] += residual_value(res, ui, k, ep)


@njit(cache=CACHE)
def add_residual_rows(out, res, m0, mr, n0, ncols, act, ep):
    """out[m0:m0+mr, n0:n0+ncols] += res there, then act (an ACTIVATIONS code; 0 when the
    activation already ran, i.e. the residual comes after it); p0, p1 and the residual's
    scale from ep."""
    for r in range(mr):
        add_row(out, res, m0 + r, n0, ncols, ep)
        if act != 0:
            apply_activation(out, m0 + r, n0, ncols, act, ep[EP_P0], ep[EP_P1])


@njit(inline="always")
def dequant_row(t, t_off, ncols, zp, sa, colsum, wscale, bias, n0, y, yi, y0):
    """y[yi, y0:y0+ncols] = (t - zp*colsum) * sa*wscale (+ bias), one tile row."""
    ut, un, uy, ui = np.uint64(t_off), np.uint64(n0), np.uint64(y0), np.uint64(yi)
    zp = np.int32(zp)
    if bias.shape[0] > 0:
        for j in range(ncols):
            u = np.uint64(j)
            acc = np.int32(t[ut + u] - zp * colsum[un + u])
            y[ui, uy + u] = np.float32(acc) * (sa * wscale[un + u]) + bias[un + u]
    else:
        for j in range(ncols):
            u = np.uint64(j)
            acc = np.int32(t[ut + u] - zp * colsum[un + u])
            y[ui, uy + u] = np.float32(acc) * (sa * wscale[un + u])


@njit(cache=CACHE)
def store_tile_f32(t, ldt, mr, m0, n0, ncols, colsum, ascale, azp, wscale,
                   bias, ep, act, out):
    """Dequantize an int32 tile into out, then apply act (an ACTIVATIONS code).

    The activation runs after all the rows: with its call in the same loop, LLVM left
    dequant_row scalar (0.90 against 0.12 ns an output, 32 x 64 tiles)."""
    for r in range(mr):
        i = m0 + r
        dequant_row(t, r * ldt, ncols, azp[i], ascale[i], colsum, wscale, bias, n0,
                    out, i, n0)
    if act != 0:
        for r in range(mr):
            apply_activation(out, m0 + r, n0, ncols, act, ep[EP_P0], ep[EP_P1])


@njit(inline="always")
def requant_params(ep):
    """(1 / out_scale, out_zp) of the parameter vector ep, float32: what store_tile_u8
    multiplies by and adds; the in-register epilogue (simd._emit_u8_epilogue) reads the same
    two from ep and divides alike."""
    return _F1 / ep[EP_OSCALE], ep[EP_OZP]


@njit(inline="always")
def _add_to_rows(y, rows, res, m0, n0, ncols, ep):
    """y[r, :ncols] += the residual's values res[m0 + r, n0:n0+ncols] for r < rows
    (store_tile_u8's staged rows)."""
    un = np.uint64(n0)
    for r in range(rows):
        ui, ur = np.uint64(m0 + r), np.uint64(r)
        for j in range(ncols):
            y[ur, np.uint64(j)] += residual_value(res, ui, un + np.uint64(j), ep)


@njit(cache=CACHE)
def store_tile_u8(t, ldt, mr, m0, n0, ncols, colsum, ascale, azp, wscale,
                  bias, res, ep, out, y):
    """Dequantize an int32 tile into y (float32 scratch of shape (>= 1, >= ncols)), as
    many rows at a time as y has (_rows_u8), add the residual res (if any: res.shape[0] > 0)
    before or after the activation as ep says, and requantize into out (uint8).
    simd.staged_u8 and tile_u8 repeat these operations in
    registers, bit for bit: change them together."""
    for r0 in range(0, mr, y.shape[0]):
        _rows_u8(t, r0 * ldt, ldt, min(y.shape[0], mr - r0), m0 + r0, n0, ncols, colsum, ascale, azp, wscale,
                 bias, res, ep, out, y)


@njit(cache=CACHE)
def _rows_u8(t, t_off, ldt, rows, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, y):
    """store_tile_u8 of rows (<= y's) rows of the tile from t[t_off]. Each step is one
    loop over the rows, as in store_tile_f32, and a residual takes a function of its own:
    with all steps in one loop per row, or the residual's loops beside them, or this loop
    nest inside store_tile_u8's, LLVM left them scalar (a 3072 x 24 output with ReLU6,
    32-row tiles, one thread: 200-240 us against 56 us)."""
    if res.shape[0] > 0:
        _rows_u8_residual(t, t_off, ldt, rows, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, y)
        return
    act = np.int32(ep[EP_ACT])
    for r in range(rows):
        dequant_row(t, t_off + r * ldt, ncols, azp[m0 + r], ascale[m0 + r], colsum, wscale, bias, n0, y, r, 0)
    if act != 0:
        for r in range(rows):
            apply_activation(y, r, 0, ncols, act, ep[EP_P0], ep[EP_P1])
    requantize_rows(y, rows, m0, n0, ncols, ep, out)


@njit(cache=CACHE)
def _rows_u8_residual(t, t_off, ldt, rows, m0, n0, ncols, colsum, ascale, azp, wscale, bias, res, ep, out, y):
    """_rows_u8 with the residual res added before or after the activation, as ep says."""
    act = np.int32(ep[EP_ACT])
    pre = ep[EP_RES_FIRST] != 0
    for r in range(rows):
        dequant_row(t, t_off + r * ldt, ncols, azp[m0 + r], ascale[m0 + r], colsum, wscale, bias, n0, y, r, 0)
    if pre:
        _add_to_rows(y, rows, res, m0, n0, ncols, ep)
    if act != 0:
        for r in range(rows):
            apply_activation(y, r, 0, ncols, act, ep[EP_P0], ep[EP_P1])
    if not pre:
        _add_to_rows(y, rows, res, m0, n0, ncols, ep)
    requantize_rows(y, rows, m0, n0, ncols, ep, out)


@njit(inline="always")
def requantize_rows(y, rows, m0, n0, ncols, ep, out):
    """out[m0 + r, n0 + j] = clip(rint(y[r, j] * (1 / out_scale)) + out_zp, 0, 255)."""
    inv, ozp = requant_params(ep)
    un = np.uint64(n0)
    for r in range(rows):
        ui, ur = np.uint64(m0 + r), np.uint64(r)
        for j in range(ncols):
            uj = np.uint64(j)
            q = np.rint(y[ur, uj] * inv) + ozp
            q = q if q > _F0 else _F0
            q = q if q < _F255 else _F255
            out[ui, un + uj] = np.uint8(np.int32(q))


@njit(cache=CACHE)
def store_tile_s32(t, ldt, mr, m0, n0, ncols, out):
    un = np.uint64(n0)
    for r in range(mr):
        ui, ut = np.uint64(m0 + r), np.uint64(r * ldt)
        for j in range(ncols):
            out[ui, un + np.uint64(j)] = t[ut + np.uint64(j)]


def store_float_tile(mr, m0, n0, ncols, f, width, ascale, bias, res, ep, out, y):
    """out[m0..m0+mr-1, n0..n0+ncols-1] from a float tile f (row r at r * width), each row
    times its scale ascale[m0 + r] (no scale when ascale is empty), + bias, then the
    epilogue the int8 linear applies (activation, residual, uint8 requantization with the
    row staged in y). The int4 and bf16 kernels end their tiles with it."""
    raise NotImplementedError  # compiled through the overload below


@overload(store_float_tile, inline="always")
def _store_float_tile(mr, m0, n0, ncols, f, width, ascale, bias, res, ep, out, y):
    if out.dtype == types.uint8:
        def impl(mr, m0, n0, ncols, f, width, ascale, bias, res, ep, out, y):
            act = np.int32(ep[EP_ACT])
            inv, ozp = _F1 / ep[EP_OSCALE], ep[EP_OZP]
            for r in range(mr):
                sa = ascale[m0 + r] if ascale.shape[0] > 0 else _F1    # x * 1 is x: the same bits
                for c in range(ncols):
                    y[0, c] = f[r * width + c] * sa + bias[n0 + c]
                if act != 0:
                    apply_activation(y, 0, 0, ncols, act, ep[EP_P0], ep[EP_P1])
                for c in range(ncols):
                    q = np.rint(y[0, c] * inv) + ozp
                    q = q if q > _F0 else _F0
                    q = q if q < _F255 else _F255
                    out[m0 + r, n0 + c] = np.uint8(np.int32(q))
        return impl
    if out.dtype != types.float32:
        return None

    def impl(mr, m0, n0, ncols, f, width, ascale, bias, res, ep, out, y):
        act = np.int32(ep[EP_ACT])
        pre = res.shape[0] > 0 and ep[EP_RES_FIRST] != 0       # the activation waits for the residual
        for r in range(mr):
            sa = ascale[m0 + r] if ascale.shape[0] > 0 else _F1
            for c in range(ncols):
                out[m0 + r, n0 + c] = f[r * width + c] * sa + bias[n0 + c]
            if act != 0 and not pre:
                apply_activation(out, m0 + r, n0, ncols, act, ep[EP_P0], ep[EP_P1])
        if res.shape[0] > 0:
            add_residual_rows(out, res, m0, mr, n0, ncols, act if pre else 0, ep)
    return impl
