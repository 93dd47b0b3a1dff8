"""GPTQ-style rounding of grouped int4 weights (Frantar et al., 2022), written for fxopt's format.

Round to nearest makes each weight's error small on its own; GPTQ makes the layer's output
error small on the calibration inputs X: the columns (input features) are quantized one at a
time and each column's rounding error is spread over the columns not yet quantized, weighted
by the inverse of H = X^T X, so that the next roundings cancel what this one did to X W^T.

The result is in quantize_weight_groups' format exactly (symmetric, |q| <= 7, a float32 scale
per group of `group_size` along K, scale = max |w| / 7 over the group, 1 for a group of zeros),
only the weights a group's scale and rounding see are the error-compensated ones: the kernels,
packing and the report treat it like any other int4 weight.

    h = HessianObserver(); h.update(x)       # for every calibration batch of the layer's input
    q, scale = gptq_groups(w, h.hessian(), group_size=32)
"""
from __future__ import annotations

import torch

from fxopt.quant import qops
from fxopt.quant.observers import Observer

DAMP = 0.01          # of the mean diagonal, added to H's diagonal (GPTQ's default percdamp)
BLOCK = 128          # columns updated together (lazy batch updates); a multiple of every group size


class HessianObserver(Observer):
    """Sums X^T X (float64) over the rows of every tensor fed to it (last dim = features)."""

    def __init__(self):
        self.h, self.rows = None, 0

    def update(self, t: torch.Tensor) -> None:
        x = t.detach().reshape(-1, t.shape[-1]).double()
        x = x[torch.isfinite(x).all(dim=1)]
        self.h = x.t() @ x if self.h is None else self.h + x.t() @ x
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor | None:
        return None if self.h is None or self.rows == 0 else self.h / self.rows

    def range(self):
        raise NotImplementedError("HessianObserver gathers X^T X, not a range")


def gptq_groups(w: torch.Tensor, h: torch.Tensor, group_size: int = 32, bits: int = 4
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N, K / group_size)) for weight w (N, K) and the input
    Hessian h (K, K) of its layer."""
    n, k = w.shape
    qops.quantize_weight_groups(w[:1], bits, group_size)          # the same checks, the same errors
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0                  # a feature never nonzero: its weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # columns of w as rows (wt[c] is input feature c's weights): each step below reads and
    # updates contiguous rows, in place (a rank-1 update per column, no temporaries)
    wt = w.t().contiguous()
    qt = torch.zeros(k, n, dtype=torch.int8)
    scale = torch.ones(n, k // group_size, dtype=torch.float32)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1, err = wt[i1:i2], torch.zeros(i2 - i1, n, dtype=w.dtype)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:           # the group's scale, from its compensated weights
                _, s = qops.quantize_weight_groups(w1[i:i + group_size].t().float(), bits, group_size)
                scale[:, col // group_size] = s[:, 0]
                sd = s[:, 0].double()
            qc = torch.clamp(torch.round(w1[i] / sd), -qmax, qmax)
            qt[col] = qc.to(torch.int8)
            e = err[i]
            torch.sub(w1[i], qc * sd, out=e)
            e /= u1[i, i]
            w1[i:].addr_(u1[i, i:], e, alpha=-1)
        wt[i2:] -= u[i1:i2, i2:].t() @ err
    q = qt.t().contiguous()
    return q, scale
