"""A model file cannot read, write or run anything, nor make a kernel read out of bounds.

Each attack edits a saved int8 model as an attacker can (the digest recomputed). Where
the attack would work without the check, a control run with the check switched off
shows it (the secret comes back, the file is written), so the test cannot pass vacuously.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves as pytree_leaves

import fxopt
from artifact_files import int8_bytes, int8_model, read, rewrite, write
from fxopt.artifact import serialize
from fxopt.core.errors import ArtifactError

aten = torch.ops.aten


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.fxopt"
    path.write_bytes(int8_bytes("mlp"))
    return path


def _node(name, target, args, kwargs=()):
    return {"op": "call_function", "name": name, "target": target, "args": {"tuple": list(args)},
            "kwargs": {"dict": [list(kv) for kv in kwargs]}, "meta": {}}


def _insert_before_output(graph, *nodes, output=None):
    at = next(i for i, n in enumerate(graph["nodes"]) if n["op"] == "output")
    graph["nodes"][at:at] = list(nodes)
    if output:
        graph["nodes"][at + len(nodes)]["args"] = {"tuple": [{"tuple": [{"node": output}]}]}


def _without_op_check(monkeypatch):
    monkeypatch.setattr(serialize, "check_graph", lambda graph: None)


# --- the attacks of the issue ------------------------------------------------------

def _read_secret(path, secret, size):
    rewrite(path, edit_graph=lambda g: _insert_before_output(
        g, _node("leak", "aten::from_file.default", [str(secret), False, size], [("dtype", {"dtype": "uint8"})]),
        output="leak"))


def test_a_file_cannot_read_another_file(mlp_file, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_bytes(b"the user's private key")
    _read_secret(mlp_file, secret, 22)
    with pytest.raises(ArtifactError, match="aten::from_file.default, which is not among the operators"):
        fxopt.load(mlp_file)
    _without_op_check(monkeypatch)        # control: unchecked, the output is the secret
    out = fxopt.load(mlp_file)(int8_model("mlp")[1][0])
    assert bytes(out.tolist()) == b"the user's private key"


def _write_file(path, victim):
    def edit(g):
        packed = next(n["name"] for n in g["nodes"] if n["op"] == "get_attr" and n["target"] == "fc1_packed")
        _insert_before_output(
            g, _node("mapped", "aten::from_file.default", [str(victim), True, 2048], [("dtype", {"dtype": "uint8"})]),
            _node("written", "aten::copy_.default", [{"node": "mapped"}, {"node": packed}]), output="written")
    rewrite(path, edit_graph=edit)


def test_a_file_cannot_write_another_file(mlp_file, tmp_path, monkeypatch):
    victim = tmp_path / "site.pth"
    victim.write_bytes(b"\0" * 2048)
    _write_file(mlp_file, victim)
    with pytest.raises(ArtifactError, match="not among the operators"):
        fxopt.load(mlp_file)
    assert victim.read_bytes() == b"\0" * 2048
    _without_op_check(monkeypatch)        # control: unchecked, the packed weights land in the file
    fxopt.load(mlp_file)(int8_model("mlp")[1][0])
    assert victim.read_bytes() != b"\0" * 2048


def _set_tensor(path, name, **changes):
    metadata, graph, tensors = read(path)
    graph["tensors"][name].update(changes)
    write(path, metadata, graph, tensors)


def test_a_shrunk_packed_buffer_is_refused(mlp_file):
    _set_tensor(mlp_file, "fc1_packed", shape=[64])     # 64 bytes where a 64x32 GEMM reads 2048
    with pytest.raises(ArtifactError, match=r"linear_int8_default \(fxopt::linear_int8\): packed must be .* "
                                            r"shape \(2048,\)"):
        fxopt.load(mlp_file)


@pytest.mark.parametrize("name,changes,message", [
    ("fc1_packed", {"dtype": "float32", "shape": [512]}, "packed must be"),
    ("fc1_packed_scale", {"shape": [32]}, "w_scale must be"),
    ("fc1_col_sums", {"dtype": "int8", "shape": [64]}, "col_sums must be"),
    ("fc1.bias", {"shape": [63]}, "bias must be"),
    ("fc1_packed", {"storage": -1}, "storage -1 is not one of"),
])
def test_kernel_buffers_that_do_not_fit_are_refused(mlp_file, name, changes, message):
    _set_tensor(mlp_file, name, **changes)
    with pytest.raises(ArtifactError, match=message):
        fxopt.load(mlp_file)


def _set_op_arg(graph, op, index, value):
    node = next(n for n in graph["nodes"] if n["target"] == op)
    node["args"]["tuple"][index] = value


@pytest.mark.parametrize("index,value,message", [
    (5, 65, "packed must be"), (5, 0, "n must be a positive int"), (6, {"float": 32.0}, "'k'"),
    (7, "/etc/passwd", "'act' = '/etc/passwd' is not one of"), (8, {"list": [{"float": 1.0}]}, "act_args"),
    (10, 300, "zero point must be an int in"), (9, {"float": "nan"}, "scale must be a finite"),
])
def test_lowered_linear_arguments_are_checked(mlp_file, index, value, message):
    rewrite(mlp_file, edit_graph=lambda g: _set_op_arg(g, "fxopt::linear_int8.default", index, value))
    with pytest.raises(ArtifactError, match=message):
        fxopt.load(mlp_file)


@pytest.mark.parametrize("index,value,message", [
    (5, {"list": [8, 4, 3, 3, 1, 0]}, "packed must be"), (5, {"list": [16, 3, 3, 3, 1, 0]}, "w_scale must be"),
    (5, {"list": [16, 3, 3, 3, 2, 0]}, "groups must divide"),
    (6, {"list": [0, 1]}, "stride must be two ints >= 1"), (7, {"list": [-1, 1]}, "padding must be two ints >= 0"),
])
def test_lowered_conv_arguments_are_checked(tmp_path, index, value, message):
    path = tmp_path / "cnn.fxopt"
    path.write_bytes(int8_bytes("cnn_bn_residual"))
    rewrite(path, edit_graph=lambda g: _set_op_arg(g, "fxopt::conv2d_int8.default", index, value))
    with pytest.raises(ArtifactError, match=message):
        fxopt.load(path)


def _set_dtypes(graph, text):
    for node in graph["nodes"]:
        if node["op"] != "output":
            node["meta"]["fxopt_dtype"] = text


def test_a_node_dtype_that_is_no_dtype_is_refused(mlp_file):
    rewrite(mlp_file, edit_graph=lambda g: _set_dtypes(g, "float32); import os"))
    with pytest.raises(ArtifactError, match="corrupt graph data: node .* has dtypes 'float32\\); import os'"):
        fxopt.load(mlp_file)


@pytest.mark.parametrize("text", ["int64", "bool", "list:float32,float32"])
def test_node_dtypes_that_lie_give_the_same_answer_or_an_error(tmp_path, text):
    """The plan picks numpy or torch steps by the dtypes a file keeps (where the op's schema
    agrees the value is a tensor), the kernels check what they are given: a file whose
    dtypes lie computes what the honest one does, or is refused, or raises when called."""
    model, example = int8_model("bert")
    honest, lying = tmp_path / "honest.fxopt", tmp_path / "lying.fxopt"
    fxopt.save(model, honest)
    fxopt.save(model, lying)
    rewrite(lying, edit_graph=lambda g: _set_dtypes(g, text))
    want = fxopt.load(honest)(**example)
    try:
        got = fxopt.load(lying)(**example)
    except (ArtifactError, TypeError, ValueError, IndexError, RuntimeError):
        return
    for a, b in zip(pytree_leaves(got), pytree_leaves(want)):
        assert torch.equal(a, b)


# --- the closed op set ---------------------------------------------------------------

@pytest.mark.parametrize("attack,message", [
    ("in place into a weight", "weight or an input"),
    ("in place into a view of an input", "weight or an input"),
    ("a device other than the CPU", "argument 'device'"),
    ("a path as a string argument", "'approximate' = '/etc/passwd' is not one of"),
    ("uninitialized memory", "aten::empty.memory_format, which is not among"),
])
def test_graph_edits_outside_the_op_set_are_refused(mlp_file, attack, message):
    def edit(g):
        bias = next(n["name"] for n in g["nodes"] if n["op"] == "get_attr" and n["target"] == "fc1.bias")
        out = next(n for n in g["nodes"] if n["op"] == "output")["args"]["tuple"][0]["tuple"][0]["node"]
        nodes = {
            "in place into a weight": [_node("w", "aten::add_.Tensor", [{"node": bias}, {"float": 1.0}])],
            "in place into a view of an input": [_node("v", "aten::view.default", [{"node": "x"}, {"list": [-1]}]),
                                                 _node("w", "aten::add_.Tensor", [{"node": "v"}, {"float": 1.0}])],
            "a device other than the CPU": [_node("w", "aten::to.device", [{"node": out}, {"device": "cuda"},
                                                                           {"dtype": "float32"}])],
            "a path as a string argument": [_node("w", "aten::gelu.default", [{"node": out}],
                                                  [("approximate", "/etc/passwd")])],
            "uninitialized memory": [_node("w", "aten::empty.memory_format", [{"list": [64]}])],
        }[attack]
        _insert_before_output(g, *nodes, output="w")
    rewrite(mlp_file, edit_graph=edit)
    with pytest.raises(ArtifactError, match=message):
        fxopt.load(mlp_file)


def _graph_module(*ops):
    """x -> ops[0](x) -> ops[1](...) ... as a GraphModule of aten overloads."""
    g = fx.Graph()
    value = g.placeholder("x")
    for op, *args in ops:
        value = g.call_function(op, (value, *args))
    g.output((value,))
    return fx.GraphModule(nn.Module(), g)


def test_in_place_on_a_value_the_graph_computed_loads(tmp_path):
    gm = _graph_module((aten.relu.default,), (aten.view.default, [-1]), (aten.add_.Tensor, 1.0))
    fxopt.save(gm, tmp_path / "ok.fxopt")
    x = torch.randn(3, 4)
    assert torch.equal(fxopt.load(tmp_path / "ok.fxopt")(x)[0], gm(x)[0])
    assert torch.equal(gm(x)[0], torch.relu(x).reshape(-1) + 1)


def test_save_refuses_an_op_that_load_would_refuse(tmp_path):
    gm = _graph_module((aten.cumprod.default, 0))
    with pytest.raises(ArtifactError, match=r"cannot save .*bad.fxopt: node cumprod_default calls aten::cumprod"):
        fxopt.save(gm, tmp_path / "bad.fxopt")
    assert os.listdir(tmp_path) == []


# --- the fuzz ------------------------------------------------------------------------

FUZZ = os.path.join(os.path.dirname(__file__), "fuzz_artifacts.py")


@pytest.mark.slow
def test_fuzzed_files_never_crash_hang_or_answer_differently(tmp_path):
    """1,000+ corrupted files over an MLP, a CNN and BERT (int8), in a child process so a
    crash is seen as one: each is refused at load, raises a clear error when called, or
    answers exactly as the original, the same twice."""
    done = subprocess.run([sys.executable, FUZZ, "--mutations", "1050", "--seed", "0", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, f"fuzz child died after {lines[-1:] if lines else 'no'} mutation: " \
                                 f"{done.stderr[-3000:]}"
    summary = lines[-1]
    assert summary["mutations"] >= 1000
    assert summary["bad"] == [], summary["bad"][:10]
    assert summary["outcomes"]["refused"] > 500, summary      # most corruptions stop at load
