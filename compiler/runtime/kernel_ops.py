"""The lowered int8 ops: torch ops in the `fxopt` namespace that call the Numba kernels.

Weights are packed once, at optimize time, and held as buffers of the graph
module (plain uint8/float32/int32 tensors, so they save and load like any
weight). On the first call the op wraps those buffers into the kernels'
PackedWeights and keeps it on the packed tensor itself, so later calls cost a
dictionary look-up, not a re-wrap, and the cache dies with the model.

    y = torch.ops.fxopt.linear_int8(x, packed, w_scale, col_sums, b, n, k, "relu", [], 0.0, 0)
    o = torch.ops.fxopt.attention_int8(q, k, v, mask, None, False)   # no weights: all dynamic
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from fxopt.core.fxops import _lib
from fxopt.core.ops import apply_activation
from fxopt.kernels import api as K
from fxopt.kernels import threads
from fxopt.kernels.finite import _nonfinite_sum
from fxopt.kernels.threads import launch_guard
from fxopt.quant import qops
from fxopt.runtime import saturation
from fxopt.runtime.kernel_args import (check_bf16_linear, check_conv, check_int4_linear, check_linear,
                                       check_sparse_linear)

_F32, _U8 = np.dtype(np.float32), np.dtype(np.uint8)
_TF32 = torch.float32
# inputs of fewer values are screened by a pass of their own, not in their first linear's
# quantization (linear 1x64x64: 5.2 us a call that way, 6.5 fused; 128x3072 input: fused
# saves the 19-45 us pass, 2 threads, Xeon with AMX)
SCREEN_APART = 1 << 14


def _load_threading_layer_keeping_torch_threads() -> None:
    """Load Numba's threading layer now and give torch back its thread count.

    Why: loading Numba's OpenMP layer sets the process's OpenMP thread count, which is
    torch's too when both use one libgomp: a user's torch.set_num_threads(1) silently became
    2 at the first kernel call, and the kernels here take their count from torch."""
    n = torch.get_num_threads()
    threads.layer()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


_load_threading_layer_keeping_torch_threads()

# x may arrive already quantized (uint8, with the static a_scale/a_zp of this op), and with
# out_scale > 0 the op hands its output on as uint8 for the next int8 op: chained int8 ops
# never round-trip through float. A residual (same shape as the output) is added after the
# activation inside the kernel's epilogue.
_lib.define("linear_int8(Tensor x, Tensor packed, Tensor w_scale, Tensor col_sums, Tensor? b, "
            "int n, int k, str act, float[] act_args, float a_scale, int a_zp, "
            "float out_scale=0.0, int out_zp=0, Tensor? residual=None) -> Tensor")
# The same op on sparse weights: `packed` holds kernels.sparse.PackedSparse.to_bytes() (the
# slot layout), every other argument and the result are linear_int8's, bit for bit.
_lib.define("linear_int8_sparse(Tensor x, Tensor packed, Tensor w_scale, Tensor col_sums, Tensor? b, "
            "int n, int k, str act, float[] act_args, float a_scale, int a_zp, "
            "float out_scale=0.0, int out_zp=0, Tensor? residual=None) -> Tensor")
# The same op on int4 weights (kernels/int4.py): `packed` holds the nibbles (N padded to 8
# columns, K / 2 bytes a column), w_scale float32 and col_sums int32 are (N, K / group), one
# per group of `group` weights along K (the group size is K / w_scale.shape[1]); every other
# argument and the result are linear_int8's.
_lib.define("linear_int4(Tensor x, Tensor packed, Tensor w_scale, Tensor col_sums, Tensor? b, "
            "int n, int k, str act, float[] act_args, float a_scale, int a_zp, "
            "float out_scale=0.0, int out_zp=0, Tensor? residual=None) -> Tensor")
# The same op on bf16 weights (kernels/bf16.py, target cpu-bf16): `packed` holds the weights'
# bf16 bits in the kernel's layout (N padded to 16 columns, a block of 16 columns K steps
# long); w_scale and col_sums are empty (no quantization); x is float32, rounded to bf16
# inside (a_scale must be 0); the rest, and the result, are linear_int8's.
_lib.define("linear_bf16(Tensor x, Tensor packed, Tensor w_scale, Tensor col_sums, Tensor? b, "
            "int n, int k, str act, float[] act_args, float a_scale, int a_zp, "
            "float out_scale=0.0, int out_zp=0, Tensor? residual=None) -> Tensor")


# A conv's residual (same shape as its output) is added before the activation: relu(conv(x) + r).
# Chained like the linears: x may be uint8 (a dense conv with a static a_scale/a_zp), and with
# out_scale > 0 a dense conv hands its output on as uint8 (channels_last). With res_scale > 0 the
# residual may be uint8 too (a chained block's output): (code - res_zp) * res_scale is added.
# An int4 embedding table (cpu-int4): row v's weights q[v, 2j], q[v, 2j + 1] in the low and
# high nibble of packed[v, j] (each + 8), a float32 scale per group of D / w_scale.shape[1]
# along the row: quantize_weight_groups' numbers, weight-only (a gather needs no kernel).
_lib.define("embedding_int4(Tensor packed, Tensor w_scale, Tensor indices) -> Tensor")
_lib.define("conv2d_int8(Tensor x, Tensor packed, Tensor w_scale, Tensor col_sums, Tensor? b, int[] geometry, "
            "int[] stride, int[] padding, int[] dilation, str act, float[] act_args, float a_scale, int a_zp, "
            "Tensor? residual=None, float out_scale=0.0, int out_zp=0, float res_scale=0.0, int res_zp=0) -> Tensor")


# aten.max_pool2d with its arguments spelled out in pairs; on uint8 (a chained conv's output,
# channels_last) it runs kernels/pool.py, the codes' max being the max's code; else torch's op.
_lib.define("max_pool2d(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode) "
            "-> Tensor")


# aten.adaptive_avg_pool2d(x, 1), or a mean over H and W, of a conv's float output: on float32
# channels_last x kernels/pool.py, each thread summing one run of the pixel rows in the conv's
# row order; on any other x torch's mean.
_lib.define("global_avg_pool(Tensor x, bool keepdim=True) -> Tensor")


_lib.define("attention_int8(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float? scale=None, "
            "bool is_causal=False) -> Tensor")


# aten.layer_norm over the last dimension, on the kernels' thread pool (see kernels/layernorm.py)
_lib.define("layer_norm(Tensor x, Tensor? weight=None, Tensor? bias=None, float eps=1e-05) -> Tensor")


def pack_conv(w_q: torch.Tensor, w_scale: torch.Tensor, groups: int) -> dict:
    """Pack int8 conv weights (O, I/g, kh, kw) with their per-channel scales.

    The kernels own the conv layout (which order im2col writes the taps in), so
    the weights go through their packer. Returns the buffers the op takes: `packed` holds every group's packed GEMM
    operand (or the depthwise taps), `geometry` = (O, C, kh, kw, groups, depthwise).
    """
    o, cg, kh, kw = w_q.shape
    pc = K.pack_conv_weights_s8(w_q.numpy(), groups, scales=w_scale.float().numpy())
    if pc.dw_q is not None:
        packed = torch.from_numpy(np.ascontiguousarray(pc.dw_q).view(np.uint8))
        scales, col_sums = pc.dw_scales, np.zeros(o, np.int32)
    else:
        packed = torch.from_numpy(np.stack([p.data.view(np.uint8) for p in pc.parts]))
        scales = np.concatenate([p.scales for p in pc.parts])
        col_sums = np.concatenate([p.col_sums for p in pc.parts])
    return {"packed": packed, "w_scale": torch.from_numpy(np.ascontiguousarray(scales, np.float32)),
            "col_sums": torch.from_numpy(np.ascontiguousarray(col_sums, np.int32)),
            "geometry": [o, cg * groups, kh, kw, groups, int(pc.dw_q is not None)]}


def _packed_conv(packed, w_scale, col_sums, b, geometry, stride, padding, dilation):
    cached = getattr(packed, "_fxopt_packed", None)
    if cached is None:
        check_conv(packed, w_scale, col_sums, b, geometry, stride, padding, dilation)
        o, c, kh, kw, groups, depthwise = geometry
        scales = w_scale.numpy()
        if depthwise:
            pc = K.PackedConv(o, c, kh, kw, groups, (), packed.numpy().view(np.int8), scales)
        else:
            og, k = o // groups, (c // groups) * kh * kw
            sums = col_sums.numpy()
            parts = tuple(K.PackedWeights(_aligned(packed[g].numpy().view(np.int8)), scales[g * og:(g + 1) * og],
                                          sums[g * og:(g + 1) * og], og, k, K.isa()) for g in range(groups))
            pc = K.PackedConv(o, c, kh, kw, groups, parts)
        bias = None if b is None else np.ascontiguousarray(b.detach().numpy(), np.float32)
        cached = (pc, bias)
        packed._fxopt_packed = cached
    return cached


def _conv2d_int8(x, packed, w_scale, col_sums, b, geometry, stride, padding, dilation, act, act_args,
                 a_scale, a_zp, residual=None, out_scale=0.0, out_zp=0, res_scale=0.0, res_zp=0):
    return conv_call(packed, w_scale, col_sums, b, geometry, stride, padding, dilation, act, act_args, a_scale,
                     a_zp, out_scale, out_zp, res_scale, res_zp)(x, residual)


def conv_call(packed, w_scale, col_sums, b, geometry, stride, padding, dilation, act, act_args, a_scale, a_zp,
              out_scale=0.0, out_zp=0, res_scale=0.0, res_zp=0):
    """conv2d_int8 for one layer: call(x, residual=None) -> a channels_last tensor, the layer's
    conv bound once (K.bind_conv2d) and kept on the packed tensor; the execution plan binds it
    when it is built and calls it with the activations only."""
    key = (tuple(stride), tuple(padding), tuple(dilation), act, tuple(act_args), a_scale, a_zp, out_scale, out_zp,
           res_scale, res_zp)
    return _bound(packed, key, lambda: _bind_conv(packed, w_scale, col_sums, b, geometry, key))


def _bind_conv(packed, w_scale, col_sums, b, geometry, key):
    stride, padding, dilation, act, act_args, a_scale, a_zp, out_scale, out_zp, res_scale, res_zp = key
    pc, bias = _packed_conv(packed, w_scale, col_sums, b, geometry, stride, padding, dilation)
    conv = K.bind_conv2d(pc, bias, stride, padding, dilation, act, act_args, a_scale, a_zp, out_scale, out_zp,
                         res_scale, res_zp)
    floats = []     # with uint8 output: the float twin a saturation monitor counts with

    def count_chained(xn, res, threads, layout):
        if not floats:
            floats.append(K.bind_conv2d(pc, bias, stride, padding, dilation, act, act_args, a_scale, a_zp))
        if res is not None and res.dtype == np.uint8:       # the float twin adds the values the codes stand for
            res = K.residual_floats(res, res_scale, res_zp)
        saturation.count_chained(packed, torch.from_numpy(floats[0](xn, res, threads, layout)), out_scale, out_zp)

    def call(x, residual=None):
        saturation.count(packed, x, a_scale, a_zp)
        x = x if x.dtype is torch.float32 or x.dtype is torch.uint8 else x.float()
        # Work in NHWC, the layout im2col reads, and hand back a channels_last tensor (logical
        # NCHW, NHWC in memory): the next conv reads it without a copy, and torch's
        # elementwise ops and pools keep the format. Float NCHW images (the model's input)
        # go as they are: a dense conv quantizes them into NHWC rows as it reads them.
        xn, layout = _nhwc_numpy(x), "NHWC"
        if not xn.flags.c_contiguous:
            if x.dtype is torch.float32 and x.is_contiguous():
                xn, layout = xn.transpose(0, 3, 1, 2), "NCHW"
            else:
                xn = np.ascontiguousarray(xn)
        res = None
        if residual is not None:
            r = residual.permute(0, 2, 3, 1)
            keep = r.dtype == torch.float32 or (r.dtype == torch.uint8 and res_scale > 0)   # else as floats
            res = (r if r.is_contiguous() and keep else r.to(r.dtype if keep else torch.float32).contiguous()
                   ).detach().numpy()
        if out_scale > 0 and saturation.active():
            count_chained(xn, res, torch.get_num_threads(), layout)
        return torch.from_numpy(conv(xn, res, torch.get_num_threads(), layout).transpose(0, 3, 1, 2))
    return call


def _nhwc_numpy(x):
    """x (N, C, H, W) as a numpy NHWC view of its memory: C-contiguous where x is
    channels_last, as the kernel ops hand on their outputs. The axes move in numpy (a view,
    ~0.3 us; torch's permute takes ~1 us)."""
    return (x.detach() if x.requires_grad else x).numpy().transpose(0, 2, 3, 1)


def max_pool2d_impl(x, kernel_size, stride, padding, dilation, ceil_mode):
    """fxopt::max_pool2d (the plan calls it directly): a channels_last tensor for uint8 x."""
    if x.dtype != torch.uint8:
        return torch.ops.aten.max_pool2d.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    y = K.max_pool2d_nhwc(_nhwc_numpy(x), kernel_size, stride, padding, dilation, ceil_mode)
    return torch.from_numpy(y.transpose(0, 3, 1, 2))


def global_avg_pool_impl(x, keepdim=True):
    """fxopt::global_avg_pool (the plan calls it directly): (N, C, 1, 1), or (N, C) without
    keepdim, float32 for float32 x."""
    nhwc = _nhwc_numpy(x) if x.dtype is torch.float32 else None
    if nhwc is None or not nhwc.flags.c_contiguous:
        return x.mean((2, 3), keepdim=keepdim)
    y = torch.from_numpy(K.global_avg_pool_nhwc(nhwc, torch.get_num_threads()))
    return y.view(*y.shape, 1, 1) if keepdim else y


def pack_linear(w_q: torch.Tensor, w_scale: torch.Tensor) -> dict:
    """Pack int8 weights (N, K) for the GEMM; returns the buffers the op takes."""
    pw = K.pack_weights_s8(w_q.numpy(), w_scale.numpy().astype(np.float32))
    return {"packed": torch.from_numpy(pw.data.view(np.uint8)), "w_scale": torch.from_numpy(pw.scales),
            "col_sums": torch.from_numpy(pw.col_sums), "n": int(pw.n), "k": int(pw.k)}


def _packed(packed, w_scale, col_sums, b, n, k):
    cached = getattr(packed, "_fxopt_packed", None)
    if cached is None:
        check_linear(packed, w_scale, col_sums, b, n, k)
        data = packed.numpy().view(np.int8)
        if data.ctypes.data % 64:  # loaded weights may land unaligned; the kernel wants 64 bytes
            data = _aligned(data)
        pw = K.PackedWeights(data, w_scale.numpy(), col_sums.numpy(), int(n), int(k), K.isa())
        bias = None if b is None else np.ascontiguousarray(b.detach().numpy(), np.float32)
        cached = (pw, bias)
        packed._fxopt_packed = cached
    return cached


def pack_linear_sparse(w_q: torch.Tensor, w_scale: torch.Tensor) -> dict:
    """pack_linear for the sparse kernel: the buffers linear_int8_sparse takes."""
    ps = K.pack_sparse_s8(w_q.numpy(), w_scale.numpy().astype(np.float32))
    return {"packed": torch.from_numpy(ps.to_bytes()), "w_scale": torch.from_numpy(ps.scales),
            "col_sums": torch.from_numpy(ps.col_sums), "n": int(ps.n), "k": int(ps.k)}


def _packed_sparse(packed, w_scale, col_sums, b, n, k):
    cached = getattr(packed, "_fxopt_packed", None)
    if cached is None:
        check_sparse_linear(packed, w_scale, col_sums, b, n, k)
        ps = K.PackedSparse.from_bytes(packed.numpy(), w_scale.numpy(), col_sums.numpy(), n, k)
        bias = None if b is None else np.ascontiguousarray(b.detach().numpy(), np.float32)
        cached = (ps, bias)
        packed._fxopt_packed = cached
    return cached


def pack_linear_int4(w_q: torch.Tensor, w_scale: torch.Tensor) -> dict:
    """pack_linear for int4 weights (quantize_weight_groups' w_q and its (N, K / group)
    scales): the buffers linear_int4 takes. col_sums is empty: the op computes the sums from
    the packed bytes when it first binds them, so a saved model holds only nibbles and scales."""
    q = w_q.numpy()
    group = q.shape[1] // w_scale.shape[1]
    pw = K.pack_int4(q, w_scale.numpy().astype(np.float32), group)
    packed = torch.from_numpy(pw.data)
    return {"packed": packed, "w_scale": torch.from_numpy(pw.natural()[0]),
            "col_sums": torch.empty(0, dtype=torch.int32), "n": int(pw.n), "k": int(pw.k)}


def _packed_int4(packed, w_scale, col_sums, b, n, k):
    cached = getattr(packed, "_fxopt_packed", None)
    if cached is None:
        check_int4_linear(packed, w_scale, col_sums, b, n, k)
        pw = K.PackedInt4.from_arrays(packed.numpy(), w_scale.numpy(), col_sums.numpy(), int(n), int(k))
        bias = None if b is None else np.ascontiguousarray(b.detach().numpy(), np.float32)
        cached = (pw, bias)
        packed._fxopt_packed = cached
    return cached


def pack_linear_bf16(weight: torch.Tensor) -> dict:
    """The buffers linear_bf16 takes for float32 weights (N, K): the weights rounded to bf16
    (round to nearest even) in the kernel's layout, as a bfloat16 tensor (half the fp32 bytes
    on disk and in memory); empty scales and sums."""
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise TypeError(f"linear_bf16 packs float32 (N, K) weights, got {weight.dtype} {tuple(weight.shape)}")
    pw = K.pack_bf16(weight.detach().contiguous().numpy())
    packed = torch.from_numpy(pw.data.view(np.int16)).view(torch.bfloat16)
    return {"packed": packed, "w_scale": torch.empty(0, dtype=torch.float32),
            "col_sums": torch.empty(0, dtype=torch.int32), "n": pw.n, "k": pw.k}


def _packed_bf16(packed, w_scale, col_sums, b, n, k):
    cached = getattr(packed, "_fxopt_packed", None)
    if cached is None:
        check_bf16_linear(packed, w_scale, col_sums, b, n, k)
        pw = K.PackedBf16(packed.view(torch.int16).numpy().view(np.uint16), n, k)
        bias = None if b is None else np.ascontiguousarray(b.detach().numpy(), np.float32)
        cached = (pw, bias)
        packed._fxopt_packed = cached
    return cached


def unpack_bf16(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 (N, K) weights a linear_bf16 holds (exact: bf16 widens to fp32 exactly)."""
    from fxopt.kernels.bf16 import unpack_bits
    bits = unpack_bits(K.PackedBf16(packed.view(torch.int16).numpy().view(np.uint16), n, k))
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()


def linear_bf16_reference(x, packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp,
                          out_scale=0.0, out_zp=0, residual=None):
    """linear_bf16 in torch (the op's eager fallback and the tests' reference): fp32 math on
    bf16-rounded x and the bf16 weights; the kernel differs only in the order of its sums."""
    _check_bf16_input(x, a_scale)
    w = unpack_bf16(packed, n, k)
    y = torch.nn.functional.linear(x.detach().to(torch.bfloat16).float(), w, None if b is None else b.float())
    y = apply_activation(y, act, act_args)
    if residual is not None:
        y = y + residual.float()
    if out_scale > 0:
        return torch.clamp(torch.round(y / out_scale) + out_zp, 0, 255).to(torch.uint8)
    return y


def _check_bf16_input(x, a_scale) -> None:
    if a_scale != 0:
        raise ValueError(f"fxopt::linear_bf16: a_scale={a_scale}; the bf16 linear rounds float activations "
                         f"to bf16 and takes no quantized input (a_scale must be 0)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fxopt::linear_bf16: x is {x.dtype}; the bf16 linear takes float32 activations "
                        f"(bfloat16 and float16 widen exactly): cast the input with .float()")


def _aligned(a: np.ndarray) -> np.ndarray:
    out = K.aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def linear_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale=0.0, out_zp=0,
                sparse=False, int4=False, bf16=False):
    """The linear_int8 op (linear_int8_sparse with sparse) for one layer with all but x and the
    residual bound, on torch tensors: call(x, residual=None) -> tensor. The op calls it; see
    linear_np_call."""
    np_call = linear_np_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp,
                             sparse, int4, bf16)
    f32, u8 = torch.float32, torch.uint8

    def call(x, residual=None):
        x = x.detach()
        if x.dtype is not f32 and x.dtype is not u8:
            x = x.float()
        r = None if residual is None else residual.detach().float().numpy()
        return torch.from_numpy(np_call(x.numpy(), r))
    return call


class _Calls(dict):
    """Bound calls kept on a packed tensor: a cache, so copies and pickles start empty."""

    def __reduce__(self):
        return (_Calls, ())

    def __deepcopy__(self, memo):
        return _Calls()


def linear_np_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale=0.0, out_zp=0,
                   sparse=False, int4=False, bf16=False):
    """linear_int8 (linear_int8_sparse with sparse) for one layer on numpy arrays:
    call(x, residual=None) -> array, x (..., K) float32 or uint8 (quantized with a_scale, a_zp),
    the residual float32 (..., N). Built once per layer and epilogue and kept on the packed
    tensor; the execution plan calls it directly."""
    key = (act, tuple(act_args), a_scale, a_zp, out_scale, out_zp, id(b))
    return _bound(packed, key, lambda: _bind_linear(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale,
                                                    a_zp, out_scale, out_zp, sparse, int4, bf16))


def _bound(packed, key, bind):
    """The layer's call for `key`, made by bind() once and kept on its packed tensor."""
    calls = getattr(packed, "_fxopt_calls", None)
    if calls is None:
        calls = packed._fxopt_calls = _Calls()
    call = calls.get(key)
    if call is None:
        call = calls[key] = bind()
    return call


def _linear_kernel(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp, sparse,
                   int4, bf16):
    """The bound kernel of one linear layer: kernel(rows, out, residual, threads) -> array."""
    if bf16:
        pw, bias = _packed_bf16(packed, w_scale, col_sums, b, n, k)
        return K.bind_linear_bf16(pw, bias, act, tuple(act_args), a_scale, a_zp, out_scale, out_zp)
    if int4:
        pw, bias = _packed_int4(packed, w_scale, col_sums, b, n, k)
        return K.bind_linear_int4(pw, bias, act, tuple(act_args), a_scale, a_zp, out_scale, out_zp)
    if sparse:
        ps, bias = _packed_sparse(packed, w_scale, col_sums, b, n, k)
        return K.bind_linear_sparse(ps, bias, act, tuple(act_args), a_scale, a_zp, out_scale, out_zp)
    pw, bias = _packed(packed, w_scale, col_sums, b, n, k)
    return K.bind_linear(pw, bias, act, tuple(act_args), a_scale, a_zp, out_scale, out_zp)


def _bind_linear(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp, sparse,
                 int4=False, bf16=False):
    weights = (packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp)
    kernel = _linear_kernel(*weights, out_scale, out_zp, sparse, int4, bf16)
    floats = []     # with uint8 output: the float twin a saturation monitor counts with

    def count_chained(x):
        if not floats:
            floats.append(_linear_kernel(*weights, 0.0, 0, sparse, int4, bf16))
        rows = np.ascontiguousarray(x.reshape(-1, k))
        y = floats[0](rows if rows.dtype == np.uint8 else rows.astype(np.float32), None, None, get_threads())
        saturation.count_chained(packed, torch.from_numpy(y), out_scale, out_zp)

    static = a_scale > 0
    get_threads = torch.get_num_threads
    lean = getattr(kernel, "rows", None)      # float or uint8 rows in one frame around one compiled call
    screened = getattr(kernel, "screened", None)
    lean_screened = getattr(kernel, "rows_screened", None)    # lean's (y, whether x was finite)

    def call(x, residual=None, out=None):
        # out: (M, N) to write into (the plan's buffer), or None for a fresh array
        if saturation.active():
            if static:
                saturation.count(packed, torch.from_numpy(x), a_scale, a_zp)
            if out_scale > 0:
                count_chained(x)
        if residual is None and lean is not None and x.ndim == 2 and (x.dtype is _F32 or x.dtype is _U8):
            return lean(x, out, get_threads())
        if residual is None and x.ndim == 2 and (x.dtype is _F32 or x.dtype is _U8) and x.flags.c_contiguous:
            if out is not None and out.shape[0] != x.shape[0]:      # the common case, kept short
                out = None
            return kernel(x, out, None, get_threads())
        lead = x.shape[:-1]
        if x.dtype != np.float32 and x.dtype != np.uint8:
            x = x.astype(np.float32)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        res = None
        if residual is not None:
            if out_scale > 0:
                raise ValueError("fxopt::linear_int8: a residual needs float output (out_scale=0)")
            res = residual.reshape(-1, n)
        rows = x.reshape(-1, k)
        if out is not None and out.shape[0] != rows.shape[0]:
            out = None
        return kernel(rows, out, res, get_threads()).reshape(lead + (n,))

    def call_screened(x, out=None):
        # (call(x), 0 or NaN): whether x is finite, from the pass that quantizes it (the
        # plan's screen of a graph input this layer reads first; bind_linear's screened).
        # A small x takes a pass of its own: cheaper than the fused path's extra Python
        # (a kernel with rows_screened has none: the sparse one)
        if lean_screened is not None and x.ndim == 2 and x.dtype is _F32 and not saturation.active():
            return lean_screened(x, out, get_threads())
        if (x.size < SCREEN_APART or x.dtype is not _F32 or not x.flags.c_contiguous or x.ndim < 1
                or x.shape[-1] != k):
            return call(x, None, out), _nonfinite_sum(np.ascontiguousarray(x).reshape(-1))
        if saturation.active():
            if static:
                saturation.count(packed, torch.from_numpy(x), a_scale, a_zp)
            if out_scale > 0:
                count_chained(x)
        rows = x.reshape(-1, k)
        if out is not None and out.shape[0] != rows.shape[0]:
            out = None
        y, bad = screened(rows, out, get_threads())
        return y.reshape(x.shape[:-1] + (n,)), bad
    at = getattr(kernel, "rows_screened_at", None)       # lean's, on rows at an address

    def call_screened_tensor(x, out=None):
        # call_screened on a torch tensor (the plan's graph input): a float32 (M, K)
        # contiguous one is read where it lies (no numpy array made of it: 0.55 us)
        if (x.dtype is _TF32 and x.dim() == 2 and x.is_contiguous() and x.is_cpu and x.shape[1] == k
                and not saturation.active()):
            got = at(x.data_ptr(), x.shape[0], out, get_threads())
            if got is not None:
                return got
        try:
            xn = x.numpy()
        except TypeError:           # a dtype numpy lacks (bfloat16): float32, as the plan's _to_numpy
            xn = x.float().numpy()
        return call_screened(xn, out)

    def call_screened_checked(x, out=None):
        # call_screened_tensor for an x the plan's input check has held to a CPU float32
        # (M, K) tensor: its contiguity is all that is left to look at (0.1 against 0.35 us)
        if x.is_contiguous() and not saturation.active():
            got = at(x.data_ptr(), x.shape[0], out, get_threads())
            if got is not None:
                return got
        return call_screened_tensor(x, out)
    call.k = k
    if screened is not None:
        call.screened = call_screened
    if at is not None:
        call.screened_tensor, call.screened_checked = call_screened_tensor, call_screened_checked
    return call


def layer_norm_np_call(weight, bias, eps):
    """fxopt::layer_norm with its weight and bias bound, on numpy arrays: call(x) -> array."""
    w = None if weight is None else weight.detach().float().numpy()
    b = None if bias is None else bias.detach().float().numpy()
    get_threads = torch.get_num_threads

    def call(x, out=None):
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if out is not None and out.size != x.size:
            out = None
        return K.layer_norm_f32(x, w, b, eps, n_threads=get_threads(), out=out)
    return call


def _linear_int8(x, packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp,
                 out_scale=0.0, out_zp=0, residual=None):
    call = linear_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp)
    return call(x, residual)


def _linear_int8_sparse(x, packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp,
                        out_scale=0.0, out_zp=0, residual=None):
    call = linear_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp,
                       sparse=True)
    return call(x, residual)


def _linear_int4(x, packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp,
                 out_scale=0.0, out_zp=0, residual=None):
    call = linear_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp,
                       int4=True)
    return call(x, residual)


def _linear_bf16(x, packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp,
                 out_scale=0.0, out_zp=0, residual=None):
    _check_bf16_input(x, a_scale)
    call = linear_call(packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp, out_scale, out_zp,
                       bf16=True)
    return call(x, residual)


def pack_embedding_int4(w_q: torch.Tensor, w_scale: torch.Tensor) -> dict:
    """The buffers embedding_int4 takes, of quantize_weight_groups' (q, scale) of a table."""
    u = (w_q.to(torch.int16) + 8).to(torch.uint8)
    return {"packed": (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), "w_scale": w_scale.float().contiguous()}


def _embedding_int4(packed, w_scale, indices):
    v, d = packed.shape[0], 2 * packed.shape[1]
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < v):
        raise IndexError(f"index out of range in self: embedding indices must be in [0, {v}), "
                         f"got values in [{int(indices.min())}, {int(indices.max())}]")
    rows = packed[indices]
    q = torch.stack([rows & 15, rows >> 4], dim=-1).reshape(*indices.shape, d).to(torch.int16) - 8
    scale = w_scale[indices].repeat_interleave(d // w_scale.shape[1], dim=-1)
    return q.float() * scale


def _strided(t: torch.Tensor, dtype=torch.float32):
    """(tensor kept alive, K.Strided) of t as the attention kernel reads it: in place
    unless its dtype differs or its last stride is not 1."""
    if t.dtype != dtype:
        t = t.to(dtype)
    st = t.stride()   # torch strides are never negative
    if st and st[-1] != 1 and t.shape[-1] > 1:
        t = t.contiguous()
        st = t.stride()
    return t, K.Strided(t.data_ptr(), t.shape, st)


def _attention_int8(q, k, v, attn_mask=None, scale=None, is_causal=False):
    return torch.from_numpy(attention_array(q, k, v, attn_mask, scale, is_causal))


def attention_array(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """attention_int8 on torch q/k/v (and mask), returning the kernel's numpy array."""
    # q/k/v are usually strided views of a fused QKV projection: the kernel reads them in
    # place (through their data pointers: no numpy wrapping on this small-shape hot path)
    # and returns (B, H, Sq, Dv) laid out (B, Sq, H, Dv), like torch's sdpa, so the
    # transpose(1, 2).reshape that follows in the graph is free
    q, qs = _strided(q)
    k, ks = _strided(k)
    v, vs = _strided(v)
    mask, ms, is_bool = attn_mask, None, True
    if mask is not None:
        is_bool = mask.dtype == torch.bool
        if mask.dim() == 0 or (mask.shape[-1] == 1 and k.shape[2] > 1):   # repeated along the keys
            mask = mask.expand(*mask.shape[:-1], k.shape[2])
        mask, ms = _strided(mask, torch.bool if is_bool else torch.float32)
    return K.attention_int8_strided(qs, ks, vs, ms, is_bool, scale, is_causal,
                                    n_threads=torch.get_num_threads())


def attention_np_call(scale=None, is_causal=False):
    """attention_int8 as the execution plan calls it: on numpy q/k/v (and mask), the
    kernel reading them in place, returning its numpy array, as attention_array does
    for torch tensors."""
    def call(q, k, v, mask=None):
        if mask is not None and mask.dtype != np.bool_ and mask.dtype != np.float32:
            mask = mask.astype(np.float32)          # as attention_array's .to(float32)
        return K.attention_int8(q, k, v, mask, scale, is_causal, n_threads=torch.get_num_threads())
    return call


def _layer_norm(x, weight=None, bias=None, eps=1e-05):
    def arr(t):
        return None if t is None else t.detach().float().numpy()
    xn = (x if x.dtype == torch.float32 else x.float()).detach().numpy()
    return torch.from_numpy(K.layer_norm_f32(xn, arr(weight), arr(bias), eps,
                                             n_threads=torch.get_num_threads()))


def _guarded(op):
    """`op` under the kernels' launch guard: a lock only where Numba's threading layer
    cannot take launches from several threads at once (fxopt.kernels.threads)."""
    @functools.wraps(op)
    def call(*args, **kwargs):
        with launch_guard():
            return op(*args, **kwargs)
    return call


_lib.impl("linear_int8", _guarded(_linear_int8), "CPU")
_lib.impl("linear_int8_sparse", _guarded(_linear_int8_sparse), "CPU")
_lib.impl("linear_int4", _guarded(_linear_int4), "CPU")
_lib.impl("linear_bf16", _guarded(_linear_bf16), "CPU")
_lib.impl("linear_bf16", linear_bf16_reference, "CompositeExplicitAutograd")   # other devices: the torch math
_lib.impl("embedding_int4", _embedding_int4, "CompositeExplicitAutograd")
_lib.impl("layer_norm", _guarded(_layer_norm), "CPU")
_lib.impl("attention_int8", _guarded(_attention_int8), "CPU")
_lib.impl("conv2d_int8", _guarded(_conv2d_int8), "CPU")
_lib.impl("max_pool2d", _guarded(max_pool2d_impl), "CPU")
_lib.impl("global_avg_pool", _guarded(global_avg_pool_impl), "CPU")


@torch.library.register_fake("fxopt::linear_int8")
def _linear_int8_fake(x, packed, w_scale, col_sums, b, n, k, act, act_args, a_scale, a_zp,
                      out_scale=0.0, out_zp=0, residual=None):
    dtype = torch.uint8 if out_scale > 0 else torch.float32
    return x.new_empty((*x.shape[:-1], n), dtype=dtype)


torch.library.register_fake("fxopt::linear_int8_sparse")(_linear_int8_fake)
torch.library.register_fake("fxopt::linear_int4")(_linear_int8_fake)
torch.library.register_fake("fxopt::linear_bf16")(_linear_int8_fake)


@torch.library.register_fake("fxopt::embedding_int4")
def _embedding_int4_fake(packed, w_scale, indices):
    return packed.new_empty((*indices.shape, 2 * packed.shape[1]), dtype=torch.float32)


@torch.library.register_fake("fxopt::conv2d_int8")
def _conv2d_int8_fake(x, packed, w_scale, col_sums, b, geometry, stride, padding, dilation, act, act_args,
                      a_scale, a_zp, residual=None, out_scale=0.0, out_zp=0, res_scale=0.0, res_zp=0):
    n, _, h, w = x.shape
    o, _, kh, kw = geometry[:4]
    pt, pl, pb, pr = K.four_pads(padding)
    oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, o, oh, ow), dtype=torch.uint8 if out_scale > 0 else torch.float32)


@torch.library.register_fake("fxopt::max_pool2d")
def _max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = x.shape
    oh, ow = (K.pool_out_size(size, *args, ceil_mode)
              for size, *args in zip((h, w), kernel_size, stride, padding, dilation))
    return x.new_empty((n, c, oh, ow), dtype=x.dtype)


@torch.library.register_fake("fxopt::global_avg_pool")
def _global_avg_pool_fake(x, keepdim=True):
    n, c = x.shape[:2]
    return x.new_empty((n, c, 1, 1) if keepdim else (n, c))


@torch.library.register_fake("fxopt::attention_int8")
def _attention_int8_fake(q, k, v, attn_mask=None, scale=None, is_causal=False):
    return qops.attention_like(q, v)


@torch.library.register_fake("fxopt::layer_norm")
def _layer_norm_fake(x, weight=None, bias=None, eps=1e-05):
    return x.new_empty(x.shape, dtype=torch.float32)


linear_int8 = torch.ops.fxopt.linear_int8.default
linear_int8_sparse = torch.ops.fxopt.linear_int8_sparse.default
linear_int4 = torch.ops.fxopt.linear_int4.default
linear_bf16 = torch.ops.fxopt.linear_bf16.default
embedding_int4 = torch.ops.fxopt.embedding_int4.default
# the lowered linears: one schema, four weight layouts (int8 activations but for bf16's)
LINEARS = (linear_int8, linear_int8_sparse, linear_int4, linear_bf16)
layer_norm = torch.ops.fxopt.layer_norm.default
attention_int8 = torch.ops.fxopt.attention_int8.default
conv2d_int8 = torch.ops.fxopt.conv2d_int8.default
max_pool2d = torch.ops.fxopt.max_pool2d.default
global_avg_pool = torch.ops.fxopt.global_avg_pool.default
