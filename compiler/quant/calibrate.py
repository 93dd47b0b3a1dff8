"""Calibration: stream inputs through a captured graph and observe chosen values.

Each item of `data` is one call's inputs, in the form of the example inputs
the model was captured with: a tuple of positional args, a dict of keyword
args, a single tensor, or a `ModelInputs(args, kwargs)`. Items are model
inputs only: for a loader of (inputs, labels) pairs pass
`(x for x, _ in loader)`. Nothing but the observers' O(bins) state is kept
between items, whatever the number of samples.

    ranges = calibrate(gm, loader, ["n12", "n15"], observer="percentile", percentile=99.99)
    ranges["n12"]                                    # (lo, hi) floats
    absmax = observe_input_channels(gm, loader, ["n12"])
    absmax["n12"]                                    # tensor [in_features] (SmoothQuant)

`data` is iterated once per call: pass a list or a DataLoader, not a
generator, when calibration runs more than once.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx._pytree as fx_pytree
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from fxopt.core.errors import CalibrationError, NoCalibrationWarning
from fxopt.quant.observers import AbsMaxPerChannelObserver, Observer, make_observer

__all__ = ["ModelInputs", "calibrate", "observe_input_channels", "observe",
           "calibration_inputs", "check_item"]

ID = "fxopt_id"
WHAT_TO_DO = ("Give calibration items in the same form as example_inputs (a tuple of positional "
              "args, a dict of keyword args, or a single tensor), with the same dtypes and the "
              "same sizes except for the batch, sequence and image height/width dims.")


@dataclass(frozen=True)
class ModelInputs:
    """One call's inputs, model(*args, **kwargs): the item form for mixed args and kwargs."""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


# ------------------------------------------------------------------- entry points

def calibrate(gm: GraphModule, data, node_ids, observer: str = "minmax", progress: bool = True,
              **kw) -> dict:
    """Range (lo, hi) of the value of each node in `node_ids`, observed over every item of `data`.

    `observer` names one of fxopt.quant.observers.OBSERVERS; `kw` are its options.

        calibrate(gm, [x1, x2], ["n7"], observer="mse", symmetric=True)   # {"n7": (lo, hi)}
    """
    observers = {nid: make_observer(observer, **kw) for nid in node_ids}
    observe(gm, data, outputs=observers, progress=progress)
    return {nid: _range_of(gm, nid, obs) for nid, obs in observers.items()}


def observe_input_channels(gm: GraphModule, data, node_ids, axis: int = -1,
                           progress: bool = True) -> dict:
    """Per-channel max |x| of the activation input (args[0]) of each node, e.g. a linear's
    input features for SmoothQuant.

        observe_input_channels(gm, loader, ["n12"])      # {"n12": tensor [in_features]}
    """
    observers = {nid: AbsMaxPerChannelObserver(axis) for nid in node_ids}
    observe(gm, data, inputs=observers, progress=progress)
    return {nid: _range_of(gm, nid, obs)[1] for nid, obs in observers.items()}


def observe(gm: GraphModule, data, outputs: dict | None = None, inputs: dict | None = None,
            progress: bool = True) -> int:
    """Stream `data` through gm once, feeding observers; return the number of items.

    outputs: {node_id: Observer} fed with the node's value;
    inputs:  {node_id: Observer} fed with the value of the node's first argument.
    Both kinds can be fed in one pass over the data.

        obs = {"n7": make_observer("minmax")}
        observe(gm, loader, outputs=obs); obs["n7"].range()
    """
    _check_iterable(data)
    taps = _taps(gm, outputs or {}, inputs or {})
    expected = _Expected(gm)
    runner = _Tap(gm, taps)
    count = rows = 0
    with _progress(data, progress) as bar, torch.no_grad():
        for count, item in enumerate(data, start=1):
            flat = check_item(expected, item, count - 1)
            try:
                runner.run(*flat)
            except CalibrationError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the model on this item
                raise _model_failed(expected, flat, count - 1, e) from e
            bar.update(1)
            rows += _rows(flat)
            bar.set_postfix(samples=rows, refresh=False)
    if count == 0:
        raise CalibrationError("calibration_data is empty: it yielded no item. Give at least one "
                               "input batch; if it is a generator, an earlier pass may have used "
                               "it up: pass a list or a DataLoader, which can be iterated again.")
    return count


NONFINITE = ("error", "skip")    # a batch holding NaN: stop with an error, or leave it out
OUTLIERS = ("drop", "keep")     # a batch whose |x| is OUTLIER_FACTOR x the others': leave it out, or keep it
OUTLIER_FACTOR = 10.0     # normal data: batches' peaks agree within ~1-3x (digits: 1.0)


def calibration_inputs(example_args: tuple, example_kwargs: dict, calibration_data, warn,
                       nonfinite: str = "error", outliers: str = "drop"):
    """The data to calibrate on: `calibration_data`, or else the example inputs with a warning.

    Batches are screened first (one pass over the inputs, no model run): a batch whose
    float inputs hold NaN raises CalibrationError naming it (nonfinite="skip":
    left out, with a warning); a batch whose largest |x| is OUTLIER_FACTOR times the
    median batch's is left out with a warning naming it (outliers="keep" keeps it), so one
    corrupt batch cannot stretch every static range. Without data, warn() is given a
    NoCalibrationWarning (its own category, so the CLI can name --calib instead).

        data = calibration_inputs(ctx.example_args, ctx.example_kwargs,
                                  ctx.state.get("calibration_data"), ctx.warn)
    """
    if nonfinite not in NONFINITE or outliers not in OUTLIERS:
        raise CalibrationError(f"calibration_nonfinite must be one of {NONFINITE} and calibration_outliers "
                               f"one of {OUTLIERS}; got {nonfinite!r} and {outliers!r}")
    if calibration_data is None:
        warn(NoCalibrationWarning(
            "fxopt: no calibration_data was given, so static activation ranges were calibrated "
            "on the example inputs only; real inputs outside those ranges will be clipped. Pass "
            "calibration_data= (an iterable of inputs like example_inputs, e.g. a list of "
            "batches or (x for x, _ in loader))."))
        return [ModelInputs(tuple(example_args), dict(example_kwargs))]
    _check_iterable(calibration_data)
    skip = _screen(calibration_data, nonfinite, outliers, warn)
    return _Without(calibration_data, skip) if skip else calibration_data


class _Without:
    """`data` without the items at indices `skip`; iterable again as often as `data` is."""

    def __init__(self, data, skip: set):
        self.data, self.skip = data, skip

    def __iter__(self):
        return (item for i, item in enumerate(self.data) if i not in self.skip)


def _screen(data, nonfinite: str, outliers: str, warn) -> set:
    """Indices of the batches to leave out (see calibration_inputs)."""
    skip, peaks = set(), {}
    for index, item in enumerate(data):
        peak = 0.0
        for name, t in _named_tensors(item):
            if not (t.is_floating_point() and t.numel()):
                continue
            # NaN only: -inf is what additive attention masks hold, and observers skip +-inf
            bad = int(torch.isnan(t).sum())
            if bad and nonfinite == "error":
                raise CalibrationError(
                    f"calibration batch {index}, input {name}: {bad} of its {t.numel()} values are NaN, "
                    "which would make every range it reaches meaningless. Clean or drop that batch, "
                    "or pass calibration_nonfinite='skip' to leave such batches out.")
            if bad:
                warnings.warn(f"fxopt: calibration batch {index} left out: input {name} holds {bad} NaN "
                              "values (calibration_nonfinite='skip').", stacklevel=6)
                skip.add(index)
                break
            finite = t[torch.isfinite(t)]
            peak = max(peak, float(finite.abs().max()) if finite.numel() else 0.0)
        if index not in skip:
            peaks[index] = peak
    typical = sorted(peaks.values())[len(peaks) // 2] if len(peaks) >= 3 else 0.0
    for index, peak in peaks.items():
        if typical > 0 and peak > OUTLIER_FACTOR * typical:
            kept = "kept (calibration_outliers='keep')" if outliers == "keep" else \
                "left out (calibration_outliers='keep' keeps it)"
            warnings.warn(f"fxopt: calibration batch {index} reaches |x| = {peak:.3g}, {peak / typical:.3g} "
                          f"times the median batch's {typical:.3g}: {kept}. Check that batch.", stacklevel=6)
            if outliers == "drop":
                skip.add(index)
    return skip


def _named_tensors(item):
    """(name, tensor) of a calibration item's inputs: keyword names, positions for the rest."""
    if isinstance(item, ModelInputs):
        args, kwargs = item.args, item.kwargs
    elif isinstance(item, dict):
        args, kwargs = (), item
    else:
        args, kwargs = (item if isinstance(item, (tuple, list)) else (item,)), {}
    named = [(f"#{i}", a) for i, a in enumerate(args)] + [(f"'{k}'", v) for k, v in kwargs.items()]
    return [(name, t) for name, t in named if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------- running

class _Tap(Interpreter):
    """Runs gm node by node, handing chosen values to observers (values are then dropped)."""

    def __init__(self, gm: GraphModule, taps: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.taps = taps

    def run_node(self, n: Node):
        out = super().run_node(n)
        for nid, obs in self.taps.get(n, ()):
            if not isinstance(out, torch.Tensor):
                raise CalibrationError(f"node {nid} ({n.name}) yields a {type(out).__name__}, not a "
                                       "tensor; only tensor values can be calibrated.")
            obs.update(out)
        return out


def _taps(gm: GraphModule, outputs: dict, inputs: dict) -> dict:
    """{node whose value to observe: [(requested id, observer), ...]}."""
    by_id = {n.meta.get(ID): n for n in gm.graph.nodes if ID in n.meta}
    unknown = [nid for nid in list(outputs) + list(inputs) if nid not in by_id]
    if unknown:
        raise CalibrationError(f"calibrate: no node has id(s) {', '.join(map(str, unknown[:8]))} "
                               f"(ids are node.meta['{ID}'], e.g. {', '.join(list(by_id)[:3])}); "
                               "pass ids of nodes of this graph.")
    taps: dict = {}
    for nid, obs in outputs.items():
        _check_observer(nid, obs)
        taps.setdefault(by_id[nid], []).append((nid, obs))
    for nid, obs in inputs.items():
        _check_observer(nid, obs)
        node = by_id[nid]
        if not node.args or not isinstance(node.args[0], Node):
            raise CalibrationError(f"calibrate: node {nid} ({node.name}) has no graph value as its "
                                   "first argument, so its input cannot be observed.")
        taps.setdefault(node.args[0], []).append((nid, obs))
    return taps


def _check_observer(nid, obs) -> None:
    if not isinstance(obs, Observer):
        raise CalibrationError(f"calibrate: the observer for node {nid} is a {type(obs).__name__}; "
                               "give an fxopt.quant.observers.Observer, e.g. make_observer('minmax').")


def _range_of(gm: GraphModule, nid, obs: Observer):
    try:
        return obs.range()
    except CalibrationError as e:
        node = next(n for n in gm.graph.nodes if n.meta.get(ID) == nid)
        layer = node.meta.get("fxopt_layer", node.name)
        raise CalibrationError(f"node {nid} ({node.name}, layer {layer}): {e} Its values were all "
                               "NaN/inf or empty on the calibration data.") from e


def _check_iterable(data) -> None:
    if isinstance(data, (torch.Tensor, dict, ModelInputs)):
        raise CalibrationError(
            f"calibration_data is a single {type(data).__name__}, but it must be an iterable of "
            "inputs (one item per model call): wrap it in a list, e.g. calibration_data=[x].")
    try:
        iter(data)
    except TypeError:
        raise CalibrationError(f"calibration_data must be an iterable of model inputs (a list, a "
                               f"DataLoader, a generator), got {type(data).__name__}.") from None


def _rows(flat: list) -> int:
    """Samples in one item: the batch size of its first tensor input."""
    first = next((x for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return first.shape[0] if first is not None else 1


class _NoBar:
    """Stand-in when tqdm is missing or the progress bar is off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass


def _progress(data, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience: calibrate runs the same without it
        return _NoBar()
    total = len(data) if hasattr(data, "__len__") else None
    # disable=None: a bar on a terminal, nothing in logs and pipes
    return tqdm(total=total, desc="fxopt calibrate", unit="batch", leave=False, disable=None)


# ------------------------------------------------------------- input checks

class _Expected:
    """What a call of gm takes: the input tree, and each flat input's name and example value."""

    def __init__(self, gm: GraphModule):
        self.spec = gm.graph._codegen.pytree_info.in_spec
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        names = gm.meta.get("fxopt_capture", {}).get("input_names")
        self.names = names if names and len(names) == len(placeholders) else [n.name for n in placeholders]
        self.vals = [n.meta.get("val") for n in placeholders]
        args_spec, kwargs_spec = (self.spec.children() if hasattr(self.spec, "children")
                                  else self.spec.children_specs)
        self.n_args = args_spec.num_children
        self.keys = list(kwargs_spec.context)

    def describe(self) -> str:
        parts = []
        if self.n_args:
            parts.append(f"{self.n_args} positional input(s)")
        if self.keys:
            parts.append(f"keyword inputs {', '.join(self.keys)}")
        return " and ".join(parts) or "no inputs"


def check_item(expected: _Expected, item, index: int) -> list:
    """The graph's flat inputs for one calibration item; CalibrationError if it does not fit.

    The error says which item, which input, what was expected and what came instead.
    """
    args, kwargs = _as_call(item, index)
    problem = _structure_problem(expected, args, kwargs)
    if problem:
        hint = _pair_hint(expected, item)
        raise CalibrationError(f"calibration item {index} does not match the model's inputs: "
                               f"{problem}.{hint}\n{WHAT_TO_DO}")
    flat = fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), expected.spec)
    sizes: dict = {}
    for name, want, got in zip(expected.names, expected.vals, flat):
        problem = _leaf_problem(want, got, sizes)
        if problem:
            raise CalibrationError(f"calibration item {index}, input '{name}': {problem}.\n{WHAT_TO_DO}")
    return flat


def _model_failed(expected: _Expected, flat: list, index: int, exc: Exception) -> CalibrationError:
    """The error for an item that passed the checks but made the model fail."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    batches = {name: x.shape[0] for name, x in zip(expected.names, flat)
               if isinstance(x, torch.Tensor) and x.dim() > 0}
    hint = ""
    if len(set(batches.values())) > 1:
        hint = (" Its inputs disagree on dim 0 (batch): "
                + ", ".join(f"{name} {size}" for name, size in batches.items()) + ".")
    return CalibrationError(f"calibration item {index}: the model failed on it: "
                            f"{type(exc).__name__}: {first_line}.{hint}\n{WHAT_TO_DO}")


def _as_call(item, index: int) -> tuple:
    if isinstance(item, ModelInputs):
        return tuple(item.args), dict(item.kwargs)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), item
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"calibration item {index} is a {type(item).__name__}; each item must be "
                           f"one call's inputs.\n{WHAT_TO_DO}")


def _structure_problem(expected: _Expected, args: tuple, kwargs: dict) -> str | None:
    if len(args) != expected.n_args:
        return (f"the model takes {expected.describe()}, the item gives {len(args)} positional "
                f"value(s)" + (f" and keywords {', '.join(map(str, kwargs))}" if kwargs else ""))
    missing = [k for k in expected.keys if k not in kwargs]
    extra = [str(k) for k in kwargs if k not in expected.keys]
    if missing or extra:
        wrong = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                ([f"has unexpected {', '.join(extra)}"] if extra else [])
        return f"the model takes {expected.describe()}; the item {' and '.join(wrong)}"
    try:
        flat = fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), expected.spec)
    except Exception as e:  # noqa: BLE001 - nested containers of another shape
        return f"its nested structure differs from the example's ({type(e).__name__}: {e})"
    if len(flat) != len(expected.vals):
        return f"it holds {len(flat)} values where the model takes {len(expected.vals)}"
    return None


def _pair_hint(expected: _Expected, item) -> str:
    """A hint when the item looks like an (inputs, labels) pair from a DataLoader."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return ""
    try:
        inner_args, inner_kwargs = _as_call(item[0], 0)
    except CalibrationError:
        return ""
    if _structure_problem(expected, inner_args, inner_kwargs) is None:
        return (" It looks like an (inputs, labels) pair: pass only the inputs, e.g. "
                "calibration_data=(x for x, _ in loader) or [x for x, _ in loader].")
    return ""


def _leaf_problem(want, got, sizes: dict) -> str | None:
    """What is wrong with one flat input, or None. `sizes` maps dynamic dims seen so far to sizes."""
    if not isinstance(want, torch.Tensor):
        if want is not None and not isinstance(got, torch.Tensor) and got != want:
            return f"expected {want!r} (fixed at capture), got {got!r}"
        return None
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor of shape {_shape_text(want)}, got a {type(got).__name__}"
    if got.dtype != want.dtype:
        return f"expected dtype {want.dtype}, got {got.dtype} (convert with .to({want.dtype}))"
    if got.dim() != want.dim():
        return (f"expected {want.dim()} dims, shape {_shape_text(want)}, got {got.dim()} dims, "
                f"shape {tuple(got.shape)}")
    for axis, (w, g) in enumerate(zip(want.shape, got.shape)):
        if is_concrete_int(w):
            if int(w) != g:
                return (f"expected shape {_shape_text(want)}, got {tuple(got.shape)}: dim {axis} "
                        f"must be {int(w)} (only * dims may vary)")
        elif sizes.setdefault(str(w), g) != g:
            return (f"dim {axis} has size {g}, but another input has {sizes[str(w)]} in the same "
                    f"dynamic dim ({w}); inputs of one call must agree on it")
    return None


def _shape_text(val: torch.Tensor) -> str:
    dims = [str(int(d)) if is_concrete_int(d) else "*" for d in val.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
