"""Mixed precision chosen by the accuracy-budgeted search (fxopt.search.budget, .precision).

The search runs on the digits MLP trained here; eval_fn scores a validation split carved
from the training images, and the chosen model is checked again on the held-out test
split. Cost is search_cost="macs" (int4 0.5, int8 1, fp32 2 per MAC): deterministic, so no
assertion depends on timing.
"""
import copy
import warnings

import pytest
import torch

import fxopt
from fxopt.core.ir import LAYER
from fxopt.core.pipeline import target_pipeline
from fxopt.examples import DigitsMLP, accuracy, train
from fxopt.runtime import kernel_ops
from fxopt.search import precision
from fxopt.search.precision import Config, assignment, build_pipeline, candidates, explain, make_config, mix_label
from fxopt.search.sensitivity import precision_latency

TEST_SLACK = 0.02     # as tests/test_budget.py: 450 test images, one image = 0.22 points
EPS = 0.005


@pytest.fixture(scope="module")
def data(search_data):
    return search_data


@pytest.fixture(scope="module")
def mlp(data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = train(DigitsMLP(), data["fit"], epochs=10)
    torch.set_num_threads(threads)
    return model


def _op_precision(gm, layer: str) -> str:
    """The precision the lowered graph really runs `layer` at, from its op."""
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(LAYER) == layer}
    if kernel_ops.linear_int4 in ops:
        return "int4"
    if kernel_ops.linear_bf16 in ops:
        return "bf16"
    if ops & {kernel_ops.linear_int8, kernel_ops.linear_int8_sparse}:
        return "int8"
    assert ops and not ops & set(kernel_ops.LINEARS), ops
    return "fp32"


def _with_outlier(mlp, data):
    """A copy of the MLP with an input column of net.4 whose neuron is dead on the training data
    times 1000: the fp32 model does not change, but every row's int8 or int4 scale grows ~1000x
    and rounds the rest of the row away."""
    model = copy.deepcopy(mlp)
    with torch.no_grad():
        hidden = torch.relu(model.net[1](data["fit"].x_train.flatten(1))).mean(0)
        model.net[4].weight[:, int(hidden.argmin())] *= 1000
    return model


def _search(model, data, precisions, max_evals):
    """The budget search over `precisions` (MAC cost, no pruning), validated on data["val"]."""
    xv, yv = data["val"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxopt.optimize(model, data["example"], "cpu-int8", calibration_data=data["calib"],
                              eval_fn=lambda m: accuracy(m, xv, yv), max_accuracy_drop=EPS,
                              search_precisions=precisions, search_cost="macs", search_prune=(),
                              max_evals=max_evals, latency_repeats=0, int4_rounding="nearest")


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_search_over_int4_int8_fp32_meets_the_budget_with_a_mix(mlp, data):
    model = _with_outlier(mlp, data)     # net.4 must climb int4 -> int8 -> fp32
    xv, yv = data["val"]
    base_val, base_test = accuracy(model, xv, yv), accuracy(model, *data["test"])
    # max_evals=16 leaves room for each layer alone at int4 and int8 (the others fp32): the
    # measured drops order the layers (the SQNR proxy blames net.6 for net.4's error).
    fast = _search(model, data, ("int4", "int8", "fp32"), max_evals=16)
    s = fast.fxopt_report.search
    evals, chosen = s["evaluations"], s["evaluations"][s["chosen"]]
    got_val, got_test = accuracy(fast, xv, yv), accuracy(fast, *data["test"])
    print(f"chosen {chosen['label']} ({chosen['mix']}): val {got_val:.4f} (fp32 {base_val:.4f}) "
          f"test {got_test:.4f} (fp32 {base_test:.4f})")
    assert s["met"] and got_val == pytest.approx(chosen["metric"]) and got_val >= base_val - EPS - 1e-6
    assert got_test >= base_test - EPS - TEST_SLACK
    layers = {r["layer"]: r for r in s["layers"]}
    want = {"net.1": "int4", "net.4": "fp32", "net.6": "int4"}
    assert {name: r["precision"] for name, r in layers.items()} == want
    # the returned model runs each layer at the chosen precision (its lowered op), as its report says
    assert {name: _op_precision(fast, name) for name in want} == want
    assert {r["layer"]: r["precision"] for r in fast.fxopt_report.layers} == want
    # net.4 climbed the whole ladder: all-int4 missed, net.4 at int8 missed, at fp32 it met
    by_label = {e["label"]: e for e in evals}
    assert not by_label["prune=0 fp32=[-] int4=[net.1,net.4,net.6]"]["meets"]
    assert not by_label["prune=0 fp32=[-] int4=[net.1,net.6]"]["meets"]       # net.4 int8
    assert layers["net.4"]["why"].startswith("accuracy") and layers["net.4"]["ladder"] == ["int4", "int8", "fp32"]
    assert layers["net.1"]["why"] == "int4 within budget"
    assert layers["net.4"]["alone_drop"]["int4"] > EPS and layers["net.4"]["alone_drop"]["int8"] > EPS
    # plain int8 (evaluations[0]) misses the budget; the chosen mix is the cheapest that meets it
    # (MAC weights), and every evaluation lists its mix
    assert evals[0]["mix"] == "int8 3" and not evals[0]["meets"]
    assert chosen["mix"] == "int4 2, fp32 1" == s["chosen_mix"]
    assert chosen["cost"] == min(e["cost"] for e in evals if e["meets"])
    assert all(e["mix"] == mix_label(e["precisions"].values()) for e in evals)
    text = fast.fxopt_report.sections["search"]
    assert "int4 2, fp32 1" in text and "int4 dB" in text
    assert s["chosen"] in s["pareto"]
    # each layer's op timed at the precision it runs at in this model (no timing assertion)
    times = precision_latency([(fast, want)], data["example"], {}, repeats=2)
    assert {name: sorted(t) for name, t in times.items()} == {name: [p] for name, p in want.items()}
    assert all(t > 0 for per in times.values() for t in per.values())


def test_pipeline_of_a_mix():
    base = target_pipeline("cpu-int8")
    cfg = Config(fp32=("c",), other=(("a", "int4"),))
    text = str(build_pipeline(base, cfg, ["a", "b", "c"]))
    assert "quantize_int4{skip=('b', 'c')},quantize_int8{per_layer={'c': 'fp32'}}" in text
    # bf16 after int4, and the bf16 layers are left to it by quantize_int8 too
    cfg = Config(other=(("a", "int4"), ("b", "bf16")))
    text = str(build_pipeline(base, cfg, ["a", "b", "c"]))
    assert ("quantize_int4{skip=('b', 'c')},quantize_bf16{skip=('a', 'c')},"
            "quantize_int8{per_layer={'b': 'fp32'}}") in text
    # int8/fp32 only: exactly the pipeline the int8/fp32 search always built
    assert str(build_pipeline(base, Config(fp32=("c",)), ["a", "b", "c"])) == \
        str(base).replace("quantize_int8", "quantize_int8{per_layer={'c': 'fp32'}}")
    # cpu-int4 keeps its own pass and options; a layer set to int8 or fp32 is skipped by it
    int4 = target_pipeline("cpu-int4")
    text = str(build_pipeline(int4, Config(fp32=("c",), other=(("b", "int8"),)), ["a", "b", "c"]))
    assert "quantize_int4{skip=('b', 'c')},quantize_int8{per_layer={'c': 'fp32'}}" in text
    assert text.count("quantize_int4") == 1
    default = {"a": "int8", "b": "int8", "c": "int8"}
    cfg = make_config({"a": "int4", "b": "int8", "c": "fp32"}, default, 0.3, True)
    assert cfg == Config(("c",), 0.3, True, (("a", "int4"),))
    assert cfg.label == "prune=0.3 fp32=[c] int4=[a] +finetune"
    assert assignment(cfg, default) == {"a": "int4", "b": "int8", "c": "fp32"}
    assert mix_label(["fp32", "int8", "int4", "int8"]) == "int4 1, int8 2, fp32 1"


def test_ladder_drops_a_precision_that_is_not_faster():
    kept, dropped = candidates(["fp32", "int4", "int8"], {"int4": 3e-3, "int8": 1e-3, "fp32": 2e-3}, 0.1)
    assert kept == ["int8", "fp32"] and dropped == {"int4": "int4 not faster here (3.000 ms vs 1.000 ms int8)"}
    # within the margin the lower precision stays (the smaller model)
    assert candidates(["int4", "int8", "fp32"], {"int4": 1.05e-3, "int8": 1e-3, "fp32": 2e-3}, 0.1)[0] == \
        ["int4", "int8", "fp32"]
    assert candidates(["int8", "fp32"], {}, 0.1) == (["int8", "fp32"], {})
    # the report's why: raised by the greedy for accuracy, on its fastest rung, or neither (the
    # chosen configuration was not a greedy result, e.g. a layer-alone evaluation)
    assert explain("int8", ["int4", "int8", "fp32"], {}, True) == "accuracy: int8, not int4, to meet the budget"
    assert explain("int4", ["int4", "fp32"], dropped, False) == f"int4 within budget; {dropped['int4']}"
    assert explain("fp32", ["int8", "fp32"], {}, None).startswith("fp32 as in the chosen configuration")


def test_bad_search_precisions(monkeypatch):
    def run(target="cpu-int8", **options):   # each error comes before any compile or evaluation
        return fxopt.optimize(DigitsMLP(), (torch.rand(4, 1, 8, 8),), target, eval_fn=lambda m: 0.0,
                              latency_repeats=0, **options)
    with pytest.raises(ValueError, match=r"unknown precision 'int3'.*'int4', 'int8', 'bf16', 'fp32'"):
        run(search_precisions=("int3", "int8"))
    with pytest.raises(ValueError, match=r"search_precisions='int8'; give a tuple"):
        run(search_precisions="int8")
    with pytest.raises(ValueError, match=r"give a tuple"):
        run(search_precisions=())
    with pytest.raises(ValueError, match=r"'int4' cannot be built on this target's pipeline.*no quantize_int8"):
        run("cpu-fp32", search_precisions=("int4", "fp32"))
    # bf16 before its pass exists: the error names the missing pass
    monkeypatch.setattr(precision, "pass_names", lambda: ["quantize_int4", "quantize_int8"])
    with pytest.raises(ValueError, match=r"'bf16' needs the pass quantize_bf16"):
        run(search_precisions=("int8", "bf16", "fp32"))


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_search_with_bf16_on_the_ladder_stops_the_outlier_layer_at_bf16(mlp, data):
    # the same outlier column in net.4 as above: int4 and int8 round its row away, bf16 keeps
    # 8 bits of every weight whatever its neighbours, so net.4 climbs int4 -> int8 -> bf16
    model = _with_outlier(mlp, data)
    xv, yv = data["val"]
    base_val, base_test = accuracy(model, xv, yv), accuracy(model, *data["test"])
    fast = _search(model, data, ("int4", "int8", "bf16", "fp32"), max_evals=24)
    s = fast.fxopt_report.search
    layers = {r["layer"]: r for r in s["layers"]}
    want = {"net.1": "int4", "net.4": "bf16", "net.6": "int4"}
    assert {name: r["precision"] for name, r in layers.items()} == want
    assert {name: _op_precision(fast, name) for name in want} == want
    assert layers["net.4"]["ladder"] == ["int4", "int8", "bf16", "fp32"] and layers["net.4"]["why"].startswith("accuracy")
    assert s["met"] and accuracy(fast, xv, yv) >= base_val - EPS - 1e-6
    assert accuracy(fast, *data["test"]) >= base_test - EPS - TEST_SLACK
    assert s["chosen_mix"] == "int4 2, bf16 1"
