"""int8 GEMM kernels against the numpy reference, on every ISA path."""
import gc
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba.core.runtime import _nrt_python as _nrt, rtsys

from fxopt.kernels import api as K, dispatch, gemm as G, linear as L, reference as R
from fxopt.kernels.simd import A_DTYPES, GEOMETRY, PEAK_CHAINS

ISAS = K.available_isas()
SHAPES = [(1, 1, 1), (1, 768, 64), (1, 5, 3), (2, 7, 65), (7, 13, 70), (6, 64, 64),
          (13, 64, 130), (5, 3, 129), (37, 130, 200),
          # K a multiple of 64: AMX blocks of 32 rows, then their row tails on vpdpbusd;
          # under 32 rows, one AMX block of the GEMM's own rows (1 or 2 tiles of them)
          (32, 64, 64), (40, 128, 70), (96, 256, 192), (65, 192, 130), (17, 128, 70), (31, 64, 64)]


@pytest.fixture(params=ISAS)
def isa(request):
    with K.use_isa(request.param):
        yield request.param


@pytest.fixture
def force_parallel(monkeypatch):
    """Run even tiny shapes through the threaded entry (job split over rows)."""
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)


def _operands(rng, m, k, n):
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    return a, w


def _pack(w, scales=None):
    scales = np.ones(w.shape[0], np.float32) if scales is None else scales
    return K.pack_weights_s8(w, scales)


def test_available_paths_fastest_first():
    assert ISAS[-1] == "portable" and K.isa() in ISAS
    feats = dispatch.host_features()
    if "avx512vnni" in feats:   # e.g. the Zen 5 and the AMX Xeon dev machines
        amx = ["amx_int8"] if {"amx-tile", "amx-int8"} <= feats else []
        assert ISAS == amx + ["avx512_vnni", "avx_vnni", "avx2", "portable"]


def test_amx_needs_its_features():
    base = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
    assert not dispatch.supports("amx_int8", base)
    assert dispatch.supports("amx_int8", base | {"amx-tile", "amx-int8"})


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_s32_bit_exact(isa, m, k, n):
    a, w = _operands(np.random.default_rng(m * 1000 + k * 7 + n), m, k, n)
    np.testing.assert_array_equal(K.gemm_u8s8_s32(a, _pack(w)), R.gemm_u8s8_s32(a, w))


# The threaded driver is ISA-independent code around the same tiles the
# serial tests check on every path; two paths keep the compile time down.
THREADED_ISAS = [name for name in ("amx_int8", "avx512_vnni", "avx2") if name in ISAS]


@pytest.mark.parametrize("isa_name", THREADED_ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 33, 64), (20, 770, 130), (64, 64, 10), (100, 128, 200),
                                   (24, 128, 130)])
def test_gemm_s32_threaded_bit_exact(isa_name, force_parallel, m, k, n):
    a, w = _operands(np.random.default_rng(1), m, k, n)
    with K.use_isa(isa_name):
        got = K.gemm_u8s8_s32(a, _pack(w), n_threads=2)
    np.testing.assert_array_equal(got, R.gemm_u8s8_s32(a, w))


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_rows_first_order_bit_exact(isa, monkeypatch, threads):
    """A large A with a small B (an early conv's shape) is walked chunk of rows by chunk
    (gemm._plan): same int32 product, and with a residual the same floats as the
    block-by-block order gives for the same rows."""
    if threads == 2 and isa not in THREADED_ISAS:
        pytest.skip("threaded driver checked on THREADED_ISAS")
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    m, k, n = 3000, 64, 200   # row chunks with a tail, a column tail block
    a, w = _operands(np.random.default_rng(12), m, k, n)
    size, kg = np.dtype(A_DTYPES[isa]).itemsize, (k + 3) // 4
    nblocks, nchunks, mchunk, rows_first = G._plan(GEOMETRY[isa][0], m, n, G.a_stride(kg, size) * size,
                                                   kg, threads)
    assert rows_first and nchunks > 1 and m % mchunk
    pw = _pack(w, np.random.default_rng(13).uniform(0.5, 2, n).astype(np.float32))
    np.testing.assert_array_equal(K.gemm_u8s8_s32(a, pw, n_threads=threads), R.gemm_u8s8_s32(a, w))
    sa = np.random.default_rng(14).uniform(0.01, 0.1, m).astype(np.float32)
    za = np.random.default_rng(15).integers(0, 256, m).astype(np.int32)
    b = np.random.default_rng(16).standard_normal(n).astype(np.float32)
    res = np.random.default_rng(17).standard_normal((m, n)).astype(np.float32)
    got = K.gemm_u8s8_f32(a, sa, za, pw, b, "relu", n_threads=threads, residual=res)
    # 100 rows (A of 20 KB) take the block-by-block order
    for lo in range(0, m, 100):
        part = K.gemm_u8s8_f32(a[lo:lo + 100], sa[lo:lo + 100], za[lo:lo + 100], pw, b, "relu",
                               n_threads=threads, residual=res[lo:lo + 100])
        np.testing.assert_array_equal(got[lo:lo + 100], part)


@pytest.mark.parametrize("a_val,w_val", [(255, -128), (255, 127), (0, -128), (255, 0)])
@pytest.mark.parametrize("m,k", [(7, 1027), (40, 1024)])   # (40, 1024): AMX blocks too
def test_gemm_s32_saturation_edges(isa, a_val, w_val, m, k):
    # 255 * -128 pairs are where vpmaddubsw would saturate int16
    n = 70
    a = np.full((m, k), a_val, np.uint8)
    w = np.full((n, k), w_val, np.int8)
    w[1::2] = -w_val if w_val != -128 else 127
    np.testing.assert_array_equal(K.gemm_u8s8_s32(a, _pack(w)), R.gemm_u8s8_s32(a, w))


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 20), k=st.integers(1, 140), n=st.integers(1, 140),
       seed=st.integers(0, 2**16))
def test_gemm_s32_random_shapes(m, k, n, seed):
    a, w = _operands(np.random.default_rng(seed), m, k, n)
    pw, ref = _pack(w), R.gemm_u8s8_s32(a, w)
    for name in ISAS:
        with K.use_isa(name):
            np.testing.assert_array_equal(K.gemm_u8s8_s32(a, pw), ref, err_msg=name)


def _float_case(rng, m, k, n):
    x = rng.standard_normal((m, k)).astype(np.float32)
    q, s = K.quantize_weights_s8(rng.standard_normal((n, k)).astype(np.float32))
    b = rng.standard_normal(n).astype(np.float32)
    return x, q, s, b


ACTS = [("none", ()), ("relu", ()), ("relu6", ()), ("hardtanh", (-0.5, 0.25)),
        ("gelu", ()), ("gelu_tanh", ()), ("silu", ())]


@pytest.mark.parametrize("act,act_args", ACTS)
# a full block (in-register epilogue), a tail under one tile (staged), and a tail of 36:
# on avx2 two whole 16-column tiles in registers, 4 columns staged; on avx512 a
# 32-column half tile in registers and 4 staged. 32 and 40: a half tile alone, and
# with 8 columns staged
@pytest.mark.parametrize("n", [64, 70, 100, 32, 40])
def test_gemm_f32_epilogues(isa, act, act_args, n):
    rng = np.random.default_rng(3)
    x, q, s, b = _float_case(rng, 9, 50, n)
    aq, sa, za = R.quantize_rows_f32_u8(x)
    got = K.gemm_u8s8_f32(aq, sa, za, K.pack_weights_s8(q, s), b, act, act_args)
    ref = R.gemm_u8s8_f32(aq, sa, za, q, s, b, act, act_args)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("act,act_args", ACTS)
@pytest.mark.parametrize("n", [64, 100])   # whole blocks (epilogue in registers), a tail block
@pytest.mark.parametrize("m", [38, 17])
def test_gemm_f32_epilogues_on_amx_sized_blocks(isa, act, act_args, n, m):
    """M and K that the AMX path takes, every activation, with and without a fused
    residual, on every path: K a multiple of 64; 38 rows, a 32-row block and a 6-row tail;
    17 rows, one block of 17 (16 rows finished in registers, 1 staged)."""
    rng = np.random.default_rng(30)
    x, q, s, b = _float_case(rng, m, 128, n)
    aq, sa, za = R.quantize_rows_f32_u8(x)
    pw = K.pack_weights_s8(q, s)
    got = K.gemm_u8s8_f32(aq, sa, za, pw, b, act, act_args)
    ref = R.gemm_u8s8_f32(aq, sa, za, q, s, b, act, act_args)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    res = rng.standard_normal((m, n)).astype(np.float32)
    np.testing.assert_array_equal(K.gemm_u8s8_f32(aq, sa, za, pw, b, act, act_args, residual=res),
                                  got + res)


def test_gemm_f32_scalar_scale_and_no_bias(isa):
    x, q, s, _ = _float_case(np.random.default_rng(4), 5, 40, 64)
    aq = R.quantize_tensor_f32_u8(x, 0.05, 128)
    got = K.gemm_u8s8_f32(aq, 0.05, 128, K.pack_weights_s8(q, s))
    ref = R.gemm_u8s8_f32(aq, 0.05, 128, q, s)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("m,k", [(11, 70), (40, 128)])
def test_gemm_u8_requantize(isa, act, m, k):
    x, q, s, b = _float_case(np.random.default_rng(5), m, k, 70)
    aq, sa, za = R.quantize_rows_f32_u8(x)
    got = K.gemm_u8s8_u8(aq, sa, za, K.pack_weights_s8(q, s), 0.1, 100, b, act)
    ref = R.gemm_u8s8_u8(aq, sa, za, q, s, 0.1, 100, b, act)
    # float rounding may move a value sitting on a .5 boundary by one step
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert (got == ref).mean() > 0.99


def _requantized(y, out_scale, out_zp):
    """epilogue.store_tile_u8's requantization of float32 y, its operations in its order:
    rint(y * (1 / out_scale)) + out_zp in float32, clamped by its compares (NaN: 0), then
    int32 and the low byte."""
    q = np.rint(y * (np.float32(1) / np.float32(out_scale))) + np.float32(out_zp)
    q = np.where(q > 0, q, np.float32(0))
    q = np.where(q < 255, q, np.float32(255))
    return q.astype(np.int32).astype(np.uint8)


# AMX blocks of 32 rows and a 6-row tail (K % 64 == 0), one AMX block of 13 or 23 rows
# (12 or 20 of them 4 at a time in registers), vpdpbusd register tiles (K % 64 != 0);
# N: a whole block, + 36 columns (avx512: a 32-column half tile, 4 staged; avx2 and
# avx_vnni: two 16-column tiles, 4 staged), 40 and 8 columns alone; 24 alone (avx512: a
# 16-column quarter tile, 8 staged, and on AMX a narrow block off AMX), + 48 (a half and a
# quarter tile)
U8_SHAPES = [(70, 128, 64), (13, 64, 100), (23, 192, 40), (38, 100, 100), (7, 36, 8), (29, 64, 24),
             (9, 96, 112)]


@pytest.mark.parametrize("act,act_args", ACTS)
@pytest.mark.parametrize("ties", [False, True])
def test_gemm_u8_equals_the_staged_requantization_bit_for_bit(isa, monkeypatch, act, act_args, ties):
    """uint8 output, finished in registers (simd.tile_u8 on vpdpbusd tiles, staged_u8 on
    AMX blocks) where the path has them and staged elsewhere, is the staged path's:
    the float result of the all-staged (portable) path, store_tile_u8's arithmetic in
    numpy, bit for bit, on every path, serial and threaded, with and without a bias,
    every activation (tanh GELU stays staged). The float output of a register
    path is no reference: it fuses scale and bias into one fma and estimates GELU's
    1 / p, an ulp away, which moves a value on a rounding tie. With ties, every other
    y / out_scale is a tie (scales 0.5, bias in quarters): round half to even."""
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(40 + ties)
    for m, k, n in U8_SHAPES:
        x, q, s, b = _float_case(rng, m, k, n)
        aq, sa, za = R.quantize_rows_f32_u8(x)
        out_scale, out_zp = 0.05, 100
        if ties:   # y = acc / 4 + b exactly, y / out_scale = acc / 2 + 2 b
            aq = (128 + rng.integers(-2, 3, (m, k))).astype(np.uint8)
            q = rng.integers(-3, 4, (n, k)).astype(np.int8)
            s, sa, za = np.full(n, 0.5, np.float32), np.full(m, 0.5, np.float32), np.full(m, 128, np.int32)
            b = (rng.integers(-40, 40, n) / 4).astype(np.float32)
            out_scale, out_zp = 0.5, 128
        pw = K.pack_weights_s8(q, s)
        for bias in (b, None):
            with K.use_isa("portable"):
                y = K.gemm_u8s8_f32(aq, sa, za, pw, bias, act, act_args)
            want = _requantized(y, out_scale, out_zp)
            ref = R.gemm_u8s8_u8(aq, sa, za, q, s, out_scale, out_zp, bias, act, act_args)
            # float rounding may move a value on a .5 boundary by one step: with ties and an
            # activation computed by polynomials, many values
            assert np.abs(want.astype(int) - ref).max() <= 1
            assert ties or (want == ref).mean() > 0.99
            if act == "none" and bias is not None:    # the cases hold what they are for
                if ties:
                    assert (y / np.float32(out_scale) % 1 == 0.5).mean() > 0.2
                else:
                    assert (want == 0).any() and (want == 255).any()
            for threads in ((1, 2) if isa in THREADED_ISAS else (1,)):
                got = K.gemm_u8s8_u8(aq, sa, za, pw, out_scale, out_zp, bias, act, act_args,
                                     n_threads=threads)
                np.testing.assert_array_equal(got, want, err_msg=f"{(m, k, n)}, bias {bias is not None}, "
                                                                 f"{threads} threads")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", [(1, 768, 64), (3, 13, 70), (130, 96, 128)])
def test_linear_f32_matches_reference(isa, monkeypatch, threads, m, k, n):
    if threads == 2 and isa not in THREADED_ISAS:
        pytest.skip("threaded driver checked on THREADED_ISAS")
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    x, q, s, b = _float_case(np.random.default_rng(6), m, k, n)
    got = K.linear_f32(x, K.pack_weights_s8(q, s), b, "gelu", n_threads=threads)
    ref = R.linear_f32(x, q, s, b, "gelu")
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("threads", [1, 2])
def test_entries_free_every_array_they_take(isa, monkeypatch, threads):
    """Each entry frees every array it allocates or takes once it returns. The workers
    hand their loops borrowed views (rowops.borrowed): a reference count taken or
    dropped once too often shows here as a memory owner never freed, or freed twice."""
    if threads == 2 and isa not in THREADED_ISAS:
        pytest.skip("threaded driver checked on THREADED_ISAS")
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(9)
    x, q, s, b = _float_case(rng, 37, 128, 70)
    pw = K.pack_weights_s8(q, s)
    a = rng.integers(0, 256, (37, 128), dtype=np.uint8)
    qk = rng.standard_normal((1, 2, 9, 64)).astype(np.float32)
    calls = [lambda: K.linear_f32(x, pw, b, "relu", n_threads=threads, residual=x[:, :70]),
             lambda: K.gemm_u8s8_s32(a, pw, n_threads=threads),
             lambda: K.attention_int8(qk, qk, qk, n_threads=threads)]
    stats_were_on = _nrt.memsys_stats_enabled()
    _nrt.memsys_enable_stats()
    try:
        for call in calls:
            call()   # compiled, and any one-time state made
            before = rtsys.get_allocation_stats()
            for _ in range(3):
                call()
            gc.collect()
            after = rtsys.get_allocation_stats()
            taken = after.mi_alloc - before.mi_alloc
            assert taken > 0 and after.mi_free - before.mi_free == taken
            assert after.free - before.free == after.alloc - before.alloc
    finally:
        if not stats_were_on:
            _nrt.memsys_disable_stats()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])  # in registers, and after the tile
# full blocks; a tail (avx2: 16 + 6); a half tile (avx512: 32 + 4)
@pytest.mark.parametrize("m,k,n", [(7, 40, 64), (13, 96, 150), (7, 40, 100)])
def test_linear_f32_fused_residual(isa, monkeypatch, threads, act, m, k, n):
    """The residual is added after bias and activation: exactly what a separate add gives."""
    if threads == 2 and isa not in THREADED_ISAS:
        pytest.skip("threaded driver checked on THREADED_ISAS")
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    x, q, s, b = _float_case(np.random.default_rng(9), m, k, n)
    res = np.random.default_rng(10).standard_normal((m, n)).astype(np.float32)
    pw = K.pack_weights_s8(q, s)
    plain = K.linear_f32(x, pw, b, act, n_threads=threads)
    fused = K.linear_f32(x, pw, b, act, n_threads=threads, residual=res)
    np.testing.assert_array_equal(fused, plain + res)
    aq, sa, za = R.quantize_rows_f32_u8(x)
    got = K.gemm_u8s8_f32(aq, sa, za, pw, b, act, n_threads=threads, residual=res)
    np.testing.assert_array_equal(got, K.gemm_u8s8_f32(aq, sa, za, pw, b, act, n_threads=threads) + res)


def test_linear_f32_residual_leading_dims_and_errors():
    x, q, s, b = _float_case(np.random.default_rng(11), 6, 32, 20)
    pw = K.pack_weights_s8(q, s)
    res = np.random.default_rng(12).standard_normal((2, 3, 20)).astype(np.float64)  # converted
    got = K.linear_f32(x.reshape(2, 3, 32), pw, b, residual=res)
    np.testing.assert_array_equal(got, K.linear_f32(x, pw, b).reshape(2, 3, 20) + res.astype(np.float32))
    with pytest.raises(K.KernelError, match="residual must have the output's shape"):
        K.linear_f32(x, pw, b, residual=np.zeros((6, 21), np.float32))


def test_linear_f32_close_to_float_linear():
    x, _, _, b = _float_case(np.random.default_rng(7), 16, 256, 96)
    w = np.random.default_rng(8).standard_normal((96, 256)).astype(np.float32)
    got = K.linear_f32(x, K.pack_weights_s8(*K.quantize_weights_s8(w)), b)
    exact = x.astype(np.float64) @ w.T + b
    assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()


def test_linear_f32_leading_dims_and_non_contiguous():
    x, q, s, b = _float_case(np.random.default_rng(9), 12, 40, 70)
    pw = K.pack_weights_s8(q, s)
    x3 = x.reshape(3, 4, 40)
    np.testing.assert_array_equal(K.linear_f32(x3, pw, b).reshape(12, 70), K.linear_f32(x, pw, b))
    wide = np.zeros((12, 80), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(K.linear_f32(wide[:, ::2], pw, b), K.linear_f32(x, pw, b))


def test_gemm_non_contiguous_and_bad_inputs():
    a, w = _operands(np.random.default_rng(10), 6, 20, 9)
    pw = _pack(w)
    big = np.zeros((6, 40), np.uint8)
    big[:, ::2] = a
    np.testing.assert_array_equal(K.gemm_u8s8_s32(big[:, ::2], pw), R.gemm_u8s8_s32(a, w))
    with pytest.raises(K.KernelError, match="uint8"):
        K.gemm_u8s8_s32(a.astype(np.int8), pw)
    with pytest.raises(K.KernelError, match="K=21"):
        K.gemm_u8s8_s32(np.zeros((2, 21), np.uint8), pw)
    with pytest.raises(K.KernelError, match="activation"):
        K.linear_f32(np.zeros((2, 20), np.float32), pw, act="tanhh")
    with pytest.raises(K.KernelError, match="bias"):
        K.linear_f32(np.zeros((2, 20), np.float32), pw, np.zeros(8, np.float32))


def test_quantize_rows_exact_vs_reference():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 37)).astype(np.float32) * 3
    x[0] = 0
    x[1] = np.abs(x[1])
    x[2] = -np.abs(x[2])
    q, s, z = K.quantize_rows_f32_u8(x)
    rq, rs, rz = R.quantize_rows_f32_u8(x)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(z, rz)
    assert z[1] == 0 and z[2] == 255 and q[1].max() == 255 and q[2].min() == 0
    deq = (q.astype(np.float32) - z[:, None]) * s[:, None]
    assert np.abs(deq - x).max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("k", [1, 15, 16, 37, 768])  # vector body of 16 values, scalar tail
def test_quantize_exact_on_ties_clamps_and_strided_rows(k):
    """The vector row quantizer rounds half to even (np.rint) and clamps to [0, 255]
    exactly as the float formula does, for contiguous and strided rows alike."""
    rng = np.random.default_rng(15)
    x = rng.integers(-400, 400, (5, k)).astype(np.float32) / 2   # many x.5 ties, out of range
    ref = R.quantize_tensor_f32_u8(x, 1.0, 3)
    np.testing.assert_array_equal(K.quantize_tensor_f32_u8(x, 1.0, 3), ref)
    wide = np.zeros((5, 2 * k), np.float32)
    wide[:, ::2] = x                                              # inner stride 2: the scalar loop
    np.testing.assert_array_equal(K.quantize_tensor_f32_u8(wide[:, ::2], 1.0, 3), ref)
    rows = rng.standard_normal((6, k)).astype(np.float32)
    for got, want in zip(K.quantize_rows_f32_u8(rows[::-2]), R.quantize_rows_f32_u8(rows[::-2])):
        np.testing.assert_array_equal(got, want)                  # negative row stride


@pytest.mark.parametrize("k", [1, 15, 16, 37, 768])
def test_quantize_into_uint16_rows_gives_the_uint8_values(k):
    """The avx2 GEMM's A rows are uint16: the vector quantizer writes them directly."""
    from fxopt.kernels.quantize import quantize_rows_into
    rng = np.random.default_rng(16)
    x = rng.standard_normal((5, k)).astype(np.float32) * 4
    q8, s8, z8 = R.quantize_rows_f32_u8(x)
    q16 = np.full((5, k + 3), 999, np.uint16)
    s16, z16 = np.empty(5, np.float32), np.empty(5, np.int32)
    quantize_rows_into(x, q16, s16, z16)
    np.testing.assert_array_equal(q16[:, :k], q8)
    kp = (k + 3) // 4 * 4
    assert (q16[:, k:kp] == z8[:, None]).all()           # the k-group's padding: the zero point
    assert (q16[:, kp:] == 999).all()                    # row padding past it is not written
    np.testing.assert_array_equal(s16, s8)
    np.testing.assert_array_equal(z16, z8)


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2")
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 130, 70), (13, 768, 128)])
def test_avx2_tile_reads_uint8_and_uint16_rows_alike(m, k, n):
    """avx2 reads A as uint16 rows (pad_rows_u8's layout there) or, in the same
    loop, widens uint8 rows itself: both give the reference product."""
    a, w = _operands(np.random.default_rng(m + k + n), m, k, n)
    pw = _pack(w)
    ref = R.gemm_u8s8_s32(a, w)
    with K.use_isa("avx2"):
        wide = K.pad_rows_u8(a)
        assert wide.dtype == np.uint16 and (wide == a).all()
        np.testing.assert_array_equal(K.gemm_u8s8_s32(wide, pw), ref)
        narrow = K.pad_rows_u8(a, "portable").base          # uint8 rows, the same layout
        out = np.empty((m, n), np.int32)
        L._run(L._NO_X, narrow, L._NO_F, L._NO_I, pw, L._NO_F, L.epilogue_params(), out, 1)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(K.gemm_u8s8_s32(a, pw), ref)   # uint8 in: widened copy
    # a uint16 view made for avx2 still works on another path (narrowed copy)
    with K.use_isa("portable"):
        np.testing.assert_array_equal(K.gemm_u8s8_s32(wide, pw), ref)
        with pytest.raises(K.KernelError, match="above 255"):
            K.gemm_u8s8_s32(np.full((m, k), 256, np.uint16), pw)


def test_quantize_tensor_and_padding():
    x = np.random.default_rng(12).standard_normal((4, 10)).astype(np.float32) * 20
    np.testing.assert_array_equal(K.quantize_tensor_f32_u8(x, 0.1, 7),
                                  R.quantize_tensor_f32_u8(x, 0.1, 7))
    q, _, z = K.quantize_rows_f32_u8(x, pad_k=True)
    assert q.shape == (4, 12) and (q[:, 10:] == z[:, None]).all()
    with pytest.raises(ValueError):
        K.quantize_tensor_f32_u8(x, 0.0, 3)


@pytest.mark.parametrize("k", [10, 1024, 3072])   # 1024/3072: unpadded rows would alias in L1
def test_padded_rows_are_read_in_place_and_give_the_same_product(k):
    rng = np.random.default_rng(14)
    a = rng.integers(0, 256, (7, k), dtype=np.uint8)
    q, s = K.quantize_weights_s8(rng.standard_normal((70, k)).astype(np.float32))
    pw = K.pack_weights_s8(q, s)
    padded = K.pad_rows_u8(a)
    assert padded.shape == a.shape and (padded == a).all()
    assert L._prepare_u8(padded, pw).ctypes.data == padded.ctypes.data   # no copy
    np.testing.assert_array_equal(K.gemm_u8s8_s32(padded, pw), K.gemm_u8s8_s32(a, pw))
    np.testing.assert_array_equal(K.gemm_u8s8_s32(padded, pw), R.gemm_u8s8_s32(a, q))
    # a look-alike view (same strides, other base) is copied, not trusted
    other = np.zeros((8, padded.base.shape[1]), np.uint8)[1:, :k]
    other[:] = a
    assert L._prepare_u8(other, pw).ctypes.data != other.ctypes.data
    np.testing.assert_array_equal(K.gemm_u8s8_s32(other, pw), K.gemm_u8s8_s32(a, pw))
    # a view of the same padded rows that starts one element in is copied too
    shifted = np.zeros_like(padded.base)[:, 1:k + 1]
    shifted[:] = a
    assert L._prepare_u8(shifted, pw).ctypes.data != shifted.ctypes.data
    np.testing.assert_array_equal(K.gemm_u8s8_s32(shifted, pw), R.gemm_u8s8_s32(a, q))


def test_quantize_weights_matches_reference():
    w = np.random.default_rng(13).standard_normal((10, 30)).astype(np.float32)
    w[3] = 0
    q, s = K.quantize_weights_s8(w)
    rq, rs = R.quantize_weights_s8(w)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    assert s[3] == 1 and np.abs(q).max() == 127


def test_packed_weights_alignment_and_plain_array_round_trip(tmp_path):
    a, w = _operands(np.random.default_rng(14), 3, 21, 70)
    pw = _pack(w, np.linspace(0.5, 1, 70, dtype=np.float32))
    assert pw.data.ctypes.data % 64 == 0
    np.testing.assert_array_equal(pw.col_sums, w.astype(np.int64).sum(1))
    path = tmp_path / "pw.npz"
    np.savez(path, **pw.to_arrays())
    with np.load(path, allow_pickle=False) as f:
        back = K.PackedWeights.from_arrays(**{k: f[k] for k in f.files})
    assert back.data.ctypes.data % 64 == 0 and (back.n, back.k) == (70, 21)
    np.testing.assert_array_equal(K.gemm_u8s8_s32(a, back), R.gemm_u8s8_s32(a, w))
    unaligned = np.empty(pw.data.size + 1, np.int8)[1:]
    unaligned[:] = pw.data
    moved = K.PackedWeights.from_arrays(unaligned, pw.scales, pw.col_sums, 70, 21)
    assert moved.data.ctypes.data % 64 == 0
    with pytest.raises(K.KernelError, match="expected"):
        K.PackedWeights.from_arrays(pw.data[:-1], pw.scales, pw.col_sums, 70, 21)


def test_select_isa_errors(monkeypatch):
    with pytest.raises(K.KernelError, match="unknown kernel ISA"):
        K.select_isa("sse9")
    monkeypatch.setattr(dispatch, "host_features", lambda: {"avx2", "avx"})
    with pytest.raises(K.KernelError, match="lacks"):
        K.select_isa("avx512_vnni")
    assert dispatch.available_isas() == ["avx2", "portable"]


def test_select_isa_switches_and_restores():
    before = K.isa()
    with K.use_isa("portable"):
        assert K.isa() == "portable"
    assert K.isa() == before
    previous = K.select_isa("avx2")
    try:
        assert K.isa() == "avx2"
    finally:
        K.select_isa(previous)


@pytest.mark.slow
def test_env_var_forces_path():
    code = "from fxopt.kernels import api as K; print(K.isa())"
    env = dict(os.environ, FXOPT_KERNEL_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "avx2", out.stderr
    env["FXOPT_KERNEL_ISA"] = "neon"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown kernel ISA 'neon'" in bad.stderr


def test_thread_count_setting():
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        assert K.get_num_threads() == 1
        K.set_num_threads(10_000)
        assert 1 <= K.get_num_threads() <= os.cpu_count()
    finally:
        K.set_num_threads(before)


def test_aliasing_row_strides_are_repacked_exactly():
    # K = 1024: rows 4 KiB apart every 4 rows would share an L1 set
    assert L.rows_share_l1_set(1024) and L.rows_share_l1_set(4096)
    assert not L.rows_share_l1_set(1088)
    assert not any(L.rows_share_l1_set(k) for k in (16, 24, 32, 48))     # rows sharing lines: read in place
    a, w = _operands(np.random.default_rng(15), 9, 1024, 64)
    np.testing.assert_array_equal(K.gemm_u8s8_s32(a, _pack(w)), R.gemm_u8s8_s32(a, w))
    x, q, s, b = _float_case(np.random.default_rng(16), 9, 1024, 64)
    np.testing.assert_allclose(K.linear_f32(x, K.pack_weights_s8(q, s), b),
                               R.linear_f32(x, q, s, b), rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n", [(1, 5), (64, 768), (700, 100)])
def test_layer_norm_against_float64(monkeypatch, threads, m, n):
    from fxopt.kernels import layernorm
    monkeypatch.setattr(layernorm, "PARALLEL_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(m + n)
    x = (rng.standard_normal((m, n)) * 4 + 2).astype(np.float32)
    w, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    xd = x.astype(np.float64)
    mean, var = xd.mean(1, keepdims=True), xd.var(1, keepdims=True)
    want = (xd - mean) / np.sqrt(var + 1e-5) * w + b
    got = K.layer_norm_f32(x, w, b, 1e-5, n_threads=threads)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = K.layer_norm_f32(x.reshape(1, m, n), n_threads=threads)   # no weight and bias
    np.testing.assert_allclose(plain[0], (xd - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


def test_layer_norm_errors():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(K.KernelError, match="float32"):
        K.layer_norm_f32(x.astype(np.float64))
    with pytest.raises(K.KernelError, match=r"shape \(4,\)"):
        K.layer_norm_f32(x, np.ones(3, np.float32))
    with pytest.raises(K.KernelError, match="eps"):
        K.layer_norm_f32(x, eps=float("nan"))


def _peak_reference(isa, n, seed):
    """numpy model of simd.peak_chains: the sum of lane 0 of every chain."""
    chains, _ = PEAK_CHAINS[isa]
    vbytes = 32 if isa != "avx512_vnni" else 64
    a = np.full(vbytes // 4, seed, np.int32).view(np.uint8)
    b = np.full(vbytes // 4, seed + 1, np.int32).view(np.int8)
    total = np.int64(0)
    for c in range(chains):
        if isa == "avx2":
            acc = a.view(np.int32) + np.int32(c)
            for _ in range(n):
                pairs = acc.view(np.int16).astype(np.int64) * b.view(np.int16).astype(np.int64)
                acc = (acc.astype(np.int64) + pairs.reshape(-1, 2).sum(1)).astype(np.int32)
        else:
            acc = np.zeros(vbytes // 4, np.int64)
            for _ in range(n):
                acc = acc + (a.astype(np.int64) * b.astype(np.int64)).reshape(-1, 4).sum(1)
            acc = acc.astype(np.int32)
        total += acc[0]
    return np.int64(total).astype(np.int32)


@pytest.mark.skipif("amx_int8" not in ISAS, reason="no AMX on this CPU")
def test_amx_peak_probe_computes_its_tiles():
    from fxopt.kernels import amx
    # A and B all ones: each tdpbusd adds 64 (one k-row of 64 products) to every element
    assert amx.peak_probe(5) == 5 * 64


@pytest.mark.parametrize("isa", [i for i in ISAS if i in PEAK_CHAINS])
def test_peak_probe_runs_the_chains_it_claims(isa):
    """The bench's peak probe computes its chains (nothing folded away), on every path
    this CPU has: its result matches a numpy model of the same chains."""
    from fxopt.bench.gemm import peak_probe
    serial, parallel, ops = peak_probe(isa)
    assert ops == 2 * PEAK_CHAINS[isa][0] * PEAK_CHAINS[isa][1]
    assert serial(5) == _peak_reference(isa, 5, 3)
    assert parallel(5, 2) == int(_peak_reference(isa, 5, 3)) + int(_peak_reference(isa, 5, 4))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 64, 64), (7, 130, 70), (33, 128, 96)])
def test_bind_linear_equals_the_unbound_entries(isa, monkeypatch, parallel, m, k, n):
    # the runtime's per-layer call gives what linear_f32 / gemm_u8s8_f32 / gemm_u8s8_u8
    # give for the same arguments, bit for bit, fresh or into a given out
    if parallel:
        monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(m * 1000 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    res = rng.standard_normal((m, n), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(rng.standard_normal((n, k), dtype=np.float32)))
    threads = 2 if parallel else 1
    q_static = K.quantize_tensor_f32_u8(x, 0.03, 120)
    q_rows, s_rows, z_rows = K.quantize_rows_f32_u8(x)
    cases = [  # (bind_linear kwargs, x, residual, reference)
        ({"act": "gelu"}, x, res, K.linear_f32(x, pw, bias, "gelu", n_threads=threads, residual=res)),
        ({"act": "gelu"}, x, None, K.linear_f32(x, pw, bias, "gelu", n_threads=threads)),
        ({"act": "relu", "a_scale": 0.03, "a_zero_point": 120}, x, res,
         K.gemm_u8s8_f32(q_static, 0.03, 120, pw, bias, "relu", n_threads=threads, residual=res)),
        ({"a_scale": 0.03, "a_zero_point": 120}, q_static, None,
         K.gemm_u8s8_f32(q_static, 0.03, 120, pw, bias, n_threads=threads)),
        ({"act": "relu", "a_scale": 0.03, "a_zero_point": 120}, x, None,
         K.gemm_u8s8_f32(q_static, 0.03, 120, pw, bias, "relu", n_threads=threads)),
        ({"a_scale": 0.03, "a_zero_point": 120, "out_scale": 0.05, "out_zero_point": 7}, q_static, None,
         K.gemm_u8s8_u8(q_static, 0.03, 120, pw, 0.05, 7, bias, n_threads=threads)),
        ({"out_scale": 0.05, "out_zero_point": 7}, x, None,
         K.gemm_u8s8_u8(q_rows, s_rows, z_rows, pw, 0.05, 7, bias, n_threads=threads)),
    ]
    checked = 0
    for kwargs, inp, residual, want in cases:
        call = K.bind_linear(pw, bias, **kwargs)
        got = call(inp, None, residual, threads)
        assert got.dtype == want.dtype and np.array_equal(got, want), kwargs
        out = np.full_like(want, 3)
        assert call(inp, out, residual, threads) is out and np.array_equal(out, want), kwargs
        if residual is None and hasattr(call, "rows"):     # the plan's one-frame path: the same bits
            assert np.array_equal(call.rows(inp, None, threads), want), kwargs
            out = np.full_like(want, 3)
            assert call.rows(inp, out, threads) is out and np.array_equal(out, want), kwargs
            wrong = np.empty((m + 1, n), want.dtype)         # not this call's buffer: a fresh one
            got = call.rows(inp, wrong, threads)
            assert got is not wrong and np.array_equal(got, want), kwargs
            strided = np.concatenate([inp, inp], axis=1)[:, :k]     # not C-contiguous: the full call
            assert np.array_equal(call.rows(strided, None, threads), want), kwargs
            # rows not of the types the compiled code was made for (linear.compiled_entry): copied
            readonly = inp.copy()
            readonly.setflags(write=False)
            unaligned = np.empty(inp.nbytes + 1, np.uint8)[1:].view(inp.dtype).reshape(inp.shape)
            unaligned[...] = inp
            for v in (readonly, unaligned):
                assert np.array_equal(call.rows(v, None, threads), want), kwargs
            loose = np.empty((m, 2 * n), want.dtype)[:, ::2]      # an out it cannot take: a fresh one
            got = call.rows(inp, loose, threads)
            assert got is not loose and np.array_equal(got, want), kwargs
            with pytest.raises(Exception) as full:      # other dtypes: the full call's answer
                call(inp.astype(np.float64), None, None, threads)
            with pytest.raises(type(full.value), match=re.escape(str(full.value))):
                call.rows(inp.astype(np.float64), None, threads)
            checked += 1
    # the one-frame path: float rows (static or per-row scales) and uint8 rows (static), not
    # per-row scales with uint8 output (quantized apart)
    assert checked == 4
    with pytest.raises(K.KernelError, match="out must be"):
        K.bind_linear(pw, bias)(x, np.empty((m, n + 1), np.float32))
    with pytest.raises(K.KernelError, match="uint8 x needs the static a_scale"):
        K.bind_linear(pw, bias)(q_static)


@pytest.mark.parametrize("m, k, n", [(1, 1024, 256), (7, 130, 70), (40, 96, 200)])
def test_rows_screened_at_reads_rows_where_they_lie(isa, monkeypatch, m, k, n):
    """rows_screened_at, the plan's call of a linear on a tensor input (its data_ptr(): one
    compiled call that quantizes and multiplies, the layer's arrays in lean_table), gives
    bind_linear's results bit for bit: per-row or static scales, float or uint8 output, one
    thread or two, fresh or into a given out; a row holding NaN or inf makes bad NaN."""
    import torch
    rng = np.random.default_rng(m * 100 + n)
    x = torch.from_numpy(rng.standard_normal((m + 1, k), dtype=np.float32))
    bias = rng.standard_normal(n, dtype=np.float32)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(rng.standard_normal((n, k), dtype=np.float32)))
    monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)          # the threaded jobs too, at every size
    for kwargs in ({"act": "gelu"}, {"act": "relu", "a_scale": 0.03, "a_zero_point": 120},
                   {"a_scale": 0.03, "a_zero_point": 120, "out_scale": 0.05, "out_zero_point": 7}):
        call = K.bind_linear(pw, bias, **kwargs)
        want = call(x[1:].numpy().copy())
        for threads in (1, 2):
            y, bad = call.rows_screened_at(x[1:].data_ptr(), m, None, threads)    # rows from the second
            assert bad == 0 and y.dtype == want.dtype and np.array_equal(y, want), (kwargs, threads)
            out = np.full((m + 1, n), 3, want.dtype)
            y, _ = call.rows_screened_at(x[1:].data_ptr(), m, out[1:], threads)
            assert np.shares_memory(y, out) and np.array_equal(out[1:], want) and (out[0] == 3).all()
            y, _ = call.rows_screened_at(x[1:].data_ptr(), m, out[:, ::2], threads)  # not one it can take
            assert not np.shares_memory(y, out) and np.array_equal(y, want)
        bad_x = x.clone()
        bad_x[m, k // 2] = float("nan")                     # the last row
        y, bad = call.rows_screened_at(bad_x[1:].data_ptr(), m, None, 2)
        assert np.isnan(bad) and np.array_equal(y[:-1], want[:-1])
    dequantized = K.bind_linear(pw, bias, out_scale=0.05, out_zero_point=7)     # dynamic rows, uint8 out
    assert not hasattr(dequantized, "rows_screened_at")     # quantized apart: no one-call path


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 64, 64), (7, 130, 70), (33, 128, 96)])
def test_screened_call_tells_a_non_finite_input_from_its_quantization(isa, monkeypatch, parallel, m, k, n):
    """bind_linear's screened call (the plan's entry screen fused into the first linear):
    the plain call's result bit for bit and 0 for finite x; NaN for x holding a NaN or
    +-inf anywhere (the first, a middle or the last value, in the vector body or the
    tail of a row), with the other rows' results unchanged; for dynamic rows, static
    rows and uint8 output alike."""
    if parallel:
        monkeypatch.setattr(L, "PARALLEL_MIN_MACS", 0)
    rng = np.random.default_rng(m * 7 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(rng.standard_normal((n, k), dtype=np.float32)))
    threads = 2 if parallel else 1
    for kwargs in ({"act": "relu"}, {"a_scale": 0.03, "a_zero_point": 120}, {"out_scale": 0.05, "out_zero_point": 7}):
        call = K.bind_linear(pw, bias, **kwargs)
        want = call(x, None, None, threads)
        got, bad = call.screened(x, None, threads)
        assert bad == 0 and np.array_equal(got, want), kwargs
        out = np.full_like(want, 3)
        got, bad = call.screened(x, out, threads)
        assert got is out and bad == 0 and np.array_equal(out, want), kwargs
        for value in (np.nan, np.inf, -np.inf):
            for row, col in ((0, 0), (m // 2, k // 2), (m - 1, k - 1)):
                xb = x.copy()
                xb[row, col] = value
                got, bad = call.screened(xb, None, threads)
                assert bad != bad, (kwargs, value, row, col)
                others = np.arange(m) != row
                assert np.array_equal(got[others], want[others]), (kwargs, value, row, col)


@pytest.mark.parametrize("isa", sorted({ISAS[0], "portable"}))
# tails and vpdpbusd rows; AMX blocks; K off AMX (every row in vpdpbusd tiles), with a half tile
@pytest.mark.parametrize("m,k,n", [(37, 64, 70), (300, 128, 128), (29, 40, 96)])
def test_uint8_residual_adds_the_floats_its_codes_stand_for(isa, m, k, n):
    """A uint8 residual (a chained ResNet block's output) gives the uint8 output of the
    float residual its codes stand for, bit for bit, added before or after the activation
    (relu and SiLU in registers, tanh GELU after); that output is the float64 reference requantized."""
    from fxopt.kernels.conv import residual_floats
    rng = np.random.default_rng(m + k + n)
    a, w = _operands(rng, m, k, n)
    ws = (rng.random(n).astype(np.float32) + 0.5) * np.float32(2e-3)
    pw = _pack(w, ws)
    s, z = np.full(m, 0.02, np.float32), np.full(m, 9, np.int32)
    bias = rng.standard_normal(n).astype(np.float32)
    codes = rng.integers(0, 256, (m, n), dtype=np.uint8)
    floats = residual_floats(codes, 0.03, 100)
    assert np.abs(floats).max() > 3                                      # as large as the conv's own values
    acc = R.gemm_u8s8_s32(a, w).astype(np.float64) - 9.0 * w.astype(np.float64).sum(1)
    y = acc * (0.02 * ws.astype(np.float64)) + bias
    acts = {"relu": lambda v: np.maximum(v, 0), "silu": lambda v: v / (1 + np.exp(-v)),
            "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))}
    for act, fn in acts.items():
        for first in (False, True):
            ep = L.epilogue_params(act, (), 0.05, 3, first, 0.03, 100)
            with K.use_isa(isa):
                aq = K.pad_rows_u8(a).base                     # the GEMM's padded rows
                got, want = (np.empty((m, n), np.uint8) for _ in range(2))
                L._run(L._NO_X, aq, s, z, pw, bias, ep, got, 2, codes)
                L._run(L._NO_X, aq, s, z, pw, bias, ep, want, 2, floats)
            np.testing.assert_array_equal(got, want)
            with K.use_isa("portable"):                        # every tile staged: the bytes the
                staged = np.empty((m, n), np.uint8)            # register tiles must give
                L._run(L._NO_X, K.pad_rows_u8(a).base, s, z, pw, bias, ep, staged, 2, codes)
            np.testing.assert_array_equal(got, staged)
            ref = fn(y + floats) if first else fn(y) + floats
            ref = np.clip(np.rint(ref / 0.05) + 3, 0, 255)
            diff = np.abs(got.astype(np.int32) - ref)
            assert diff.max() <= 1 and (diff > 0).mean() < 2e-3, (act, first, diff.max(), (diff > 0).mean())
            assert (got == 255).any() and len(np.unique(got)) > 100      # the clip, and values below it
