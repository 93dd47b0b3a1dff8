"""Saved models to attack: int8 zoo models written once, and a rewriter that edits a file
as an attacker can (anyone can recompute the SHA-256 a file carries)."""
import functools
import json
import os
import sys
import tempfile
import warnings

import safetensors
import safetensors.torch

sys.path.insert(0, os.path.dirname(__file__))
import fxopt  # noqa: E402
from fxopt.artifact import serialize  # noqa: E402
from zoo import ZOO  # noqa: E402


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@functools.lru_cache(maxsize=None)
def int8_model(name):
    """(cpu-int8 model, example inputs) of a zoo model, optimized once per process."""
    model, example, _ = ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example],
                              latency_repeats=0, report_layers=False, drift=False)
    return fast, example


@functools.lru_cache(maxsize=None)
def int8_bytes(name):
    """The bytes of fxopt.save(int8_model(name))."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.fxopt")
        fxopt.save(int8_model(name)[0], path)
        with open(path, "rb") as f:
            return f.read()


def read(path):
    """(metadata dict, graph dict, {key: tensor}) of a saved file."""
    with safetensors.safe_open(os.fspath(path), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return metadata, json.loads(metadata["graph"]), tensors


def write(path, metadata, graph, tensors, fix_digest=True):
    """Write a file from parts; the digest recomputed as an attacker would."""
    metadata = dict(metadata)
    if graph is not None:
        metadata["graph"] = json.dumps(graph)
    if fix_digest:
        blobs = [tensors[f"storage.{i}"] for i in range(len(tensors))]   # as many as there are
        metadata["sha256"] = serialize._digest(metadata, blobs)
    safetensors.torch.save_file(tensors, os.fspath(path), metadata=metadata)


def rewrite(path, edit_metadata=None, edit_graph=None, fix_digest=True):
    """Rewrite a saved file's header (as an attacker or a newer fxopt could), keeping tensors."""
    metadata, graph, tensors = read(path)
    if edit_graph:
        edit_graph(graph)
    metadata["graph"] = json.dumps(graph)
    if edit_metadata:
        edit_metadata(metadata)
    write(path, metadata, None, tensors, fix_digest)
