"""A streaming histogram: fixed bins over a range that grows as data arrives.

Memory is `bins` counters whatever the number of samples; the histogram
observers of fxopt.quant.observers read quantiles and |x| distributions from it.

    h = StreamingHistogram(2048)
    for x in batches:
        h.add(x)
    h.quantile(np.array([0.001, 0.999]))      # two tails
    h.abs_quantile(0.9999)                   # t with 99.99% of values in [-t, t]
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fxopt.core.errors import CalibrationError

__all__ = ["StreamingHistogram", "flat_finite", "finite"]

def flat_finite(t) -> torch.Tensor:
    """t as a flat float tensor without NaN/inf."""
    t = torch.as_tensor(t).detach().reshape(-1)
    return finite(t if t.is_floating_point() else t.float())


def finite(t: torch.Tensor) -> torch.Tensor:
    """t without NaN/inf (they carry no range information and would poison min/max)."""
    if t.numel() == 0:
        return t
    lo, hi = torch.aminmax(t)
    if math.isfinite(lo.item()) and math.isfinite(hi.item()):
        return t
    return t[torch.isfinite(t)]


class StreamingHistogram:
    """A fixed number of equal bins over a range that grows as data arrives.

    Memory is `bins` counters whatever the number of samples. When a batch
    falls outside the range, the range grows to k times the bin width (k an
    integer) on a grid aligned with the old one, so every old bin falls
    inside exactly one new bin and counts move over exactly.

        h = StreamingHistogram(2048); h.add(x); h.add(10 * x)
        h.counts.sum() == 2 * x.numel(); h.quantile(np.array([0.5]))
    """

    def __init__(self, bins: int = 2048):
        if bins < 2:
            raise CalibrationError(f"a histogram needs at least 2 bins, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, np.int64)
        self.lo = self.width = None

    @property
    def hi(self) -> float:
        return self.lo + self.bins * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    def add(self, t: torch.Tensor) -> None:
        t = flat_finite(t)
        if t.numel() == 0:
            return
        self.add_clean(t, *(v.item() for v in torch.aminmax(t)))

    def add_clean(self, t: torch.Tensor, lo: float, hi: float) -> None:
        """add() for a flat, finite float tensor whose min and max are known."""
        if self.lo is None:
            self._start(lo, hi)
        elif lo < self.lo or hi > self.hi:
            self._grow(lo, hi)
        # clamp: float rounding may put a value at the very edge one bin outside
        idx = ((t - self.lo) * (1.0 / self.width)).floor_().clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).numpy()

    def _start(self, lo: float, hi: float) -> None:
        span = hi - lo
        if span <= 0:  # a constant batch: give it a tiny range centred on the value
            span = max(abs(lo), 1.0) * 1e-6
            lo -= span / 2
        self.lo, self.width = lo, span / self.bins

    def _grow(self, lo: float, hi: float) -> None:
        w = self.width
        below = max(0, math.ceil((self.lo - lo) / w))      # old-width bins missing below
        above = max(0, math.ceil((hi - self.hi) / w))      # and above
        k = max(2, math.ceil((self.bins + below + above) / self.bins))
        # Why the slack goes where the data grew: a tail still being explored
        # keeps growing, and each growth at least doubles the bin width.
        slack = self.bins * k - (self.bins + below + above)
        shift = below + (slack * below) // (below + above)
        target = (np.arange(self.bins, dtype=np.int64) + shift) // k
        moved = np.zeros(self.bins, np.int64)
        np.add.at(moved, target, self.counts)
        self.counts, self.lo, self.width = moved, self.lo - shift * w, w * k

    def cdf_at(self, x: np.ndarray) -> np.ndarray:
        """Number of values below x (values spread evenly inside each bin)."""
        cum = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.float64)
        return np.interp(x, self.edges(), cum)

    def quantile(self, q: np.ndarray) -> np.ndarray:
        """Values below which a fraction q of the data lies."""
        cum = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.float64)
        return _invert(self.edges(), cum, np.asarray(q, np.float64) * self.total)

    def abs_histogram(self) -> tuple:
        """(counts, edges) of |x| over [0, max|x|] with `bins` bins, resampled from this one."""
        top = max(abs(self.lo), abs(self.hi))
        edges = np.linspace(0.0, top, self.bins + 1)
        within = self.cdf_at(edges) - self.cdf_at(-edges)     # mass inside [-a, a]
        return np.maximum(np.diff(within), 0.0), edges

    def abs_quantile(self, q: float) -> float:
        """t such that a fraction q of the values lies in [-t, t]."""
        # mass(t) is piecewise linear between the |edges|, so invert it exactly there
        grid = np.unique(np.abs(np.concatenate([[0.0], self.edges()])))
        mass = self.cdf_at(grid) - self.cdf_at(-grid)
        return float(_invert(grid, mass, q * self.total))


def _invert(xs: np.ndarray, ys: np.ndarray, target) -> np.ndarray:
    """Smallest x where the nondecreasing piecewise-linear curve (xs, ys) reaches target."""
    target = np.asarray(target, np.float64)
    i = np.clip(np.searchsorted(ys, target, side="left"), 1, len(ys) - 1)
    y0, y1 = ys[i - 1], ys[i]
    rise = np.where(y1 > y0, y1 - y0, 1.0)
    frac = np.clip(np.where(y1 > y0, (target - y0) / rise, 1.0), 0.0, 1.0)
    return xs[i - 1] + frac * (xs[i] - xs[i - 1])
