"""Canonical Huffman coding (fxopt.artifact.huffman) against direct reference facts."""
import math
import random

import pytest

from fxopt.artifact.huffman import CodeError, canonical_codes, code_lengths, decode, encode


def test_round_trip_and_optimal_length():
    rng = random.Random(0)
    symbols = [min(int(rng.expovariate(0.3)), 40) - 5 for _ in range(5000)]
    lengths, data = encode(symbols)
    assert decode(lengths, data, len(symbols)) == symbols
    counts = {s: symbols.count(s) for s in set(symbols)}
    n = len(symbols)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    bits = sum(counts[s] * lengths[s] for s in counts)
    assert entropy * n <= bits < (entropy + 1) * n        # Huffman is within 1 bit of entropy
    assert len(data) == -(-bits // 8)


def test_known_code_is_canonical_and_prefix_free():
    lengths = code_lengths([0] * 8 + [1] * 4 + [2] * 2 + [3] * 2)
    assert lengths == {0: 1, 1: 2, 2: 3, 3: 3}
    codes = canonical_codes(lengths)
    assert codes == {0: (0b0, 1), 1: (0b10, 2), 2: (0b110, 3), 3: (0b111, 3)}
    assert encode([1, 0, 3]) != encode([1, 0, 2])
    assert decode({7: 1}, encode([7, 7, 7])[1], 3) == [7, 7, 7]      # one symbol: one bit each


@pytest.mark.parametrize("lengths, data, count, message", [
    ({0: 1, 1: 1, 2: 1}, b"\x00", 1, "over-full"),
    ({0: 0}, b"\x00", 1, "bad code table"),
    ({0: 1, 1: 2}, b"\xff", 3, "invalid code"),                   # 11 names no symbol
    ({0: 1, 1: 1}, b"\x00", 9, "cannot hold"),
    ({0: 2, 1: 2, 2: 2, 3: 2}, b"\x00", 5, "truncated"),
    ({0: 1, 1: 1}, b"\x00", -1, "bad symbol count"),
])
def test_malformed_tables_and_streams_raise_code_error(lengths, data, count, message):
    with pytest.raises(CodeError, match=message):
        decode(lengths, data, count)
