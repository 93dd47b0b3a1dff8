"""Deep Compression: unstructured pruning (prune_weights), weight sharing (share_weights)
and Huffman-coded artifacts, on models trained on the digits (fxopt.examples)."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt import examples as ex
from fxopt.artifact.packed_int8 import conv_weight, int8_layers, layout, matrices

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return ex.digits()


def trained(model, data, epochs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small training loops run faster on one thread
    try:
        torch.manual_seed(0)
        return ex.train(model, data, epochs=epochs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cnn(data):
    return trained(ex.DigitsCNN(width=16), data, 3)


@pytest.fixture(scope="module")
def mlp(data):
    return trained(ex.DigitsMLP(hidden=64), data, 4)


def calib(data, n=4, size=64):
    return [(data.x_train[i * size:(i + 1) * size],) for i in range(n)]


def int8_weights(fast) -> dict:
    """{layer name: int8 weight in the original layer's shape} of every lowered int8 layer
    (dense GEMM, conv or sparse kernel layout)."""
    out = {}
    for target, (node, (n, k, groups)) in int8_layers(fast).items():
        mats = matrices(fast.get_buffer(target), n, k, groups, layout(node))
        layer = node.meta["fxopt_layer"]
        if isinstance(node.args[5], (list, tuple)):       # conv geometry
            o, c, kh, kw, g, _ = node.args[5]
            out[layer] = torch.from_numpy(conv_weight(mats, o, c, kh, kw, g))
        else:
            out[layer] = torch.from_numpy(mats[0])
    return out


def magnitude_masks(model, ratio) -> dict:
    """Reference masks: per layer, the round(ratio * numel) smallest |w| go (sorted by hand)."""
    masks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            w = mod.weight.detach().reshape(-1)
            mask = torch.ones_like(w, dtype=torch.bool)
            mask[torch.argsort(w.abs(), stable=True)[:round(ratio * w.numel())]] = False
            masks[name] = mask.reshape(mod.weight.shape)
    return masks


def masked_copy(model, masks):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            ref.get_submodule(name).weight.mul_(mask)
    return ref


def test_pruned_weights_stay_zero_in_int8_cnn_and_match_masked_eager(cnn, data):
    masks = magnitude_masks(cnn, 0.7)
    fast = fxopt.optimize(cnn, (data.x_test[:8],), calibration_data=calib(data), latency_repeats=0,
                          latency_aware=False, prune={"structure": "weights", "ratio": 0.7})
    weights = int8_weights(fast)
    assert set(weights) == set(masks)            # every conv (batch norm folded in) and linear
    for name, mask in masks.items():
        w = weights[name]
        assert w.shape == mask.shape
        assert int((w[~mask] != 0).sum()) == 0, name       # pruned: exactly zero in int8
        assert int((w[mask] != 0).sum()) > 0.9 * int(mask.sum()), name   # the rest mostly nonzero
    ref = masked_copy(cnn, masks)
    x1, x2 = data.x_test[:64], data.x_test[64:128]
    with torch.no_grad():
        out1, out2, want = fast(x1), fast(x2), ref(x1)
        plain = cnn(x1)
    assert (out1 - out2).abs().max() > 1.0            # different inputs, different answers
    scale = want.abs().max()
    assert (out1 - want).abs().max() < 0.05 * scale    # int8 of the masked model ...
    assert (plain - want).abs().max() > 0.1 * scale    # ... and not of the unpruned one
    assert (out1.argmax(1) == want.argmax(1)).float().mean() >= 0.95


def test_finetuned_masks_stay_zero_and_global_scope_counts(mlp, data):
    batches = [(x,) for x, _ in data.batches(batch_size=64)]
    fast = fxopt.optimize(mlp, (data.x_test[:8],), calibration_data=batches, latency_repeats=0,
                          latency_aware=False, finetune={"epochs": 2, "lr": 3e-3},
                          prune={"structure": "weights", "ratio": 0.8, "scope": "global",
                                 "schedule": "iterative", "steps": 2})
    stats = {r.name: r.stats for r in fast.fxopt_report.records}
    assert stats["prune_weights"]["steps"] == 2
    total = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    assert stats["prune_weights"]["zeroed"] == round(0.8 * total)
    kept = fast.meta["fxopt_sparsity"]
    assert sum(k for k, _ in kept.values()) == total - round(0.8 * total)
    fractions = [k / n for k, n in kept.values()]
    assert max(fractions) - min(fractions) > 0.05       # global: layers lose different shares
    weights = int8_weights(fast)
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    # fine-tuning moved the kept weights but revived none of the pruned ones
    assert nonzero <= total - round(0.8 * total)
    assert nonzero > 0.9 * (total - round(0.8 * total))
    plain = fxopt.optimize(mlp, (data.x_test[:8],), calibration_data=batches, latency_repeats=0,
                           latency_aware=False, prune={"structure": "weights", "ratio": 0.8, "scope": "global"})
    assert any(not torch.equal(weights[n], w) for n, w in int8_weights(plain).items())


@pytest.mark.parametrize("prune, message", [
    ({"structure": "wieghts", "ratio": 0.9}, "unknown prune structure 'wieghts'"),
    ({"structure": "weights", "ratio": 0.9, "round_to": 4}, "unknown option(s) round_to"),
    ({"structure": "weights", "ratio": 1.5}, "prune ratio must be a number in [0, 1)"),
    ({"structure": "weights", "criterion": "l1"}, "unknown prune criterion 'l1'"),
    ({"structure": "weights", "scope": "uniform"}, "unknown prune scope 'uniform'"),
    ({"structure": "weights", "schedule": "iterative", "steps": 0}, "prune steps must be an int >= 1"),
])
def test_weight_pruning_options_are_checked(mlp, data, prune, message):
    with pytest.raises((TypeError, ValueError)) as err:
        fxopt.optimize(mlp, (data.x_test[:8],), target="cpu-fp32", prune=prune)
    assert message in str(err.value)


def test_taylor_criterion_needs_data_and_differs_from_magnitude(mlp, data):
    with pytest.raises(fxopt.PassError, match="taylor.*needs calibration_data"):
        fxopt.optimize(mlp, (data.x_test[:8],), target="cpu-fp32",
                       prune={"structure": "weights", "ratio": 0.5, "criterion": "taylor"})
    prune = {"structure": "weights", "ratio": 0.5, "criterion": "taylor"}
    fast = fxopt.optimize(mlp, (data.x_test[:8],), target="cpu-fp32", calibration_data=calib(data),
                          prune=prune, latency_repeats=0)
    weights = {n: b for n, b in fast.named_buffers() if n.endswith("weight_pruned")}
    masks = magnitude_masks(mlp, 0.5)
    taylor = [w != 0 for w in weights.values()]
    assert all(int(t.sum()) == int(m.sum()) for t, m in zip(taylor, masks.values()))
    assert any(not torch.equal(t, m) for t, m in zip(taylor, masks.values()))


# --- compress="huffman" -----------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_cnn(cnn, data):
    return fxopt.optimize(cnn, (data.x_test[:8],), calibration_data=calib(data), latency_repeats=0,
                          latency_aware=False, prune={"structure": "weights", "ratio": 0.8})


def test_huffman_file_round_trips_exactly_and_is_smaller(pruned_cnn, data, tmp_path):
    plain, coded = tmp_path / "plain.fxopt", tmp_path / "coded.fxopt"
    fxopt.save(pruned_cnn, plain)
    fxopt.save(pruned_cnn, coded, compress="huffman")
    assert coded.stat().st_size < 0.4 * plain.stat().st_size
    a, b = fxopt.load(plain), fxopt.load(coded)
    want = dict(a.named_buffers())
    got = dict(b.named_buffers())
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)       # packed bytes included
    x = data.x_test[:100]
    assert torch.equal(b(x), pruned_cnn(x))
    kinds = [c["kind"] for c in _sections(*_header(coded))["codecs"]]
    layers = len(int8_layers(pruned_cnn))
    assert kinds.count("int8") == layers and kinds.count("col_sums") == layers   # sums rebuilt at load
    coded_report, plain_report = (fxopt.artifact.serialize.read_report(p) for p in (coded, plain))
    assert "coded" in coded_report.sections["compression"]              # the size table gains its coded column
    assert "coded" not in plain_report.sections["compression"]
    with pytest.raises(ValueError, match="compress='zip'"):
        fxopt.save(pruned_cnn, tmp_path / "x.fxopt", compress="zip")


def _rewrite(src, dst, change):
    """Copy a saved file with `change(metadata, tensors)` applied and its checksum made valid
    again: what a forger (or a bug) could write, not what a damaged copy looks like."""
    import safetensors
    import safetensors.torch
    from fxopt.artifact import serialize
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    change(meta, tensors)
    blobs = [tensors[f"storage.{i}"] for i in range(int(meta["storages"]))]
    meta["sha256"] = serialize._digest(meta, blobs)
    safetensors.torch.save_file(tensors, str(dst), metadata=meta)


def _header(path):
    import safetensors
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {"storage.0": f.get_tensor("storage.0").clone()}


def _sections(meta, tensors):
    import json
    from fxopt.artifact.compress import _unlzma
    head = int(meta["sections"])
    return json.loads(_unlzma(tensors["storage.0"][:head].numpy().tobytes(), 1 << 30))


def _set_sections(meta, tensors, sections):
    import json
    import lzma
    from fxopt.artifact.compress import LZMA
    head = lzma.compress(json.dumps(sections).encode(), format=lzma.FORMAT_RAW, filters=LZMA)
    rest = tensors["storage.0"][int(meta["sections"]):]
    tensors["storage.0"] = torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8), rest])
    meta["sections"] = str(len(head))


def _codecs(kind, edit):
    def change(meta, tensors):
        sections = _sections(meta, tensors)
        edit(next(c for c in sections["codecs"] if c["kind"] == kind), sections["codecs"])
        _set_sections(meta, tensors, sections)
    return change


def _flip_first_layer(meta, tensors):
    codecs = _sections(meta, tensors)["codecs"]
    i = next(i for i, c in enumerate(codecs) if c["kind"] == "int8")
    at = int(meta["sections"]) + sum(c["size"] for c in codecs[:i])
    tensors["storage.0"][at:at + codecs[i]["size"]] ^= 0x5A


def _flip_sections(meta, tensors):
    tensors["storage.0"][2:6] ^= 0x77


CORRUPTIONS = {
    "value count +1": _codecs("int8", lambda c, _: c["values"].__setitem__(0, c["values"][0] + 1)),
    "position count -1": _codecs("int8", lambda c, _: c["gaps"].__setitem__(0, c["gaps"][0] - 1)),
    "over-full code": _codecs("int8", lambda c, _: c["values"].__setitem__(2, [0, "111"])),
    "code length not a digit": _codecs("int8", lambda c, _: c["values"].__setitem__(2, [0, "\x01"])),
    "layer shape smaller": _codecs("int8", lambda c, _: c.__setitem__("k", 2)),
    "unknown filler": _codecs("int8", lambda c, _: c.__setitem__("filler", 5)),
    "unknown layout": _codecs("int8", lambda c, _: c.__setitem__("layout", "csr")),
    "column sums of no layer": _codecs("col_sums", lambda c, _: c.__setitem__("of", 0)),
    "recorded size": _codecs("int8", lambda c, _: c.__setitem__("nbytes", c["nbytes"] + 64)),
    "coded size": _codecs("int8", lambda c, _: c.__setitem__("size", c["size"] + 1)),
    "unknown codec": _codecs("int8", lambda c, _: c.__setitem__("kind", "lzma")),
    "codec list short": _codecs("int8", lambda c, codecs: codecs.pop()),
    "stream truncated": lambda m, t: t.__setitem__("storage.0", t["storage.0"][:-3].clone()),
    "stream bits flipped": _flip_first_layer,
    "sections not lzma": _flip_sections,
    "sections size past the end": lambda m, t: m.__setitem__("sections", str(t["storage.0"].numel() + 1)),
    "sections size short": lambda m, t: m.__setitem__("sections", str(int(m["sections"]) - 4)),
    "sections size not a number": lambda m, t: m.__setitem__("sections", "AAAA"),
    "unknown compression": lambda m, t: m.__setitem__("compress", "brotli"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_compressed_files_raise_artifact_error(pruned_cnn, tmp_path, name):
    good = tmp_path / "good.fxopt"
    fxopt.save(pruned_cnn, good, compress="huffman")
    bad = tmp_path / "bad.fxopt"
    _rewrite(good, bad, CORRUPTIONS[name])
    with pytest.raises(fxopt.ArtifactError, match="corrupt"):
        fxopt.load(bad)


def test_damaged_compressed_file_fails_its_checksum(pruned_cnn, tmp_path):
    path = tmp_path / "m.fxopt"
    fxopt.save(pruned_cnn, path, compress="huffman")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF                    # inside the one coded storage
    path.write_bytes(bytes(raw))
    with pytest.raises(fxopt.ArtifactError, match="checksum"):
        fxopt.load(path)


# --- share_weights ------------------------------------------------------------------

def test_shared_int8_weights_are_the_codebook_and_kernels_compute_the_shared_model(mlp, data):
    fast = fxopt.optimize(mlp, (data.x_test[:8],), calibration_data=calib(data), latency_repeats=0,
                          latency_aware=False, prune={"structure": "weights", "ratio": 0.7},
                          share_weights={"linear": 3})
    masks = magnitude_masks(mlp, 0.7)
    shared = {}
    for target, (node, (n, k, groups)) in int8_layers(fast).items():
        q = torch.from_numpy(matrices(fast.get_buffer(target), n, k, groups, layout(node))[0])
        scales = fast.get_buffer(node.args[2].target)
        layer = node.meta["fxopt_layer"]
        values = q[q != 0].unique()
        assert 2 <= len(values) <= 2 ** 3, layer                # at most 8 values, plus zero
        assert int((q[~masks[layer]] != 0).sum()) == 0          # pruned weights still zero
        assert torch.all(scales == scales[0])                   # one int8 grid for the layer
        shared[layer] = q.float() * scales[0]
    # the shared model in eager torch: the lowered model equals it up to int8 activations
    ref = copy.deepcopy(mlp)
    with torch.no_grad():
        for layer, w in shared.items():
            ref.get_submodule(layer).weight.copy_(w)
    pruned = masked_copy(mlp, masks)
    x1, x2 = data.x_test[:64], data.x_test[64:128]
    with torch.no_grad():
        out1, out2, want, unshared = fast(x1), fast(x2), ref(x1), pruned(x1)
    scale = want.abs().max()
    assert (out1 - out2).abs().max() > 1.0
    err = (out1 - want).abs().max()
    assert err < 0.01 * scale                                 # int8 activation rounding only
    assert (unshared - want).abs().max() > 5 * err           # and sharing did change the model
    # the codebook came from the pruned weights: each shared weight is near its original
    for layer, w in shared.items():
        orig = pruned.get_submodule(layer).weight
        assert (w - orig).abs().max() < 0.35 * orig.abs().max()


@pytest.mark.parametrize("share, message", [
    ({"bits": 9}, "bits must be an int in 1..8"),
    ({"bits": 4, "conv": 8}, "give 'bits' alone"),
    ({"lstm": 4}, "unknown key"),
    ({"bits": 4, "bias_bits": 1}, "bias_bits must be an int in 2..16"),
    ({"bits": 4, "finetune": 3}, "finetune must be a dict"),
    (5, "must be a dict"),
])
def test_share_weights_options_are_checked(mlp, data, share, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fxopt.optimize(mlp, (data.x_test[:8],), share_weights=share)


# --- trained quantization, grid biases, sparse layout in compressed files ----------------

def test_unpack_sparse_is_the_exact_inverse_of_pack():
    from fxopt.kernels.sparse_pack import PackedSparse, pack_sparse_s8, unpack_sparse_s8
    rng = np.random.default_rng(0)
    for n, k, density in [(1, 1, 1.0), (7, 33, 0.3), (9, 70, 0.9), (300, 64, 0.05), (5, 5, 0.0)]:
        q = (rng.integers(-127, 128, (n, k)) * (rng.random((n, k)) < density)).astype(np.int8)
        q[0, :4] = [127, 127, -127, 1][:min(4, k)] if density else 0   # pairs past +-128 get empty slots
        blob = pack_sparse_s8(q, np.ones(n, np.float32)).to_bytes()
        ps = PackedSparse.from_bytes(blob, np.ones(n), np.zeros(n), n, k)
        assert np.array_equal(unpack_sparse_s8(ps), q), (n, k, density)


def test_sparse_lowered_linears_are_huffman_coded_and_round_trip(mlp, data, tmp_path):
    fast = fxopt.optimize(mlp, (data.x_test[:8],), calibration_data=calib(data), latency_repeats=0,
                          latency_aware=False, sparse="always", prune={"structure": "weights", "ratio": 0.8})
    sparse = [n for n in fast.graph.nodes if n.target is fxopt.runtime.kernel_ops.linear_int8_sparse]
    assert sparse
    path = tmp_path / "m.fxopt"
    fxopt.save(fast, path, compress="huffman")
    codecs = _sections(*_header(path))["codecs"]
    assert sum(c["kind"] == "int8" and c["layout"] == "sparse" for c in codecs) == len(sparse)
    back = fxopt.load(path)
    want, got = dict(fast.named_buffers()), dict(back.named_buffers())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = data.x_test[:100]
    assert torch.equal(back(x), fast(x))


def test_trained_centroids_move_stay_on_the_grid_and_kernels_compute_them(mlp, data, tmp_path):
    opts = dict(calibration_data=calib(data), latency_repeats=0, latency_aware=False,
                prune={"structure": "weights", "ratio": 0.7})
    plain = fxopt.optimize(mlp, (data.x_test[:8],), share_weights={"linear": 3}, **opts)
    fast = fxopt.optimize(mlp, (data.x_test[:8],), share_weights={
        "linear": 3, "bias_bits": 8, "finetune": {"epochs": 4, "lr": 0.5}}, **opts)
    stats = {r.name: r.stats for r in fast.fxopt_report.records}["share_weights"]
    assert stats["centroids_moved"] > 0
    before, after = int8_weights(plain), int8_weights(fast)
    ref = copy.deepcopy(mlp)
    moved = 0
    for target, (node, _) in int8_layers(fast).items():
        layer = node.meta["fxopt_layer"]
        q, scales = after[layer], fast.get_buffer(node.args[2].target)
        assert len(q[q != 0].unique()) <= 2 ** 3 and torch.all(scales == scales[0])   # on one int8 grid
        assert torch.equal(q != 0, before[layer] != 0)            # same kept weights
        moved += int((q != before[layer]).sum())
        bias = fast.get_buffer(node.args[4].target)
        step = fast.meta["fxopt_shared"][layer]["bias_scale"]
        assert torch.equal(torch.round(bias / step) * torch.tensor(step), bias)     # bias on its grid
        with torch.no_grad():
            ref.get_submodule(layer).weight.copy_(q.float() * scales[0])
            ref.get_submodule(layer).bias.copy_(bias)
    assert moved > 0                                             # the centroids the kernels use moved
    x = data.x_test[:64]
    with torch.no_grad():
        want, got = ref(x), fast(x)
    assert (got - want).abs().max() < 0.01 * want.abs().max()   # int8 activation rounding only
    # distillation through the rounded centroids: the shared model got closer to the user's
    assert ex.accuracy(fast, data.x_test, data.y_test) > ex.accuracy(plain, data.x_test, data.y_test)
    path = tmp_path / "m.fxopt"
    fxopt.save(fast, path, compress="huffman")
    kinds = [c["kind"] for c in _sections(*_header(path))["codecs"]]
    assert kinds.count("grid_f32") == len(after)                 # biases stored as integers
    assert torch.equal(fxopt.load(path)(x), got)


def test_share_weights_finetune_needs_data(mlp, data):
    with pytest.raises(fxopt.PassError, match="calibration_data"):
        fxopt.optimize(mlp, (data.x_test[:8],), latency_repeats=0, latency_aware=False,
                       share_weights={"bits": 4, "finetune": {"epochs": 1}})


@pytest.mark.parametrize("version", ["2", "3"])
def test_retired_compressed_format_is_refused_by_name(pruned_cnn, tmp_path, version):
    good, old = tmp_path / "good.fxopt", tmp_path / "old.fxopt"
    fxopt.save(pruned_cnn, good, compress="huffman")
    _rewrite(good, old, lambda m, t: m.__setitem__("format_version", version))
    with pytest.raises(fxopt.ArtifactError, match=f"file format {version}.*Save the model again"):
        fxopt.load(old)


def _lzma_bytes(text: str) -> int:
    import lzma
    from fxopt.artifact.compress import LZMA
    return len(lzma.compress(text.encode(), format=lzma.FORMAT_RAW, filters=LZMA))


def test_compressed_file_keeps_a_compacted_report(pruned_cnn, tmp_path):
    """The report a compressed file holds has the saved model's summary, per-layer rows and
    sections, each pass's name, status, change and nonzero stats, and says it was compacted;
    its encoding is smaller than the whole report's (pass timings, counts, drift, options)."""
    import json
    from fxopt.artifact.compress import _rounded
    from fxopt.artifact.graph_json import encode_value
    path = tmp_path / "m.fxopt"
    fxopt.save(pruned_cnn, path, compress="huffman")
    full, loaded = pruned_cnn.fxopt_report, fxopt.load(path).fxopt_report
    want = _rounded(full.to_dict())                       # the file keeps 7 significant digits
    assert loaded.summary == want["summary"] and loaded.layers == want["layers"]
    sections = dict(loaded.sections)
    assert "compacted" in sections.pop("saved report") and "coded" in sections["compression"]
    assert sections.keys() == full.sections.keys()
    assert {k: v for k, v in sections.items() if k != "compression"} == \
        {k: v for k, v in full.sections.items() if k != "compression"}
    assert [(r.name, r.status, r.changed, r.stats) for r in loaded.records] == \
        [(p["pass"], p["status"], p["changed"], {k: v for k, v in p["stats"].items() if v}) for p in want["passes"]]
    assert loaded.pipeline == full.pipeline and "saved report:\ncompacted" in str(loaded)
    assert all(r.seconds is None and r.drift is None for r in loaded.records)
    stored = _sections(*_header(path))["report"]
    whole = json.dumps(encode_value(want))            # what a format-3 file stored (less the coded column)
    assert _lzma_bytes(stored) < _lzma_bytes(whole)
    assert fxopt.artifact.serialize.read_report(path).to_dict() == loaded.to_dict()


def test_size_table_in_the_report_per_layer_and_by_stage(pruned_cnn, tmp_path):
    table = pruned_cnn.fxopt_report.sections["compression"]
    sparsity = pruned_cnn.meta["fxopt_sparsity"]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:len(sparsity) + 1]}
    assert {layer: [int(r[2]), int(r[1])] for layer, r in rows.items()} == sparsity     # kept, weights
    dense = pruned_cnn.fxopt_report.summary["fp32_bytes"]
    stages = {line.split(" B ")[0].rsplit(None, 1)[0]: int(line.split(" B ")[0].rsplit(None, 1)[1].replace(",", ""))
              for line in table.splitlines()[len(sparsity) + 1:]}
    kept = sum(k for k, _ in sparsity.values())
    weights = sum(n for _, n in sparsity.values())
    assert stages == {"dense fp32": dense, "pruned": kept * 5 + dense - 4 * weights}
    path = tmp_path / "m.fxopt"
    fxopt.save(pruned_cnn, path, compress="huffman")
    saved = fxopt.artifact.serialize.read_report(path).sections["compression"]
    meta, tensors = _header(path)
    sizes = [c["size"] for c in _sections(meta, tensors)["codecs"] if c["kind"] == "int8"]
    coded = [int(line.split()[5]) for line in saved.splitlines()[1:len(sparsity) + 1]]
    assert sorted(coded) == sorted(sizes)
    data = tensors["storage.0"].numel() - int(meta["sections"])
    assert f"coded (file data)  {data:>9,} B" in saved
