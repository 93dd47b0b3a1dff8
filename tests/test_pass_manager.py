"""Pipelines, the pass manager's instruments, failures, bisect and the optimize entry point."""
import os
import types

import pytest
import torch
from torch import nn

import fxopt
from fxopt.core.errors import PassError, PipelineError
from fxopt.core.ops import OpKind, kind_of
from fxopt.core.pass_base import PassInfo, PassResult
from fxopt.core.pipeline import Pipeline
from fxopt.core.registry import register_pass, unregister_pass


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 4))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval(), (torch.randn(2, 3, 8, 8),)


def test_pipeline_prints_and_parses_back():
    text = "fold_batchnorm,fuse_epilogues,eliminate_dead_code"
    assert str(Pipeline.parse(text)) == text
    p = Pipeline.parse(fxopt.TARGETS["cpu-fp32"])
    assert str(Pipeline.parse(str(p))) == str(p)


@pytest.mark.parametrize("text,needle", [
    ("fold_batchnorm,no_such_pass", "unknown pass 'no_such_pass'; known passes: "),
    ("fold_batchnorm{ratio=0.3}", "pass fold_batchnorm has no option ratio; its options: none"),
    ("fold_batchnorm{", "cannot parse pipeline"),
])
def test_pipeline_errors_name_the_problem(text, needle):
    with pytest.raises(PipelineError, match=None) as info:
        Pipeline.parse(text)
    assert needle in str(info.value)


def test_unknown_target_and_option_list_valid_ones():
    model, x = _cnn()
    with pytest.raises(PipelineError) as info:
        fxopt.optimize(model, x, target="gpu-int4")
    assert "unknown target 'gpu-int4'" in str(info.value) and "cpu-fp32" in str(info.value)
    with pytest.raises(PipelineError) as info:
        fxopt.optimize(model, x, target="cpu-fp32", fold_everything=True)
    assert "unknown option(s) fold_everything" in str(info.value) and "dump_dir" in str(info.value)


def test_report_records_every_pass():
    model, x = _cnn()
    fast = fxopt.optimize(model, x, target="cpu-fp32")
    report = fast.fxopt_report
    names = [r.name for r in report.records]
    assert names == ["input"] + Pipeline.parse(fxopt.TARGETS["cpu-fp32"]).names
    fold = report.record("fold_batchnorm")
    assert fold.changed and fold.stats["folded"] == 2 and fold.seconds > 0
    assert fold.counts.get("batch_norm") is None and report.records[0].counts["batch_norm"] == 2
    assert fold.drift.cosine > 0.999999 and fold.drift.max_abs < 1e-5
    d = report.to_dict()
    assert d["passes"][5]["pass"] == "fold_batchnorm" and d["passes"][5]["stats"]["folded"] == 2
    text = str(report)
    assert "fold_batchnorm" in text and "folded=2" in text and "sqnr dB" in text


def test_model_is_not_mutated():
    model, x = _cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxopt.optimize(model, x, target="cpu-fp32")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_print_ir_after_dump_dir_stop_after_disable(tmp_path):
    model, x = _cnn()
    printed = []
    fast = fxopt.optimize(model, x, target="cpu-fp32", print_ir_after=["fold_batchnorm"],
                          dump_dir=str(tmp_path), stop_after="fold_batchnorm", disable=["fold_constants"])
    files = sorted(os.listdir(tmp_path))
    assert "000_input.txt" in files and "005_fold_batchnorm.txt" in files
    assert any(f.startswith("005_fold_batchnorm.png") for f in files)
    assert not any("fuse_epilogues" in f for f in files)  # stopped after fold_batchnorm
    assert "004_fold_constants.txt" not in files           # disabled
    records = {r.name: r for r in fast.fxopt_report.records}
    assert records["fold_constants"].status == "disabled"
    assert "fuse_epilogues" not in records and fast.fxopt_report.stopped_after == "fold_batchnorm"
    with open(tmp_path / "005_fold_batchnorm.txt") as f:
        assert "batch_norm" not in f.read()
    fxopt.optimize(model, x, target="cpu-fp32", print_ir_after="all", drift=False)
    torch.testing.assert_close(fast(*x), model(*x), rtol=1e-5, atol=1e-5)


def test_instrument_options_are_checked():
    model, x = _cnn()
    with pytest.raises(PipelineError, match="stop_after='nope' is not in the pipeline"):
        fxopt.optimize(model, x, stop_after="nope")
    with pytest.raises(PipelineError, match="cannot disable nope"):
        fxopt.optimize(model, x, disable=["nope"])


def _make_pass(name, run):
    module = types.ModuleType(name)
    module.PASS = PassInfo(name, doc="test pass")
    module.run = run
    return module


@pytest.fixture
def broken_relu_pass():
    """A deliberately wrong pass: turns the second relu into an identity (drops negatives' clamp)."""
    def run(gm, ctx):
        relus = [n for n in gm.graph.nodes if kind_of(n) is OpKind.ACTIVATION]
        victim = relus[1]
        victim.replace_all_uses_with(victim.args[0])
        gm.graph.erase_node(victim)
        return PassResult(True, {"broken": 1})

    register_pass(_make_pass("break_second_relu", run))
    yield "break_second_relu"
    unregister_pass("break_second_relu")


@pytest.mark.slow
def test_bisect_finds_broken_pass_and_node(broken_relu_pass):
    model, x = _cnn()
    found = fxopt.bisect(model, x, target=f"remove_identity,fold_batchnorm,{broken_relu_pass},fuse_epilogues",
                         tol=1e-4)
    assert found.found and found.pass_name == broken_relu_pass and found.pass_index == 3
    # the relu (layer "5") is gone, so the first value to drift is the pool (layer "6")
    # that used to read it; bisect names the input the pass took away
    assert found.node_layer == "6" and found.node_op == "adaptive_avg_pool2d", found
    assert found.rewired_from == ["5 [relu]"]
    assert found.node_drift.max_abs > 1e-4
    assert "first pass over tolerance: #3 break_second_relu" in str(found)


def test_bisect_reports_nothing_for_exact_pipeline():
    model, x = _cnn()
    found = fxopt.bisect(model, x, target="cpu-fp32", tol=1e-4)
    assert not found.found and "no pass drifted" in str(found)


def test_failing_pass_is_named_with_ir_before(tmp_path):
    def run(gm, ctx):
        raise RuntimeError("boom")

    register_pass(_make_pass("explode", run))
    try:
        model, x = _cnn()
        with pytest.raises(PassError) as info:
            fxopt.optimize(model, x, target="remove_identity,fold_batchnorm,explode", dump_dir=str(tmp_path))
    finally:
        unregister_pass("explode")
    msg = str(info.value)
    assert "pass explode (#3" in msg and "RuntimeError: boom" in msg
    assert "Passes that ran before it: remove_identity, fold_batchnorm" in msg
    assert "batch_norm" not in info.value.ir_before and "conv2d" in info.value.ir_before
    assert os.path.exists(tmp_path / "003_explode.before.txt")
    replay = info.value.graph_before
    torch.testing.assert_close(replay(*x), model(*x), rtol=1e-5, atol=1e-5)


def test_pass_leaving_invalid_graph_is_caught():
    def run(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
        node.meta.pop("val")
        return PassResult(True, {})

    register_pass(_make_pass("drop_meta", run))
    try:
        model, x = _cnn()
        with pytest.raises(PassError, match="has no shape metadata"):
            fxopt.optimize(model, x, target="drop_meta")
    finally:
        unregister_pass("drop_meta")


@pytest.mark.slow
def test_example_inputs_from_calibration_data():
    model, x = _cnn()
    fast = fxopt.optimize(model, calibration_data=[x, x], target="cpu-fp32")
    torch.testing.assert_close(fast(*x), model(*x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="needs example_inputs"):
        fxopt.optimize(model)


def test_bisect_names_node_whose_weights_a_pass_corrupted():
    from fxopt.core.ir import add_weight, get_weight

    def run(gm, ctx):
        convs = [n for n in gm.graph.nodes if kind_of(n) is OpKind.CONV]
        target = convs[1]
        bias = get_weight(gm, target.args[2])
        target.args = (*target.args[:2], add_weight(gm, "bad.bias", bias + 0.5, before=target),
                       *target.args[3:])
        return PassResult(True, {})

    register_pass(_make_pass("corrupt_bias", run))
    try:
        model, x = _cnn()
        found = fxopt.bisect(model, x, target="fold_batchnorm,corrupt_bias,fuse_epilogues", tol=1e-3)
    finally:
        unregister_pass("corrupt_bias")
    assert found.pass_name == "corrupt_bias"
    assert found.node_layer == "3" and found.node_op == "conv2d" and not found.rewired_from
    assert found.node_drift.max_abs == pytest.approx(0.5, abs=1e-5)


def test_one_shot_calibration_iterator_serves_every_pass():
    model, x = _cnn()
    with pytest.warns(UserWarning, match="one-shot iterator"):
        fast = fxopt.optimize(model, target="cpu-int8", calibration_data=(x for _ in range(3)),
                              latency_repeats=0)
    torch.testing.assert_close(fast(*x), model(*x), rtol=0.05, atol=0.05)


def test_drift_probe_is_two_samples_of_a_dynamic_batch():
    from fxopt.driver.compile import probe_inputs
    model, _ = _cnn()
    x = torch.randn(8, 3, 8, 8)
    gm = fxopt.capture(model, (x,))
    (probe,), kwargs = probe_inputs(gm, (x,), {})
    assert torch.equal(probe, x[:2]) and kwargs == {}
    static = fxopt.capture(model, (x,), dynamic=False)
    assert probe_inputs(static, (x,), {})[0][0] is x      # a static batch is never cut
