"""fxopt.save(..., compress="huffman"): the file's storages and header sections, coded.

    metadata, blobs = compress(gm, metadata, blobs, table)      # at save, after collect_weights
    metadata, blobs = decompress(metadata, blobs, path)         # at load, after the checksum

The file holds one storage: first one LZMA2 stream of the JSON sections (graph,
report, artifact meta and one codec record per original storage; the header
entry "sections" gives its byte count), then every original storage coded back
to back. An int8 layer's weights, its column sums and a bias on a grid have codecs
of their own (fxopt.artifact.weight_codecs: Huffman-coded values and relative
positions, sums rebuilt from the weights); every other storage is zlib, or raw
where zlib would grow it. The report keeps its numbers to 7 significant digits and gains
the Deep Compression size table with each layer's coded bytes. Decoding checks every count, position and size against
the record; anything off is an ArtifactError, and so is a storage whose decoded
bytes miss the CRC-32 recorded at save (the file's SHA-256 covers the coded form only).
"""
from __future__ import annotations

import binascii
import json
import lzma
import zlib

import numpy as np
import torch

from fxopt.artifact.graph_json import decode_value, encode_value
from fxopt.artifact.huffman import CodeError
from fxopt.artifact.packed_int8 import col_sums, repack
from fxopt.artifact.weight_codecs import decode_grid, decode_int8, derived_plan, encode_storage
from fxopt.core.errors import ArtifactError
from fxopt.core.size_table import size_table

SECTIONS = ("graph", "report", "artifact")
REPORT_DIGITS = 7
# a pass's entries a compressed file's report keeps (with its nonzero stats): the timings,
# drift, op counts and options (the pipeline line holds them) were 40 % of the LZMA'd report
# of a Deep Compression MLP, whose whole file is 6 KB
PASS_KEYS = ("index", "pass", "status", "changed")
COMPACTED = ("compacted at save (compress='huffman'): pass timings, node and op counts, drift and options "
             "left out; fxopt.save without compress= keeps them")
# the sections (mostly JSON text): raw LZMA2, no container header; ~10 % below zlib on them
LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def compress(gm, metadata: dict, blobs: list, table: dict) -> tuple[dict, list]:
    """The header and storages of a compressed file (see the module doc)."""
    plan = derived_plan(gm, table)
    codecs, out = [], []
    for i, blob in enumerate(blobs):
        raw = blob.numpy().tobytes()
        coded = encode_storage(plan[i], raw) if i in plan else None
        if coded is None:
            packed = zlib.compress(raw, 9)
            coded = ({"kind": "zlib"}, packed) if len(packed) < len(raw) else ({"kind": "raw"}, raw)
        codec, data = coded
        codec["nbytes"], codec["crc32"], codec["size"] = len(raw), zlib.crc32(raw), len(data)
        codecs.append(codec)
        out.append(data)
    coded = {plan[i][1][5]: c["size"] for i, c in enumerate(codecs) if c["kind"] == "int8"}
    metadata = dict(metadata, report=_saved_report(gm, metadata["report"], coded, sum(map(len, out))))
    # one storage and one LZMA section: each safetensors entry and JSON key costs bytes, and
    # a binary section skips base64's third
    sections = {key: metadata[key] for key in SECTIONS}
    sections["codecs"] = codecs
    head = lzma.compress(json.dumps(sections, separators=(",", ":")).encode(), format=lzma.FORMAT_RAW,
                         filters=LZMA)
    meta = {k: v for k, v in metadata.items() if k not in SECTIONS}
    meta.update(sections=str(len(head)), compress="huffman", storages="1")
    return meta, [torch.frombuffer(bytearray(head + b"".join(out)), dtype=torch.uint8)]


def _saved_report(gm, report: str, coded: dict, data_bytes: int) -> str:
    """The report (JSON) compacted, with the size table of a pruned/shared model, coded column
    included, and its numbers to REPORT_DIGITS significant digits."""
    data = decode_value(json.loads(report)) if report != "null" else None
    if not isinstance(data, dict):
        return report
    data = compact_report(data)
    sparsity, shared = gm.meta.get("fxopt_sparsity", {}), gm.meta.get("fxopt_shared", {})
    if (sparsity or shared) and "fp32_bytes" in data.get("summary", {}):
        data["sections"]["compression"] = size_table(sparsity, shared, data["summary"]["fp32_bytes"], coded,
                                                     data_bytes)
    return json.dumps(encode_value(_rounded(data)))


def compact_report(data: dict) -> dict:
    """A report's to_dict() data as a compressed file keeps it (see PASS_KEYS), saying so.

        Report.from_dict(compact_report(fast.fxopt_report.to_dict()))   # prints "-" for timings
    """
    passes = [dict({k: p[k] for k in PASS_KEYS}, stats={k: v for k, v in p["stats"].items() if v})
              for p in data.get("passes", [])]
    return dict(data, passes=passes, sections={**data.get("sections", {}), "saved report": COMPACTED})


def _rounded(v):
    """The report's floats (timings, drift) to REPORT_DIGITS significant digits: it prints at most
    six, and the 17 digits of a float's repr are, in a small model's file, a third of its report."""
    if isinstance(v, float):
        return float(f"{v:.{REPORT_DIGITS}g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_rounded(x) for x in v)
    return v


def decompress(metadata: dict, blobs: list, path: str) -> tuple[dict, list]:
    """The header and storages as an uncompressed file holds them."""
    try:
        if len(blobs) != 1:
            raise ValueError(f"{len(blobs)} storages (1 expected)")
        data = blobs[0].numpy().tobytes()
        head = int(metadata["sections"])
        if not 0 < head <= len(data):
            raise ValueError(f"a section of {head} bytes in a storage of {len(data)}")
        sections = json.loads(_unlzma(data[:head], 1 << 30))
        codecs = sections["codecs"]
        if not isinstance(codecs, list):
            raise ValueError(f"codecs {type(codecs).__name__}")
        meta = {k: v for k, v in metadata.items() if k != "sections"}
        for key in SECTIONS:
            if not isinstance(sections[key], str):
                raise ValueError(f"section {key} is not text")
            meta[key] = sections[key]
        out = _decode_all(codecs, data, head)
        meta["storages"] = str(len(out))
        return meta, out
    except (CodeError, KeyError, TypeError, ValueError, IndexError, zlib.error, lzma.LZMAError, binascii.Error,
            UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path} is corrupt: its compressed data does not decode ({type(e).__name__}: "
                            f"{e}). Save the model again.") from None


def _decode_all(codecs: list, data: bytes, at: int) -> list:
    pieces = []
    for codec in codecs:
        size = codec["size"]
        if type(size) is not int or not 0 <= size <= len(data) - at:
            raise ValueError(f"coded storage of {size!r} bytes past the end of the data")
        pieces.append(data[at:at + size])
        at += size
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes after the last coded storage")
    # weights first: column sums are rebuilt from the matrices they decode to
    mats, raw = {}, {}
    for i, (codec, piece) in enumerate(zip(codecs, pieces)):
        if codec["kind"] == "int8":
            mats[i] = decode_int8(codec, piece)
            raw[i] = repack(mats[i], codec["layout"]).numpy().tobytes()
    for i, (codec, piece) in enumerate(zip(codecs, pieces)):
        if i not in raw:
            raw[i] = _decode_other(codec, piece, mats)
    return [_checked(codec, raw[i]) for i, codec in enumerate(codecs)]


def _inflate(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, limit + 1)
    if len(out) > limit or not d.eof or d.unused_data:
        raise ValueError("zlib stream longer than recorded, or truncated")
    return out


def _unlzma(data: bytes, limit: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or not d.eof or d.unused_data:
        raise ValueError("LZMA stream longer than allowed, or truncated")
    return out


def _decode_other(codec: dict, data: bytes, mats: dict) -> bytes:
    nbytes, kind = codec["nbytes"], codec["kind"]
    if type(nbytes) is not int or nbytes < 0:
        raise ValueError(f"bad size {nbytes!r}")
    if kind == "zlib":
        return _inflate(data, nbytes)
    if kind == "raw":
        return data
    if kind == "col_sums":
        if data or codec["of"] not in mats:
            raise ValueError(f"column sums of storage {codec['of']!r:.20}, which holds no int8 layer")
        return col_sums(mats[codec["of"]]).tobytes()
    if kind == "grid_f32":
        return decode_grid(codec, data)
    raise ValueError(f"unknown codec {kind!r:.20}")


def _checked(codec: dict, raw: bytes) -> torch.Tensor:
    if len(raw) != codec["nbytes"]:
        raise ValueError(f"storage decodes to {len(raw)} bytes, recorded {codec['nbytes']!r:.20}")
    # the decoded bytes are checked too: a stream changed after coding can decode to a
    # well-formed but different layer, which no count or bound would notice
    if zlib.crc32(raw) != codec["crc32"]:
        raise ValueError("storage decodes to bytes whose CRC-32 differs from the recorded one")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def coded_layers(metadata: dict, blob: np.ndarray) -> list:
    """The "int8" codec records of a compressed file's header and storage (for size tables)."""
    head = int(metadata["sections"])
    sections = json.loads(_unlzma(bytes(blob[:head]), 1 << 30))
    return [c for c in sections["codecs"] if c["kind"] == "int8"]
