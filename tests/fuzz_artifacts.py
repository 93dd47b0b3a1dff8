"""Fuzz fxopt.load with corrupted int8 model files (run by test_hostile_files.py in a
child process, so that a crash kills the child, not the test run).

    python tests/fuzz_artifacts.py --mutations 1050 --seed 0 --dir /tmp/fuzz

Each mutation edits one saved file (an MLP, a CNN and BERT, all cpu-int8; the MLP and the
CNN also saved compress="huffman", whose graph sits in the coded section) and recomputes
its digest, as an attacker can: the tensor table (shapes, strides, offsets, dtypes,
storage indices), the arguments of the lowered kernel ops, node references and targets,
input specs and header fields; in compressed files also the codec records, the coded
bytes and the section size. The outcome of each is one of
  refused  - fxopt.load raised ArtifactError
  raised   - the model loaded, and calling it raised an exception (not a crash)
  same     - the model loaded and answered exactly as the original, twice
and anything else is "bad": an error other than ArtifactError at load, two calls that
disagree, or an answer that differs from the original's.

Corruption is what is fuzzed: a value moved out of its domain or made inconsistent with
the rest of the file. An edit that keeps the file a valid description of another model
(another stride, another weight through an in-bounds offset) is what any file can say,
whoever wrote it, so it is not drawn here. One JSON line per mutation; the last line
sums them up.
"""
import argparse
import copy
import json
import lzma
import os
import random
import sys
import time
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

import fxopt  # noqa: E402
import safetensors  # noqa: E402
from artifact_files import call, int8_bytes, int8_model, write  # noqa: E402
from fxopt.artifact.compress import LZMA, _unlzma  # noqa: E402
from fxopt.core.errors import ArtifactError  # noqa: E402

HUFFMAN = "@huffman"          # a model saved with compress="huffman"
MODELS = ("mlp", "cnn_bn_residual", "bert", "mlp" + HUFFMAN, "cnn_bn_residual" + HUFFMAN)
HUGE = (2**31, 2**40, 2**63)
DTYPES = ("float32", "float64", "int8", "uint8", "int32", "int64", "bool", "float16", "complex64", "nope", 3)
BAD_TARGETS = ("aten::from_file.default", "aten::empty.memory_format", "aten::copy_.default", "aten::save",
               "aten::set_.source_Storage", "aten::seed.default", "fxopt::nope.default", "os.system",
               "aten::linear", "", "aten:::linear.default")


# --- mutations: each takes (rng, graph dict, metadata dict) and returns a description --------

def _tensor(rng, graph):
    name = rng.choice(sorted(graph["tensors"]))
    return name, graph["tensors"][name]


def tensor_shape(rng, graph, metadata):
    name, rec = _tensor(rng, graph)
    if not rec["shape"] or rng.random() < 0.2:
        rec["shape"] = rec["shape"] + [rng.choice([1, 2, 7])]
        return f"{name}: one more dim"
    d = rng.randrange(len(rec["shape"]))
    size = rec["shape"][d]
    rec["shape"][d] = rng.choice([0, size - 1, size + 1, 2 * size, size // 2, -1, *HUGE, 1.5, "8"])
    return f"{name}: shape[{d}] {size} -> {rec['shape'][d]}"


def tensor_stride(rng, graph, metadata):
    name, rec = _tensor(rng, graph)
    if not rec["stride"]:
        rec["stride"] = [1]
        return f"{name}: a stride without a dim"
    d = rng.randrange(len(rec["stride"]))
    rec["stride"][d] = rng.choice([-1, *HUGE, None])
    return f"{name}: stride[{d}] -> {rec['stride'][d]}"


def tensor_offset(rng, graph, metadata):
    name, rec = _tensor(rng, graph)
    rec["offset"] = rng.choice([-1, *HUGE, 2**20 + 1, "0", None])
    return f"{name}: offset -> {rec['offset']}"


def tensor_dtype(rng, graph, metadata):
    name, rec = _tensor(rng, graph)
    old = rec["dtype"]
    rec["dtype"] = rng.choice([d for d in DTYPES if d != old])
    return f"{name}: dtype {old} -> {rec['dtype']}"


def tensor_storage(rng, graph, metadata):
    name, rec = _tensor(rng, graph)
    # one past the last storage: a compressed file's header counts its one coded storage, the
    # graph's table the storages it decodes to (pointing at another of those is another model)
    past = max(int(metadata["storages"]), 1 + max(r["storage"] for r in graph["tensors"].values()))
    rec["storage"] = rng.choice([-1, past, *HUGE, True, "0", None])
    return f"{name}: storage -> {rec['storage']}"


def tensor_record(rng, graph, metadata):
    name, rec = _tensor(rng, graph)
    key = rng.choice(sorted(rec))
    if rng.random() < 0.5:
        del rec[key]
        return f"{name}: no {key}"
    rec[key] = rng.choice([None, [], {}, "x", -1])
    return f"{name}: {key} -> {rec[key]}"


def _kernel_nodes(graph):
    return [n for n in graph["nodes"] if n["op"] == "call_function" and n["target"].startswith("fxopt::")]


# Out-of-domain values per kernel-op argument position (in-domain ones describe another model).
_OUT_OF_DOMAIN = {
    "fxopt::linear_int8.default": {5: [0, -1, 1, *HUGE], 6: [0, -1, *HUGE], 9: [{"float": "nan"}, {"float": "inf"}],
                                   10: [-1, 256, *HUGE]},
    "fxopt::conv2d_int8.default": {11: [{"float": "nan"}, {"float": "inf"}], 12: [-1, 256, *HUGE]},
}


def kernel_int_arg(rng, graph, metadata):
    node = rng.choice(_kernel_nodes(graph))
    args = node["args"]["tuple"]
    choices = _OUT_OF_DOMAIN.get(node["target"], {})
    if node["target"] == "fxopt::conv2d_int8.default" and rng.random() < 0.6:
        i = rng.choice([5, 6, 7, 8])                       # geometry, stride, padding, dilation
        values = args[i]["list"]
        j = rng.randrange(len(values))
        old = values[j]
        values[j] = rng.choice([0, -1, *HUGE] + ([old + 1, 2 * old] if i == 5 and j < 4 else []))
        return f"{node['name']}: arg {i}[{j}] {old} -> {values[j]}"
    if not choices:
        return kernel_arg_type(rng, graph, metadata)
    i = rng.choice(sorted(choices))
    old, args[i] = args[i], rng.choice(choices[i])
    return f"{node['name']}: arg {i} {old} -> {args[i]}"


def _kind(value):
    if isinstance(value, int) or (isinstance(value, dict) and "float" in value):
        return "number"
    return type(value).__name__ if not isinstance(value, dict) else next(iter(value), "dict")


def kernel_arg_type(rng, graph, metadata):
    """An argument of another kind (a number where a list was, ...): another number where a
    number was would be another valid model, so the kind always changes."""
    node = rng.choice(_kernel_nodes(graph))
    args = node["args"]["tuple"]
    i = rng.randrange(len(args))
    old = args[i]
    kinds = [{"float": 1.0}, "relu", {"list": [1]}, {"node": graph["nodes"][0]["name"]}, {"tuple": []},
             {"dtype": "float32"}, {"device": "cpu"}]
    args[i] = rng.choice([k for k in kinds if _kind(k) != _kind(old)])
    return f"{node['name']}: arg {i} {json.dumps(old)[:40]} -> {json.dumps(args[i])}"


def kernel_arg_count(rng, graph, metadata):
    node = rng.choice(_kernel_nodes(graph))
    args = node["args"]["tuple"]
    if rng.random() < 0.5:     # the first, always required (a trailing one may have a default)
        args.pop(0)
        return f"{node['name']}: no first argument"
    # past every parameter the op has (filling an optional one in is another valid model)
    args += [rng.choice([0, {"float": 1.0}, None, "x"]) for _ in range(4)]
    return f"{node['name']}: more arguments than the op takes"


def _names(graph):
    return [n["name"] for n in graph["nodes"]]


def node_reference(rng, graph, metadata):
    calls = [n for n in graph["nodes"] if n["op"] == "call_function"]
    node = rng.choice(calls)
    refs = [i for i, a in enumerate(node["args"]["tuple"]) if isinstance(a, dict) and "node" in a]
    if not refs:
        return node_target(rng, graph, metadata)
    i = rng.choice(refs)
    later = _names(graph)[_names(graph).index(node["name"]):]
    node["args"]["tuple"][i] = {"node": rng.choice(["nobody", node["name"], *later[1:3]])}
    return f"{node['name']}: arg {i} refers to {node['args']['tuple'][i]['node']}"


def node_target(rng, graph, metadata):
    node = rng.choice([n for n in graph["nodes"] if n["op"] == "call_function"])
    old, node["target"] = node["target"], rng.choice(BAD_TARGETS)
    return f"{node['name']}: target {old} -> {node['target']!r}"


def node_structure(rng, graph, metadata):
    nodes = graph["nodes"]
    i = rng.randrange(len(nodes))
    what = rng.choice(["delete", "duplicate name", "move last", "op"])
    if what == "delete":
        del nodes[i]
    elif what == "duplicate name":
        nodes[i]["name"] = nodes[(i + 1) % len(nodes)]["name"]
    elif what == "move last":
        nodes.append(nodes.pop(i))
    else:
        nodes[i]["op"] = rng.choice(["call_module", "call_method", "get_attr", "nope"])
    return f"node {i}: {what}"


def input_spec(rng, graph, metadata):
    specs = graph.get("inputs") or []
    shaped = [s for s in specs if s and s["shape"]]
    if not shaped:
        graph["inputs"] = rng.choice([None, [], "x"])
        return "inputs replaced"
    spec = rng.choice(shaped)
    d = rng.randrange(len(spec["shape"]))
    old = spec["shape"][d]
    spec["shape"][d] = rng.choice([-1, 1.5, "1x", None if old is None else [old], *HUGE])
    return f"input {spec['name']}: dim {d} {old} -> {spec['shape'][d]}"


def header(rng, graph, metadata):
    key = rng.choice(["format", "format_version", "storages", "byteorder", "report", "artifact", "graph"])
    metadata[key] = rng.choice(["", "-1", "0", "99", "{", "[]", "null", "big", json.dumps({"nodes": 1})])
    return f"header {key} -> {metadata[key]!r}"


def codec_record(rng, graph, metadata, sections=None):
    """A compressed file's codec record: a field out of its domain or of another kind."""
    if sections is None:
        return header(rng, graph, metadata)
    i = rng.randrange(len(sections["codecs"]))
    codec = sections["codecs"][i]
    key = rng.choice(sorted(codec))
    old = codec[key]
    if isinstance(old, list) and old and rng.random() < 0.7:      # a stream: count, size, table
        j = rng.randrange(len(old))
        old[j] = rng.choice([-1, old[j] + 1 if type(old[j]) is int else 1, *HUGE, [0, "1" * 3], [0, "\x00"],
                             "x", None])
        return f"codec {i} ({codec['kind']}): {key}[{j}] -> {old[j]!r:.30}"
    codec[key] = rng.choice([-1, 0, 1, *HUGE, 1.5, "lzma", "sparse", [], None, {"x": 1}])
    return f"codec {i} ({codec['kind']}): {key} {old!r:.30} -> {codec[key]!r:.30}"


def coded_bytes(rng, graph, metadata, sections=None, tensors=None):
    """Bytes of the coded storages changed, cut or added (the sections left whole)."""
    if sections is None:
        return header(rng, graph, metadata)
    blob = tensors["storage.0"].clone()
    head = int(metadata["sections"])
    what = rng.choice(["flip", "cut", "grow"])
    if what == "flip" and blob.numel() > head:
        at = rng.randrange(head, blob.numel())
        blob[at] ^= 1 << rng.randrange(8)
    elif what == "cut" and blob.numel() > head:
        blob = blob[:rng.randrange(head, blob.numel())].clone()
    else:
        blob = torch.cat([blob, torch.tensor([rng.randrange(256)], dtype=torch.uint8)])
    tensors["storage.0"] = blob
    return f"coded storages: {what}"


def section_size(rng, graph, metadata, sections=None):
    if sections is None:
        return header(rng, graph, metadata)
    old = int(metadata["sections"])
    metadata["sections"] = rng.choice(["0", "-1", str(old - 1), str(old + 1), "1e3", "", str(2**40)])
    return f"header sections {old} -> {metadata['sections']!r}"


MUTATIONS = (tensor_shape, tensor_stride, tensor_offset, tensor_dtype, tensor_storage, tensor_record,
             kernel_int_arg, kernel_arg_type, kernel_arg_count, node_reference, node_target,
             node_structure, input_spec, header, codec_record, coded_bytes, section_size)


# --- running one mutated file ------------------------------------------------------------

def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                                    for x, y in zip(a, b))


def outcome(path, example, expected) -> tuple[str, str]:
    try:
        model = fxopt.load(path)
    except ArtifactError:
        return "refused", ""
    except Exception as e:  # noqa: BLE001 - any other error at load is a finding
        return "bad", f"load raised {type(e).__name__}: {e}"[:300]
    try:
        with torch.no_grad():
            first, second = _leaves(call(model, example)), _leaves(call(model, example))
    except Exception as e:  # noqa: BLE001 - an error when called is not a silent answer
        return "raised", f"{type(e).__name__}: {e}"[:200]
    if not _same(first, second):
        return "bad", "two calls disagree"
    if not _same(first, expected):
        return "bad", "answers differently from the original"
    return "same", ""


def saved_bytes(name):
    """The bytes of the model's file, compressed for a name ending in HUFFMAN."""
    if not name.endswith(HUFFMAN):
        return int8_bytes(name)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.fxopt")
        fxopt.save(int8_model(name.removesuffix(HUFFMAN))[0], path, compress="huffman")
        with open(path, "rb") as f:
            return f.read()


def read_parts(path):
    """(metadata, graph, tensors, sections or None): a compressed file's graph is in its sections."""
    with safetensors.safe_open(path, "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "compress" not in metadata:
        return metadata, json.loads(metadata["graph"]), tensors, None
    head = int(metadata["sections"])
    sections = json.loads(_unlzma(tensors["storage.0"][:head].numpy().tobytes(), 1 << 30))
    return metadata, json.loads(sections["graph"]), tensors, sections


def write_parts(path, metadata, graph, tensors, sections, keep_header_graph):
    if sections is None:
        if not keep_header_graph:
            metadata["graph"] = json.dumps(graph)
        return write(path, metadata, None, tensors)
    sections["graph"] = json.dumps(graph)
    old_head = int(sections.pop("_head"))
    head = lzma.compress(json.dumps(sections).encode(), format=lzma.FORMAT_RAW, filters=LZMA)
    rest = tensors["storage.0"][old_head:]
    tensors = {"storage.0": torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8), rest])}
    if metadata.get("sections") == str(old_head):      # unless a mutation set it
        metadata["sections"] = str(len(head))
    return write(path, metadata, None, tensors)


def mutate(rng, mutation, graph, metadata, sections, tensors):
    if sections is None or mutation not in (codec_record, coded_bytes, section_size):
        return mutation(rng, graph, metadata)
    if mutation is coded_bytes:
        return coded_bytes(rng, graph, metadata, sections, tensors)
    return mutation(rng, graph, metadata, sections)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mutations", type=int, default=1050)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", required=True)
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    originals = {}
    for name in MODELS:
        path = os.path.join(opts.dir, f"{name}.fxopt")
        with open(path, "wb") as f:
            f.write(saved_bytes(name))
        example = int8_model(name.removesuffix(HUFFMAN))[1]
        with torch.no_grad():
            originals[name] = (read_parts(path), example, _leaves(call(fxopt.load(path), example)))
    outcomes, bad = {"refused": 0, "raised": 0, "same": 0, "bad": 0}, []
    path = os.path.join(opts.dir, "mutated.fxopt")
    for i in range(opts.mutations):
        name = MODELS[i % len(MODELS)]
        (metadata, graph, tensors, sections), example, expected = originals[name]
        metadata, graph, tensors = dict(metadata), copy.deepcopy(graph), dict(tensors)
        sections = None if sections is None else dict(copy.deepcopy(sections), _head=metadata["sections"])
        mutation = rng.choice(MUTATIONS)
        what = mutate(rng, mutation, graph, metadata, sections, tensors)
        write_parts(path, metadata, graph, tensors, sections, mutation is header and "graph" in what)
        start = time.perf_counter()
        result, detail = outcome(path, example, expected)
        outcomes[result] += 1
        record = {"i": i, "model": name, "mutation": mutation.__name__, "what": what, "outcome": result,
                  "detail": detail, "seconds": round(time.perf_counter() - start, 3)}
        if result == "bad":
            bad.append(record)
        print(json.dumps(record), flush=True)
    print(json.dumps({"mutations": opts.mutations, "outcomes": outcomes, "bad": bad}), flush=True)


if __name__ == "__main__":
    main()
