"""int4 weights: grouped symmetric quantization (the numbers every int4 path must compute)."""
import numpy as np
import pytest
import torch

from fxopt.quant import qops


def test_groups_match_numpy_and_bound_the_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[2, 32:] = 0.0                                  # an all-zero group keeps scale 1, q 0
    q, s = qops.quantize_weight_groups(w, bits=4, group_size=32)
    wn = w.numpy().reshape(6, 2, 32)
    amax = np.abs(wn).max(axis=2)
    s_ref = np.where(amax > 0, amax / np.float32(7), 1).astype(np.float32)
    q_ref = np.clip(np.rint(wn / s_ref[:, :, None]), -7, 7).astype(np.int8).reshape(6, 64)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7
    deq = (q.float().reshape(6, 2, 32) * s[:, :, None]).reshape(6, 64)
    assert float((deq - w).abs().max()) <= float(s.max()) / 2 + 1e-6


@pytest.mark.parametrize("shape, bits, group, match", [
    ((4, 48), 4, 32, "not a multiple of group_size 32"),
    ((4, 2, 32), 4, 32, "2-d"),
    ((4, 64), 1, 32, "bits must be"),
])
def test_bad_groupings_are_named(shape, bits, group, match):
    with pytest.raises(ValueError, match=match):
        qops.quantize_weight_groups(torch.ones(shape), bits=bits, group_size=group)
