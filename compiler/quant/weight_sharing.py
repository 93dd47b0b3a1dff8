"""Trained quantization by weight sharing (Deep Compression's second stage), on the int8 grid.

    centroids, index = kmeans_1d(values, 2 ** bits)      # linear initialisation, Lloyd steps
    shared, scale = share(weight, bits)                   # weight with <= 2**bits nonzero values

Each layer's surviving (nonzero) weights are clustered in units of the layer's
int8 scale s = max|w| / 127 and the centroids rounded to whole units, so every
shared weight is c * s with c an int8 value. quantize_int8 then quantizes such a
layer with the single scale s (node.meta[SHARED]) instead of per channel, and
its int8 weights are exactly the codebook: the kernels compute the shared model.
"""
from __future__ import annotations

import numpy as np
import torch

from fxopt.core.errors import PipelineError
from fxopt.core.pipeline import PassSpec, Pipeline

SHARED = "fxopt_shared"
KINDS = ("linear", "conv")


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, index of each value) of k-means on 1-D data, centroids initialised evenly
    between min and max (the paper's linear initialisation, which keeps the rare large weights)."""
    values = np.asarray(values, np.float64)
    k = max(1, min(k, len(np.unique(values))))
    centroids = np.linspace(values.min(), values.max(), k)
    for _ in range(iterations):
        index = _nearest(values, centroids)
        sums = np.bincount(index, values, k)
        counts = np.bincount(index, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(moved, centroids):
            break
        centroids = moved
    return centroids, _nearest(values, centroids)


def _nearest(values, centroids) -> np.ndarray:
    order = np.argsort(centroids)
    c = centroids[order]
    mid = (c[1:] + c[:-1]) / 2
    return order[np.searchsorted(mid, values)]


def share(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """(shared weight, int8 scale): the nonzero weights replaced by their cluster's centroid,
    centroids rounded to whole int8 steps of scale; zeros stay zero."""
    w = weight.detach().double()
    amax = float(w.abs().max())
    scale = float(np.float32(amax / 127.0)) if amax > 0 else 1.0
    mask = (w != 0).numpy()
    units = w.numpy() / scale
    out = np.zeros_like(units)
    if mask.any():
        centroids, index = kmeans_1d(units[mask], 2 ** bits)
        out[mask] = np.clip(np.rint(centroids), -127, 127)[index]
    return torch.from_numpy(out * scale).to(weight.dtype), scale


def quantize(node, weight: torch.Tensor, default):
    """int8 weights and per-channel scales for quantize_int8: a shared layer's codebook with its
    one scale, else `default(weight)` (per-channel symmetric)."""
    info = node.meta.get(SHARED)
    if info is None:
        return default(weight)
    scale = float(info["scale"])
    q = torch.clamp(torch.round(weight.double() / scale), -127, 127).to(torch.int8)
    return q, torch.full((weight.shape[0],), scale, dtype=torch.float32)


def check_bits(share_weights) -> dict:
    """{"linear": bits, "conv": bits} of share_weights={"bits": 5} or {"conv": 8, "linear": 5}."""
    if not isinstance(share_weights, dict):
        raise TypeError(f"share_weights must be a dict like {{'bits': 5}} or {{'conv': 8, 'linear': 5}}, "
                        f"got {share_weights!r}")
    if "bits" in share_weights:
        extra = set(share_weights) - {"bits"}
        if extra:
            raise TypeError(f"share_weights: give 'bits' alone or per kind ('conv', 'linear'), not both "
                            f"(got {', '.join(sorted(extra))} too)")
        bits = {k: share_weights["bits"] for k in KINDS}
    else:
        unknown = set(share_weights) - set(KINDS)
        if unknown or not share_weights:
            raise TypeError(f"share_weights: unknown key(s) {', '.join(sorted(unknown)) or '(none given)'}; "
                            "use 'bits', or 'conv' and/or 'linear'")
        bits = dict(share_weights)
    for kind, b in bits.items():
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"share_weights: {kind} bits must be an int in 1..8 (int8 holds at most 255 "
                             f"values), got {b!r}")
    return bits


def with_sharing(pipeline: Pipeline, share_weights) -> Pipeline:
    """`pipeline` with share_weights spliced in before calibrate_ranges (after SmoothQuant, which
    rescales weight columns, and before the ranges the shared weights produce are measured)."""
    if share_weights is None:
        return pipeline
    bits = check_bits(share_weights)
    names = [p.name for p in pipeline.passes]
    if "quantize_int8" not in names:
        raise PipelineError("share_weights puts weights on the int8 grid: use an int8 target (cpu-int8)")
    at = names.index("calibrate_ranges") if "calibrate_ranges" in names else names.index("quantize_int8")
    passes = list(pipeline.passes)
    out = Pipeline(tuple(passes[:at] + [PassSpec("share_weights", {"bits": bits})] + passes[at:]))
    out.validate()
    return out
