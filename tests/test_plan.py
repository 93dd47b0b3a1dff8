"""The execution plan an optimized model runs on computes what its graph computes, bit for
bit, on every zoo model; it is rebuilt on load, steps aside for tracing, hooks, copies and
graph edits; and it reports per-step times (fxopt.profile)."""
import copy
import warnings

import pytest
import torch
import torch.utils._pytree as pytree

import fxopt
from fxopt.runtime.plan import Plan, plan_of
from zoo import ZOO, zoo_params


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_bitwise(a, b):
    assert type(a) is type(b)
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), (x - y).abs().max()


def both_runtimes(model, example, target="cpu-int8", **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(target=target, report_layers=False, latency_repeats=0, **options)
        return fxopt.optimize(model, example, **kw), fxopt.optimize(model, example, runtime="graph", **kw)


def _saved_bert(tmp_path):
    """The zoo BERT optimized on both runtimes, the plan one saved: (other inputs, plan, graph, path)."""
    model, example, other = ZOO["bert"]()
    fast, graph = both_runtimes(model, example)
    path = tmp_path / "bert.fxopt"
    fxopt.save(fast, path)
    return other, fast, graph, path


@pytest.mark.parametrize("name", zoo_params(fast=("mlp",)))
def test_plan_equals_graph_bit_for_bit_on_the_zoo(name):
    model, example, other = ZOO[name]()
    fast, graph = both_runtimes(model, example)
    assert plan_of(fast) is not None and plan_of(graph) is None
    with torch.no_grad():
        got_example, got_other = call(fast, example), call(fast, other)
        # the outputs depend on the inputs (else equal outputs would prove nothing)
        a, b = leaves(got_example)[0], leaves(got_other)[0]
        assert a.shape != b.shape or not torch.allclose(a, b)
        want_example, want_other = call(graph, example), call(graph, other)
        assert_bitwise(got_example, want_example)
        assert_bitwise(got_other, want_other)
        # later calls write into the planned buffers (laid out at the second call of a shape)
        for inputs, want in [(example, want_example), (other, want_other)] * 2:
            assert_bitwise(call(fast, inputs), want)
        # what a call handed back is the caller's: later calls do not write over it
        assert_bitwise(got_example, want_example)


@pytest.mark.parametrize("name", zoo_params(["mlp", "bert", "cnn_bn_residual"], fast=("mlp",)))
def test_plan_equals_graph_for_fp32_targets(name):
    model, example, other = ZOO[name]()
    fast, graph = both_runtimes(model, example, target="cpu-fp32")
    with torch.no_grad():
        assert_bitwise(call(fast, other), call(graph, other))


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


def test_static_linear_keeps_its_fused_residual():
    # a linear with a static activation scale and a fused residual add used to drop the
    # residual in the op (cosine 0.25 to eager): both paths must add it
    torch.manual_seed(0)
    model = _Residual().eval()
    x, x2 = torch.randn(16, 64), torch.randn(16, 64)
    target = fxopt.core.pipeline.target_pipeline("cpu-int8")
    target = str(target).replace("quantize_int8", "quantize_int8{activations=static}")
    fast, graph = both_runtimes(model, (x,), target=target)
    lowered = [n for n in fast.graph.nodes if "linear_int8" in str(n.target)]
    assert any(n.args[9] > 0 and len(n.args) > 13 and n.args[13] is not None for n in lowered)
    with torch.no_grad():
        want = model(x2)
        for m in (fast, graph):
            got = m(x2)
            assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
            assert (got - want).abs().max() < 0.05
        assert torch.equal(fast(x2), graph(x2))


@pytest.mark.slow
def test_load_rebuilds_the_plan(tmp_path):
    other, fast, _, path = _saved_bert(tmp_path)
    loaded, loaded_graph = fxopt.load(path), fxopt.load(path, runtime="graph")
    assert plan_of(loaded) is not None and plan_of(loaded_graph) is None
    # the same plan: the file keeps each value's dtype, so the mask's integer and bool ops
    # and the embeddings' adds stay numpy steps (in torch, with conversions, they cost a
    # loaded BERT-base about 0.2 ms a call)
    assert plan_of(loaded).source == plan_of(fast).source
    with torch.no_grad():
        assert_bitwise(call(loaded, other), call(fast, other))
        assert_bitwise(call(loaded_graph, other), call(fast, other))
    with pytest.raises(ValueError, match="runtime must be one of"):
        fxopt.load(path, runtime="fast")


@pytest.mark.parametrize("name", zoo_params(fast=("mlp", "cnn_bn_residual")))
def test_a_loaded_model_runs_the_plan_the_saved_one_ran(name, tmp_path):
    """fxopt.load rebuilds the plan from the file: the same steps, in numpy or torch alike
    (the file keeps the dtypes the plan decides by), the same answers."""
    model, example, other = ZOO[name]()
    fast, _ = both_runtimes(model, example)
    fxopt.save(fast, tmp_path / "m.fxopt")
    loaded = fxopt.load(tmp_path / "m.fxopt")
    with torch.no_grad():
        assert_bitwise(call(loaded, other), call(fast, other))
    assert plan_of(loaded).source == plan_of(fast).source


class Scaled(torch.nn.Module):
    """A float input whose first step is not a linear: its screen is a pass of its own."""
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x * 2.0)


def _poisons_bad_samples(fast, graph, shape):
    """NaN and inf in one value of a sample poison all of that sample's outputs (not only
    its row: the screen's doing); the other samples equal the graph runtime's bit for bit."""
    x = torch.randn(shape)
    n = shape[0]
    x[1].view(-1)[3], x[2].view(-1)[0], x[n - 1].view(-1)[-1] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        y, want = fast(x), graph(x)
    for bad in (1, 2, n - 1):
        assert torch.isnan(y[bad]).all() and torch.isnan(want[bad]).all()
    good = [0] + list(range(3, n - 1))
    assert torch.equal(y[good], want[good])
    clean = torch.randn(shape)
    with torch.no_grad():
        assert not torch.isnan(fast(clean)).any() and torch.equal(fast(clean), graph(clean))


def test_one_float_input_is_screened_inline_and_bad_samples_still_poisoned():
    model = Scaled().eval()
    fast, graph = both_runtimes(model, (torch.randn(4, 3, 16),))
    assert "_fx_finite_sum(" in plan_of(fast).source          # the finite sum, no screen call
    _poisons_bad_samples(fast, graph, (4, 3, 16))


@pytest.mark.parametrize("shape", [(4, 3, 16), (5, 16, 512)])    # 192 or 40960 values: apart, fused
def test_first_linear_screens_its_input_while_quantizing_it(shape):
    """A float input read first by an int8 linear is screened by the linear's own
    quantization pass (no pass of its own over a large input)."""
    from fxopt.runtime import kernel_ops
    k = shape[-1]
    model = torch.nn.Sequential(torch.nn.Linear(k, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    fast, graph = both_runtimes(model, (torch.randn(shape),))
    source = plan_of(fast).source
    assert "_fx_finite_sum(" not in source and ", _fx_f" in source, source
    assert (torch.Size(shape).numel() >= kernel_ops.SCREEN_APART) == (k == 512)
    _poisons_bad_samples(fast, graph, shape)


def test_unknown_runtime_is_an_error():
    model, example, _ = ZOO["mlp"]()
    with pytest.raises(ValueError, match="runtime must be one of plan, graph"):
        fxopt.optimize(model, example, runtime="numba", report_layers=False, latency_repeats=0)


def test_graph_edits_and_copies_run_the_graph():
    model, example, other = ZOO["mlp"]()
    fast, _ = both_runtimes(model, example)
    with torch.no_grad():
        want = call(fast, other)
        twin = copy.deepcopy(fast)
        assert plan_of(twin) is None
        assert_bitwise(call(twin, other), want)
        fast.recompile()                      # a graph edit: the plan no longer describes it
        assert plan_of(fast) is None
        assert_bitwise(call(fast, other), want)


@pytest.mark.slow
def test_inputs_a_plan_cannot_run_take_the_graph_path():
    model, example, other = ZOO["mlp"]()
    fast, graph = both_runtimes(model, example)
    x = other[0].clone().requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(fast(x), graph(x.detach()))
    # torch tools can still trace the optimized module (fake tensors take the graph path)
    exported = torch.export.export(fast, (other[0],), strict=False)
    assert any("linear_int8" in str(n.target) for n in exported.graph.nodes)


def test_forward_hooks_still_run():
    model, example, other = ZOO["mlp"]()
    fast, graph = both_runtimes(model, example)
    seen = []
    handle = fast.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        out = fast(*other)
    handle.remove()
    assert seen == [out.shape]
    with torch.no_grad():
        assert torch.equal(out, graph(*other))


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: x.double(), TypeError, "must be float32"),
    (lambda x: x[None], ValueError, "must have 2 dims"),
    (lambda x: x[:, :5], ValueError, "dim 1 must be"),
    (lambda x: x.numpy(), TypeError, r"must be a torch.Tensor .*got numpy.ndarray.*torch.from_numpy"),
    # a container: the plan's check names it; the graph runtime's input flattening (torch.export's) refuses it first
    (lambda x: [x], (TypeError, ValueError), r"must be a torch.Tensor .*got list: pass each tensor|same number and"),
    (lambda x: {"x": x}, (TypeError, ValueError), r"must be a torch.Tensor .*got dict: pass each tensor|same number"),
    (lambda x: 1.0, TypeError, r"must be a torch.Tensor .*got float"),
])
def test_bad_inputs_get_the_entry_check_message(bad, error, message):
    model, example, other = ZOO["mlp"]()
    fast, graph = both_runtimes(model, example)
    for m in (fast, graph):
        with pytest.raises(error, match=message):
            m(bad(other[0]))


def test_a_container_for_a_tensor_input_is_named_by_the_plans_check():
    model, example, other = ZOO["mlp"]()
    fast, _ = both_runtimes(model, example)
    for bad, kind in (([other[0]], "list"), ((other[0],), "tuple"), ({"x": other[0]}, "dict")):
        with pytest.raises(TypeError, match=f"input 'x' must be a torch.Tensor .*got {kind}: pass each tensor"):
            fast(bad)


@pytest.mark.slow
def test_profile_lists_every_step_and_the_time_outside():
    model, example, other = ZOO["bert"]()
    fast, _ = both_runtimes(model, example)
    with torch.no_grad():
        prof = fxopt.profile(fast, **other, repeats=3)
    plan = plan_of(fast)
    assert len(prof.rows) == len(plan.steps)
    ops = {r["op"] for r in prof.rows}
    assert {"linear_int8.default", "attention_int8.default", "layer_norm.default"} <= ops
    assert all(r["us"] >= 0 for r in prof.rows) and 0 < prof.kernel_us <= prof.steps_us
    assert prof.outside_us >= 0
    text = str(prof)
    assert "outside steps" in text and "encoder.layer.0" in text


def test_profile_sums_kernel_time_within_each_call():
    # a step's time is skewed: one slow call in three. The kernels' share of a call is their
    # sum within each call (median over calls), not the sum of each step's median
    from types import SimpleNamespace
    from fxopt.runtime.profile import Profile
    node = SimpleNamespace(meta={}, name="n")
    plan = SimpleNamespace(steps=[SimpleNamespace(node=node, op="k", kernel=True)] * 2
                           + [SimpleNamespace(node=node, op="v", kernel=False)])
    runs = [[1e-6, 1e-6, 1e-6], [1e-6, 5e-6, 1e-6], [5e-6, 1e-6, 1e-6]]
    prof = Profile(plan, runs, [("", "")] * 3, timed_call=10e-6, call=8e-6)
    assert [r["us"] for r in prof.rows] == pytest.approx([1, 1, 1])
    assert prof.kernel_us == pytest.approx(6) and prof.steps_us == pytest.approx(7)
    assert prof.outside_us == pytest.approx(1) and prof.outside_kernels_pct == pytest.approx(25)


def test_profile_of_a_graph_runtime_model_builds_a_plan():
    model, example, other = ZOO["mlp"]()
    _, graph = both_runtimes(model, example)
    with torch.no_grad():
        prof = fxopt.profile(graph, *other, repeats=2)
    assert any(r["kernel"] for r in prof.rows)


def test_profile_takes_about_two_seconds_of_calls_by_default(monkeypatch):
    """Its time outside the kernels is a small difference of two medians: many calls of a
    fast model (at most PROFILE_REPEATS[1]), and never fewer than PROFILE_REPEATS[0]."""
    from fxopt.runtime import plan as plan_module
    model, example, other = ZOO["mlp"]()
    fast, _ = both_runtimes(model, example)
    with torch.no_grad():
        assert fxopt.profile(fast, *other).repeats == plan_module.PROFILE_REPEATS[1]    # a call of us
        assert fxopt.profile(fast, *other, repeats=3).repeats == 3
        monkeypatch.setattr(plan_module, "PROFILE_SECONDS", 1e-9)
        assert fxopt.profile(fast, *other).repeats == plan_module.PROFILE_REPEATS[0]


@pytest.mark.slow
def test_plan_source_is_names_and_calls_only():
    # the generated function holds no values from the graph: constants are bound by name
    model, example, _ = ZOO["bert"]()
    fast, _ = both_runtimes(model, example)
    source = plan_of(fast).source
    assert "'" not in source and '"' not in source
    assert isinstance(plan_of(fast), Plan)


def test_planned_buffers_are_reused_and_never_overlap_while_live():
    import random
    from fxopt.runtime.memory import place
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        sizes = [rng.choice([0, 64, 128, 640, 4096]) for _ in range(n)]
        intervals = []
        for _ in range(n):
            first = rng.randint(0, 20)
            intervals.append((first, first + rng.randint(0, 6)))
        offsets = place(sizes, intervals)
        for i in range(n):
            for j in range(i + 1, n):
                live = intervals[i][0] <= intervals[j][1] and intervals[j][0] <= intervals[i][1]
                apart = offsets[i] + sizes[i] <= offsets[j] or offsets[j] + sizes[j] <= offsets[i]
                assert not live or apart or not sizes[i] or not sizes[j]
    # buffers that are never live together share memory
    assert place([4096, 4096, 4096], [(0, 1), (2, 3), (4, 5)]) == [0, 0, 0]


@pytest.mark.slow
def test_memory_plan_holds_less_than_every_output_and_threads_get_their_own():
    from concurrent.futures import ThreadPoolExecutor
    model, example, other = ZOO["bert"]()
    fast, graph = both_runtimes(model, example)
    memory = plan_of(fast).memory
    assert memory is not None and len(memory.intervals) >= 8
    with torch.no_grad():
        for _ in range(3):
            call(fast, other)
    assert 0 < memory.nbytes()
    # the arena is smaller than all the planned outputs laid end to end
    sizes = [b.nbytes for m in memory._local.arenas.values() for b in m.buffers if b is not None]
    assert memory.nbytes() < sum(sizes)
    inputs = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        batch = dict(other)
        batch["input_ids"] = torch.randint(0, 99, other["input_ids"].shape, generator=g)
        inputs.append(batch)
    with torch.no_grad():
        want = [call(graph, x) for x in inputs]

        def work(t):
            return all(torch.equal(leaves(call(fast, inputs[(t + i) % 4]))[0], leaves(want[(t + i) % 4])[0])
                       for i in range(12))
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(4)))


@pytest.mark.slow
def test_values_of_the_input_shapes_alone_are_computed_once_per_shapes():
    # BERT builds its position ids and attention mask with arange, new_ones and comparisons
    # on the input's sizes: the plan computes those once per input shapes, while the mask's
    # values still come from each call's attention_mask
    model, example, other = ZOO["bert"]()
    fast, graph = both_runtimes(model, example)
    shaped = plan_of(fast).shape_values
    assert torch.ops.aten.arange.default in {n.target for n in shaped.cached}
    assert not any(s.node in shaped.cached for s in plan_of(fast).steps)
    padded = dict(example, attention_mask=example["attention_mask"].clone())
    padded["attention_mask"][1, 3:] = 0             # same shapes, other mask values
    with torch.no_grad():
        got, got_padded = fast(**example), fast(**padded)
        assert not torch.allclose(got.logits, got_padded.logits)      # the mask counts
        assert_bitwise(got, graph(**example))
        assert_bitwise(got_padded, graph(**padded))
        assert len(shaped.values) == 1
        assert_bitwise(fast(**other), graph(**other))
        assert len(shaped.values) == 2
        assert_bitwise(fast(**padded), graph(**padded))


class _Positions(torch.nn.Module):
    """Returns a value made from its input's shape alone (positions), and one derived from it."""
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        pos = torch.arange(x.shape[1])
        return self.lin(x) + pos[:, None].float(), pos[None], pos.float().sum()


def test_shape_values_handed_to_the_caller_are_fresh_each_call():
    torch.manual_seed(0)
    x, other = torch.randn(2, 6, 16), torch.randn(3, 9, 16)
    fast, graph = both_runtimes(_Positions().eval(), (x,))
    with torch.no_grad():
        for inputs in (x, other, x):
            got = fast(inputs)
            assert_bitwise(got, graph(inputs))
            got[1].add_(100)            # the caller's to change: the next call is not affected
            got[2].add_(100)


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x, x_np):
        return self.lin(x) + x_np


def test_names_the_plan_makes_never_shadow_the_inputs():
    # converting x to numpy must not write over an input called x_np
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    x, other = torch.randn(4, 16), torch.randn(4, 16) * 100
    fast, graph = both_runtimes(model, (x, other))
    with torch.no_grad():
        got = fast(x, other)
        assert torch.equal(got, graph(x, other))
        assert (got - model(x, other)).abs().max() < 0.5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_screen_agrees_with_numpy(dtype):
    import numpy as np
    from fxopt.kernels import api as K
    rng = np.random.default_rng(0)
    for trial in range(200):
        x = rng.standard_normal((rng.integers(0, 5), rng.integers(1, 70))).astype(dtype)
        x *= 10.0 ** rng.integers(-30, 38)          # huge finite values must not look like inf
        if x.size and trial % 2:
            x.flat[rng.integers(0, x.size)] = rng.choice([np.nan, np.inf, -np.inf])
        view = x.T if trial % 3 == 0 else x           # strided views too
        assert K.all_finite(view) == bool(np.isfinite(view).all())


@pytest.mark.slow
def test_dims_beyond_the_captured_limit_are_refused(tmp_path):
    # the zoo BERT has 64 positions: export bounds the sequence dim at 64, and a longer
    # input is an error naming the limit on every path, not a broadcast error inside
    other, fast, graph, path = _saved_bert(tmp_path)
    longer = {k: torch.cat([v] * 12, dim=1)[:, :80] for k, v in other.items()}
    at_limit = {k: torch.cat([v] * 12, dim=1)[:, :64] for k, v in other.items()}
    for m in (fast, graph, fxopt.load(path)):
        with pytest.raises(ValueError, match="dim 1 is 80, but the model takes at most 64"):
            call(m, longer)
        with torch.no_grad():
            assert leaves(call(m, at_limit))[0].shape[0] == 3


def test_a_corrupt_size_limit_in_a_file_is_refused():
    from fxopt.core.errors import ArtifactError
    from fxopt.runtime.input_check import install
    model, example, _ = ZOO["mlp"]()
    fast, _ = both_runtimes(model, example)
    for bad in ([-1, None], ["64", None], [1, 2, 3], "64"):
        with pytest.raises(ArtifactError, match="corrupt input spec"):
            install(fast, [{"name": "x", "shape": ["s0", 32], "dtype": "float32", "max": bad}])


def test_generated_input_check_agrees_with_the_rule_loop():
    """The plan's generated check refuses exactly what the loop over the rules refuses, with
    the same message (the loop, InputCheck.check, is the reference)."""
    from fxopt.runtime.input_check import InputCheck
    check = InputCheck([{"name": "ids", "shape": ["b", "s"], "dtype": "int64", "max": [None, 16]},
                        None,
                        {"name": "mask", "shape": ["b", "s"], "dtype": "int64"},
                        {"name": "x", "shape": ["b", 3], "dtype": "float32"}])
    fast = check.fast_check()
    i64 = lambda *s: torch.zeros(s, dtype=torch.long)   # noqa: E731
    f32 = lambda *s: torch.zeros(s)                      # noqa: E731
    cases = [(i64(2, 8), 7, i64(2, 8), f32(2, 3)),        # good
             (i64(2, 8), None, i64(2, 9), f32(2, 3)),     # a shared size differs
             (i64(2, 8), None, i64(2, 8), f32(3, 3)),     # the batch differs on the last input
             (i64(2, 17), None, i64(2, 17), f32(2, 3)),   # over the limit
             (i64(2, 8), None, i64(2, 8), f32(2, 4)),     # a fixed size
             (i64(2, 8), None, i64(2, 8), f32(2, 3, 1)),  # rank
             (f32(2, 8), None, i64(2, 8), f32(2, 3)),     # dtype
             (i64(2, 8), None, i64(2, 8), 1.0)]           # not a tensor: the loop refuses it
    outcomes = []
    for args in cases:
        results = []
        for fn in (check.check, fast):
            try:
                results.append(("ok", fn(*args)))
            except (TypeError, ValueError) as e:
                results.append((type(e).__name__, str(e)))
        assert results[0] == results[1], (args, results)
        outcomes.append(results[0][0])
    assert outcomes == ["ok", "ValueError", "ValueError", "ValueError", "ValueError", "ValueError",
                        "TypeError", "TypeError"]
