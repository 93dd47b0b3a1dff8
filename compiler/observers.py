"""Range observers for calibration: they watch a stream of tensors and propose a range.

Memory is O(bins) whatever the number of samples: min/max observers keep two
numbers (or two per channel), histogram observers one streaming histogram.

    obs = make_observer("percentile", percentile=99.99)
    for x in batches:
        obs.update(x)
    lo, hi = obs.range()            # floats; lo <= 0 <= hi is not guaranteed

Observers: "minmax", "percentile", "mse", "entropy" (all per tensor) and
"absmax_per_channel" (SmoothQuant's per-input-channel |x| max). A range is
what the observer proposes; the quantizer widens it to include 0. The grid an
int8 quantizer builds from a range is `quant_grid` (the MSE observer scores
candidate ranges on exactly that grid).
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from fxopt.errors import CalibrationError

__all__ = ["Observer", "MinMaxObserver", "AbsMaxPerChannelObserver", "StreamingHistogram",
           "HistogramObserver", "PercentileObserver", "MSEObserver", "EntropyObserver",
           "OBSERVERS", "make_observer", "quant_grid", "fake_quant"]


def _flat_float(t) -> torch.Tensor:
    t = torch.as_tensor(t).detach()
    return t.reshape(-1).float() if not t.is_floating_point() else t.reshape(-1)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """t without NaN/inf (they carry no range information and would poison min/max)."""
    if t.numel() == 0:
        return t
    lo, hi = torch.aminmax(t)
    if math.isfinite(lo.item()) and math.isfinite(hi.item()):
        return t
    return t[torch.isfinite(t)]


class Observer:
    """Base: `update(t)` with each tensor seen, `range()` -> (lo, hi) once done."""

    def update(self, t: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self):
        raise NotImplementedError

    def _empty(self):
        return CalibrationError(f"{type(self).__name__} has seen no finite value, so it has no "
                                "range; feed it at least one non-empty batch before range().")


# ------------------------------------------------------------------ min / max

class MinMaxObserver(Observer):
    """Running min and max, per tensor or per channel along `axis`.

        obs = MinMaxObserver(per_channel=True, axis=0)   # e.g. a linear weight [out, in]
        obs.update(w); lo, hi = obs.range()              # two tensors of size out
    """

    def __init__(self, per_channel: bool = False, axis: int = 0):
        self.per_channel, self.axis = per_channel, axis
        self.lo = self.hi = None

    def update(self, t: torch.Tensor) -> None:
        t = torch.as_tensor(t).detach().float()
        if self.per_channel:
            lo, hi = _channel_reduce(t, self.axis, torch.amin), _channel_reduce(t, self.axis, torch.amax)
        else:
            t = _finite(t.reshape(-1))
            if t.numel() == 0:
                return
            lo, hi = (v.item() for v in torch.aminmax(t))
        self._merge(lo, hi)

    def _merge(self, lo, hi):
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.per_channel:
            _check_channels(self.lo, lo, self.axis)
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def range(self):
        if self.lo is None:
            raise self._empty()
        return self.lo, self.hi


class AbsMaxPerChannelObserver(Observer):
    """Running max of |x| per channel along `axis` (default: last, a linear's input features).

        obs = AbsMaxPerChannelObserver(axis=-1)
        obs.update(x)                   # x: [batch, seq, in_features]
        obs.absmax()                    # tensor [in_features]; range() is (-absmax, absmax)
    """

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.amax = None

    def update(self, t: torch.Tensor) -> None:
        amax = _channel_reduce(torch.as_tensor(t).detach().float().abs(), self.axis, torch.amax)
        if self.amax is not None:
            _check_channels(self.amax, amax, self.axis)
            amax = torch.maximum(self.amax, amax)
        self.amax = amax

    def absmax(self) -> torch.Tensor:
        if self.amax is None:
            raise self._empty()
        return self.amax

    def range(self):
        return -self.absmax(), self.absmax()


def _channel_reduce(t: torch.Tensor, axis: int, reduce) -> torch.Tensor:
    """reduce(t) over every dim but `axis`; NaN/inf ignored (counted as 0 for the channel)."""
    if t.dim() == 0:
        t = t.reshape(1)
    t = torch.nan_to_num(t.movedim(axis, 0), nan=0.0, posinf=0.0, neginf=0.0)
    return reduce(t.reshape(t.shape[0], -1), dim=1)


def _check_channels(old: torch.Tensor, new: torch.Tensor, axis: int) -> None:
    if old.shape != new.shape:
        raise CalibrationError(f"per-channel observer along axis {axis} saw {old.numel()} channels, "
                               f"then a tensor with {new.numel()}; every tensor it observes must "
                               "have the same channel count on that axis.")


# --------------------------------------------------------- streaming histogram

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
        t = _finite(_flat_float(t))
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


# ------------------------------------------------------ histogram observers

class HistogramObserver(Observer):
    """Base of the observers that read a streaming histogram of every value seen.

    The exact min/max is kept too (two floats): the histogram's range is a
    little wider than the data, and no proposed range may exceed the data's.
    """

    def __init__(self, bins: int = 2048):
        self.hist = StreamingHistogram(bins)
        self.lo = self.hi = None

    def update(self, t: torch.Tensor) -> None:
        flat = _finite(_flat_float(t))
        if flat.numel() == 0:
            return
        lo, hi = (v.item() for v in torch.aminmax(flat))
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.hist.add_clean(flat, lo, hi)

    def range(self):
        if self.lo is None:
            raise self._empty()
        return self._search()

    def _search(self) -> tuple:
        raise NotImplementedError

    def _clip(self, lo: float, hi: float) -> tuple:
        return float(max(lo, self.lo)), float(min(hi, self.hi))


class PercentileObserver(HistogramObserver):
    """Clip the tails at a percentile: of each tail, or of |x| when symmetric.

        PercentileObserver(99.99)                  # (0.01th, 99.99th) percentiles
        PercentileObserver(99.99, symmetric=True)  # t = 99.99th of |x|; (-t, t) within min/max
    """

    def __init__(self, percentile: float = 99.99, symmetric: bool = False, bins: int = 2048):
        if not 50.0 < percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile, self.symmetric = percentile, symmetric

    def _search(self):
        p = self.percentile / 100.0
        if self.symmetric:
            t = self.hist.abs_quantile(p)
            return self._clip(-t, t)
        lo, hi = self.hist.quantile(np.array([1.0 - p, p]))
        return self._clip(lo, hi)


# ----------------------------------------------------------- int8 grids, MSE

def quant_grid(lo, hi, symmetric: bool = False, bits: int = 8) -> tuple:
    """(scale, zero_point, qmin, qmax) of the grid a quantizer builds from a range.

    Asymmetric (unsigned): the range is widened to include 0, scale =
    (hi - lo) / (2**bits - 1), zero_point = round(-lo / scale) in [0, 2**bits - 1].
    Symmetric (signed): scale = max(|lo|, |hi|) / (2**(bits-1) - 1), zero_point 0,
    q in [-(2**(bits-1) - 1), 2**(bits-1) - 1]. Works on floats or numpy arrays.

        quant_grid(-1.0, 3.0)            # (4/255, 64, 0, 255)
    """
    lo, hi = np.minimum(np.asarray(lo, np.float64), 0.0), np.maximum(np.asarray(hi, np.float64), 0.0)
    tiny = np.finfo(np.float32).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.maximum(np.maximum(-lo, hi) / qmax, tiny)
        return scale, np.zeros_like(scale), -qmax, qmax
    qmax = 2 ** bits - 1
    scale = np.maximum((hi - lo) / qmax, tiny)
    return scale, np.clip(np.round(-lo / scale), 0, qmax), 0, qmax


def fake_quant(x: np.ndarray, lo, hi, symmetric: bool = False, bits: int = 8) -> np.ndarray:
    """x quantized to the grid of (lo, hi) and back; broadcasts ranges against x."""
    scale, zp, qmin, qmax = quant_grid(lo, hi, symmetric, bits)
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


class MSEObserver(HistogramObserver):
    """The range, inside min/max, whose quantization grid has the least squared error.

    Each candidate range is scored on the histogram (a few points per bin,
    weighted by its count) with the grid `quant_grid` builds. Symmetric:
    one threshold t searched on a grid of `steps`; asymmetric: lo and hi
    searched in turn (coordinate descent), starting from min/max, so the
    result never scores worse than min/max.

        MSEObserver(symmetric=False)    # uint8 asymmetric grid
    """

    def __init__(self, symmetric: bool = False, bits: int = 8, steps: int = 128,
                 rounds: int = 3, bins: int = 2048):
        super().__init__(bins)
        self.symmetric, self.bits, self.steps, self.rounds = symmetric, bits, steps, rounds

    def _points(self) -> tuple:
        """Sample points (4 per non-empty bin) and their weights."""
        sub = 4
        used = np.nonzero(self.hist.counts)[0]
        offsets = (np.arange(sub) + 0.5) / sub
        x = self.hist.lo + (used[:, None] + offsets[None, :]) * self.hist.width
        w = np.repeat(self.hist.counts[used] / sub, sub).reshape(len(used), sub)
        return x.reshape(-1), w.reshape(-1)

    def _error(self, x, w, lo, hi) -> np.ndarray:
        """Weighted squared error of each candidate (lo[i], hi[i]) on the points x."""
        q = fake_quant(x[None, :], lo[:, None], hi[:, None], self.symmetric, self.bits)
        return ((x[None, :] - q) ** 2 * w[None, :]).sum(axis=1)

    def _search(self):
        x, w = self._points()
        lo, hi = self.lo, self.hi
        frac = np.linspace(1.0, 1.0 / self.steps, self.steps)   # 1.0 first: min/max is a candidate
        if self.symmetric:
            t = frac * max(abs(lo), abs(hi))
            best = t[np.argmin(self._error(x, w, -t, t))]
            return self._clip(-best, best)
        for _ in range(self.rounds):
            his = np.where(hi > 0, frac * hi, hi)
            hi = his[np.argmin(self._error(x, w, np.full_like(his, lo), his))]
            los = np.where(lo < 0, frac * lo, lo)
            lo = los[np.argmin(self._error(x, w, los, np.full_like(los, hi)))]
        return self._clip(lo, hi)


# ------------------------------------------------------------------ entropy

class EntropyObserver(HistogramObserver):
    """TensorRT-style: the |x| threshold whose clipped, quantized distribution has the
    least KL divergence from the clipped reference distribution.

    On the histogram of |x| (resampled from the signed one), for each
    candidate threshold bin i the reference P is bins [0, i) with the mass
    beyond added to the last; Q merges those i bins into `levels` groups
    (2**bits for one-signed data, 2**(bits-1) otherwise) and spreads each
    group evenly over its non-empty bins. The range is (-t, t) cut to min/max.

        EntropyObserver()               # lo, hi = obs.range() after updates
    """

    def __init__(self, bits: int = 8, stride: int = 8, bins: int = 2048):
        super().__init__(bins)
        self.bits, self.stride = bits, stride

    def _search(self):
        counts, edges = self.hist.abs_histogram()
        # Why: exact zeros (ReLU, padding) pile up in bin 0; that spike says nothing
        # about the range yet would dominate the divergence of every wide candidate.
        counts[0] = counts[1]
        lo, hi = self.lo, self.hi
        one_signed = lo >= 0 or hi <= 0
        levels = min(2 ** self.bits if one_signed else 2 ** (self.bits - 1), len(counts))
        candidates = np.unique(np.append(np.arange(levels, len(counts) + 1, self.stride), len(counts)))
        kl = np.array([_kl_clipped(counts, i, levels) for i in candidates])
        t = edges[candidates[np.argmin(kl)]]
        return self._clip(-t, t)


def _kl_clipped(counts: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) of the histogram clipped at bin i and its `levels`-level quantization."""
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()
    starts = np.floor(np.linspace(0, i, levels + 1)[:-1]).astype(np.int64)
    starts = np.unique(starts)
    group_sum = np.add.reduceat(counts[:i], starts)
    nonzero = counts[:i] > 0
    group_nonzero = np.add.reduceat(nonzero.astype(np.float64), starts)
    sizes = np.diff(np.append(starts, i))
    per_bin = np.repeat(group_sum / np.maximum(group_nonzero, 1.0), sizes)
    q = np.where(nonzero, per_bin, 0.0)
    p, q = p / max(p.sum(), 1e-30), q / max(q.sum(), 1e-30)
    mask = p > 0
    # Why the floor on q: P's last bin holds the clipped tail even when it was empty in Q
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


# ------------------------------------------------------------------ factory

OBSERVERS = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "absmax_per_channel": AbsMaxPerChannelObserver,
}


def make_observer(name: str, **kw) -> Observer:
    """A fresh observer by name, e.g. make_observer("percentile", percentile=99.9).

    Valid names: minmax, percentile, mse, entropy, absmax_per_channel.
    """
    if isinstance(name, Observer):
        raise CalibrationError("make_observer takes an observer name, not an observer instance")
    cls = OBSERVERS.get(name)
    if cls is None:
        raise CalibrationError(f"unknown observer {name!r}; valid observers: {', '.join(OBSERVERS)}")
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise CalibrationError(f"observer {name!r} takes no option(s) {', '.join(unknown)}; "
                               f"its options: {', '.join(params) or 'none'}")
    return cls(**kw)
