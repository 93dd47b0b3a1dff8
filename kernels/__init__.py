"""Numba int8 kernels. Plain numpy in, numpy out: no torch, no fx."""
