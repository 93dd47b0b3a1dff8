"""capture(): every zoo model becomes one ATen FX graph that matches eager,
answers other batch sizes and sequence lengths, and leaves the model alone."""
import copy
import warnings

import pytest
import torch
from torch import fx, nn

from fxopt.core.capture import capture, normalize_inputs
from fxopt.core.errors import CaptureError, FxoptError
from zoo import HF_MODELS, SEQUENCE_MODELS, ZOO, zoo_params

_CAPTURED = {}


def _call(module, inputs):
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        return module(*args, **kwargs)


def _captured(name):
    """(model, example, other, gm), captured once per test session."""
    if name not in _CAPTURED:
        model, example, other = ZOO[name]()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = capture(model, example)
        ours = [str(w.message) for w in caught if "fxopt.capture" in str(w.message)]
        assert not ours, ours  # no dim may fall back to static
        _CAPTURED[name] = (model, example, other, gm)
    return _CAPTURED[name]


def _assert_same_structure(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got.keys()) == list(want.keys())
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)


@pytest.mark.parametrize("name", zoo_params())
@pytest.mark.parametrize("which", ["example", "other"])
def test_matches_eager(name, which):
    model, example, other, gm = _captured(name)
    inputs = example if which == "example" else other
    got, want = _call(gm, inputs), _call(model, inputs)
    _assert_same_structure(got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# image models that take any height and width; ViT's position table fixes its image size, and
# so does the TF-style padding of Hugging Face's MobileNetV2 and EfficientNet (computed from
# the input's size)
IMAGE_MODELS = {"cnn_bn_residual", "dwsep_cnn", "resnet", "convnext", "squeezenet"}
FIXED_IMAGE_MODELS = {"vit", "mobilenet_v2", "efficientnet"}


@pytest.mark.parametrize("name", zoo_params())
def test_batch_sequence_and_image_size_are_dynamic(name):
    model, example, _, gm = _captured(name)
    record = gm.meta["fxopt_capture"]
    args, kwargs = normalize_inputs(example)
    tensor_names = list(kwargs) if kwargs else [record["input_names"][0]]
    want = {0, 1} if name in SEQUENCE_MODELS else {0, 2, 3} if name in IMAGE_MODELS else {0}
    for input_name in tensor_names:
        assert set(record["dynamic_dims"][input_name]) == want
        assert set(record["dynamic_ranges"][input_name]) == want
        for low, high in record["dynamic_ranges"][input_name].values():
            assert low >= 0 and (high is None or high >= low)
    if name in FIXED_IMAGE_MODELS:
        assert record["static_dims"] == {"pixel_values": {2: 32, 3: 32}}
    else:
        assert record["static_dims"] == {}


@pytest.mark.parametrize("name", zoo_params())
def test_node_meta(name):
    model, _, _, gm = _captured(name)
    nodes = list(gm.graph.nodes)
    assert all("val" in n.meta for n in nodes)
    ids = [n.meta["fxopt_id"] for n in nodes]
    assert len(set(ids)) == len(ids) and ids[0] == "n0"
    for n in nodes:
        if n.op == "get_attr" or n.op == "placeholder":
            assert isinstance(n.meta["val"], torch.Tensor), n.name
    modules = dict(model.named_modules())
    layers = {n.meta["fxopt_layer"] for n in nodes if "fxopt_layer" in n.meta}
    assert layers and layers <= set(modules), layers - set(modules)


@pytest.mark.parametrize("name", zoo_params())
def test_graph_is_aten(name):
    _, _, _, gm = _captured(name)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            assert n.target == "_guards_fn"  # export's input check; no user modules
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            assert n.target.namespace == "aten", n.target


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.slow
def test_known_op_forms():
    """The forms later passes match on: BN, conv, linear, sdpa, addmm."""
    aten = torch.ops.aten
    assert aten.batch_norm.default in _targets(_captured("cnn_bn_residual")[3])
    assert aten.conv2d.default in _targets(_captured("dwsep_cnn")[3])
    assert aten.hardtanh.default in _targets(_captured("dwsep_cnn")[3])
    bert_ops = _targets(_captured("bert")[3])
    assert {aten.linear.default, aten.scaled_dot_product_attention.default,
            aten.layer_norm.default, aten.gelu.default} <= bert_ops
    assert aten.addmm.default in _targets(_captured("gpt2")[3])  # GPT-2's Conv1D


@pytest.mark.parametrize("name", zoo_params(["mlp", "cnn_bn_residual", "bert"]))
def test_user_model_unchanged(name):
    model, example, _ = ZOO[name]()
    model.train()
    before = copy.deepcopy(model.state_dict())
    gm = capture(model, example)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # the graph holds its own copy: an in-place pass must not reach the model
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key
    # and the graph runs in eval mode (dropout off) although the model trains
    eval_model = copy.deepcopy(model).eval()
    gm2 = capture(model, example)
    torch.testing.assert_close(_call(gm2, example), _call(eval_model, example))


@pytest.mark.slow
def test_batch_one_example_still_dynamic():
    model, example, other = ZOO["gpt2"]()
    single = {k: v[:1, :1] for k, v in example.items()}
    gm = capture(model, single)
    dims = gm.meta["fxopt_capture"]["dynamic_dims"]
    assert set(dims["input_ids"]) == {0, 1}
    torch.testing.assert_close(_call(gm, other).logits, _call(model, other).logits)
    torch.testing.assert_close(_call(gm, single).logits, _call(model, single).logits)


class FixedBatch(nn.Module):
    def forward(self, x):
        return x + torch.ones(4, 3)  # broadcasting pins the batch to 4


def test_specialized_dim_warns_and_is_recorded():
    with pytest.warns(UserWarning, match=r"input 'x' dim 0 \(batch\) is static"):
        gm = capture(FixedBatch(), torch.randn(4, 3))
    record = gm.meta["fxopt_capture"]
    assert record["static_dims"] == {"x": {0: 4}} and record["dynamic_dims"] == {}


def test_static_capture():
    model, example, other = ZOO["mlp"]()
    gm = capture(model, example, dynamic=False)
    assert gm.meta["fxopt_capture"]["dynamic_dims"] == {}
    torch.testing.assert_close(_call(gm, example), _call(model, example))
    with pytest.raises(Exception, match="size"):
        _call(gm, other)


@pytest.mark.slow
def test_keyword_order_and_constant_kwargs():
    model, example, _ = ZOO["gpt2"]()
    inputs = {"attention_mask": example["attention_mask"],
              "input_ids": example["input_ids"], "use_cache": False}
    gm = capture(model, inputs)
    assert gm.meta["fxopt_capture"]["input_names"] == ["attention_mask", "input_ids",
                                                       "use_cache"]
    torch.testing.assert_close(_call(gm, inputs).logits, _call(model, inputs).logits)


@pytest.mark.slow
def test_non_tensor_keywords_in_var_kwargs():
    # BERT takes return_dict/output_hidden_states through **kwargs
    model, example, other = ZOO["bert"]()
    flags = {"return_dict": False, "output_hidden_states": True}
    gm = capture(model, {**example, **flags})
    assert set(gm.meta["fxopt_capture"]["dynamic_dims"]["input_ids"]) == {0, 1}
    got, want = _call(gm, {**other, **flags}), _call(model, {**other, **flags})
    _assert_same_structure(got, want)
    torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_transformer_encoder_avoids_fused_fast_path():
    ops = _targets(_captured("transformer_encoder")[3])
    aten = torch.ops.aten
    assert aten._transformer_encoder_layer_fwd.default not in ops
    assert {aten.linear.default, aten.scaled_dot_product_attention.default,
            aten.layer_norm.default} <= ops


def test_symbolic_trace_input_is_exported():
    model, example, other = ZOO["mlp"]()
    traced = fx.symbolic_trace(model)
    gm = capture(traced, example)
    assert torch.ops.aten.linear.default in _targets(gm)
    torch.testing.assert_close(_call(gm, other), _call(model, other))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_data_dependent_control_flow_raises():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), torch.randn(2, 3))
    msg = str(info.value)
    assert "DataDependent" in msg and "torch.cond" in msg
    assert "if x.sum() > 0" in msg  # names the offending line
    assert info.value.__cause__ is not None


@pytest.mark.slow
def test_gpt2_with_cache_names_use_cache():
    model, example, _ = ZOO["gpt2"](use_cache=True)
    try:
        gm = capture(model, example)
    except CaptureError as e:
        assert "use_cache=False" in str(e)
    else:
        torch.testing.assert_close(_call(gm, example).logits, _call(model, example).logits)


@pytest.mark.parametrize("bad", ["text", 3, None, {1: torch.ones(1)}])
def test_bad_example_inputs(bad):
    with pytest.raises(TypeError, match="example_inputs"):
        capture(ZOO["mlp"]()[0], bad)


def test_inputs_without_tensors():
    with pytest.raises(FxoptError, match="no tensor"):
        capture(ZOO["mlp"]()[0], (1, 2))


def test_model_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, (torch.ones(2),))


def test_hf_models_listed():
    assert set(HF_MODELS) <= set(ZOO)
