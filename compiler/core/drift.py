"""Numeric drift between two sets of outputs: cosine, SQNR (dB), max abs error.

    >>> d = drift(reference_outputs, new_outputs)
    >>> d.sqnr_db, d.cosine, d.max_abs
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.utils._pytree as pytree

METRICS = ("max_abs", "sqnr", "cosine")


@dataclass(frozen=True)
class Drift:
    cosine: float
    sqnr_db: float
    max_abs: float

    def exceeds(self, tol: float, metric: str = "max_abs") -> bool:
        """True when this drift is worse than `tol` in `metric`.

        max_abs: error above tol; sqnr: SQNR below tol dB; cosine: cosine below tol.
        """
        if metric == "max_abs":
            return not self.max_abs <= tol
        if metric == "sqnr":
            return not self.sqnr_db >= tol
        if metric == "cosine":
            return not self.cosine >= tol
        raise ValueError(f"unknown drift metric {metric!r}; use one of {METRICS}")

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"cos={self.cosine:.6f} sqnr={self.sqnr_db:.1f}dB max_abs={self.max_abs:.3g}"


def float_leaves(outputs) -> list[torch.Tensor]:
    """The floating-point tensors of a (nested) output, in a fixed order."""
    leaves = pytree.tree_leaves(outputs)
    return [t.detach().float().reshape(-1) for t in leaves
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def drift(reference, candidate) -> Drift:
    """Drift of `candidate` outputs against `reference` outputs of the same structure."""
    ref, got = float_leaves(reference), float_leaves(candidate)
    if len(ref) != len(got) or any(r.numel() != g.numel() for r, g in zip(ref, got)):
        raise ValueError(
            f"outputs differ in structure: {len(ref)} float tensors against {len(got)}")
    if not ref:
        return Drift(1.0, math.inf, 0.0)
    return tensor_drift(torch.cat(ref), torch.cat(got))


def tensor_drift(ref: torch.Tensor, got: torch.Tensor) -> Drift:
    """Drift of one tensor against another of the same number of elements."""
    ref = ref.detach().double().reshape(-1)
    got = got.detach().double().reshape(-1)
    err = got - ref
    max_abs = float(err.abs().max()) if err.numel() else 0.0
    signal, noise = float((ref * ref).sum()), float((err * err).sum())
    if noise == 0.0:
        sqnr = math.inf
    elif signal == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    denom = float(ref.norm() * got.norm())
    if denom == 0.0:
        cosine = 1.0 if float(ref.norm()) == float(got.norm()) else 0.0
    else:
        cosine = float((ref @ got) / denom)
    if not math.isfinite(max_abs):
        cosine, sqnr = float("nan"), -math.inf
    return Drift(cosine, sqnr, max_abs)
