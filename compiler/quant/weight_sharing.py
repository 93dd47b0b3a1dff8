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
    centroids, index, scale = cluster(weight, bits)
    return shared_weight(centroids, index, scale, weight.dtype), scale


def cluster(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(centroids in int8 steps, float64 (k,); cluster of each weight, int64, -1 where the
    weight is zero; the int8 scale): the codebook share() rounds onto the grid."""
    w = weight.detach().double()
    amax = float(w.abs().max())
    scale = float(np.float32(amax / 127.0)) if amax > 0 else 1.0
    mask = (w != 0).numpy()
    index = np.full(mask.shape, -1, np.int64)
    centroids = np.zeros(0)
    if mask.any():
        centroids, index[mask] = kmeans_1d(w.numpy()[mask] / scale, 2 ** bits)
    return torch.from_numpy(centroids), torch.from_numpy(index), scale


def on_grid(units: torch.Tensor, low: float = -127, high: float = 127) -> torch.Tensor:
    """units rounded to whole steps (clamped), with the gradient of the unrounded value (the
    straight-through estimator): training moves the values, the model sees them on the grid."""
    return units + (torch.clamp(torch.round(units), low, high) - units).detach()


def shared_weight(centroids: torch.Tensor, index: torch.Tensor, scale: float, dtype=torch.float32):
    """The weight of a codebook: centroid (rounded to int8 steps) times scale, 0 where index is -1.
    Differentiable in centroids: each centroid's gradient is the sum over its weights' (the
    paper's rule for trained quantization)."""
    grid = on_grid(centroids)
    padded = torch.cat([grid.new_zeros(1), grid])            # index -1 -> the zero in front
    return (padded[index + 1] * scale).to(dtype)


def grid_bias(bias: torch.Tensor, bits: int) -> tuple[float, torch.Tensor]:
    """(scale, bias in units of it) of a bias put on a grid of 2**(bits-1) - 1 steps per side:
    stored as the integers and one float (fxopt.artifact's grid codec)."""
    amax = float(bias.detach().abs().max())
    scale = float(np.float32(amax / (2 ** (bits - 1) - 1))) if amax > 0 else 1.0
    return scale, bias.detach().double() / scale


def bias_on_grid(units: torch.Tensor, scale: float) -> torch.Tensor:
    """float32(integer) * float32(scale) exactly as the file's decoder computes it."""
    return torch.round(units.detach()).float() * torch.tensor(scale, dtype=torch.float32) + 0.0   # no -0.0


def quantize(node, weight: torch.Tensor, default):
    """int8 weights and per-channel scales for quantize_int8: a shared layer's codebook with its
    one scale, else `default(weight)` (per-channel symmetric)."""
    info = node.meta.get(SHARED)
    if info is None:
        return default(weight)
    scale = float(info["scale"])
    q = torch.clamp(torch.round(weight.double() / scale), -127, 127).to(torch.int8)
    return q, torch.full((weight.shape[0],), scale, dtype=torch.float32)


EXTRAS = ("finetune", "bias_bits")     # options beside the bits (split_options)


def split_options(share_weights) -> tuple[dict, dict]:
    """({"linear": bits, "conv": bits}, {"finetune": ..., "bias_bits": ...}) of share_weights, checked."""
    if not isinstance(share_weights, dict):
        raise TypeError(f"share_weights must be a dict like {{'bits': 5}} or {{'conv': 8, 'linear': 5}}, "
                        f"got {share_weights!r}")
    extras = {k: share_weights[k] for k in EXTRAS if k in share_weights}
    bias_bits = extras.get("bias_bits")
    if bias_bits is not None and (isinstance(bias_bits, bool) or not isinstance(bias_bits, int)
                                  or not 2 <= bias_bits <= 16):
        raise ValueError(f"share_weights: bias_bits must be an int in 2..16 (or None: biases kept), got {bias_bits!r}")
    tune = extras.get("finetune")
    if tune is not None and not isinstance(tune, dict):
        raise TypeError(f"share_weights: finetune must be a dict of options like {{'epochs': 2, 'lr': 0.05}}, "
                        f"got {tune!r}")
    return check_bits({k: v for k, v in share_weights.items() if k not in EXTRAS}), extras


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
                            "use 'bits', or 'conv' and/or 'linear' (beside them 'finetune' and 'bias_bits')")
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
    bits, extras = split_options(share_weights)
    names = [p.name for p in pipeline.passes]
    if "quantize_int8" not in names:
        raise PipelineError("share_weights puts weights on the int8 grid: use an int8 target (cpu-int8)")
    at = names.index("calibrate_ranges") if "calibrate_ranges" in names else names.index("quantize_int8")
    passes = list(pipeline.passes)
    out = Pipeline(tuple(passes[:at] + [PassSpec("share_weights", {"bits": bits, **extras})] + passes[at:]))
    out.validate()
    return out
