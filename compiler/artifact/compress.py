"""fxopt.save(..., compress="huffman"): the file's storages and header sections, coded.

    metadata, blobs = compress(gm, metadata, blobs, table)      # at save, after collect_weights
    metadata, blobs = decompress(metadata, blobs)               # at load, after the checksum

Each int8 layer's packed weight is stored as its nonzero values and their
positions (Deep Compression's relative index: the gap to the previous nonzero,
a gap of FILLER meaning "FILLER zeros, no value", as the paper's padding
zeros), both canonical-Huffman coded (fxopt.artifact.huffman); loading packs the
matrices again with the lowering's packer, so the bytes are the saved ones.
Every other storage and the JSON sections (graph, report, artifact meta) are zlib
streams. Decoding checks every count, position and size against the record;
anything off is an ArtifactError, and so is a storage whose decoded bytes miss
the CRC-32 recorded at save (the file's SHA-256 covers the coded form only).
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib

import numpy as np
import torch

from fxopt.artifact.huffman import CodeError, decode, encode
from fxopt.artifact.packed_int8 import int8_layers, matrices, repack
from fxopt.core.errors import ArtifactError

FILLER = 255
SECTIONS = ("graph", "report", "artifact")


def compress(gm, metadata: dict, blobs: list, table: dict) -> tuple[dict, list]:
    """The header and storages of a compressed file (see the module doc)."""
    sparse = {}
    for target, (node, (n, k, groups)) in int8_layers(gm).items():
        rec = table.get(target)
        if rec is not None and rec["offset"] == 0:
            sparse[rec["storage"]] = (gm.get_buffer(target), n, k, groups, isinstance(node.args[5], list))
    codecs, out = [], []
    for i, blob in enumerate(blobs):
        raw = blob.numpy().tobytes()
        if i in sparse:
            codec, data = _encode_sparse(*sparse[i])
        else:
            codec, data = {"kind": "zlib"}, zlib.compress(raw, 9)
        codec["nbytes"], codec["crc32"], codec["size"] = len(raw), zlib.crc32(raw), len(data)
        codecs.append(codec)
        out.append(data)
    # one storage and one zlib section: each safetensors entry and JSON key costs bytes
    sections = {key: metadata[key] for key in SECTIONS}
    sections["codecs"] = codecs
    meta = {k: v for k, v in metadata.items() if k not in SECTIONS}
    meta["sections"] = base64.b64encode(zlib.compress(json.dumps(sections, separators=(",", ":")).encode(),
                                                      9)).decode()
    meta["compress"] = "huffman"
    meta["storages"] = "1"
    return meta, [torch.frombuffer(bytearray(b"".join(out) or b"\0"), dtype=torch.uint8)]


def _encode_sparse(packed, n, k, groups, conv) -> tuple[dict, bytes]:
    flat = np.concatenate([m.reshape(-1) for m in matrices(packed, n, k, groups)]).astype(np.int64)
    where = np.flatnonzero(flat)
    gaps = []
    for gap in np.diff(where, prepend=-1) - 1:
        gaps += [FILLER] * int(gap // FILLER) + [int(gap % FILLER)]
    g_len, g_data = encode(gaps)
    v_len, v_data = encode(flat[where])
    codec = {"kind": "sparse_int8", "n": n, "k": k, "groups": groups, "conv": conv,
             "gaps": [len(gaps), len(g_data), sorted(g_len.items())],
             "values": [len(where), len(v_data), sorted(v_len.items())]}
    return codec, g_data + v_data


def decompress(metadata: dict, blobs: list, path: str) -> tuple[dict, list]:
    """The header and storages as an uncompressed file holds them."""
    try:
        sections = json.loads(_inflate(base64.b64decode(metadata["sections"], validate=True), 1 << 30))
        codecs = sections["codecs"]
        if len(blobs) != 1 or not isinstance(codecs, list):
            raise ValueError(f"{len(blobs)} storages (1 expected), codecs {type(codecs).__name__}")
        meta = {k: v for k, v in metadata.items() if k != "sections"}
        for key in SECTIONS:
            if not isinstance(sections[key], str):
                raise ValueError(f"section {key} is not text")
            meta[key] = sections[key]
        data, at, out = blobs[0].numpy().tobytes(), 0, []
        for codec in codecs:
            size = codec["size"]
            if type(size) is not int or not 0 <= size <= len(data) - at:
                raise ValueError(f"coded storage of {size!r} bytes past the end of the data")
            out.append(_decode_blob(codec, data[at:at + size]))
            at += size
        if at != len(data) and not (at == 0 and data == b"\0"):     # b"\0": nothing was stored
            raise ValueError(f"{len(data) - at} bytes after the last coded storage")
        meta["storages"] = str(len(out))
        return meta, out
    except (CodeError, KeyError, TypeError, ValueError, IndexError, zlib.error, binascii.Error,
            UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path} is corrupt: its compressed data does not decode ({type(e).__name__}: "
                            f"{e}). Save the model again.") from None


def _inflate(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, limit + 1)
    if len(out) > limit or not d.eof:
        raise ValueError("zlib stream longer than recorded, or truncated")
    return out


def _decode_blob(codec: dict, data: bytes) -> torch.Tensor:
    nbytes = codec["nbytes"]
    if type(nbytes) is not int or nbytes < 0:
        raise ValueError(f"bad size {nbytes!r}")
    if codec["kind"] == "zlib":
        raw = _inflate(data, nbytes)
    elif codec["kind"] == "sparse_int8":
        raw = _decode_sparse(codec, data)
    else:
        raise ValueError(f"unknown codec {codec['kind']!r}")
    if len(raw) != nbytes:
        raise ValueError(f"storage decodes to {len(raw)} bytes, recorded {nbytes}")
    # the decoded bytes are checked too: a stream changed after coding can decode to a
    # well-formed but different layer, which no count or bound would notice
    if zlib.crc32(raw) != codec["crc32"]:
        raise ValueError("storage decodes to bytes whose CRC-32 differs from the recorded one")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def _stream(spec, data: bytes, at: int) -> tuple[list, int]:
    count, size, lengths = spec
    if type(size) is not int or not 0 <= size <= len(data) - at:
        raise ValueError(f"stream of {size!r} bytes past the storage's end")
    table = {}
    for item in lengths:
        sym, n = item
        table[sym] = n
    return (decode(table, data[at:at + size], count) if count else []), at + size


def _decode_sparse(codec: dict, data: bytes) -> bytes:
    n, k, groups = codec["n"], codec["k"], codec["groups"]
    if not all(type(v) is int and 1 <= v <= 1 << 24 for v in (n, k, groups)) or n * k * groups > 1 << 31:
        raise ValueError(f"bad layer shape n={n!r} k={k!r} groups={groups!r}")
    gaps, at = _stream(codec["gaps"], data, 0)
    values, at = _stream(codec["values"], data, at)
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes left after the coded streams")
    size = n * k * groups
    flat = np.zeros(size, np.int8)
    pos, skip, j = -1, 0, 0
    for g in gaps:
        if g == FILLER:
            skip += FILLER
            continue
        if type(g) is not int or not 0 <= g < FILLER or j >= len(values):
            raise ValueError("position stream and value stream disagree")
        pos += skip + g + 1
        skip = 0
        v = values[j]
        if pos >= size or type(v) is not int or not -127 <= v <= 127 or v == 0:
            raise ValueError(f"weight {j}: position {pos} or value {v!r} out of range")
        flat[pos] = v
        j += 1
    if j != len(values):
        raise ValueError(f"{len(values)} values but {j} positions")
    mats = [m.reshape(n, k) for m in np.split(flat, groups)]
    return repack(mats, bool(codec["conv"])).numpy().tobytes()
