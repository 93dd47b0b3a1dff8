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

import numpy as np
import torch

from fxopt.core.errors import CalibrationError
from fxopt.quant.histogram import StreamingHistogram, finite, flat_finite

__all__ = ["Observer", "MinMaxObserver", "AbsMaxPerChannelObserver", "StreamingHistogram",
           "HistogramObserver", "PercentileObserver", "MSEObserver", "EntropyObserver",
           "OBSERVERS", "make_observer", "quant_grid", "fake_quant"]


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
            t = finite(t.reshape(-1))
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
        flat = flat_finite(t)
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
        """(lo, hi) moved inside the data's [min, max] (so lo <= hi even for constant data)."""
        return (float(min(max(lo, self.lo), self.hi)), float(max(min(hi, self.hi), self.lo)))


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


class Tee(Observer):
    """Feeds every tensor to several observers: one pass over the data serves them all.

        both = Tee(make_observer("minmax"), AbsMaxPerChannelObserver(-1))
    """

    def __init__(self, *observers: Observer):
        self.observers = observers

    def update(self, t: torch.Tensor) -> None:
        for obs in self.observers:
            obs.update(t)

    def range(self):
        return self.observers[0].range()
