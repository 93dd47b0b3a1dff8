"""Save an optimized model to one file and load it back, without running code from the file.

    fast = fxopt.optimize(model, example, target="cpu-fp32")
    fxopt.save(fast, "model.fxopt")
    same = fxopt.load("model.fxopt")        # same outputs, called the same way
    print(fxopt.artifact.serialize.read_report("model.fxopt"))   # the stored table, model not loaded

The file is a safetensors file. Its tensors are the weights' raw storages
(uint8 blobs, see tensor_store); its string metadata holds the graph as JSON
(see graph_json), the report, `gm.meta["fxopt_artifact"]`, the fxopt and
format versions and a SHA-256 over all of it. Why safetensors rather than a
zip: one standard container whose header is parsed by a memory-safe reader
that never unpickles, whose tensors load straight from the file, and whose
header (graph, report) can be read without touching the weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import warnings

import safetensors.torch
import torch
from torch import fx, nn

from fxopt.artifact.atomic_file import write_atomic
from fxopt.artifact.compress import compress as compress_file, decompress
from fxopt.artifact.graph_json import decode_graph, decode_value, encode_graph, encode_value
from fxopt.artifact.opset import check_graph
from fxopt.artifact.tensor_store import assign_weight, collect_weights, rebuild_weights
from fxopt.core.errors import ArtifactError, FxoptError
from fxopt.core.report import Report
from fxopt.core.version import VERSION
from fxopt.pruning.structured import PruneReport
from fxopt.runtime.input_check import input_specs, install as install_input_check
from fxopt.runtime.plan import check_runtime, install as install_plan
from fxopt.runtime.kernel_args import check_lowered

__all__ = ["save", "load", "read_report", "register_load_hook", "remove_load_hook",
           "FORMAT_VERSION", "ARTIFACT_META"]

FORMAT = "fxopt"
FORMAT_VERSION = 1
COMPRESSED_VERSION = 4             # compress="huffman" files: older fxopt refuses them by version
RETIRED_VERSIONS = {2: "the first compressed format (its sections in base64, no sparse-layout layers)",
                    3: "the compressed format whose report was not compacted (a format-3 reader cannot "
                       "read a compacted one)"}
COMPRESSIONS = (None, "huffman")
ARTIFACT_META = "fxopt_artifact"   # plain JSON a stage wants back at load (e.g. packing ISA)
CAPTURE_META = "fxopt_capture"

# Modules that define torch.ops.fxopt operators; load imports them (fixed
# names, never names read from a file) before resolving a graph's targets.
OP_PROVIDERS = ["fxopt"]

_LOAD_HOOKS: list = []


def register_load_hook(fn):
    """Call `fn(gm, artifact_meta)` on every loaded model, in registration order.

    For stages whose saved state depends on the machine, e.g. weights packed
    for one CPU's ISA that must be repacked on another:

        @fxopt.artifact.serialize.register_load_hook
        def repack(gm, meta):
            if meta.get("kernel_isa") != current_isa(): ...
    """
    if fn not in _LOAD_HOOKS:
        _LOAD_HOOKS.append(fn)
    return fn


def remove_load_hook(fn) -> None:
    """Undo register_load_hook(fn)."""
    if fn in _LOAD_HOOKS:
        _LOAD_HOOKS.remove(fn)


# --- save --------------------------------------------------------------------

def save(model: fx.GraphModule, path, compress: str | None = None) -> None:
    """Write `model` (what fxopt.optimize returned) to `path`, atomically.

    The file at `path` is replaced only once the new one is complete and on
    disk; on any failure the old file is left as it was. compress="huffman"
    stores each int8 layer's nonzero weights and their positions Huffman coded
    and the rest zlib-compressed (fxopt.artifact.compress; the model loads the same).

        fxopt.save(fast, "model.fxopt")
        fxopt.save(fast, "model.fxopt", compress="huffman")    # pruned/shared models shrink most
    """
    if compress not in COMPRESSIONS:
        raise ValueError(f"fxopt.save: compress={compress!r}; use None (default) or 'huffman'")
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"fxopt.save expects the GraphModule fxopt.optimize returned, got "
                        f"{type(model).__name__}")
    try:
        check_graph(model.graph)
    except ArtifactError as e:
        raise ArtifactError(f"cannot save {os.fspath(path)}: {e}. fxopt saves only the operators it "
                            "loads; keep this one out of the model, or run it unsaved.") from None
    blobs, table = collect_weights(model)
    graph = encode_graph(model)
    graph.update(tensors=table, training=model.training, meta=_graph_meta(model),
                 inputs=input_specs(model))
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "fxopt_version": VERSION, "torch_version": torch.__version__,
        "byteorder": sys.byteorder, "storages": str(len(blobs)),
        "graph": json.dumps(graph),
        "report": json.dumps(_report_data(getattr(model, "fxopt_report", None))),
        "artifact": json.dumps(_artifact_meta(model)),
    }
    if compress is not None:
        metadata, blobs = compress_file(model, metadata, blobs, table)
        metadata["format_version"] = str(COMPRESSED_VERSION)
    metadata["sha256"] = _digest(metadata, blobs)
    tensors = {f"storage.{i}": b for i, b in enumerate(blobs)}
    write_atomic(os.fspath(path), lambda tmp: _write_tensors(tensors, tmp, metadata))


# gm.meta entries of a class of their own, saved as cls.to_dict() and loaded by cls.from_dict
_META_CLASSES = {"fxopt_prune": PruneReport}


def _graph_meta(gm) -> dict:
    """gm.meta["fxopt_*"] entries (bar the artifact meta), tagged-encoded."""
    out = {}
    for key, value in gm.meta.items():
        if not key.startswith("fxopt_") or key == ARTIFACT_META:
            continue
        if isinstance(value, _META_CLASSES.get(key, ())):
            value = value.to_dict()
        try:
            out[key] = encode_value(value, f"gm.meta[{key!r}]")
        except ArtifactError as e:
            warnings.warn(f"fxopt.save: gm.meta[{key!r}] is not saved: {e}", stacklevel=3)
    return out


def _artifact_meta(gm) -> dict:
    meta = gm.meta.get(ARTIFACT_META, {})
    try:
        ok = json.loads(json.dumps(meta)) == meta and isinstance(meta, dict)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ArtifactError(f"cannot save gm.meta[{ARTIFACT_META!r}]: it must be a dict of plain "
                            "JSON data (str keys; dict, list, str, int, float, bool, None values; "
                            f"no tuples), got {meta!r:.100}")
    return meta


def _report_data(report):
    if report is None:
        return None
    return encode_value(_portable(report.to_dict()), "the report")


def _portable(v):
    """The report's data with scalars made plain and unknown objects made text (as printed)."""
    if isinstance(v, dict):
        return {k if isinstance(k, (str, int)) else str(k): _portable(x) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_portable(x) for x in v)
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        return v.item()   # numpy / torch scalar
    try:
        encode_value(v)
        return v
    except ArtifactError:
        return str(v)


def _digest(metadata: dict, blobs) -> str:
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        h.update(f"{len(key)}:{key}{len(metadata[key])}:".encode())
        h.update(metadata[key].encode())
    for blob in blobs:
        h.update(blob.numpy().data)
    return h.hexdigest()


def _write_tensors(tensors: dict, path: str, metadata: dict) -> None:
    safetensors.torch.save_file(tensors, path, metadata=metadata)



# --- load --------------------------------------------------------------------

def load(path, runtime: str = "plan") -> fx.GraphModule:
    """Load a model written by fxopt.save: a GraphModule called like the saved one,
    running on an execution plan rebuilt from its graph (runtime="graph": on the graph
    itself, for debugging; see fxopt.runtime.plan).

    Only aten/fxopt operators and a fixed set of Python functions can appear
    in the graph, and only tensors are read from the file; anything else
    raises ArtifactError, as do corrupt, truncated, foreign and too-new files.

        fast = fxopt.load("model.fxopt")
        fast(**inputs)
    """
    path = os.fspath(path)
    check_runtime(runtime)                 # before reading the file
    metadata, blobs = _read(path)
    graph_data = _json(metadata, "graph", path)
    if not isinstance(graph_data, dict):
        raise ArtifactError(f"{path} is corrupt: its graph entry is not a JSON object")
    try:
        gm = _module(graph_data, blobs)
    except ArtifactError as e:
        raise ArtifactError(f"cannot load {path}: {e}") from None
    _restore_meta(gm, graph_data.get("meta", {}), metadata, path)
    report = _json(metadata, "report", path)
    if report is not None:
        gm.fxopt_report = _report(report, path)
    for hook in list(_LOAD_HOOKS):
        _run_hook(hook, gm)
    return install_plan(gm, runtime)


def _read(path: str) -> tuple[dict, list]:
    """The checked header and the storage blobs of a saved model."""
    with _open(path) as f:
        metadata = _check_header(f.metadata(), path)
        # Why clone: safetensors maps the file; a later in-place write or truncation of
        # the file would change or crash (SIGBUS) the loaded model.
        blobs = [f.get_tensor(f"storage.{i}").clone()
                 for i in range(_int(metadata, "storages", path))]
    if _digest(metadata, blobs) != metadata.get("sha256"):
        raise ArtifactError(f"{path} is corrupt: its checksum does not match its contents "
                            "(damaged in copy or storage). Save the model again.")
    if "compress" in metadata:
        if metadata["compress"] != "huffman":
            raise ArtifactError(f"{path} is corrupt: unknown compression {metadata['compress']!r:.40}")
        metadata, blobs = decompress(metadata, blobs, path)
    return metadata, blobs


def _module(graph_data: dict, blobs: list) -> fx.GraphModule:
    for module in OP_PROVIDERS:
        importlib.import_module(module)
    weights = rebuild_weights(graph_data.get("tensors"), blobs)
    graph = decode_graph(graph_data, set(weights))
    check_graph(graph)
    gm = _build_module(graph, weights)
    check_lowered(gm)
    if graph_data.get("inputs") is not None:
        install_input_check(gm, graph_data["inputs"])
    gm.train(bool(graph_data.get("training", False)))
    return gm


@contextlib.contextmanager
def _open(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fxopt model file at {path}")
    try:
        f = safetensors.safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(
            f"{path} is not an fxopt model file, or it is truncated or corrupt: {e}. "
            "Give a file written by fxopt.save, or save the model again.") from None
    try:
        yield f
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path} is corrupt ({type(e).__name__}: {e}); save the model again.") from None


def _check_header(metadata, path: str) -> dict:
    if not metadata or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path} is a safetensors file but not an fxopt model (no fxopt "
                            "header); load plain weights with safetensors.torch.load_file.")
    version = _int(metadata, "format_version", path)
    if version > COMPRESSED_VERSION:
        raise ArtifactError(
            f"{path} was written by a newer fxopt ({metadata.get('fxopt_version', '?')}, file "
            f"format {version}); this fxopt ({VERSION}) reads format up to "
            f"{COMPRESSED_VERSION}. Upgrade fxopt to load it.")
    if version in RETIRED_VERSIONS:
        raise ArtifactError(f"{path} is in file format {version}, {RETIRED_VERSIONS[version]}, written by "
                            f"fxopt {metadata.get('fxopt_version', '?')} before its release; this fxopt "
                            f"reads formats {FORMAT_VERSION} and {COMPRESSED_VERSION}. Save the model again with "
                            "this fxopt.")
    if metadata.get("byteorder") != sys.byteorder:
        raise ArtifactError(f"{path} was written on a {metadata.get('byteorder')}-endian machine; "
                            f"this one is {sys.byteorder}-endian. Save the model on this machine.")
    return metadata


def _int(metadata: dict, key: str, path: str) -> int:
    try:
        value = int(metadata[key])
    except (KeyError, ValueError):
        raise ArtifactError(f"{path} is corrupt: header entry {key!r} is missing or not a "
                            "number. Save the model again.") from None
    if value < 0 or (key == "format_version" and value < 1):
        raise ArtifactError(f"{path} is corrupt: header entry {key!r} is {value}")
    return value


def _json(metadata: dict, key: str, path: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path} is corrupt: header entry {key!r} is missing or not JSON "
                            f"({e}). Save the model again.") from None


def _build_module(graph: fx.Graph, weights: dict) -> fx.GraphModule:
    root = nn.Module()
    for name, (t, kind, persistent) in weights.items():
        assign_weight(root, name, t, kind, persistent)
    try:
        gm = fx.GraphModule(root, graph)
    except Exception as e:  # noqa: BLE001 - a decoded graph FX cannot compile is corrupt data
        raise ArtifactError(f"corrupt graph data: FX cannot build the module "
                            f"({type(e).__name__}: {e})") from None
    # GraphModule copies every tensor as a buffer; give each its saved kind back.
    for name, (t, kind, persistent) in weights.items():
        assign_weight(gm, name, t, kind, persistent)
    return gm


def _restore_meta(gm, graph_meta: dict, metadata: dict, path: str) -> None:
    if not isinstance(graph_meta, dict):
        raise ArtifactError(f"{path} is corrupt: graph meta is not a mapping")
    for key, value in graph_meta.items():
        gm.meta[key] = decode_value(value)
        if key in _META_CLASSES:
            try:
                gm.meta[key] = _META_CLASSES[key].from_dict(gm.meta[key])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ArtifactError(f"{path} holds a malformed gm.meta[{key!r}] "
                                    f"({type(e).__name__}: {e})") from None
    artifact = _json(metadata, "artifact", path)
    if not isinstance(artifact, dict):
        raise ArtifactError(f"{path} is corrupt: artifact meta is not a mapping")
    gm.meta[ARTIFACT_META] = artifact
    gm.meta["fxopt_saved_with"] = {"fxopt": metadata.get("fxopt_version"),
                                   "torch": metadata.get("torch_version")}


def _report(data, path: str) -> Report:
    try:
        return Report.from_dict(decode_value(data))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path} holds a malformed report ({type(e).__name__}: {e})") from None


def _run_hook(hook, gm) -> None:
    try:
        hook(gm, gm.meta[ARTIFACT_META])
    except FxoptError:
        raise
    except Exception as e:  # noqa: BLE001 - name the hook that failed
        name = getattr(hook, "__qualname__", repr(hook))
        raise ArtifactError(f"load hook {name} failed on the loaded model: {e}") from e


def read_report(path) -> Report:
    """The report stored in a saved model, without loading its weights or graph.

        print(fxopt.artifact.serialize.read_report("model.fxopt"))   # for `fxopt report model.fxopt`
    """
    path = os.fspath(path)
    with _open(path) as f:
        metadata = _check_header(f.metadata(), path)
    if "compress" in metadata:         # the report is a zlib section: read (and check) the file
        metadata, _ = _read(path)
    data = _json(metadata, "report", path)
    if data is None:
        raise ArtifactError(f"{path} holds no report (the model was saved without one)")
    return _report(data, path)
