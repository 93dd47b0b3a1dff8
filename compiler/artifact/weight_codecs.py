"""How a compressed file codes each storage it can do better than zlib with (see compress.py).

    plan = derived_plan(gm, table)                  # {storage index: (kind, what it needs)}
    codec, data = encode_storage(plan[i], raw)      # None when the codec does not fit exactly
    raw = decode_storage(codec, data, decoded)      # decoded: {storage index: int8 matrices}

Three codecs, each chosen only when decoding gives the saved bytes back exactly:
- "int8": an int8 layer's weights (dense GEMM, conv or sparse layout) as its nonzero
  values and their relative positions (Deep Compression: the gap to the previous
  nonzero, a gap of `filler` meaning `filler` zeros and no value), both canonical-Huffman
  coded. The filler and the scan order (rows or columns: an input the model never
  reads zeroes a whole column) are the cheapest for the layer. Loading packs the
  matrices again with the lowering's packer (fxopt.artifact.packed_int8).
- "col_sums": a layer's column sums, rebuilt from its decoded weights (no bytes stored).
- "grid_f32": a float32 vector whose values are integers times one scale (the biases
  share_weights put on a grid): the integers Huffman coded, the scale in the record.
"""
from __future__ import annotations

import numpy as np

from fxopt.artifact.huffman import coded_bits, decode, encode, table_dict, table_list
from fxopt.artifact.packed_int8 import col_sums, int8_layers, layout, matrices, repack

FILLERS = (3, 7, 15, 31, 63, 127, 255)
ORDERS = ("rows", "cols")
SHARED = "fxopt_shared"        # gm.meta key of share_weights' per-layer record (bias_scale)


def derived_plan(gm, table: dict) -> dict:
    """{storage index: (kind, info)} of the storages an int8 layer lets us code."""
    plan = {}
    shared = gm.meta.get(SHARED, {})
    for target, (node, (n, k, groups)) in int8_layers(gm).items():
        at = _whole(table, target)
        if at is None:
            continue
        kind = layout(node)
        mats = matrices(gm.get_buffer(target), n, k, groups, kind)
        plan[at] = ("int8", (mats, n, k, groups, kind, node.meta.get("fxopt_layer", node.name)))
        sums = _whole(table, _attr(node.args[3]))
        if sums is not None:
            plan.setdefault(sums, ("col_sums", (at, mats)))
        bias, scale = _whole(table, _attr(node.args[4])), shared.get(node.meta.get("fxopt_layer"), {})
        if bias is not None and "bias_scale" in scale:
            plan.setdefault(bias, ("grid_f32", float(scale["bias_scale"])))
    return plan


def _attr(arg):
    return str(arg.target) if getattr(arg, "op", None) == "get_attr" else None


def _whole(table: dict, target) -> int | None:
    """The storage index of a weight that is a whole storage on its own (offset 0)."""
    rec = table.get(target) if target is not None else None
    return rec["storage"] if rec is not None and rec["offset"] == 0 else None


def encode_storage(entry, raw: bytes) -> tuple[dict, bytes] | None:
    kind, info = entry
    if kind == "int8":
        mats, n, k, groups, layer_layout, _ = info
        if repack(mats, layer_layout).numpy().tobytes() != raw:
            return None                 # not the layout we pack: leave it to zlib
        return _encode_int8(mats, n, k, groups, layer_layout)
    if kind == "col_sums":
        at, mats = info
        return ({"kind": "col_sums", "of": at}, b"") if col_sums(mats).tobytes() == raw else None
    return _encode_grid(np.frombuffer(raw, np.float32), info) if len(raw) % 4 == 0 else None


# --- int8 weights -------------------------------------------------------------------------

def _flat(mats: list, order: str) -> np.ndarray:
    return np.concatenate([(m if order == "rows" else m.T).reshape(-1) for m in mats]).astype(np.int64)


def _gaps(where: np.ndarray, filler: int) -> np.ndarray:
    gaps = np.diff(where, prepend=-1) - 1
    fills, rest = gaps // filler, gaps % filler
    # each gap: `fills` filler symbols, then its remainder
    ends = np.cumsum(fills + 1) - 1
    syms = np.full(int(ends[-1]) + 1 if len(ends) else 0, filler, np.int64)
    syms[ends] = rest
    return syms


def _cost(syms: np.ndarray) -> int:
    vals, counts = np.unique(syms, return_counts=True)
    counts = dict(zip(vals.tolist(), counts.tolist()))
    return coded_bits(counts) // 8 + (max(counts) - min(counts) + 1 if counts else 0)


def _encode_int8(mats, n, k, groups, layer_layout) -> tuple[dict, bytes]:
    best = None
    for order in ORDERS:
        flat = _flat(mats, order)
        where = np.flatnonzero(flat)
        for filler in FILLERS:
            syms = _gaps(where, filler)
            cost = _cost(syms)
            if best is None or cost < best[0]:
                best = (cost, order, filler, syms, flat[where])
    _, order, filler, syms, values = best
    g_len, g_data = encode(syms)
    v_len, v_data = encode(values)
    codec = {"kind": "int8", "n": n, "k": k, "groups": groups, "layout": layer_layout, "order": order,
             "filler": filler, "gaps": [len(syms), len(g_data), table_list(g_len)],
             "values": [len(values), len(v_data), table_list(v_len)]}
    return codec, g_data + v_data


def _stream(spec, data: bytes, at: int) -> tuple[list, int]:
    count, size, table = spec
    if type(size) is not int or not 0 <= size <= len(data) - at:
        raise ValueError(f"stream of {size!r} bytes past the storage's end")
    return (decode(table_dict(table), data[at:at + size], count) if count else []), at + size


def decode_int8(codec: dict, data: bytes) -> list:
    """The int8 group matrices of an "int8" record (checked: a file is a stranger's)."""
    n, k, groups, filler = codec["n"], codec["k"], codec["groups"], codec["filler"]
    if not all(type(v) is int and 1 <= v <= 1 << 24 for v in (n, k, groups)) or n * k * groups > 1 << 31:
        raise ValueError(f"bad layer shape n={n!r} k={k!r} groups={groups!r}")
    if filler not in FILLERS or codec["order"] not in ORDERS or codec["layout"] not in ("linear", "conv", "sparse"):
        raise ValueError(f"bad filler {filler!r:.10}, order {codec['order']!r:.10} or layout {codec['layout']!r:.10}")
    if groups != 1 and codec["layout"] != "conv":
        raise ValueError(f"a {codec['layout']} layer with {groups} groups")
    gaps, at = _stream(codec["gaps"], data, 0)
    values, at = _stream(codec["values"], data, at)
    if at != len(data):
        raise ValueError(f"{len(data) - at} bytes left after the coded streams")
    flat = _place(gaps, values, filler, n * k * groups)
    if codec["order"] == "rows":
        return [m.reshape(n, k) for m in np.split(flat, groups)]
    return [np.ascontiguousarray(m.reshape(k, n).T) for m in np.split(flat, groups)]


def _place(gaps: list, values: list, filler: int, size: int) -> np.ndarray:
    g = np.asarray(gaps, np.int64)
    if g.size and (g.min() < 0 or g.max() > filler):
        raise ValueError("a position symbol out of range")
    real = g != filler
    if int(real.sum()) != len(values):
        raise ValueError(f"{len(values)} values but {int(real.sum())} positions")
    # a position is the previous one + 1 + its gap, plus filler for every filler symbol before it
    steps = np.where(real, g + 1, filler)
    where = (np.cumsum(steps) - 1)[real]
    v = np.asarray(values, np.int64)
    if where.size and (where[-1] >= size or v.min() < -127 or v.max() > 127 or not v.all()):
        raise ValueError(f"a weight position past {size} or a value out of [-127, 127] \\ 0")
    flat = np.zeros(size, np.int8)
    flat[where] = v
    return flat


# --- float32 vectors on a grid ----------------------------------------------------------

def _encode_grid(values: np.ndarray, scale: float) -> tuple[dict, bytes] | None:
    s = np.float32(scale)
    if not (np.isfinite(s) and s > 0) or not np.all(np.isfinite(values)):
        return None
    q = np.rint(values.astype(np.float64) / float(s)) + 0.0      # + 0.0: the decoder makes no -0.0
    if np.abs(q).max(initial=0) > 1 << 15 or (q.astype(np.float32) * s).tobytes() != values.tobytes():
        return None                     # not exactly on the grid (bias correction, -0.0...)
    lengths, data = encode(q.astype(np.int64))
    return {"kind": "grid_f32", "scale": float(s), "values": [len(q), len(data), table_list(lengths)]}, data


def decode_grid(codec: dict, data: bytes) -> bytes:
    s = codec["scale"]
    if type(s) is not float or not np.isfinite(s) or s <= 0:
        raise ValueError(f"bad grid scale {s!r:.20}")
    q, at = _stream(codec["values"], data, 0)
    if at != len(data) or (q and max(abs(v) for v in q) > 1 << 15):
        raise ValueError("grid values out of range or bytes left after them")
    return (np.asarray(q, np.float32) * np.float32(s)).tobytes()
