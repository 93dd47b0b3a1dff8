"""Numba int8 kernels. Plain numpy in, numpy out: no torch, no fx.

    >>> from fxopt import kernels as K
    >>> pw = K.pack_weights_s8(*K.quantize_weights_s8(w))     # w: (N, K) float32
    >>> y = K.linear_f32(x, pw, bias, act="gelu")             # x: (..., K) float32

See linear.py (GEMM/linear), attention.py (fused int8 attention, with attention_steps.py
and rowops.py), conv.py (conv2d), isa.py (CPU dispatch), pack.py (layout), reference.py
(numpy twins).
"""
from . import _cache  # noqa: F401  (must precede every @njit(cache=True))
from .epilogue import ACTIVATIONS
from .dispatch import KernelError, available_isas, isa, select_isa, use_isa
from .linear import (gemm_u8s8_f32, gemm_u8s8_s32, gemm_u8s8_u8, get_num_threads,
                     linear_f32, pad_rows_u8, set_num_threads)
from .pack import PackedWeights, aligned_empty, pack_weights_s8, quantize_weights_s8
from .quantize import quantize_rows_f32_u8, quantize_tensor_f32_u8

__all__ = [
    "ACTIVATIONS", "KernelError", "PackedWeights", "aligned_empty", "available_isas",
    "gemm_u8s8_f32", "gemm_u8s8_s32", "gemm_u8s8_u8", "get_num_threads", "isa",
    "linear_f32", "pack_weights_s8", "pad_rows_u8", "quantize_rows_f32_u8", "quantize_tensor_f32_u8",
    "quantize_weights_s8", "select_isa", "set_num_threads", "use_isa",
]
from .attention import Strided, attention_int8, attention_int8_strided  # noqa: E402
from .conv import PackedConv, conv2d_f32, pack_conv_weights_s8  # noqa: E402
from .layernorm import layer_norm_f32  # noqa: E402

__all__ += ["PackedConv", "Strided", "attention_int8", "attention_int8_strided", "conv2d_f32",
            "layer_norm_f32", "pack_conv_weights_s8"]
