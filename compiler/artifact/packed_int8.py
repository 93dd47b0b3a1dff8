"""The int8 weight matrices inside the kernels' packed buffers, and back.

The GEMM's packed layout (fxopt.kernels.pack) is ISA-independent: N padded to
64, K to 4, blocks of 64 output channels by k-groups of 4. A conv holds one
such buffer per group over its (kh, kw, c)-ordered GEMM columns. The compressed
artifact codes the logical matrices (no padding) and packs them again at load,
with the same packer the lowering used, so the loaded bytes are the saved ones.
A linear on the sparse kernel (linear_int8_sparse) holds its matrix in the slot
layout; kernels.sparse_pack unpacks and packs it (this module never parses it).

    layers = int8_layers(gm)                         # {packed target: (node, (og, k, groups))}
    mats = matrices(packed, og, k, groups, layout)   # [(og, k) int8 array per group]
    blob = repack(mats, layout)                      # uint8 tensor equal to the saved buffer
"""
from __future__ import annotations

import numpy as np
import torch

from fxopt.kernels.pack import packed_nbytes, pack_weights_s8
from fxopt.kernels.sparse_pack import PackedSparse, pack_sparse_s8, unpack_sparse_s8
from fxopt.runtime import kernel_ops

BLOCK = 64


def unpack_matrix(data: np.ndarray, n: int, k: int) -> np.ndarray:
    """The (n, k) int8 matrix of one packed GEMM operand (flat int8 or uint8 bytes)."""
    blocks, kg = -(-n // BLOCK), -(-k // 4)
    layout = np.asarray(data).view(np.int8).reshape(blocks, kg, BLOCK, 4)
    return np.ascontiguousarray(layout.transpose(0, 2, 1, 3).reshape(blocks * BLOCK, kg * 4)[:n, :k])


def pack_matrix(q: np.ndarray) -> np.ndarray:
    """The packed bytes (uint8, flat) of an (n, k) int8 matrix, as the lowering wrote them."""
    return pw_bytes(pack_weights_s8(q, np.ones(q.shape[0], np.float32)))


def pw_bytes(pw) -> np.ndarray:
    return np.ascontiguousarray(pw.data).view(np.uint8).reshape(-1)


def layer_geometry(node) -> tuple | None:
    """(n per group, k, groups) of a lowered linear/conv node's packed weight; None for a
    depthwise conv (its taps are not a GEMM operand)."""
    # int4 nibbles and bf16 weights are not int8 GEMM bytes: their buffers are stored as they are
    if node.target in kernel_ops.LINEARS and node.target not in (kernel_ops.linear_bf16, kernel_ops.linear_int4):
        return int(node.args[5]), int(node.args[6]), 1
    if node.target is kernel_ops.conv2d_int8:
        o, c, kh, kw, groups, depthwise = node.args[5]
        if depthwise:
            return None
        return o // groups, (c // groups) * kh * kw, groups
    return None


def int8_layers(gm) -> dict:
    """{packed weight target: (node, (n, k, groups))} of every lowered GEMM-path layer."""
    out = {}
    for node in gm.graph.nodes:
        geometry = layer_geometry(node) if node.op == "call_function" else None
        if geometry is not None and node.args[1].op == "get_attr":
            out.setdefault(str(node.args[1].target), (node, geometry))
    return out


def layout(node) -> str:
    """How a lowered layer's packed weight is laid out: "linear", "conv" or "sparse"."""
    if node.target is kernel_ops.linear_int8_sparse:
        return "sparse"
    return "conv" if node.target is kernel_ops.conv2d_int8 else "linear"


def matrices(packed: torch.Tensor, n: int, k: int, groups: int, kind: str = "linear") -> list:
    """The int8 matrix of every group of one packed weight (kind: see layout)."""
    data = packed.detach().numpy()
    if kind == "sparse":
        ps = PackedSparse.from_bytes(data, np.ones(n, np.float32), np.zeros(n, np.int32), n, k, wide=False)
        return [unpack_sparse_s8(ps)]
    flat = data.reshape(groups, -1)
    return [unpack_matrix(flat[g], n, k) for g in range(groups)]


def repack(mats: list, kind: str) -> torch.Tensor:
    """The uint8 packed buffer of the group matrices: (bytes,) for a linear or a sparse
    linear, (groups, bytes) for a conv."""
    if kind == "sparse":
        (q,) = mats
        return torch.from_numpy(pack_sparse_s8(q, np.ones(q.shape[0], np.float32)).to_bytes())
    parts = [pack_matrix(m) for m in mats]
    data = np.stack(parts) if kind == "conv" else parts[0]
    return torch.from_numpy(np.ascontiguousarray(data))


def col_sums(mats: list) -> np.ndarray:
    """The int32 column sums (per output channel, groups in order) the packers store."""
    return np.concatenate([m.sum(axis=1, dtype=np.int64) for m in mats]).astype(np.int32)


def conv_weight(mats: list, o: int, c: int, kh: int, kw: int, groups: int) -> np.ndarray:
    """The (O, C/groups, kh, kw) int8 conv weight of its group matrices ((kh, kw, c) columns)."""
    full = np.concatenate(mats)                       # (O, kh * kw * C/groups)
    return np.ascontiguousarray(full.reshape(o, kh, kw, c // groups).transpose(0, 3, 1, 2))


def expected_nbytes(n: int, k: int) -> int:
    return packed_nbytes(n, k)
