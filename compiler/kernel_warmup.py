"""Compile every kernel for this CPU ahead of time (`fxopt warmup`), e.g. in a Docker build
step, so that later processes start without compiling: optimize and call a few small
models that together use every kernel, on both runtimes, at a few shapes.

    fxopt.warmup()   # -> {"compiled": 17, "seconds": 148.0, "cache": "/root/.cache/fxopt/kernels-..."}
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fxopt.api import optimize
from fxopt.core.pipeline import TARGETS
from fxopt.driver.compile_notice import NOTICE
from fxopt.kernels import _cache
from fxopt.kernels import api as K


class Encoder(nn.Module):
    """Embedding, layer norms, QKV, attention with a padding mask and causal, GELU FFN."""

    def __init__(self, vocab=64, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, ids, mask):
        x = self.embed(ids)
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        heads = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        keep = mask[:, None, None, :].bool()
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep)
        causal = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.out((a + causal).transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CNN(nn.Module):
    """Strided, depthwise, 1x1 and grouped convs, batch norms, residual add, pooling (max,
    average, and the global average of a conv's output)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.Hardswish())
        self.grouped = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=2), nn.SiLU())
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.gate = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.conv(self.grouped(self.pw(self.dw(x)))) + x)
        x = self.gate(F.avg_pool2d(self.pool(x), 2))
        return self.head(x.mean((2, 3)))


def _workloads():
    """(name, model, example_inputs, calls, target) that together use every kernel: linear
    (dynamic and static scales, activations, residual, M=1 and many rows), conv (strided,
    depthwise, grouped, 1x1, residual), pooling, int8 embedding, layer norm and attention
    (with and without a mask)."""
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(0)
    ids = lambda b, s: torch.randint(0, 64, (b, s), generator=g)  # noqa: E731
    mask = lambda b, s: torch.ones(b, s, dtype=torch.long)        # noqa: E731
    image = lambda b, hw: torch.randn(b, 3, hw, hw, generator=g)  # noqa: E731
    rows = lambda b: torch.randn(b, 64, generator=g)              # noqa: E731

    def int8(options):     # cpu-int8 with quantize_int8 options
        return TARGETS["cpu-int8"].replace("quantize_int8", f"quantize_int8{{{options}}}")

    # static linear and dynamic conv activations, int8 depthwise: the options' paths; the
    # larger calls take the threaded entries (layer norm from 32K floats, attention from
    # 1M MACs, ...)
    mlp_calls, cnn_calls = [(rows(1),), (rows(512),)], [(image(1, 32),), (image(8, 32),)]
    return [
        ("mlp", mlp, (rows(8),), mlp_calls, "cpu-int8"),
        ("mlp, static activations", mlp, (rows(8),), mlp_calls, int8("activations='static'")),
        ("cnn", CNN(), (image(2, 32),), cnn_calls, "cpu-int8"),
        ("cnn, dynamic activations, int8 depthwise", CNN(), (image(2, 32),), cnn_calls,
         int8("activations='dynamic',depthwise='int8'")),
        ("encoder", Encoder(), (ids(2, 8), mask(2, 8)), [(ids(1, 8), mask(1, 8)), (ids(8, 128), mask(8, 128))],
         "cpu-int8"),
    ]


def _dense_linear() -> None:
    """The dense linear's entries whichever way the models above route their linears: its
    full call (the kernel's _run, which the int8 conv's batched GEMM also takes with uint8
    output: conv._conv_batched) and its one-frame rows (the lean entries), float and uint8
    rows, per-row and static scales, uint8 out, on this thread and threaded."""
    g = np.random.default_rng(0)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(g.standard_normal((128, 64)).astype(np.float32)))
    threads = K.get_num_threads()
    for rows in (1, 512):
        x = g.standard_normal((rows, 64)).astype(np.float32)
        q = K.quantize_tensor_f32_u8(x, 0.05, 128)
        for a_scale, a_zp in ((0.0, 0), (0.05, 128)):
            chained = K.bind_linear(pw, None, "relu", (), a_scale, a_zp, 0.05, 128)
            chained(x)
            if a_scale:
                chained(q)
                chained.rows(x, None, threads)
                chained.rows(q, None, threads)


def _sparse_linear() -> None:
    """The sparse linear's entries (optimize takes it for pruned linears only, and only where it
    times faster): float and uint8 rows, float and uint8 out, on this thread and threaded."""
    g = np.random.default_rng(0)
    w = g.standard_normal((128, 64)).astype(np.float32) * (g.random((128, 64)) < 0.1)
    ps = K.pack_sparse_s8(*K.quantize_weights_s8(w))
    for rows in (1, 512):
        x = g.standard_normal((rows, 64)).astype(np.float32)
        K.linear_sparse_f32(x, ps)
        chained = K.bind_linear_sparse(ps, None, "relu", (), 0.05, 128, 0.05, 128)
        chained(chained(x)[:, :64].copy())


def _int4_linear() -> None:
    """The int4 linear's entries (cpu-int4): float and uint8 rows, float and uint8 out, on this
    thread and threaded."""
    g = np.random.default_rng(0)
    q = g.integers(-7, 8, (128, 64)).astype(np.int8)
    pw = K.pack_int4(q, np.full((128, 2), 0.01, np.float32), 32)
    for rows in (1, 512):
        x = g.standard_normal((rows, 64)).astype(np.float32)
        K.linear_int4_f32(x, pw)
        chained = K.bind_linear_int4(pw, None, "relu", (), 0.05, 128, 0.05, 128)
        chained(chained(x)[:, :64].copy())


def _bf16_linear() -> None:
    """The bf16 linear's entries (cpu-bf16): float and uint8 out, on this thread and threaded."""
    g = np.random.default_rng(0)
    pw = K.pack_bf16(g.standard_normal((128, 64)).astype(np.float32))
    for rows in (1, 512):
        x = g.standard_normal((rows, 64)).astype(np.float32)
        K.linear_bf16_f32(x, pw)
        K.bind_linear_bf16(pw, None, "relu", (), 0.0, 0, 0.05, 128)(x)


def warmup(progress: bool = True) -> dict:
    """Compile every kernel fxopt uses on this CPU into the cache folder, so that later
    processes start without compiling. Returns {"compiled", "seconds", "cache"}.

    It optimizes a few small models with cpu-int8 (dynamic and calibrated static scales)
    and calls each on both runtimes at a few shapes."""
    before, start = NOTICE.total, time.perf_counter()
    work = _workloads()
    with NOTICE.held():
        for i, (name, model, example, calls, target) in enumerate(work):
            if progress:
                NOTICE.say(f"fxopt warmup: {name} ({i + 1}/{len(work)}), {time.perf_counter() - start:.0f} s")
            model.eval()
            for calibration in (None, [example, *calls]):
                for runtime in ("plan", "graph"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fast = optimize(model, example, target, calibration_data=calibration,
                                        runtime=runtime, report_layers=False, latency_repeats=0, drift=False)
                    with torch.no_grad():
                        for inputs in (example, *calls):
                            fast(*inputs)
        _dense_linear()
        _sparse_linear()
        _int4_linear()
        _bf16_linear()
    return {"compiled": NOTICE.total - before, "seconds": round(time.perf_counter() - start, 1),
            "cache": _cache.cache_dir()}
