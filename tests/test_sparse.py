"""The sparse int8 linear (kernels/sparse.py, op fxopt.linear_int8_sparse) computes exactly what
the dense int8 kernel computes, on every ISA path; optimize picks it for pruned linears (any
pruning: here torch.nn.utils.prune), and the model keeps the dense model's outputs bit for bit
through the plan, the graph runtime and save/load."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import fxopt
from fxopt import examples
from fxopt.core.drift import tensor_drift
from fxopt.core.errors import ArtifactError
from fxopt.kernels import api as K
from fxopt.kernels import reference as R
from fxopt.kernels import sparse as S
from fxopt.kernels.sparse_pack import NO_WIDE, SLOTS, STEP, WIDE_SLICE, WIDE_STEP
from fxopt.runtime import kernel_ops
from fxopt.runtime.kernel_args import check_lowered

# the step loops this CPU runs: the machine's own ISA (with AVX512-VBMI the wide layout's
# vpermb + 512-bit vpdpbusd; the 8-row layout's 256-bit vpdpbusd in
# test_the_wide_layout_holds_the_weights_and_runs, and without VBMI here), vpmaddubsw on
# shifted rows (avx2), plain loops (portable). Each more ISA is a cold compile (~45 s)
ISAS = [isa for isa in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2", "portable")
        if isa in K.available_isas() and isa in (K.isa(), "avx2", "portable")]
# the dense kernel's AMX blocks (K whole tiles of 64, at least 4 rows) stage a block's last
# rows under 4 and column blocks under 64 wide; the sparse epilogue follows it there. Column
# tails under 32: a tail of 32 to 63 is the AVX-512 half tile, within an ulp (sparse._epilogue)
AMX_SHAPES = [(7, 130, 128, 0.2), (4, 64, 192, 0.3), (37, 90, 64, 0.3), (64, 200, 128, 0.1)]

# (M, N, K, density): M not a multiple of the 4-row groups, K not a multiple of 4 or of the
# 16-k chunk, N with a column tail, very sparse and fully dense
SHAPES = [(1, 256, 200, 0.1), (3, 70, 37, 0.3), (13, 130, 100, 0.05), (6, 64, 16, 0.5), (1, 8, 3, 1.0),
          (33, 200, 129, 0.2)]


def sparse_weights(rng, n, k, density):
    w = rng.standard_normal((n, k)).astype(np.float32) * (rng.random((n, k)) < density)
    w[n // 2] = 0          # an all-zero output row
    w[:, k // 3] = 0       # an all-zero input column
    return K.quantize_weights_s8(w)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k,density", SHAPES)
def test_int32_products_equal_numpy_and_the_dense_kernel(isa, m, n, k, density):
    rng = np.random.default_rng(m * n + k)
    q, s = sparse_weights(rng, n, k, density)
    q[0, :min(k, 8)] = 127   # large weights side by side: pairs that must not saturate in int16
    q[-1, :min(k, 8)] = -127
    q[1 % n, :min(k, 16)] = -127
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    a[:, :8] = 255
    a[:, 8:16] = 0           # the ends of the uint8 range against the largest weights of both signs
    with K.use_isa(isa):
        got = K.gemm_sparse_s32(a, K.pack_sparse_s8(q, s))
        dense = K.gemm_u8s8_s32(a, K.pack_weights_s8(q, s))
    np.testing.assert_array_equal(got, R.gemm_u8s8_s32(a, q))
    np.testing.assert_array_equal(got, dense)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,n,k,density", SHAPES)
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
def test_linear_equals_the_dense_kernel_bit_for_bit(isa, m, n, k, density, act):
    rng = np.random.default_rng(m + n + k)
    q, s = sparse_weights(rng, n, k, density)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    with K.use_isa(isa):
        pw, ps = K.pack_weights_s8(q, s), K.pack_sparse_s8(q, s)
        np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, b, act=act), K.linear_f32(x, pw, b, act=act))
        np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, None, act=act, residual=res, n_threads=1),
                                      K.linear_f32(x, pw, None, act=act, residual=res, n_threads=1))
        # static activation scale, uint8 in and out (a chained layer), residual before the act
        qx = K.quantize_tensor_f32_u8(x, 0.02, 120)
        for xin in (x, qx):
            dense = K.bind_linear(pw, b, act, (), 0.02, 120, 0.05, 7)(xin)
            sparse = K.bind_linear_sparse(ps, b, act, (), 0.02, 120, 0.05, 7)
            np.testing.assert_array_equal(sparse(xin), dense)
            np.testing.assert_array_equal(sparse.rows(xin, None, 1), dense)     # the plan's path
        np.testing.assert_array_equal(K.bind_linear_sparse(ps, b, act).rows(x, None, 1),
                                      K.linear_f32(x, pw, b, act=act, n_threads=1))
    # numpy's float64 epilogue on the same int32 sums: float32 rounding apart
    np.testing.assert_allclose(K.linear_sparse_f32(x, ps, b, act=act), R.linear_f32(x, q, s, b, act),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("amx_int8" not in K.available_isas(), reason="needs AMX-INT8 (and the OS's leave)")
@pytest.mark.parametrize("m,n,k,density", AMX_SHAPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_linear_equals_the_dense_amx_kernel_bit_for_bit(m, n, k, density, act):
    rng = np.random.default_rng(m + n + k)
    q, s = sparse_weights(rng, n, k, density)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    res = rng.standard_normal((m, n)).astype(np.float32)
    with K.use_isa("amx_int8"):
        pw, ps = K.pack_weights_s8(q, s), K.pack_sparse_s8(q, s)
        for threads in (1, 2):
            np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, b, act=act, n_threads=threads),
                                          K.linear_f32(x, pw, b, act=act, n_threads=threads))
            np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, None, act=act, residual=res, n_threads=threads),
                                          K.linear_f32(x, pw, None, act=act, residual=res, n_threads=threads))


def test_threads_split_the_work_with_the_same_result():
    rng = np.random.default_rng(1)
    q, s = sparse_weights(rng, 1024, 1024, 0.1)
    ps, x = K.pack_sparse_s8(q, s), rng.standard_normal((5, 1024)).astype(np.float32)
    np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, n_threads=2), K.linear_sparse_f32(x, ps, n_threads=1))
    rows = K.bind_linear_sparse(ps).rows          # the plan's path, threaded (above the launch threshold)
    assert ps.steps * STEP * x.shape[0] >= S.PARALLEL_MIN_SLOTS
    out = np.empty((5, 1024), np.float32)
    assert rows(x, out, 2) is out
    np.testing.assert_array_equal(out, K.linear_sparse_f32(x, ps, n_threads=1))


@pytest.mark.parametrize("isa", ISAS)
def test_all_zero_weights_give_the_bias(isa):
    q, s = np.zeros((70, 33), np.int8), np.ones(70, np.float32)
    ps, b = K.pack_sparse_s8(q, s), np.arange(70, dtype=np.float32)
    assert ps.steps == 0
    x = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    with K.use_isa(isa):
        np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, b, n_threads=2), np.broadcast_to(b, (5, 70)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("a_scale", [0.0, 0.05])
def test_the_screened_call_tells_a_nonfinite_input_from_its_quantization(isa, a_scale):
    rng = np.random.default_rng(3)
    q, s = sparse_weights(rng, 96, 80, 0.2)
    ps = K.pack_sparse_s8(q, s)
    x = rng.standard_normal((5, 80)).astype(np.float32)
    with K.use_isa(isa):
        call = K.bind_linear_sparse(ps, np.ones(96, np.float32), "relu", (), a_scale, 128 if a_scale else 0)
        want = call(x.copy())
        for screened in (lambda v: call.rows_screened(v, None, 1), lambda v: call.screened(v),
                         lambda v: call.rows_screened_at(v.ctypes.data, v.shape[0], None, 1)):
            y, bad = screened(x)
            assert bad == 0 and np.array_equal(y, want)
            for value in (np.nan, np.inf, -np.inf):
                bad_x = x.copy()
                bad_x[3, 41] = value
                y, bad = screened(bad_x)
                assert np.isnan(bad)
                np.testing.assert_array_equal(np.delete(y, 3, 0), np.delete(want, 3, 0))
        if a_scale:      # uint8 rows come quantized: finite
            y, bad = call.screened(K.quantize_tensor_f32_u8(x, np.float32(a_scale), np.int32(128)))
            assert bad == 0 and np.array_equal(y, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out_scale", [0.0, 0.1])
def test_rows_screened_takes_rows_the_compiled_entry_was_not_made_for(isa, out_scale):
    """rows_screened calls the lean entry's compiled code directly for C-contiguous,
    aligned, writeable float32 rows (sparse.compiled_entry); rows that are readonly,
    unaligned or strided are copied first, and an out buffer that is not one is not used:
    the same results, the dense kernel's, bit for bit."""
    rng = np.random.default_rng(5)
    q, s = sparse_weights(rng, 140, 80, 0.2)         # no 32-column half tile (sparse._epilogue)
    ps, pw, b = K.pack_sparse_s8(q, s), K.pack_weights_s8(q, s), rng.standard_normal(140).astype(np.float32)
    x = rng.standard_normal((3, 80)).astype(np.float32)
    readonly = x.copy()
    readonly.setflags(write=False)
    unaligned = np.empty(x.size * 4 + 1, np.uint8)[1:].view(np.float32).reshape(x.shape)
    unaligned[...] = x
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    assert not unaligned.flags.aligned and not strided.flags.c_contiguous
    args = ("gelu", (), 0.0, 0, out_scale, 128 if out_scale else 0)
    with K.use_isa(isa):
        call, dense = K.bind_linear_sparse(ps, b, *args), K.bind_linear(pw, b, *args)
        want = dense(x)
        for v in (x, readonly, unaligned, strided, x):
            y, bad = call.rows_screened(v, None, 1)
            assert bad == 0 and y.dtype == want.dtype and np.array_equal(y, want)
        out = np.empty(want.shape, want.dtype)
        y, _ = call.rows_screened(x, out, 1)
        assert y is out and np.array_equal(out, want)
        loose = np.empty((want.shape[0], want.shape[1] * 2), want.dtype)[:, ::2]     # not an out it can take
        y, _ = call.rows_screened(x, loose, 1)
        assert y is not loose and np.array_equal(y, want)


@pytest.mark.parametrize("isa", ISAS)
def test_rows_screened_at_reads_rows_where_they_lie(isa):
    """rows_screened_at (the plan's call for a tensor input: its data_ptr()) gives the dense
    kernel's results bit for bit, writes a given out, and leaves rows the threaded entry
    would run to rows_screened (None)."""
    rng = np.random.default_rng(8)
    q, s = sparse_weights(rng, 140, 72, 0.25)        # no 32-column half tile (sparse._epilogue)
    ps, pw, b = K.pack_sparse_s8(q, s), K.pack_weights_s8(q, s), rng.standard_normal(140).astype(np.float32)
    x = torch.randn(4, 72)
    with K.use_isa(isa):
        call, dense = K.bind_linear_sparse(ps, b, "relu"), K.bind_linear(pw, b, "relu")
        want = dense(x.numpy())
        y, bad = call.rows_screened_at(x.data_ptr(), 4, None, 1)
        assert bad == 0 and np.array_equal(y, want)
        out = np.empty(want.shape, np.float32)
        y, _ = call.rows_screened_at(x[1:].data_ptr(), 3, out[:3], 2)    # rows from the second one
        assert np.shares_memory(y, out) and np.array_equal(out[:3], want[1:])
        m = S.PARALLEL_MIN_SLOTS // (ps.starts.shape[0] * STEP) + 1
        assert call.rows_screened_at(torch.randn(m, 72).data_ptr(), m, None, 2) is None


def test_a_copied_layer_makes_its_tables_anew():
    """A kernel table holds the addresses of its layer's idx and val: copies and pickles of
    a layer's Kernels start empty and make their own, with the same results."""
    rng = np.random.default_rng(6)
    q, s = sparse_weights(rng, 70, 90, 0.3)
    kernels = S.Kernels(K.pack_sparse_s8(q, s), np.zeros(70, np.float32), S.epilogue_params())
    table = kernels[K.isa()][2]
    for dup in (copy.deepcopy(kernels), pickle.loads(pickle.dumps(kernels))):
        assert len(dup) == 0 and dup[K.isa()][2] is not table
        head, mine = dup[K.isa()][2][:S._HEAD * 8].view(np.int64), dup[K.isa()][3]
        assert head[S._IDX] == mine.ctypes.data != table[:S._HEAD * 8].view(np.int64)[S._IDX]


def test_the_kernel_table_holds_its_arrays_whole():
    rng = np.random.default_rng(4)
    arrays = (np.arange(9, dtype=np.int32), rng.integers(0, 99, 30).astype(np.int32), np.arange(16, dtype=np.int32),
              np.arange(5, dtype=np.int32), rng.random(5).astype(np.float32), rng.random(5).astype(np.float32),
              S.epilogue_params("relu6"))
    idx, val = rng.integers(0, 255, 64).astype(np.uint8), rng.integers(-99, 99, 64).astype(np.int8)
    table = S.kernel_table(*arrays, True, idx, val, 0.25, 131)
    head = table[:S._HEAD * 8].view(np.int64)
    assert table.ctypes.data % 64 == 0 and head[2 * len(arrays)] == 1
    assert (head[S._IDX], head[S._VAL], head[S._SLOTS], head[S._A_ZP]) == (idx.ctypes.data, val.ctypes.data, 64, 131)
    assert table[S._A_SCALE * 8:S._A_SCALE * 8 + 4].view(np.float32)[0] == np.float32(0.25)
    for i, arr in enumerate(arrays):
        first, nbytes = head[i], head[len(arrays) + i]
        assert first % 64 == 0 and nbytes == arr.nbytes and (i == 0 or first >= head[i - 1] + head[len(arrays) + i - 1])
        assert np.array_equal(table[first:first + nbytes].view(arr.dtype), arr)


def test_bad_input_gets_the_dense_entry_points_errors():
    q, s = K.quantize_weights_s8(np.eye(8, 12, dtype=np.float32))
    ps = K.pack_sparse_s8(q, s)
    with pytest.raises(K.KernelError, match="weights expect K=12"):
        K.linear_sparse_f32(np.zeros((2, 11), np.float32), ps)
    with pytest.raises(K.KernelError, match="weights expect K=12"):
        K.gemm_sparse_s32(np.zeros((2, 11), np.uint8), ps)
    with pytest.raises(K.KernelError, match="2-D uint8"):
        K.gemm_sparse_s32(np.zeros((2, 12), np.int32), ps)
    with pytest.raises(K.KernelError, match="PackedSparse"):
        K.linear_sparse_f32(np.zeros((2, 12), np.float32), K.pack_weights_s8(q, s))
    with pytest.raises(K.KernelError, match="2-D int8"):
        K.pack_sparse_s8(q.astype(np.int16), s)
    with pytest.raises(K.KernelError, match="one scale per output channel"):
        K.pack_sparse_s8(q, s[:3])
    with pytest.raises(K.KernelError, match="bias must have shape"):
        K.linear_sparse_f32(np.zeros((2, 12), np.float32), ps, np.zeros(3, np.float32))
    with pytest.raises(K.KernelError, match="static a_scale"):
        K.bind_linear_sparse(ps)(np.zeros((2, 12), np.uint8))


def test_a_corrupt_layout_is_refused_not_read():
    q, s = K.quantize_weights_s8(np.random.default_rng(0).standard_normal((16, 40)).astype(np.float32))
    ps = K.pack_sparse_s8(q, s)
    blob = ps.to_bytes()
    again = K.PackedSparse.from_bytes(blob, ps.scales, ps.col_sums, 16, 40)
    assert all(np.array_equal(a, b) for a, b in zip(again[:-1], ps[:-1]))
    assert all(np.array_equal(a, b) for a, b in zip(again.wide, ps.wide))
    bad_start = blob.copy()
    bad_start[4 + 4 * 3:4 + 4 * 3 + 4] = 255            # the first step's start: -1
    bad_idx = blob.copy()
    bad_idx[-2 * ps.idx.size] = 16                      # a slot index past its window
    bad_val = blob.copy()
    bad_val[-1] = 128                                   # a weight of -128: |w| would not fit int8
    old = blob[4:].copy()                               # the sparse-pack-1 layout began with slice_ptr
    for bad, match in ((blob[:-1], "corrupt"), (bad_start, "past K"), (bad_idx, "past K"), (bad_val, "-128"),
                       (old, "another fxopt version")):
        with pytest.raises(K.KernelError, match=match):
            K.PackedSparse.from_bytes(bad, ps.scales, ps.col_sums, 16, 40)


def _magnitude_pruned(n, k, amount, seed=0):
    """int8 weights of an nn.Linear pruned by torch's l1_unstructured: every weight left is
    near the row's largest, so all of them quantize to |q| >= 100 (the case that once took
    a slot pair per weight)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    prune.l1_unstructured(lin, "weight", amount=amount)
    return K.quantize_weights_s8(lin.weight.detach().numpy())


@pytest.mark.parametrize("isa", ISAS)
def test_large_weights_fill_the_slots_and_stay_exact(isa):
    q, s = _magnitude_pruned(256, 512, 0.9)
    nonzero = q[q != 0]
    assert np.abs(nonzero).min() >= 100
    ps = K.pack_sparse_s8(q, s)
    # at least half the slots hold a weight (the pair rule of sparse-pack-1 left 26 % filled)
    assert nonzero.size / (ps.steps * STEP) > 0.5
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (5, 512), dtype=np.uint8)
    a[0], a[1] = 255, 0
    x = rng.standard_normal((1, 512)).astype(np.float32)
    with K.use_isa(isa):
        np.testing.assert_array_equal(K.gemm_sparse_s32(a, ps), R.gemm_u8s8_s32(a, q))
        np.testing.assert_array_equal(K.linear_sparse_f32(x, ps, n_threads=1),
                                      K.linear_f32(x, K.pack_weights_s8(q, s), n_threads=1))


@pytest.mark.parametrize("m,n,k,density", SHAPES)
def test_unpack_gives_back_the_packed_matrix(m, n, k, density):
    q, s = sparse_weights(np.random.default_rng(n + k), n, k, density)
    ps = K.pack_sparse_s8(q, s)
    for packed in (ps, K.PackedSparse.from_bytes(ps.to_bytes(), ps.scales, ps.col_sums, n, k)):
        back = K.unpack_sparse_s8(packed)
        assert back.dtype == np.int8 and back.shape == (n, k)
        np.testing.assert_array_equal(back, q)
    q2, _ = _magnitude_pruned(70, 300, 0.8)
    np.testing.assert_array_equal(K.unpack_sparse_s8(K.pack_sparse_s8(q2, np.ones(70, np.float32))), q2)
    with pytest.raises(K.KernelError, match="PackedSparse"):
        K.unpack_sparse_s8(K.pack_weights_s8(q, s))


def _wide_matrix(wide, n, k):
    """The int8 (n, k) matrix a WideSteps holds (its slot index is k - start), in numpy."""
    q = np.zeros(((n + WIDE_SLICE - 1) // WIDE_SLICE * WIDE_SLICE, k + 64), np.int8)
    rows = np.repeat(np.arange(wide.slice_ptr.shape[0] - 1) * WIDE_SLICE, np.diff(wide.slice_ptr))
    o = np.flatnonzero(wide.val)
    step = o // WIDE_STEP
    q[rows[step] + o % WIDE_STEP // SLOTS, wide.starts[step] + wide.idx[o]] = wide.val[o]
    return q[:n, :k], q


@pytest.mark.skipif(not S.WIDE_HOST, reason="the wide layout needs AVX512-VBMI and VNNI")
@pytest.mark.parametrize("m,n,k,density", SHAPES)
def test_the_wide_layout_holds_the_weights_and_runs(m, n, k, density):
    q, s = sparse_weights(np.random.default_rng(n + k + 1), n, k, density)
    ps = K.pack_sparse_s8(q, s)
    for packed in (ps, K.PackedSparse.from_bytes(ps.to_bytes(), ps.scales, ps.col_sums, n, k)):
        got, whole = _wide_matrix(packed.wide, n, k)
        np.testing.assert_array_equal(got, q)
        assert not whole[n:].any() and not whole[:, k:].any()     # nothing past the matrix
        assert packed.wide.idx.ctypes.data % 64 == 0 and packed.wide.val.ctypes.data % 64 == 0
    assert not K.PackedSparse.from_bytes(ps.to_bytes(), ps.scales, ps.col_sums, n, k, wide=False).wide.starts.size
    a = np.random.default_rng(m).integers(0, 256, (m, k), dtype=np.uint8)
    assert K.isa() in S.WIDE_ISAS    # the wide loop, and without the wide layout the 8-row one (256-bit vpdpbusd)
    np.testing.assert_array_equal(K.gemm_sparse_s32(a, ps), R.gemm_u8s8_s32(a, q))
    np.testing.assert_array_equal(K.gemm_sparse_s32(a, ps._replace(wide=NO_WIDE)), R.gemm_u8s8_s32(a, q))


# --- through optimize ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_mlp():
    """The digits MLP (wider, so that the pruned layers have weight to lose), trained, its linears
    pruned to 90 % by torch.nn.utils.prune.l1_unstructured and the pruning made permanent."""
    data = examples.digits()
    torch.manual_seed(0)
    model = examples.train(examples.DigitsMLP(hidden=256), data, epochs=6)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            prune.l1_unstructured(mod, "weight", amount=0.9)
            prune.remove(mod, "weight")
    return model.eval(), data


def _optimize(model, x, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.optimize(model, (x,), target="cpu-int8", latency_aware=False, latency_repeats=0,
                              calibration_data=[(x,)], **options)


def _targets(fast):
    return [n.target for n in fast.graph.nodes if n.target in kernel_ops.LINEARS]


def test_optimize_runs_pruned_linears_sparse_with_the_dense_models_outputs(pruned_mlp, tmp_path):
    model, data = pruned_mlp
    x = data.x_test[:64]
    dense = _optimize(model, x, sparse=False)
    fast = _optimize(model, x, sparse="always")
    graph = _optimize(model, x, sparse="always", runtime="graph")
    assert _targets(dense) == [kernel_ops.linear_int8] * 3
    assert _targets(fast) == [kernel_ops.linear_int8_sparse] * 3 == _targets(graph)
    with torch.no_grad():
        for inp in (x, data.x_test[64:65], data.x_test[:7]):
            y = fast(inp)
            assert torch.equal(y, dense(inp)) and torch.equal(y, graph(inp))
            assert tensor_drift(model(inp), y).cosine > 0.999
        assert (fast(data.x_test).argmax(1) == model(data.x_test).argmax(1)).float().mean() > 0.98
    assert "sparse int8 kernel: 9" in str(fast.fxopt_report)
    path = tmp_path / "sparse.fxopt"
    fxopt.save(fast, path)
    loaded = fxopt.load(path)
    assert _targets(loaded) == _targets(fast)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))


def test_a_nonfinite_sample_comes_out_as_from_the_dense_model(pruned_mlp):
    # the plan screens the (flattened) input in a pass of its own, then poisons the bad sample
    model, data = pruned_mlp
    x = data.x_test[:6].clone()
    dense, fast = _optimize(model, x, sparse=False), _optimize(model, x, sparse="always")
    for value in (float("nan"), float("inf")):
        x.view(len(x), -1)[2, 5] = value
        with torch.no_grad():
            y = fast(x)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
        torch.testing.assert_close(y, dense(x), rtol=0, atol=0, equal_nan=True)


def test_a_sparse_first_layer_screens_its_input_while_quantizing_it(pruned_mlp):
    """A float input read first by a sparse linear is screened by the kernel's quantization
    (rows_screened), not by a pass of its own; a bad sample still comes out as from the
    dense model."""
    from fxopt.runtime.plan import plan_of
    model, data = pruned_mlp
    head = torch.nn.Sequential(model.net[1], model.net[2]).eval()     # Linear(64, 256), ReLU
    x = data.x_test[:6].reshape(6, -1).clone()
    dense, fast = _optimize(head, x, sparse=False), _optimize(head, x, sparse="always")
    assert _targets(fast) == [kernel_ops.linear_int8_sparse]
    source = plan_of(fast).source
    assert "_fx_finite_sum(" not in source and ", _fx_f" in source, source
    # the tensor itself: a numpy view of it made only when it is not finite, and its dtype,
    # rank, width and device not looked at again after the input check
    assert ".numpy()" not in source and source.count("_fx_to_numpy(") == 1, source
    for optimized in (fast, dense):      # the dense int8 linear takes the tensor too (rows_screened_at)
        plan = plan_of(optimized)
        linear = next(step.fn for step in plan.steps if hasattr(step.fn, "screened_checked"))
        assert linear.screened_checked in plan._globals.values()
    plan = plan_of(fast)
    linear = next(step.fn for step in plan.steps if hasattr(step.fn, "screened_checked"))
    with torch.no_grad():
        assert torch.equal(fast(x), dense(x))
        strided = torch.cat([x, x], 1)[:, :x.shape[1]]     # rows apart: not contiguous, the numpy path
        assert not strided.is_contiguous() and torch.equal(fast(strided), dense(x))
        want, _ = linear.screened(x.numpy())
        for call in (linear.screened_tensor, linear.screened_checked):
            for v in (x, strided):
                y, bad = call(v)
                assert bad == 0 and np.array_equal(y, want)
        y, bad = linear.screened_tensor(x.double())     # unchecked: any tensor numpy takes
        assert bad == 0 and np.array_equal(y, linear.screened(x.double().numpy())[0])
        x[2, 5] = float("nan")
        y = fast(x)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
        torch.testing.assert_close(y, dense(x), rtol=0, atol=0, equal_nan=True)


def test_the_timed_choice_records_both_times(pruned_mlp):
    model, data = pruned_mlp
    fast = _optimize(model, data.x_test[:1])
    nodes = [n for n in fast.graph.nodes if n.target in kernel_ops.LINEARS]
    for node in nodes:
        info = node.meta["fxopt_quant"]["sparse"]
        assert info["zeros"] >= 0.89 and info["dense_us"] > 0 and info["sparse_us"] > 0
        assert info["chosen"] == (node.target is kernel_ops.linear_int8_sparse)
    stats = fast.fxopt_report.record("lower_to_kernels").stats
    assert stats["sparse_timed"] == 3 and stats["sparse"] == sum(n.target is kernel_ops.linear_int8_sparse
                                                                  for n in nodes)
    assert " us dense at " in str(fast.fxopt_report)


def test_a_corrupt_sparse_layout_in_a_model_is_refused(pruned_mlp):
    model, data = pruned_mlp
    fast = _optimize(model, data.x_test[:4], sparse="always")
    node = next(n for n in fast.graph.nodes if n.target is kernel_ops.linear_int8_sparse)
    packed = getattr(fast, node.args[1].target)
    steps = int(packed[4:4 + 4 * ((node.args[5] + 7) // 8 + 1)].view(torch.int32)[-1])
    packed[packed.numel() - 2 * 32 * steps] = 200           # the first slot index, far past its window
    with pytest.raises(ArtifactError, match="past K"):
        check_lowered(fast)


def test_sparse_option_is_checked():
    with pytest.raises(TypeError, match="sparse must be"):
        fxopt.optimize(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), sparse="yes")
