"""Numba int8 kernels: the public entry points. Plain numpy in, numpy out: no torch, no fx.

    >>> from fxopt.kernels import api as K
    >>> pw = K.pack_weights_s8(*K.quantize_weights_s8(w))     # w: (N, K) float32
    >>> y = K.linear_f32(x, pw, bias, act="gelu")             # x: (..., K) float32

kernels/ has no __init__.py on purpose: it is a namespace portion of fxopt, so that
running Python from the repository root never lets this folder stand in for the
installed `kernels` package (which transformers imports). Import its modules by name.

See linear.py (GEMM/linear), bf16.py (the fp32-accumulating linear on bf16 weights and
bf16-rounded activations: pack_bf16, linear_bf16_f32, bind_linear_bf16), int4.py (the linear on grouped int4 weights: pack_int4,
linear_int4_f32, bind_linear_int4; layout in int4_pack.py), sparse.py (the same linear on sparse weights:
pack_sparse_s8, linear_sparse_f32, bind_linear_sparse), attention.py (fused int8 attention, with attention_steps.py
and rowops.py), conv.py (conv2d), pool.py (pools on NHWC images), layernorm.py, dispatch.py (CPU dispatch), pack.py
(layout), reference.py (numpy twins).
"""
from .dispatch import KernelError, available_isas, isa, select_isa, use_isa
from .finite import all_finite
from .epilogue import ACTIVATIONS
from .linear import (bind_linear, gemm_u8s8_f32, gemm_u8s8_s32, gemm_u8s8_u8, get_num_threads,
                     linear_f32, pad_rows_u8, set_num_threads)
from .pack import PackedWeights, aligned_empty, pack_weights_s8, quantize_weights_s8
from .quantize import quantize_rows_f32_u8, quantize_tensor_f32_u8
from .attention import Strided, attention_int8, attention_int8_strided
from .conv import PackedConv, bind_conv2d, conv2d_f32, four_pads, pack_conv_weights_s8, residual_floats
from .layernorm import layer_norm_f32
from .pool import global_avg_pool_nhwc, max_pool2d_nhwc, pool_out_size
from .sparse import bind_linear_sparse, gemm_sparse_s32, linear_sparse_f32
from .sparse_pack import PackedSparse, density, pack_sparse_s8, unpack_sparse_s8
from .int4 import bind_linear_int4, linear_int4_f32
from .int4_pack import PackedInt4, pack_int4, unpack_int4
from .bf16 import PackedBf16, bind_linear_bf16, linear_bf16_f32, pack_bf16

__all__ = [
    "ACTIVATIONS", "KernelError", "PackedBf16", "bind_linear_bf16", "linear_bf16_f32", "pack_bf16",
    "PackedConv", "PackedInt4", "PackedSparse", "PackedWeights", "Strided",
    "aligned_empty", "bind_linear_int4", "linear_int4_f32", "pack_int4", "unpack_int4",
    "bind_linear_sparse", "density", "gemm_sparse_s32", "linear_sparse_f32", "pack_sparse_s8", "unpack_sparse_s8",
    "all_finite", "attention_int8", "bind_linear", "attention_int8_strided", "available_isas", "bind_conv2d",
    "conv2d_f32", "four_pads", "gemm_u8s8_f32",
    "gemm_u8s8_s32", "gemm_u8s8_u8", "get_num_threads", "isa", "layer_norm_f32", "linear_f32",
    "max_pool2d_nhwc", "global_avg_pool_nhwc", "pack_conv_weights_s8", "pack_weights_s8",
    "pad_rows_u8", "pool_out_size", "quantize_rows_f32_u8",
    "quantize_tensor_f32_u8", "quantize_weights_s8", "residual_floats", "select_isa", "set_num_threads", "use_isa",
]
