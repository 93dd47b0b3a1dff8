"""Canonical Huffman coding of small-integer symbol streams (Deep Compression's last stage).

    lengths, data = encode([3, 3, 0, 7, 3])     # {symbol: code length}, packed bits (bytes)
    decode(lengths, data, 5)                    # -> [3, 3, 0, 7, 3]

The tree comes from heapq over the symbol counts; only the code lengths are
stored, and both sides derive the same codes from them (canonical order: by
length, then symbol). decode reads data from a stranger: bad lengths (an
over-full code, absurd lengths), a truncated stream or a code that names no
symbol raise CodeError, never IndexError or a wrong stream of the right length.
"""
from __future__ import annotations

import heapq
from collections import Counter

import numpy as np

MAX_LENGTH = 48      # a longer code would need > 2**48 symbols to arise honestly


class CodeError(ValueError):
    """A coded stream or its table is malformed."""


def code_lengths(symbols) -> dict:
    """{symbol: code length} of a Huffman code for the counts of `symbols`."""
    return lengths_of_counts(Counter(int(s) for s in symbols))


def lengths_of_counts(counts: dict) -> dict:
    """{symbol: code length} of a Huffman code for {symbol: count} (counts > 0)."""
    if len(counts) == 1:
        return {next(iter(counts)): 1}
    # heap items: (count, tie-breaker, symbols under this node); merging deepens them all
    heap = [(c, i, [s]) for i, (s, c) in enumerate(sorted(counts.items()))]
    heapq.heapify(heap)
    depth = dict.fromkeys(counts, 0)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            depth[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return depth


def canonical_codes(lengths: dict) -> dict:
    """{symbol: (code, length)} of the canonical code with these lengths."""
    _check_lengths(lengths)
    codes, code, prev = {}, 0, 0
    for sym, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev
        codes[sym] = (code, n)
        code += 1
        prev = n
    return codes


def _check_lengths(lengths: dict) -> None:
    if not lengths:
        raise CodeError("empty code table")
    for sym, n in lengths.items():
        if type(sym) is not int or type(n) is not int or not 1 <= n <= MAX_LENGTH:
            raise CodeError(f"bad code table entry {sym!r}: length {n!r}")
    # Kraft: a prefix code's lengths satisfy sum 2**-n <= 1; more would make codes collide
    if sum(2.0 ** -n for n in lengths.values()) > 1.0 + 1e-12:
        raise CodeError("code lengths over-full (not a prefix code)")


def coded_bits(counts: dict) -> int:
    """Bits the Huffman-coded stream of these symbol counts takes (tables excluded)."""
    lengths = lengths_of_counts(counts) if counts else {}
    return sum(counts[s] * n for s, n in lengths.items())


def table_list(lengths: dict) -> list:
    """A code table as [lowest symbol, the length of each symbol from there up as one
    character each, chr(48 + length), "0" = absent]: one byte a symbol in JSON, less after
    compression."""
    if not lengths:
        return [0, ""]
    lo = min(lengths)
    out = ["0"] * (max(lengths) - lo + 1)
    for sym, n in lengths.items():
        out[sym - lo] = chr(48 + n)
    return [lo, "".join(out)]


def table_dict(table) -> dict:
    """Inverse of table_list, checked (a file's table): {symbol: length}."""
    lo, lens = table
    if type(lo) is not int or not isinstance(lens, str) or len(lens) > 1 << 16:
        raise CodeError(f"bad code table (lowest symbol {lo!r:.20}, {type(lens).__name__})")
    out = {}
    for i, c in enumerate(lens):
        n = ord(c) - 48
        if not 0 <= n <= MAX_LENGTH:
            raise CodeError(f"bad code length {c!r:.20} for symbol {lo + i}")
        if n:
            out[lo + i] = n
    return out


def encode(symbols) -> tuple[dict, bytes]:
    """({symbol: length}, packed bits, MSB first) of `symbols`; an empty stream gives ({}, b"")."""
    symbols = [int(s) for s in symbols]
    if not symbols:
        return {}, b""
    lengths = code_lengths(symbols)
    codes = canonical_codes(lengths)
    bits = []
    for s in symbols:
        code, n = codes[s]
        bits.extend((code >> (n - 1 - i)) & 1 for i in range(n))
    return lengths, np.packbits(np.array(bits, np.uint8)).tobytes()


def decode(lengths: dict, data: bytes, count: int) -> list:
    """The `count` symbols coded in `data` with the canonical code of `lengths`."""
    if type(count) is not int or count < 0:
        raise CodeError(f"bad symbol count {count!r}")
    if count == 0:
        return []
    table = {(n, code): sym for sym, (code, n) in canonical_codes(lengths).items()}
    longest = max(lengths.values())
    if count > len(data) * 8:       # every symbol takes at least one bit
        raise CodeError(f"stream of {len(data)} bytes cannot hold {count} symbols")
    bits = np.unpackbits(np.frombuffer(data, np.uint8)).tolist()
    out, code, n = [], 0, 0
    for bit in bits:
        code, n = (code << 1) | bit, n + 1
        sym = table.get((n, code))
        if sym is not None:
            out.append(sym)
            if len(out) == count:
                return out
            code, n = 0, 0
        elif n >= longest:
            raise CodeError(f"invalid code in the stream after {len(out)} symbols")
    raise CodeError(f"stream truncated: {len(out)} of {count} symbols")
