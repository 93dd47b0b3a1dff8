"""fxopt.save / fxopt.load: identical outputs after a round trip, atomic writes, clear
errors on bad files, and no code from a file ever runs."""
import functools
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import safetensors
import safetensors.torch
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

import fxopt
from fxopt.artifact import atomic_file, serialize
from artifact_files import rewrite
from fxopt.core.errors import ArtifactError
from zoo import ZOO, zoo_params

aten = torch.ops.aten


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@functools.lru_cache(maxsize=None)
def optimized(name):
    """(fast model, example inputs, other inputs) of a zoo model, optimized once per session."""
    model, example, other = ZOO[name]()
    return fxopt.optimize(model, example, target="cpu-fp32", drift=name == "mlp"), example, other


@functools.lru_cache(maxsize=None)
def saved_bytes(name):
    """The bytes of fxopt.save(optimized(name)), written once per session."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        fxopt.save(optimized(name)[0], os.path.join(tmp, "m.fxopt"))
        with open(os.path.join(tmp, "m.fxopt"), "rb") as f:
            return f.read()


def assert_identical(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got.keys()) == list(expected.keys())
    got_leaves, expected_leaves = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves):
        assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e)


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.fxopt"
    path.write_bytes(saved_bytes("mlp"))
    return path


# --- round trips ----------------------------------------------------------------

@pytest.mark.parametrize("name", zoo_params(fast=("mlp",)))
def test_round_trip_gives_identical_outputs(name, tmp_path):
    fast, example, other = optimized(name)
    fxopt.save(fast, tmp_path / "m.fxopt")
    loaded = fxopt.load(tmp_path / "m.fxopt")
    with torch.no_grad():
        for inputs in (example, other):   # other: another batch (and sequence) size
            assert_identical(call(loaded, inputs), call(fast, inputs))
    assert str(loaded.fxopt_report) == str(fast.fxopt_report)
    assert loaded.fxopt_report.to_dict() == fast.fxopt_report.to_dict()
    assert loaded.meta["fxopt_capture"] == fast.meta["fxopt_capture"]
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in fast.graph.nodes]


@pytest.mark.parametrize("name", zoo_params(["mlp", "bert"], fast=("mlp",)))
def test_int8_round_trip_keeps_packed_weights_and_isa(name, tmp_path):
    model, example, other = ZOO[name]()
    fast = fxopt.optimize(model, example, target="cpu-int8", drift=False)
    fxopt.save(fast, tmp_path / "q.fxopt")
    loaded = fxopt.load(tmp_path / "q.fxopt")
    with torch.no_grad():
        for inputs in (example, other):
            assert_identical(call(loaded, inputs), call(fast, inputs))
    assert loaded.meta["fxopt_artifact"] == fast.meta["fxopt_artifact"]
    assert "kernel_isa" in loaded.meta["fxopt_artifact"]
    assert str(loaded.fxopt_report) == str(fast.fxopt_report)
    dtypes = {b.dtype for b in loaded.buffers()}
    assert torch.uint8 in dtypes and dtypes == {b.dtype for b in fast.buffers()}


@pytest.mark.slow
def test_a_loaded_model_saves_and_loads_again(tmp_path):
    fast, example, other = optimized("bert")
    fxopt.save(fast, tmp_path / "a.fxopt")
    fxopt.save(fxopt.load(tmp_path / "a.fxopt"), tmp_path / "b.fxopt")
    again = fxopt.load(tmp_path / "b.fxopt")
    with torch.no_grad():
        assert_identical(call(again, other), call(fast, other))
    assert str(again.fxopt_report) == str(fast.fxopt_report)


def test_pruned_model_keeps_its_prune_report(tmp_path):
    import warnings
    model, example, other = ZOO["cnn_bn_residual"]()
    small = fxopt.prune(model, example, ratio=0.5, round_to=1)
    report = small.meta["fxopt_prune"]
    assert report.groups and any(g.kept < g.count for g in report.groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the report is saved, not dropped with a warning
        fxopt.save(small, tmp_path / "p.fxopt")
    loaded = fxopt.load(tmp_path / "p.fxopt")
    assert loaded.meta["fxopt_prune"] == report and str(loaded.meta["fxopt_prune"]) == str(report)
    with torch.no_grad():
        assert_identical(call(loaded, other), call(small, other))


def test_malformed_prune_report_is_an_artifact_error(tmp_path):
    model, example, _ = ZOO["mlp"]()
    fxopt.save(fxopt.prune(model, example, ratio=0.5, round_to=1), tmp_path / "p.fxopt")

    def drop_groups(graph):
        report = graph["meta"]["fxopt_prune"]
        report["dict"] = [pair for pair in report["dict"] if pair[0] != "groups"]
    rewrite(tmp_path / "p.fxopt", edit_graph=drop_groups)
    with pytest.raises(ArtifactError, match="malformed gm.meta\\['fxopt_prune'\\]"):
        fxopt.load(tmp_path / "p.fxopt")


def test_loaded_model_checks_its_inputs(mlp_file, tmp_path):
    loaded = fxopt.load(mlp_file)
    loaded(torch.randn(9, 32))      # batch is dynamic
    with pytest.raises(ValueError, match="input 'x' dim 1 must be 32"):
        loaded(torch.randn(2, 31))
    with pytest.raises(ValueError, match="input 'x' must have 2 dims"):
        loaded(torch.randn(32))
    fast, example, _ = optimized("bert")
    fxopt.save(fast, tmp_path / "b.fxopt")
    bad = dict(example, token_type_ids=example["token_type_ids"][:, :5])
    with pytest.raises(ValueError, match="input 'token_type_ids' dim 1 is 5 but input 'input_ids'"):
        fxopt.load(tmp_path / "b.fxopt")(**bad)


SUBPROCESS_MODELS = ["mlp", "bert", "gpt2"]

CHILD = textwrap.dedent("""
    import sys, torch, torch.utils._pytree as pytree
    torch.set_num_threads(int(sys.argv[2]))
    import fxopt
    for name in sys.argv[3:]:
        model = fxopt.load(f"{sys.argv[1]}/{name}.fxopt")
        saved = torch.load(f"{sys.argv[1]}/{name}.pt", weights_only=True)
        with torch.no_grad():
            for inputs, expected in zip(saved["inputs"], saved["outputs"]):
                out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
                leaves = pytree.tree_leaves(out)
                assert type(out).__name__ == saved["type"], type(out)
                assert len(leaves) == len(expected)
                assert all(torch.equal(a, b) for a, b in zip(leaves, expected)), name
        print("ok", name)
""")


@pytest.mark.slow
def test_load_in_a_fresh_process(tmp_path):
    for name in SUBPROCESS_MODELS:
        fast, example, other = optimized(name)
        fxopt.save(fast, tmp_path / f"{name}.fxopt")
        with torch.no_grad():
            outs = [call(fast, example), call(fast, other)]
        torch.save({"inputs": [example, other], "type": type(outs[0]).__name__,
                    "outputs": [pytree.tree_leaves(o) for o in outs]}, tmp_path / f"{name}.pt")
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path),
                           str(torch.get_num_threads()), *SUBPROCESS_MODELS],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [w for n in SUBPROCESS_MODELS for w in ("ok", n)]


def test_loaded_weights_do_not_depend_on_the_file(mlp_file):
    loaded = fxopt.load(mlp_file)
    expected = loaded(torch.ones(2, 32))
    mlp_file.write_bytes(b"")         # truncated in place (e.g. `cp other mlp.fxopt` failing)
    assert torch.equal(loaded(torch.ones(2, 32)), expected)


def test_read_report_without_loading(mlp_file):
    report = serialize.read_report(mlp_file)
    assert str(report) == str(optimized("mlp")[0].fxopt_report)
    assert report.records[-1].drift.cosine > 0.99999


def _weights_module():
    """A hand-built graph reading weights of many dtypes, kinds, strides and a tied pair."""
    root = nn.Module()
    root.sub = nn.Module()
    root.sub.w = nn.Parameter(torch.randn(4, 6).t())             # non-contiguous parameter
    root.register_buffer("packed", torch.from_numpy((torch.arange(64) % 251).to(torch.uint8).numpy()))
    root.register_buffer("q", torch.randint(-128, 127, (4, 4), dtype=torch.int8))
    root.register_buffer("sums", torch.arange(4, dtype=torch.int32), persistent=False)
    root.register_buffer("bf16", torch.randn(4, dtype=torch.bfloat16))
    root.register_buffer("mask", torch.tensor([True, False, True, True]))
    root.const = torch.randn(4, dtype=torch.float64)              # plain tensor attribute
    root.tied = root.sub.w                                       # same tensor, second name
    g = fx.Graph()
    x = g.placeholder("x")
    w = {n: g.get_attr(n) for n in ("sub.w", "packed", "q", "sums", "bf16", "mask", "const", "tied")}
    y = g.call_function(aten.mm.default, (x, w["sub.w"]))
    y = g.call_function(aten.add.Tensor, (y, g.call_function(aten.mm.default, (x, w["tied"]))))
    outs = [y] + [g.call_function(aten.clone.default, (w[n],)) for n in w if n not in ("sub.w", "tied")]
    g.output(tuple(outs))
    gm = fx.GraphModule(root, g)
    # GraphModule copies every tensor in as a persistent buffer; restore the kinds wanted.
    gm.register_buffer("sums", gm.sums, persistent=False)
    const = gm._buffers.pop("const")
    gm.const = const
    return gm


def test_any_dtype_kind_stride_and_tied_weights_round_trip(tmp_path):
    gm = _weights_module()
    fxopt.save(gm, tmp_path / "w.fxopt")
    loaded = fxopt.load(tmp_path / "w.fxopt")
    x = torch.randn(3, 6)
    assert_identical(loaded(x), gm(x))
    assert loaded.sub.w.stride() == gm.sub.w.stride() and isinstance(loaded.sub.w, nn.Parameter)
    assert loaded.tied.untyped_storage().data_ptr() == loaded.sub.w.untyped_storage().data_ptr()
    assert "sums" in dict(loaded.named_buffers()) and "sums" not in loaded.state_dict()
    assert "const" not in dict(loaded.named_buffers()) and torch.equal(loaded.const, gm.const)


def test_artifact_meta_and_load_hook(tmp_path):
    gm = _weights_module()
    gm.meta["fxopt_artifact"] = {"kernel_isa": "avx512_vnni", "layers": [1, 2.5, None]}
    fxopt.save(gm, tmp_path / "w.fxopt")
    seen = []
    hook = serialize.register_load_hook(lambda m, meta: seen.append((type(m), meta)))
    try:
        loaded = fxopt.load(tmp_path / "w.fxopt")
    finally:
        serialize.remove_load_hook(hook)
    assert loaded.meta["fxopt_artifact"] == gm.meta["fxopt_artifact"]
    assert len(seen) == 1 and seen[0][1] == gm.meta["fxopt_artifact"]
    assert issubclass(seen[0][0], fx.GraphModule)


def test_non_json_artifact_meta_is_refused_before_writing(tmp_path):
    gm = _weights_module()
    gm.meta["fxopt_artifact"] = {"shape": (1, 2)}    # a tuple would come back as a list
    with pytest.raises(ArtifactError, match="plain JSON"):
        fxopt.save(gm, tmp_path / "w.fxopt")
    assert os.listdir(tmp_path) == []


# --- atomic writes ------------------------------------------------------------------

def _half_write_then_fail(tensors, path, metadata):
    with open(path, "wb") as f:
        f.write(b"\x00" * 100)
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["writer", "replace"])
def test_failed_save_keeps_old_file_and_leaves_no_temp(mlp_file, monkeypatch, failure):
    before = mlp_file.read_bytes()
    if failure == "writer":
        monkeypatch.setattr(serialize, "_write_tensors", _half_write_then_fail)
    else:
        monkeypatch.setattr(serialize.os, "replace", lambda *a: _half_write_then_fail(None, os.devnull, None))
    with pytest.raises(OSError):
        fxopt.save(optimized("cnn_bn_residual")[0], mlp_file)
    assert mlp_file.read_bytes() == before
    assert os.listdir(mlp_file.parent) == [mlp_file.name]
    monkeypatch.undo()
    assert_identical(fxopt.load(mlp_file)(torch.ones(2, 32)), optimized("mlp")[0](torch.ones(2, 32)))


def test_save_replaces_an_existing_file(mlp_file):
    fast, example, _ = optimized("cnn_bn_residual")
    fxopt.save(fast, mlp_file)
    assert_identical(call(fxopt.load(mlp_file), example), call(fast, example))
    assert os.listdir(mlp_file.parent) == [mlp_file.name]


# --- bad files ----------------------------------------------------------------------

def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _random_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("graph.json", "{}")


BAD_FILES = {
    "truncated in the weights": (lambda p: _truncate(p, lambda n: n - 7), "truncated or corrupt"),
    "truncated in the header": (lambda p: _truncate(p, lambda n: 50), "truncated or corrupt"),
    "empty": (lambda p: p.write_bytes(b""), "not an fxopt model file"),
    "a bit flipped in a weight": (_flip_last_byte, "checksum"),
    "a zip": (_random_zip, "not an fxopt model file"),
    "a pickle": (lambda p: p.write_bytes(pickle.dumps({"w": torch.ones(2)})), "not an fxopt model"),
    "a text file": (lambda p: p.write_text("hello world\n" * 20), "not an fxopt model file"),
    "plain safetensors": (lambda p: safetensors.torch.save_file({"w": torch.ones(2)}, p),
                          "not an fxopt model"),
    "a newer format": (lambda p: rewrite(p, lambda m: m.update(format_version="99")),
                       "newer fxopt.*Upgrade fxopt"),
    "a changed header": (lambda p: rewrite(p, lambda m: m.update(fxopt_version="9"),
                                           fix_digest=False), "checksum"),
    "a missing graph": (lambda p: rewrite(p, lambda m: m.pop("graph")), "'graph' is missing"),
    "a weight outside its storage": (
        lambda p: rewrite(p, edit_graph=lambda g: g["tensors"]["fc1.weight"].update(offset=10**6)),
        "corrupt weight table entry for fc1.weight"),
    "a dangling node reference": (
        lambda p: rewrite(p, edit_graph=lambda g: g["nodes"][-1].update(
            args={"tuple": [{"node": "nowhere"}]})), "unknown or later node 'nowhere'"),
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_bad_file_raises_a_clear_artifact_error(mlp_file, damage):
    spoil, message = BAD_FILES[damage]
    spoil(mlp_file)
    with pytest.raises(ArtifactError, match=message):
        fxopt.load(mlp_file)

# Damage read_report must notice too: it reads the header only, not weights or graph.
HEADER_DAMAGE = ["truncated in the weights", "truncated in the header", "empty", "a zip",
                 "a pickle", "a text file", "plain safetensors", "a newer format"]


@pytest.mark.parametrize("damage", HEADER_DAMAGE)
def test_read_report_of_a_bad_file_raises(mlp_file, damage):
    spoil, message = BAD_FILES[damage]
    spoil(mlp_file)
    with pytest.raises(ArtifactError, match=message):
        serialize.read_report(mlp_file)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fxopt model file"):
        fxopt.load(tmp_path / "nothing.fxopt")


# --- files that try to run code -------------------------------------------------------

class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _set_first_call(graph, target, args):
    node = next(n for n in graph["nodes"] if n["op"] == "call_function")
    node.update(target=target, args=args)


def _shell(marker):
    return {"tuple": [f"touch {marker}"]}


ATTACKS = {
    "os.system target": lambda g, m: _set_first_call(g, "os.system", _shell(m)),
    "builtins.eval target": lambda g, m: _set_first_call(
        g, "builtins.eval", {"tuple": [f"__import__('os').system('touch {m}')"]}),
    "non-aten namespace": lambda g, m: _set_first_call(g, "myns::system.default", _shell(m)),
    "code in a node name": lambda g, m: g["nodes"][0].update(
        name=f"x = __import__('os').system('touch {m}')"),
    "code in an input name": lambda g, m: g.update(
        orig_args=[f"x=__import__('os').system('touch {m}')"]),
    "code in a weight name": lambda g, m: next(n for n in g["nodes"] if n["op"] == "get_attr").update(
        target=f"fc1.weight; __import__('os').system('touch {m}')"),
    "code in an input keyword": lambda g, m: g["in_spec"]["children"][1].update(
        context={"list": [f"x': __import__('os').system('touch {m}'), 'y"]}),
    "pytree enum import": lambda g, m: g.update(out_spec={
        "type": "builtins.dict", "children": [],
        "context": {"__enum__": True, "fqn": "os:system", "name": f"touch {m}"}}),
    "foreign output class": lambda g, m: g.update(out_spec={
        "type": "subprocess.Popen", "context": None, "children": []}),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_crafted_graph_cannot_run_code(tmp_path, attack):
    marker, path = tmp_path / "pwned", tmp_path / "bert.fxopt"
    path.write_bytes(saved_bytes("bert"))    # called with keywords: the in-spec holds a dict
    example = optimized("bert")[1]
    rewrite(path, edit_graph=lambda g: ATTACKS[attack](g, marker))
    with pytest.raises(ArtifactError):
        call(fxopt.load(path), example)
    assert not marker.exists()


def test_pickle_payload_is_never_unpickled(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.fxopt"
    path.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ArtifactError, match="not an fxopt model file"):
        fxopt.load(path)
    assert not marker.exists()
    # and as a torch.save checkpoint (a zip holding data.pkl)
    torch.save({"model": _Exploit(marker)}, path)
    with pytest.raises(ArtifactError, match="not an fxopt model file"):
        fxopt.load(path)
    assert not marker.exists()


def test_unsavable_target_is_refused(tmp_path):
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(print, (x,)))
    with pytest.raises(ArtifactError, match="calls <built-in function print>"):
        fxopt.save(fx.GraphModule(nn.Module(), g), tmp_path / "p.fxopt")
    assert os.listdir(tmp_path) == []


def test_graph_with_submodule_calls_is_refused(tmp_path):
    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ArtifactError, match="call_module"):
        fxopt.save(traced, tmp_path / "s.fxopt")


def test_failing_load_hook_is_named(mlp_file):
    def repack(gm, meta):
        raise RuntimeError("no kernel for this CPU")
    serialize.register_load_hook(repack)
    try:
        with pytest.raises(ArtifactError, match="load hook .*repack failed.*no kernel"):
            fxopt.load(mlp_file)
    finally:
        serialize.remove_load_hook(repack)


# --- killed saves and failing disks ------------------------------------------------------

_KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import fxopt
    from fxopt.artifact import serialize
    from test_serialize import optimized

    def stall(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"partial")
        print("writing", flush=True)
        time.sleep(60)

    serialize._write_tensors = stall
    fxopt.save(optimized("mlp")[0], {target!r})
""")


@pytest.mark.slow
def test_a_killed_save_leaves_a_marked_temp_file_the_next_save_removes(tmp_path):
    target = tmp_path / "m.fxopt"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE.format(tests=os.path.dirname(__file__),
                                                                        target=str(target))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    orphans = [n for n in os.listdir(tmp_path) if atomic_file.TEMP_MARK in n]
    assert len(orphans) == 1 and orphans[0].startswith(".m.fxopt") and not target.exists()
    alive = tmp_path / f".other.fxopt{atomic_file.TEMP_MARK}{os.getpid()}.abc"   # a save still running
    alive.write_bytes(b"partial")
    fxopt.save(optimized("mlp")[0], target)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, "m.fxopt"])
    assert_identical(fxopt.load(target)(torch.ones(2, 32)), optimized("mlp")[0](torch.ones(2, 32)))


def test_a_failed_save_names_the_users_path(tmp_path, monkeypatch):
    monkeypatch.setattr(serialize, "_write_tensors", _half_write_then_fail)
    with pytest.raises(OSError, match=r"cannot save .*m\.fxopt: No space left on device") as caught:
        fxopt.save(optimized("mlp")[0], tmp_path / "m.fxopt")
    assert atomic_file.TEMP_MARK not in str(caught.value) and caught.value.errno == 28
    assert os.listdir(tmp_path) == []
