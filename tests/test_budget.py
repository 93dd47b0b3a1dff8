"""Accuracy-budgeted search (fxopt.search.budget) on small models trained on sklearn's digits.

eval_fn scores a validation split; every claim is re-checked on a separate test split
against the unoptimized model's accuracy computed here. Cost is search_cost="macs"
(deterministic) so no assertion depends on timing.
"""
import copy
import warnings

import pytest
import torch

import fxopt
from fxopt.core.pipeline import target_pipeline
from fxopt.examples import DigitsCNN, DigitsMLP, accuracy, train
from fxopt.report.pareto import pareto_front
from fxopt.search.budget import Config, choose, with_fp32_layers
from fxopt.search.sensitivity import quant_proxy, slower_in_int8

# On 450 test images one image is 0.22 points: a configuration chosen on the validation
# split may lose a few more images on the test split than the budget allows.
TEST_SLACK = 0.02


# every test runs searches of many optimize + evaluate rounds: minutes in all
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def data(search_data):
    return search_data


@pytest.fixture(scope="module")
def models(data):
    torch.set_num_threads(1)
    torch.manual_seed(0)   # the models' initial weights: train() seeds only the training
    mlp = DigitsMLP()
    cnn = DigitsCNN(width=16)
    return {"mlp": train(mlp, data["fit"], epochs=10), "cnn": train(cnn, data["fit"], epochs=5)}


def _search(model, data, eps, **options):
    xv, yv = data["val"]
    # Distillation (3 epochs on the training images) lets pruning fit the 2-point budget.
    options = {"search_cost": "macs", "latency_repeats": 0, "prune": {"round_to": 4},
               "finetune_budget": 3, "max_evals": 20, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxopt.optimize(model, data["example"], "cpu-int8", calibration_data=data["calib"],
                              eval_fn=lambda m: accuracy(m, xv, yv), max_accuracy_drop=eps, **options)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("eps", [0.005, 0.02])
def test_search_meets_budget_and_beats_plain_int8_when_pruning_fits(models, data, name, eps):
    model = models[name]
    base_val, base_test = accuracy(model, *data["val"]), accuracy(model, *data["test"])
    fast = _search(model, data, eps)
    s = fast.fxopt_report.search
    evals, chosen = s["evaluations"], s["evaluations"][s["chosen"]]
    got_val, got_test = accuracy(fast, *data["val"]), accuracy(fast, *data["test"])
    print(f"{name} eps={eps}: {chosen['label']} MACs {chosen['macs']} (plain int8 {evals[0]['macs']}) "
          f"val {got_val:.4f} (fp32 {base_val:.4f}) test {got_test:.4f} (fp32 {base_test:.4f})")
    assert s["met"] and s["reference_metric"] == pytest.approx(base_val)
    # The returned model is the chosen configuration: the search's number is reproduced here.
    assert got_val == pytest.approx(chosen["metric"]) == pytest.approx(s["final_metric"])
    assert got_val >= base_val - eps - 1e-6
    assert got_test >= base_test - eps - TEST_SLACK
    # evaluations[0] is plain cpu-int8 (no fp32 layers, no pruning).
    assert evals[0]["fp32"] == [] and evals[0]["ratio"] == 0.0
    assert chosen["cost"] <= evals[0]["cost"]
    if any(e["meets"] and e["ratio"] > 0 and e["macs"] < evals[0]["macs"] for e in evals):
        assert chosen["ratio"] > 0 and chosen["macs"] < evals[0]["macs"]
    if eps >= 0.02:   # both models prune (with distillation) within 2 points
        assert chosen["ratio"] > 0 and fast.fxopt_report.summary["macs_optimized"] < evals[0]["macs"]
    assert "search" in fast.fxopt_report.sections


def test_impossible_budget_warns_with_the_miss_and_returns_the_best(models, data):
    xv, yv = data["val"]
    with pytest.warns(UserWarning, match=r"no configuration met the budget.*misses by"):
        fast = fxopt.optimize(models["mlp"], data["example"], "cpu-int8", calibration_data=data["calib"],
                              eval_fn=lambda m: accuracy(m, xv, yv), max_accuracy_drop=-1.0,
                              search_cost="macs", latency_repeats=0, search_prune=(0.0, 0.5), max_evals=8)
    s = fast.fxopt_report.search
    assert not s["met"]
    assert s["evaluations"][s["chosen"]]["metric"] == max(e["metric"] for e in s["evaluations"])
    assert accuracy(fast, xv, yv) == pytest.approx(s["final_metric"])
    assert "MISSES the budget" in fast.fxopt_report.sections["search"]


def test_layer_with_weight_outliers_stays_fp32(models, data):
    model = copy.deepcopy(models["mlp"])
    with torch.no_grad():
        # The input column of net.4 whose neuron is dead on the training data, times 1000: the
        # fp32 model does not change, but every output channel's int8 scale grows ~1000x, so
        # per-channel int8 rounds the rest of each row to zero or one level and net.4 loses
        # its information (the other layers are untouched).
        hidden = torch.relu(model.net[1](data["fit"].x_train.flatten(1))).mean(0)
        model.net[4].weight[:, int(hidden.argmin())] *= 1000
    plain = fxopt.optimize(model, data["example"], "cpu-int8", calibration_data=data["calib"], latency_repeats=0)
    assert accuracy(plain, *data["val"]) < accuracy(model, *data["val"]) - 0.005
    fast = _search(model, data, 0.005, search_prune=())
    layers = {r["layer"]: r for r in fast.fxopt_report.search["layers"]}
    assert layers["net.4"]["precision"] == "fp32"
    assert layers["net.4"]["why"].startswith("accuracy")
    assert layers["net.1"]["precision"] == "int8"
    rows = {r["layer"]: r for r in fast.fxopt_report.layers}
    assert rows["net.4"]["precision"] == "fp32" and rows["net.1"]["precision"] == "int8"


def test_evaluations_are_cached_and_reproducible(models, data):
    first = _search(models["mlp"], data, 0.02).fxopt_report.search
    second = _search(models["mlp"], data, 0.02).fxopt_report.search
    labels = [e["label"] for e in first["evaluations"]]
    assert len(labels) == len(set(labels))   # no configuration evaluated twice
    assert labels == [e["label"] for e in second["evaluations"]]
    assert first["chosen_config"] == second["chosen_config"]


def test_max_evals_stops_the_search_and_still_returns_a_model(models, data):
    fast = _search(models["mlp"], data, 0.02, max_evals=2)
    s = fast.fxopt_report.search
    assert len(s["evaluations"]) == 2 and "max_evals=2" in s["stopped"]
    assert accuracy(fast, *data["val"]) == pytest.approx(s["final_metric"])


def test_time_budget_stops_after_the_plain_target(models, data):
    fast = _search(models["mlp"], data, 0.02, time_budget_s=0)
    s = fast.fxopt_report.search
    assert [e["label"] for e in s["evaluations"]] == ["prune=0 fp32=[-]"]
    assert "time_budget_s=0" in s["stopped"]


def test_layer_latency_times_every_layer_in_both_precisions(models, data):
    from fxopt.search.sensitivity import layer_latency
    model = models["mlp"]
    layers = ["net.1", "net.4", "net.6"]
    int8 = fxopt.optimize(model, data["example"], "cpu-int8", calibration_data=data["calib"], latency_repeats=0)
    fp32 = fxopt.optimize(model, data["example"], str(with_fp32_layers(target_pipeline("cpu-int8"), layers)),
                          calibration_data=data["calib"], latency_repeats=0)
    assert [r["precision"] for r in fp32.fxopt_report.layers] == ["fp32"] * 3
    times = layer_latency(int8, fp32, data["example"], {}, repeats=3)
    assert sorted(times) == layers
    assert all(t8 > 0 and t32 > 0 for t8, t32 in times.values())


def test_plot_and_saved_report(models, data, tmp_path):
    pytest.importorskip("matplotlib")
    fast = _search(models["mlp"], data, 0.02, plot_path=str(tmp_path / "front.png"))
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fxopt.save(fast, tmp_path / "m.fxopt")
    from fxopt.artifact.serialize import read_report
    text = str(read_report(tmp_path / "m.fxopt"))
    assert "search:" in text and "chosen #" in text


def test_relative_drop_mode_scales_the_budget(models, data):
    fast = _search(models["mlp"], data, 0.02, drop_mode="relative", search_prune=())
    s = fast.fxopt_report.search
    assert s["allowed_drop"] == pytest.approx(0.02 * s["reference_metric"])


def test_pieces():
    assert pareto_front([{"cost": 1, "metric": 0.9}, {"cost": 2, "metric": 0.8},
                         {"cost": 3, "metric": 0.95}]) == [0, 2]
    assert choose([{"cost": 2, "metric": .9, "meets": True},
                   {"cost": 1, "metric": .8, "meets": False}]) == (0, True)
    near = [{"cost": 1.0, "macs": 9, "metric": .9, "meets": True}, {"cost": 1.04, "macs": 5, "metric": .9, "meets": True}]
    assert choose(near, 0.05) == (1, True) and choose(near) == (0, True)
    assert choose([{"cost": 2, "metric": .7, "meets": False},
                   {"cost": 1, "metric": .8, "meets": False}]) == (1, False)
    assert quant_proxy([{"layer": "a", "precision": "int8", "sqnr_db": 40.0},
                        {"layer": "b", "precision": "int8", "sqnr_db": 30.0},
                        {"layer": "c", "precision": "fp32", "sqnr_db": None}]) == [("b", 30.0), ("a", 40.0)]
    assert list(slower_in_int8({"x": (2e-3, 1e-3), "y": (1.05e-3, 1e-3), "z": (1e-3, 2e-3)})) == ["x"]
    text = str(with_fp32_layers(target_pipeline("cpu-int8"), ["fc1"]))
    assert "quantize_int8{per_layer={'fc1': 'fp32'}}" in text
    assert Config(("a",), 0.25, True).label == "prune=0.25 fp32=[a] +finetune"
