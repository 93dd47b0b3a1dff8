"""Observers against numpy references, and calibration of captured graphs."""
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fxopt.core.capture import capture
from fxopt.core.errors import CalibrationError, FxoptError, NoCalibrationWarning
from fxopt.quant.calibrate import (ModelInputs, calibrate, calibration_inputs, observe,
                             observe_input_channels)
from fxopt.quant.observers import (OBSERVERS, AbsMaxPerChannelObserver, MinMaxObserver,
                             StreamingHistogram, make_observer)
from zoo import ZOO


def _batches(n, size, seed=0, dist="normal"):
    gen = torch.Generator().manual_seed(seed)
    if dist == "laplace":
        u = torch.rand(n, size, generator=gen) - 0.5
        return list(-torch.sign(u) * torch.log1p(-2 * u.abs()))
    return list(torch.randn(n, size, generator=gen))


def _fake_quant(x, lo, hi, symmetric):
    """Independent reference of an int8 grid: uint8 asymmetric with 0 exact, or int8 symmetric."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(-lo, hi) / 127
        return np.clip(np.round(x / scale), -127, 127) * scale
    scale = (hi - lo) / 255
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _mse(x, lo, hi, symmetric=False):
    return float(np.mean((x - _fake_quant(x, lo, hi, symmetric)) ** 2))


# ------------------------------------------------------------------ observers

def test_minmax_is_exact():
    batches = _batches(20, 500)
    obs = make_observer("minmax")
    for b in batches:
        obs.update(b * 3)
    data = np.concatenate([b.numpy() * 3 for b in batches])
    assert obs.range() == (float(data.min()), float(data.max()))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_minmax_and_absmax(axis):
    batches = [torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    mm, am = MinMaxObserver(per_channel=True, axis=axis), AbsMaxPerChannelObserver(axis=axis)
    for b in batches:
        mm.update(b)
        am.update(b)
    data = np.concatenate([b.numpy() for b in batches], axis=0 if axis != 0 else 1)
    other = tuple(d for d in range(3) if d != axis % 3)
    lo, hi = mm.range()
    np.testing.assert_array_equal(lo.numpy(), data.min(axis=other))
    np.testing.assert_array_equal(hi.numpy(), data.max(axis=other))
    np.testing.assert_array_equal(am.absmax().numpy(), np.abs(data).max(axis=other))


def test_per_channel_count_change_is_an_error():
    obs = AbsMaxPerChannelObserver(axis=-1)
    obs.update(torch.randn(2, 8))
    with pytest.raises(CalibrationError, match="8 channels, then a tensor with 4"):
        obs.update(torch.randn(2, 4))


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_matches_numpy_within_a_bin(symmetric):
    # batches of growing spread make the histogram grow and rebin as they stream in
    batches = [b * (1 + i / 50) for i, b in enumerate(_batches(200, 1000))]
    obs = make_observer("percentile", percentile=99.9, symmetric=symmetric)
    for b in batches:
        obs.update(b)
    data = np.concatenate([b.numpy() for b in batches]).astype(np.float64)
    lo, hi = obs.range()
    width = obs.hist.width
    if symmetric:
        t = np.percentile(np.abs(data), 99.9)
        assert abs(hi - t) <= width and abs(lo + t) <= width
    else:
        ref_lo, ref_hi = np.percentile(data, [0.1, 99.9])
        assert abs(lo - ref_lo) <= width and abs(hi - ref_hi) <= width


def test_histogram_memory_is_constant():
    hist = StreamingHistogram(bins=512)
    gen = torch.Generator().manual_seed(0)
    shapes, total = set(), 0
    for i in range(1000):
        batch = torch.randn(64, generator=gen) * (1 + i % 97)   # the range keeps growing early on
        hist.add(batch)
        total += batch.numel()
        shapes.add(hist.counts.shape)
    assert shapes == {(512,)}
    assert hist.total == total


def test_rebin_preserves_counts():
    a = torch.rand(5000, generator=torch.Generator().manual_seed(1))        # [0, 1)
    b = torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 20  # far wider, both sides
    hist = StreamingHistogram(bins=256)
    hist.add(a)
    hist.add(b)
    assert hist.total == 10000
    assert hist.lo <= float(b.min()) and hist.hi >= float(b.max())
    ref, _ = np.histogram(np.concatenate([a.numpy(), b.numpy()]), bins=hist.edges())
    # bin assignment may differ by float rounding for values sitting on an edge
    assert np.abs(hist.counts - ref).sum() <= 4


def test_histogram_starts_from_a_constant_batch():
    hist = StreamingHistogram(bins=128)
    hist.add(torch.zeros(100))
    hist.add(torch.linspace(-2, 3, 101))
    assert hist.total == 201
    assert hist.lo <= -2 and hist.hi >= 3
    assert hist.quantile(np.array([0.5]))[0] == pytest.approx(0.0, abs=hist.width)


@pytest.mark.parametrize("name,kw,dist", [
    ("mse", {}, "laplace"),
    ("mse", {"symmetric": True}, "laplace"),
    ("mse", {}, "outliers"),
    ("entropy", {}, "laplace"),
])
def test_range_search_clips_heavy_tails(name, kw, dist):
    batches = _batches(40, 2500, seed=3, dist="laplace" if dist == "laplace" else "normal")
    if dist == "outliers":
        batches[7][:3] = torch.tensor([30.0, -25.0, 40.0])
    obs = make_observer(name, **kw)
    for b in batches:
        obs.update(b)
    data = np.concatenate([b.numpy() for b in batches]).astype(np.float64)
    lo, hi = obs.range()
    symmetric = kw.get("symmetric", False)
    assert data.min() <= lo < hi <= data.max()
    assert (lo, hi) != (data.min(), data.max())
    assert _mse(data, lo, hi, symmetric) < _mse(data, data.min(), data.max(), symmetric)


def test_nonfinite_values_are_ignored():
    for name in OBSERVERS:
        if name == "absmax_per_channel":
            continue
        obs = make_observer(name)
        obs.update(torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.5]))
        lo, hi = obs.range()
        assert -2.0 <= lo <= hi <= 1.0, name


@pytest.mark.parametrize("value", [0.0, 5.0, -3.0])
def test_constant_data_gives_a_point_range(value):
    for name in ("minmax", "percentile", "mse", "entropy"):
        obs = make_observer(name)
        for _ in range(3):
            obs.update(torch.full((100,), value))
        assert obs.range() == (value, value), name


def test_observer_without_data_says_so():
    with pytest.raises(CalibrationError, match="seen no finite value"):
        make_observer("mse").range()


def test_make_observer_errors_list_the_choices():
    with pytest.raises(CalibrationError, match="minmax, percentile, mse, entropy"):
        make_observer("kl")
    with pytest.raises(CalibrationError, match="takes no option.*bits"):
        make_observer("percentile", bits=8)
    assert isinstance(make_observer("percentile", percentile=99.0), OBSERVERS["percentile"])


# ------------------------------------------------------------------ calibrate

@pytest.fixture(scope="module")
def mlp_graph():
    model, example, _ = ZOO["mlp"]()
    return model, capture(model, example)


def _ids_by_layer(gm, op="linear"):
    return {n.meta["fxopt_layer"]: n.meta["fxopt_id"] for n in gm.graph.nodes
            if n.op == "call_function" and n.name.startswith(op)}


def _eager_stats(model, data):
    """Per-module output min/max and per-feature |input| max, from forward hooks on the eager model."""
    out, inp = {}, {}

    def hook(name):
        def record(_, args, y):
            lo, hi = out.get(name, (float("inf"), float("-inf")))
            out[name] = (min(lo, y.min().item()), max(hi, y.max().item()))
            a = args[0].abs().amax(dim=0)
            inp[name] = torch.maximum(inp[name], a) if name in inp else a
        return record

    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in ("fc1", "fc2", "fc3")]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return out, inp


def test_calibrate_matches_eager_hooks(mlp_graph):
    model, gm = mlp_graph
    data = [torch.randn(b, 32, generator=torch.Generator().manual_seed(b)) for b in (3, 8, 5, 1)]
    ids = _ids_by_layer(gm)
    assert set(ids) == {"fc1", "fc2", "fc3"}
    ranges = calibrate(gm, data, list(ids.values()), progress=False)
    absmax = observe_input_channels(gm, iter(data), list(ids.values()), progress=False)
    ref_out, ref_in = _eager_stats(model, data)
    for layer, nid in ids.items():
        assert ranges[nid] == pytest.approx(ref_out[layer], abs=1e-6)
        torch.testing.assert_close(absmax[nid], ref_in[layer])


def test_observe_feeds_both_kinds_in_one_pass(mlp_graph):
    _, gm = mlp_graph
    nid = _ids_by_layer(gm)["fc2"]
    outs, ins = {nid: make_observer("minmax")}, {nid: AbsMaxPerChannelObserver()}
    gen = (torch.randn(4, 32) for _ in range(6))
    assert observe(gm, gen, outputs=outs, inputs=ins, progress=False) == 6
    assert ins[nid].absmax().shape == (64,)
    lo, hi = outs[nid].range()
    assert lo < hi


def test_progress_bar_and_fallback(mlp_graph, capsys, monkeypatch):
    _, gm = mlp_graph
    nid = _ids_by_layer(gm)["fc1"]
    data = [torch.randn(4, 32) for _ in range(3)]
    plain = calibrate(gm, data, [nid], progress=True)
    assert capsys.readouterr().err == ""                    # no bar in logs and pipes
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with_bar = calibrate(gm, data, [nid], progress=True)
    assert "fxopt calibrate" in capsys.readouterr().err     # a bar on a terminal
    assert with_bar == plain
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)   # import now fails
    assert calibrate(gm, data, [nid], progress=True) == with_bar


@pytest.mark.parametrize("item,expected", [
    (torch.randn(3, 31), [r"item 1, input 'x'", r"expected shape \(\*, 32\), got \(3, 31\)"]),
    (torch.randn(3, 32).double(), ["item 1, input 'x'", "float32, got torch.float64"]),
    (torch.randn(32), ["item 1, input 'x'", r"expected 2 dims.*got 1 dims"]),
    ((torch.randn(3, 32), torch.tensor([1, 0, 1])), ["item 1", "gives 2 positional",
                                                     r"\(x for x, _ in loader\)"]),
    ({"x": torch.randn(3, 32)}, ["item 1", "takes 1 positional", "keywords x"]),
    ("text", ["item 1 is a str"]),
])
def test_mismatched_items_get_clear_errors(mlp_graph, item, expected):
    _, gm = mlp_graph
    nid = _ids_by_layer(gm)["fc1"]
    with pytest.raises(CalibrationError) as info:
        calibrate(gm, [torch.randn(2, 32), item], [nid], progress=False)
    assert isinstance(info.value, FxoptError)
    for pattern in expected:
        assert re.search(pattern, str(info.value)), str(info.value)
    assert "same form as example_inputs" in str(info.value)


def test_empty_and_non_iterable_data(mlp_graph):
    _, gm = mlp_graph
    nid = _ids_by_layer(gm)["fc1"]
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(gm, [], [nid], progress=False)
    with pytest.raises(CalibrationError, match=r"wrap it in a list"):
        calibrate(gm, torch.randn(4, 32), [nid], progress=False)
    with pytest.raises(CalibrationError, match="no node has id"):
        calibrate(gm, [torch.randn(4, 32)], ["nope"], progress=False)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.proj(x) * mask.unsqueeze(-1)


@pytest.fixture(scope="module")
def kw_graph():
    torch.manual_seed(0)
    example = {"x": torch.randn(2, 5, 8), "mask": torch.ones(2, 5, dtype=torch.long)}
    model = TwoInputs().eval()
    return model, capture(model, example), example


def test_keyword_inputs(kw_graph):
    model, gm, example = kw_graph
    nid = _ids_by_layer(gm)["proj"]
    other = {"mask": torch.ones(3, 7, dtype=torch.long), "x": torch.randn(3, 7, 8)}       # another order and size
    ranges = calibrate(gm, [example, other, ModelInputs((), example)], [nid], progress=False)
    with torch.no_grad():
        ref = torch.cat([model.proj(d["x"]).flatten() for d in (example, other)])
    assert ranges[nid] == pytest.approx((ref.min().item(), ref.max().item()), abs=1e-6)
    with pytest.raises(CalibrationError, match="item 0 does not match.*lacks mask"):
        calibrate(gm, [{"x": example["x"]}], [nid], progress=False)
    with pytest.raises(CalibrationError, match=r"input 'mask'.*dim 1 has size 4.*other input has 5"):
        calibrate(gm, [{"x": example["x"], "mask": torch.ones(2, 4, dtype=torch.long)}], [nid], progress=False)
    with pytest.raises(CalibrationError, match=r"\(x for x, _ in loader\)"):
        calibrate(gm, [(example, torch.tensor([0, 1]))], [nid], progress=False)


def test_calibration_inputs_warns_without_data(mlp_graph):
    _, gm = mlp_graph
    nid = _ids_by_layer(gm)["fc1"]
    x = torch.randn(4, 32)
    said = []
    data = calibration_inputs((x,), {}, None, said.append)
    assert len(said) == 1 and isinstance(said[0], NoCalibrationWarning)
    assert "example inputs only" in str(said[0]) and "calibration_data=" in str(said[0])
    assert calibrate(gm, data, [nid], progress=False) == calibrate(gm, [x], [nid], progress=False)
    given = [x, x]
    assert calibration_inputs((x,), {}, given, said.append) is given and len(said) == 1
    with pytest.raises(CalibrationError, match="single Tensor"):
        calibration_inputs((x,), {}, x, said.append)
