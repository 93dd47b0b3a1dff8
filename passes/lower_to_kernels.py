"""Lower int8 ops to the Numba kernels: pack weights once, call the kernel op.
(quantize_bf16 writes its kernel op itself; this pass chains and fuses it as the others.)

    fxopt.quantized_linear(x, w_q, w_scale, b, act, ...)   (torch reference)
 -> fxopt.linear_int8(x, packed, w_scale, col_sums, b, n, k, act, ...)
    fxopt.quantized_attention(q, k, v, attn_mask=..., ...) (no weights)
 -> fxopt.attention_int8(q, k, v, attn_mask=..., ...)
    aten.layer_norm(x, [N], w, b, eps)                    (float32, last dim)
 -> fxopt.layer_norm(x, w, b, eps)

LayerNorm moves too, though it stays float: between kernel calls, torch's own
thread pool (a second OpenMP runtime) would wake for it and spin on the cores
the kernels' pool needs.

Packing (VNNI order, 64-byte aligned, column sums for the zero point) happens
here, at optimize time; the op only runs the kernel. Ops without a kernel
stay as they are and are counted.

Sparse linears: where at least SPARSE_MIN_ZEROS of a linear's int8 weights are zero
(whatever made them zero: pruning of any kind, or rounding), the sparse kernel
(kernels/sparse.py, op fxopt.linear_int8_sparse: the same arguments and the same result,
bit for bit) and the dense one are timed on the packed weights at the example inputs' row
count, taking turns, and the faster one is kept; the layer's report row says which and
both times. Option sparse=False (optimize's, or this pass's) keeps every linear dense;
sparse="always" takes the sparse kernel wherever the zeros allow, untimed (deterministic).

Chained int8 layers: where the next int8 layers quantize a layer's output with a static
scale, the layer's epilogue writes that uint8 directly (linears to a linear, dense and
depthwise convs to dense and depthwise convs, a zero pad between them folded into a
depthwise conv's padding; convs joined by a channel concat, as in SqueezeNet's fire modules;
dense convs may also add it as their residual: then the residual is 8-bit too;
option residual_codes=False keeps residuals float, as quantization-aware training models
them). The codes are the ones the consumer would have made from the float value (but for
a value within an ulp of a rounding tie: the float epilogue rounds scale and bias once,
the uint8 one twice); option chain=False keeps every hand-over in float (debugging).

Global average pools of a conv's float output (a squeeze-excite block's, a classifier
head's) -> fxopt.global_avg_pool, on the kernels' threads.
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch

from fxopt.core.ir import ID, add_weight, get_weight, infer_meta, insert_call
from fxopt.core.macs import concrete_shape
from fxopt.core.ops import OpKind, kind_of, pad_parts
from fxopt.kernels import api as K
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.quant import qops
from fxopt.runtime import kernel_ops

aten = torch.ops.aten

PASS = PassInfo("lower_to_kernels", requires=("quantize_int8|quantize_bf16",),
                options={"sparse": None, "chain": True, "residual_codes": True},
                doc="replace int8 reference ops by Numba kernel ops with pre-packed weights")

SPARSE_MODES = (True, False, "always")   # timed choice, dense only, sparse wherever zeros allow
SPARSE_MIN_ZEROS = 0.5   # fewer zeros never paid (bench/sparse.py: break-even at 70-80 % and M=1)
TIMING_ROUNDS = 5        # interleaved rounds of the dense/sparse timing, each >= TIMING_BATCH_S
TIMING_BATCH_S = 2e-4


def run(gm, ctx, sparse=None, chain=True, residual_codes=True) -> PassResult:
    sparse = ctx.get("sparse", True) if sparse is None else sparse
    if sparse not in SPARSE_MODES:
        raise ValueError(f"lower_to_kernels: sparse must be one of {SPARSE_MODES}, got {sparse!r}")
    stats = {"linear": 0, "conv2d": 0, "attention": 0, "sparse": 0, "sparse_timed": 0}
    for node in list(gm.graph.nodes):
        if node.target is qops.quantized_linear and get_weight(gm, node.args[2]).dim() == 2:
            _lower_int4(gm, node)                     # grouped scales: quantize_int4's weights
            stats["linear"] += 1
            stats["int4"] = stats.get("int4", 0) + 1
        elif node.target is qops.quantized_linear:
            _int8_why(node, ctx.state.get("quantize_int4", {}).get("kept_int8", {}))
            timed = _lower_linear(gm, node, sparse)
            stats["linear"] += 1
            stats["sparse_timed"] += timed is not None
            stats["sparse"] += bool(timed)
        elif node.target is qops.quantized_conv2d:
            _lower_conv(gm, node)
            stats["conv2d"] += 1
        elif node.target is qops.quantized_attention:
            _replace(gm, node, kernel_ops.attention_int8, node.args, node.kwargs)
            stats["attention"] += 1
        elif node.target is kernel_ops.linear_bf16:    # quantize_bf16 packed it already
            stats["linear"] += 1
            stats["bf16"] = stats.get("bf16", 0) + 1
    if not stats["sparse_timed"]:          # no sparse candidate: the report's stats as before
        del stats["sparse"], stats["sparse_timed"]
    if stats["linear"] + stats["conv2d"] + stats["attention"]:
        stats["layer_norm"] = _lower_layer_norms(gm)
    if stats["conv2d"]:
        stats["view_to_reshape"] = _views_to_reshapes(gm)
    stats["chained"] = _chain(gm) if chain else 0
    stats["residual_adds"] = _fuse_residual_adds(gm) + _fuse_conv_residuals(gm)
    if stats["conv2d"]:
        stats["pads_folded"] = _fold_pads_into_convs(gm)
    stats["chained"] += (_chain_convs(gm, residual_codes) + _chain_concats(gm)) if chain else 0
    if stats["conv2d"]:
        stats["global_pools"] = _lower_global_pools(gm)
    from fxopt.kernels import api as kernels
    gm.meta.setdefault("fxopt_artifact", {})["kernel_isa"] = kernels.isa()
    return PassResult(stats["linear"] + stats["conv2d"] + stats["attention"] > 0, stats)


def _lower_linear(gm, node, sparse) -> bool | None:
    """linear_int8, or linear_int8_sparse where the weights are sparse enough and it timed
    faster; returns None (not timed) or whether the sparse kernel was kept."""
    x, w_q, w_scale, b, act, act_args, a_scale, a_zp = node.args
    q, scales = get_weight(gm, w_q), get_weight(gm, w_scale)
    buffers = kernel_ops.pack_linear(q, scales)
    target, chosen, zeros = kernel_ops.linear_int8, None, 1.0 - K.density(q.numpy())
    if sparse and zeros >= SPARSE_MIN_ZEROS:
        bias = None if b is None else get_weight(gm, b).detach().float().numpy()
        sparse_buffers = kernel_ops.pack_linear_sparse(q, scales)
        rows = _example_rows(x)
        if sparse == "always":
            chosen, info, reason = True, {}, f"sparse int8 kernel: {zeros:.0%} zeros (sparse='always', not timed)"
        else:
            dense_s, sparse_s = _time_pair(buffers, sparse_buffers, bias, act, act_args, rows)
            chosen = sparse_s < dense_s
            info = {"dense_us": dense_s * 1e6, "sparse_us": sparse_s * 1e6}
            reason = (f"sparse int8 kernel: {zeros:.0%} zeros, {sparse_s * 1e6:.1f} us vs {dense_s * 1e6:.1f} "
                      f"us dense at {rows} rows" if chosen else
                      f"dense int8 kept: {zeros:.0%} zeros, but the sparse kernel took {sparse_s * 1e6:.1f} us "
                      f"vs {dense_s * 1e6:.1f} us dense at {rows} rows")
        node.meta.setdefault("fxopt_quant", {}).update(
            sparse={"zeros": zeros, "rows": rows, "chosen": chosen, **info}, reason=reason)
        if chosen:
            target, buffers = kernel_ops.linear_int8_sparse, sparse_buffers
    layer = node.meta.get("fxopt_layer", node.name)
    packed = add_weight(gm, f"{layer}.packed", buffers["packed"], before=node)
    scale = add_weight(gm, f"{layer}.packed_scale", buffers["w_scale"], before=node)
    col_sums = add_weight(gm, f"{layer}.col_sums", buffers["col_sums"], before=node)
    args = (x, packed, scale, col_sums, b, buffers["n"], buffers["k"], act, act_args, a_scale, a_zp)
    _replace(gm, node, target, args)
    return chosen


def _lower_int4(gm, node) -> None:
    """fxopt.linear_int4 for a quantized_linear with (N, K / group) scales."""
    x, w_q, w_scale, b, act, act_args, a_scale, a_zp = node.args
    buffers = kernel_ops.pack_linear_int4(get_weight(gm, w_q), get_weight(gm, w_scale))
    layer = node.meta.get("fxopt_layer", node.name)
    packed = add_weight(gm, f"{layer}.packed_int4", buffers["packed"], before=node)
    scale = add_weight(gm, f"{layer}.packed_scale", buffers["w_scale"], before=node)
    col_sums = add_weight(gm, f"{layer}.col_sums", buffers["col_sums"], before=node)
    args = (x, packed, scale, col_sums, b, buffers["n"], buffers["k"], act, act_args, a_scale, a_zp)
    _replace(gm, node, kernel_ops.linear_int4, args)


def _int8_why(node, kept: dict) -> None:
    """A linear quantize_int4 left int8 (cpu-int4): its report row says why."""
    why = kept.get(node.meta.get("fxopt_layer", node.name))
    if why:
        info = node.meta.setdefault("fxopt_quant", {})
        info["reason"] = f"{why}; {info['reason']}" if info.get("reason") else why


def _example_rows(x) -> int:
    """Rows the layer multiplies at the example inputs (its input's leading dims)."""
    shape = concrete_shape(x) if isinstance(x, torch.fx.Node) else None
    return max(1, math.prod(shape[:-1])) if shape else 1


def _time_pair(dense_buffers, sparse_buffers, bias, act, act_args, rows) -> tuple[float, float]:
    """Median seconds per call of the dense and the sparse kernel on these weights, on random
    rows of the layer's width, taking turns (a change of machine load hits both alike)."""
    n, k = dense_buffers["n"], dense_buffers["k"]
    pw = K.PackedWeights(dense_buffers["packed"].numpy().view(np.int8), dense_buffers["w_scale"].numpy(),
                         dense_buffers["col_sums"].numpy(), n, k, K.isa())
    ps = K.PackedSparse.from_bytes(sparse_buffers["packed"].numpy(), sparse_buffers["w_scale"].numpy(),
                                   sparse_buffers["col_sums"].numpy(), n, k)
    x = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
    threads = torch.get_num_threads()
    calls = [K.bind_linear(pw, bias, act, tuple(act_args)), K.bind_linear_sparse(ps, bias, act, tuple(act_args))]
    outs = [np.empty((rows, n), np.float32) for _ in calls]
    numbers = []
    for call, out in zip(calls, outs):
        call(x, out, None, threads)                      # compiles on first use
        t0 = time.perf_counter()
        call(x, out, None, threads)
        numbers.append(max(1, int(TIMING_BATCH_S / max(time.perf_counter() - t0, 1e-7))))
    samples = [[], []]
    for _ in range(TIMING_ROUNDS):
        for i, (call, out) in enumerate(zip(calls, outs)):
            t0 = time.perf_counter()
            for _ in range(numbers[i]):
                call(x, out, None, threads)
            samples[i].append((time.perf_counter() - t0) / numbers[i])
    return statistics.median(samples[0]), statistics.median(samples[1])


def _lower_conv(gm, node) -> None:
    x, w_q, w_scale, b, stride, padding, dilation, groups, act, act_args, a_scale, a_zp = node.args
    buffers = kernel_ops.pack_conv(get_weight(gm, w_q), get_weight(gm, w_scale), groups)
    layer = node.meta.get("fxopt_layer", node.name)
    packed = add_weight(gm, f"{layer}.packed", buffers["packed"], before=node)
    scale = add_weight(gm, f"{layer}.packed_scale", buffers["w_scale"], before=node)
    col_sums = add_weight(gm, f"{layer}.col_sums", buffers["col_sums"], before=node)
    args = (x, packed, scale, col_sums, b, buffers["geometry"], stride, padding, dilation, act, act_args,
            a_scale, a_zp)
    _replace(gm, node, kernel_ops.conv2d_int8, args)


def _lower_layer_norms(gm) -> int:
    """aten.layer_norm over the last dimension of a float32 tensor -> fxopt.layer_norm."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.layer_norm.default or node.kwargs:
            continue
        x, shape, weight, bias, eps = (list(node.args) + [None, None, 1e-05])[:5]
        val = node.meta.get("val")
        if (len(shape) != 1 or not isinstance(val, torch.Tensor) or val.dtype != torch.float32
                or val.dim() < 1 or val.shape[-1] != shape[0]):
            continue
        _replace(gm, node, kernel_ops.layer_norm, (x, weight, bias, float(eps)))
        count += 1
    return count


def _chain(gm) -> int:
    """Let an int8 linear hand uint8 straight to the next one when that one quantizes its
    input statically: the producer's epilogue requantizes to the consumer's (scale, zero
    point), so the value never exists in float (convs: _chain_convs)."""
    count = 0
    for node in gm.graph.nodes:
        if node.target not in kernel_ops.LINEARS or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.target not in kernel_ops.LINEARS or user.args[0] is not node or user.args[9] <= 0:
            continue
        node.args = (*node.args[:11], float(user.args[9]), int(user.args[10]))
        infer_meta(gm, node)
        node.meta.setdefault("fxopt_quant", {})["chained"] = True
        count += 1
    return count


def _chain_convs(gm, residual_codes=True) -> int:
    """The same for convs, after their residual adds are fused: a dense or depthwise int8
    conv hands uint8 (channels_last) on when its users are dense or depthwise static-scale
    convs reading it as their input, all taking one (scale, zero point) as convs reading
    one tensor do (MobileNetV2's expand -> depthwise -> project, end to end), and
    dense convs adding it as their residual that hand uint8 on themselves (the kernels
    add codes in the uint8 epilogue only). Those add the floats the codes stand for: a
    ResNet block's output feeds the next block's first conv and its residual add, and
    both read the codes (the residual is then quantized as that conv's input is: 8 bits,
    the scale calibrated there). A max pool between a conv and its readers runs on the
    codes (fxopt.max_pool2d): ResNet's stem. A conv only added (a stage's shortcut conv)
    takes the scale calibrate_ranges measured on its output. With residual_codes=False a conv adding a
    value keeps it float (so does its producer)."""
    plans = {}
    for node in gm.graph.nodes:
        if node.target is not kernel_ops.conv2d_int8 or not _chainable_conv(node) or _conv_out_scale(node) > 0:
            continue
        adders = [u for u in node.users if residual_codes and _adds_uint8_residual(u, node)]
        pools, takes = _pools_and_takes(node, adders)
        quant = node.meta.get("fxopt_quant", {})
        if not takes and adders and quant.get("out_scale", 0) > 0:    # added only: its own calibrated scale
            takes = {(float(quant["out_scale"]), int(quant["out_zp"]))}
        if len(takes) == 1 and None not in takes:
            plans[node] = (*takes.pop(), pools, adders)
    dropped = True
    while dropped:      # an adder that cannot hand uint8 on takes no codes: its residual's producer stays float
        dropped = [node for node, (*_, adders) in plans.items() if any(a not in plans for a in adders)]
        for node in dropped:
            del plans[node]
    for node, (scale, zp, pools, adders) in plans.items():
        _set_conv_args(gm, node, out_scale=scale, out_zp=zp)
        node.meta.setdefault("fxopt_quant", {})["chained"] = True
        for adder in adders:
            _set_conv_args(gm, adder, res_scale=scale, res_zp=zp)
        for pool in pools:
            _replace(gm, pool, kernel_ops.max_pool2d, _pool_args(pool))
    return len(plans)


def _pools_and_takes(node, others=()) -> tuple:
    """(the max pools reading node, the set of (scale, zero point) that node's other readers
    but `others`, and the pools' readers, quantize it with; None in the set for a reader
    that is not a static-scale int8 conv taking it as its input)."""
    pools = [u for u in node.users if u.target is aten.max_pool2d.default and u.args[0] is node and not u.kwargs]
    takers = ([(u, node) for u in node.users if u not in pools and u not in others]
              + [(u, p) for p in pools for u in p.users])
    return pools, {(float(u.args[11]), int(u.args[12])) if _reads_uint8_input(u, x) else None for u, x in takers}


def _chain_concats(gm) -> int:
    """Convs joined by a channel concat hand uint8 on too (SqueezeNet's fire modules: two
    expand convs, each with its ReLU, joined), when the concat's readers are static-scale
    convs taking it as their input, directly or through a max pool, all with one (scale,
    zero point): each conv writes its channels' codes with that scale, torch.cat joins the
    codes and the pool runs on them (fxopt.max_pool2d). The float concat and pool go, and
    so does the readers' quantization. Returns the convs chained."""
    count = 0
    for cat in list(gm.graph.nodes):
        if cat.target is not aten.cat.default or cat.kwargs or not cat.users:
            continue
        parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
        val = cat.meta.get("val")
        if val is None or val.dim() != 4 or dim not in (1, -3) or not all(
                isinstance(p, torch.fx.Node) and p.target is kernel_ops.conv2d_int8 and _chainable_conv(p)
                and _conv_out_scale(p) == 0 and set(p.users) == {cat} for p in parts):
            continue
        pools, takes = _pools_and_takes(cat)
        if len(takes) != 1 or None in takes:
            continue
        scale, zp = takes.pop()
        for part in dict.fromkeys(parts):
            _set_conv_args(gm, part, out_scale=scale, out_zp=zp)
            part.meta.setdefault("fxopt_quant", {})["chained"] = True
            count += 1
        infer_meta(gm, cat)
        for pool in pools:
            _replace(gm, pool, kernel_ops.max_pool2d, _pool_args(pool))
    return count


def _fold_pads_into_convs(gm) -> int:
    """A zero pad read only by int8 dense or depthwise convs becomes their padding, four
    numbers (top, left, bottom, right) where it is asymmetric: TensorFlow-style "same" convs
    of stride 2 (Hugging Face MobileNetV2 and EfficientNet, their stems too) pad [0, 1, 0, 1]
    apart, which fold_padding leaves (aten's conv pads symmetrically). The pad's copy of the
    activations goes, and the conv can read a uint8 producer's codes, or the model's float
    input as it comes; out-of-image taps read the zero point (= 0.0)."""
    count = 0
    for pad in list(gm.graph.nodes):
        if pad.op != "call_function" or kind_of(pad) is not OpKind.PAD or not pad.users:
            continue
        parts = pad_parts(pad)
        amounts = parts["amounts"]
        convs = list(pad.users)
        if (parts["mode"] != "constant" or parts["value"] != 0 or len(amounts) != 4 or min(amounts) < 0
                or not all(_pads_fold_into(c, pad) for c in convs)):
            continue
        left, right, top, bottom = (int(v) for v in amounts)
        for conv in convs:
            pt, pl, pb, pr = K.four_pads(conv.args[7])
            conv.args = (parts["x"], *conv.args[1:7], [pt + top, pl + left, pb + bottom, pr + right], *conv.args[8:])
            infer_meta(gm, conv)
        gm.graph.erase_node(pad)
        count += 1
    return count


def _pads_fold_into(conv, pad) -> bool:
    """Whether conv is an int8 depthwise or dense (groups 1) conv reading pad as its input only."""
    return (conv.target is kernel_ops.conv2d_int8 and (bool(conv.args[5][5]) or conv.args[5][4] == 1)
            and conv.args[0] is pad and not conv.kwargs and pad not in conv.args[1:])


# conv2d_int8's arguments after a_zp, with their defaults (its schema)
_CONV_TAIL = {"residual": None, "out_scale": 0.0, "out_zp": 0, "res_scale": 0.0, "res_zp": 0}


def _set_conv_args(gm, node, **values) -> None:
    """Set conv2d_int8 arguments after a_zp by name, the others kept, all positional."""
    tail = dict(zip(_CONV_TAIL, node.args[13:]))
    tail = {name: values.get(name, tail.get(name, default)) for name, default in _CONV_TAIL.items()}
    node.args = (*node.args[:13], *tail.values())
    infer_meta(gm, node)


def _adds_uint8_residual(user, node) -> bool:
    """user is a dense int8 conv adding node as its residual (and reading it nowhere else)."""
    return (user.target is kernel_ops.conv2d_int8 and _dense_conv(user) and len(user.args) > 13
            and user.args[13] is node and not user.kwargs and node not in user.args[:13])


def _pool_args(pool) -> tuple:
    """aten.max_pool2d's arguments with every size a pair and the defaults spelled out."""
    x, kernel, stride, padding, dilation, ceil_mode = (*pool.args, *[None] * 5)[:6]
    kernel = _pair(kernel, None)
    return (x, kernel, _pair(stride, kernel), _pair(padding, [0, 0]), _pair(dilation, [1, 1]), bool(ceil_mode))


def _pair(v, default) -> list:
    """A pool size as a pair: [k] is [k, k]; [] or None is the default."""
    if not v:
        return default
    return [int(v[0])] * 2 if len(v) == 1 else [int(i) for i in v]


def _dense_conv(node) -> bool:
    return node.args[5][4] == 1 and not node.args[5][5]


def _chainable_conv(node) -> bool:
    """A conv whose kernel takes and gives uint8: dense, or depthwise (kernels/depthwise.py)."""
    return _dense_conv(node) or bool(node.args[5][5])


def _conv_out_scale(node) -> float:
    return float(node.args[14]) if len(node.args) > 14 else float(node.kwargs.get("out_scale", 0.0))


def _reads_uint8_input(user, node) -> bool:
    """user is a dense or depthwise static-scale int8 conv taking node as its input x (and only so)."""
    return (user.target is kernel_ops.conv2d_int8 and _chainable_conv(user) and user.args[0] is node
            and user.args[11] > 0 and not user.kwargs and node not in user.args[1:])


def _fuse_residual_adds(gm) -> int:
    """`linear(x) + r` becomes one kernel call adding r in the epilogue, while each output
    tile is still in cache: a transformer's residual adds stop being a separate pass over
    the activations. Only for a float-output linear whose one user is the add, and an r of
    exactly the output's shape and dtype (no broadcasting, no type promotion)."""
    count = 0
    for add in list(gm.graph.nodes):
        if not _is_plain_add(add):
            continue
        for lin, res in (add.args, add.args[::-1]):
            if _fusable_residual(lin, res):
                out_scale = lin.args[11] if len(lin.args) > 11 else 0.0
                out_zp = lin.args[12] if len(lin.args) > 12 else 0
                _fused(gm, add, lin, lin.target, (*lin.args[:11], out_scale, out_zp, res),
                       ("fxopt_quant", "fxopt_activation"))
                gm.graph.erase_node(add)
                gm.graph.erase_node(lin)
                count += 1
                break
    return count


def _fuse_conv_residuals(gm) -> int:
    """`relu(conv(x) + r)` (a ResNet block's end; relu, relu6/hardtanh or no activation)
    becomes one conv call that adds r and then activates in its epilogue, while each
    output tile is in cache. Dense int8 convs (groups == 1) with no activation of
    their own, whose one user is the add; r of exactly the output's shape and dtype."""
    count = 0
    for add in list(gm.graph.nodes):
        if not _is_plain_add(add):
            continue
        for conv, res in (add.args, add.args[::-1]):
            if not _fusable_conv_residual(conv, res):
                continue
            last, act, act_args = add, "none", []
            user = next(iter(add.users)) if len(add.users) == 1 else None
            if user is not None and user.target in (aten.relu.default, aten.relu_.default):
                last, act = user, "relu"
            elif (user is not None and user.target is aten.hardtanh.default and len(user.args) == 3
                  and not user.kwargs):
                last, act, act_args = user, "hardtanh", [float(user.args[1]), float(user.args[2])]
            args = (*conv.args[:9], act, act_args, *conv.args[11:13], res)
            # the conv's own activation meta is not carried: the fused node's act differs
            _fused(gm, last, conv, kernel_ops.conv2d_int8, args, ("fxopt_quant",))
            for node in ([last] if last is add else [last, add]) + [conv]:
                gm.graph.erase_node(node)
            count += 1
            break
    return count


def _fused(gm, last, like, target, args, meta_keys):
    """Insert target(*args) for the chain ending at `last` (`like` is the kernel node it
    absorbs: its layer name and the given meta), send last's users to it; the caller
    erases the absorbed nodes."""
    new = insert_call(gm, last, target, args, like=like)
    if ID in last.meta:
        new.meta[ID] = last.meta[ID]  # the fused node computes the chain's final value
    for key in meta_keys:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    new.meta.setdefault("fxopt_quant", {})["residual"] = True
    last.replace_all_uses_with(new)
    return new


def _is_plain_add(node) -> bool:
    """a + b with no alpha; also the in-place a += b (eager code such as Hugging Face's
    ResNet writes `hidden += residual`) when nothing else reads a, so the mutation is
    unobservable and the node is just a sum."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return False
    if node.target is aten.add.Tensor:
        return True
    return (node.target is aten.add_.Tensor and isinstance(node.args[0], torch.fx.Node)
            and len(node.args[0].users) == 1)


def _fusable_conv_residual(conv, res) -> bool:
    if (not isinstance(conv, torch.fx.Node) or conv.target is not kernel_ops.conv2d_int8
            or len(conv.users) != 1 or not isinstance(res, torch.fx.Node) or res is conv):
        return False
    geometry, act = conv.args[5], conv.args[9]
    if geometry[4] != 1 or geometry[5] or act != "none" or (len(conv.args) > 13 and conv.args[13] is not None):
        return False
    return _same_float32_shape(conv, res)


def _same_float32_shape(a_node, b_node) -> bool:
    a, b = a_node.meta.get("val"), b_node.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype == torch.float32
            and len(a.shape) == len(b.shape) and all(x == y for x, y in zip(a.shape, b.shape)))


def _fusable_residual(lin, res) -> bool:
    if (not isinstance(lin, torch.fx.Node) or lin.target not in kernel_ops.LINEARS
            or len(lin.users) != 1 or not isinstance(res, torch.fx.Node) or res is lin):
        return False
    if len(lin.args) > 11 and lin.args[11] > 0:  # uint8 output (chained): no float tile to add to
        return False
    if len(lin.args) > 13 and lin.args[13] is not None:
        return False
    return _same_float32_shape(lin, res)


def _views_to_reshapes(gm) -> int:
    """Conv kernels return channels_last tensors, and what flows from them (adds, pools)
    stays channels_last, which `view` cannot always reinterpret; `reshape` copies then."""
    count = 0
    for node in gm.graph.nodes:
        if node.target is aten.view.default:
            node.target = aten.reshape.default
            count += 1
    return count


def _lower_global_pools(gm) -> int:
    """Global average pools of a conv's float output (aten.adaptive_avg_pool2d(x, 1), a mean
    over H and W) -> fxopt.global_avg_pool, which sums each thread's run of the conv's NHWC
    pixel rows (kernels/pool.py). EfficientNet-B0 b1's pools: 822 -> 397 us a call."""
    count = 0
    for node in list(gm.graph.nodes):
        keepdim = _global_pool_keepdim(node)
        x = node.args[0] if node.args else None
        if keepdim is not None and _float_conv_output(x):
            _replace(gm, node, kernel_ops.global_avg_pool, (x, keepdim))
            count += 1
    return count


def _float_conv_output(x) -> bool:
    return (isinstance(x, torch.fx.Node) and x.target is kernel_ops.conv2d_int8
            and x.meta["val"].dtype == torch.float32)


def _global_pool_keepdim(node) -> bool | None:
    """keepdim of a global average pool of an NCHW tensor, None for any other node."""
    if node.target is aten.adaptive_avg_pool2d.default:
        size = node.args[1]
        return True if isinstance(size, (list, tuple)) and list(size) == [1, 1] else None
    if node.target is aten.mean.dim and "dtype" not in node.kwargs and len(node.args) >= 2:
        x, dims = node.args[0], node.args[1]
        if isinstance(x, torch.fx.Node) and x.meta["val"].dim() == 4 and sorted(d % 4 for d in dims) == [2, 3]:
            return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    return None


def _replace(gm, node, target, args, kwargs=None):
    new = insert_call(gm, node, target, args, kwargs, like=node)
    for key in ("fxopt_quant", "fxopt_activation"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
