"""Sparse int8 linear benchmark: where the sparse kernel beats the dense one, and the figure
through optimize.

    python -m fxopt.bench.sparse [--threads 2] [--repeats 15] [--quick]

1. Break-even table: a 1024 x 1024 int8 linear (float32 in and out, activation quantization
   and epilogue included) with unstructured random sparsity 50/70/80/90/95 %, M = 1, 8, 32,
   128 rows: the dense kernel (bind_linear) and the sparse one (bind_linear_sparse), each
   bound once as the runtime binds them, interleaved medians, and dense / sparse (> 1:
   sparse faster); then the lowest sparsity at which sparse wins, per M.
2. The same kernels on the int8 weights of that figure's layer (below: magnitude pruning
   leaves only large weights, |q| >= 114), M = 1 and 8.
3. The figure: nn.Linear(1024, 1024) pruned to 90 % by torch.nn.utils.prune.l1_unstructured,
   through fxopt.optimize (cpu-int8) with sparse=True and with sparse=False (the dense int8
   kernel), both with latency_aware=False so that the dense model stays int8 whatever a noisy
   fp32 timing says; the modules optimize returns, called as a user calls them on a 1 x 1024
   input, interleaved medians in one run.

Measured (branch sparse1, 2026-12-06, a 2-vCPU AVX2 VM shared with other jobs, load 5-10:
wall-clock medians of this bench were whole scheduler quanta, 8-32 ms a call, so these
figures come from the thread CPU time of single-thread bound calls, same run, medians):
1024 x 1024 at 90 %, dense / sparse kernel alone, 1 thread:

  | weights                   | layout        | steps | M=1   | M=8   |
  |---------------------------|---------------|-------|-------|-------|
  | random 90 %               | sparse-pack-1 | 8187  | 2.47x | 3.05x |
  | random 90 %               | sparse-pack-2 | 5255  | 2.92x | 4.22x |
  | l1-pruned 90 % (q >= 114 in size) | sparse-pack-1 | 12765 | 1.79x | 2.17x |
  | l1-pruned 90 % (q >= 114 in size) | sparse-pack-2 | 5270  | 2.99x | 4.45x |

M=32 / M=128, the same way: random 3.22x / 3.31x -> 4.24x / 4.51x, l1-pruned 2.16x / 2.19x
-> 4.45x / 4.50x.
2 threads, wall clock, in a quieter minute (p50 of 300 single calls): random 90 %, M=1,
dense 50.3 us, sparse 23.8-24.5 us = 2.07-2.13x (sparse-pack-1: 1.64x in notes/stop20).

AMX Xeon (AVX512-VBMI: the wide layout), 2 threads, --quick, 2026-12-07: section 3,
sparse=True 10.2 us, sparse=False 14.7 us = 1.44x (1.05-1.20x before the VNNI and wide step
loops). Then with the small arrays in one table (10 entry arguments, not 20) and the input's
NaN screen in the kernel's quantization: 8.1 / 13.2 us = 1.62x; bound kernels at M=1 (section
2) 5.3 / 10.4 us = 1.94x. Of the 8.1 us, about 2.9 are the plan's (module call, input check,
torch <-> numpy), about 0.7 the Python around the kernel and 0.45 Numba's dispatch, which the
dense call pays as well; the kernel's steps take about 2.3 us.
2026-12-07, later (same VM): rows_screened calls the serial entry's compiled code without
Numba's dispatch, and the entries take the table's sections as borrowed views: section 3 at
1.95-2.01x in five runs (1.78-1.89x before); the rows_screened call at M=1 5.3-5.7 us.

AMD EPYC (Zen 5: AVX512-VNNI and VBMI, no AMX; isa avx512_vnni), 2 vCPUs, 2026-12-07:
section 3 at 1.66x (6.2 / 10.3 us) before, then with the lean entry (three arguments, all
arrays borrowed: sparse.py) 1.83-1.89x in five runs, sparse=True 5.5-5.9 us, sparse=False
10.1-11.0 us (one run 2.40x, dense 13.3 us). The steps: 0.84 ns each in the kernel at
1024 x 1024; a bare loop of them (start, window, vpermb, vpdpbusd) took 0.70 ns a step on
steps in L2 (128 bytes a step: ~180 GB/s) and 0.65 on steps in L1, and the same loop with
the steps grouped by aligned 128-byte regions (two loads a group, vpermi2b) 0.72 / 0.40 ns:
from L2, fewer bytes a nonzero is the lever, not fewer instructions. The two vCPUs share a
core's L2 bandwidth (two threads reading L2-resident arrays: 131 GB/s each against 208 GB/s
alone), so a second thread barely helps the sparse call (tried: warm helper threads, 0.14 us
a launch, the call 5 % faster).
Same kind of VM, later: the lean entry's views as C arrays at their addresses (Numba's
.view(dtype) was a call with two integer divisions and a reference count, 14 a call), the
plan handing the sparse linear the input tensor itself (its data_ptr(); no numpy view of it,
0.55 us) and not checking again what the input check did: sparse=True 4.2-4.9 us. The dense
peer is bimodal here: sparse=False 9.3-10.9 us in most runs (2.09-2.32x), 12.5-14.1 us in
others (2.8-3.1x), in and out over seconds, with OPENBLAS_NUM_THREADS=1 as well. Of a 4.2 us
sparse call: the entry 2.25, its Python and output array 0.4, the tensor's contiguity and
address 0.23, the input check 0.19, torch.from_numpy 0.43, the module call 0.32. The dense
linear does not take the tensor yet; with the same ~0.9 us less, its fast runs would give
about 1.9-2.1x.
Same kind of VM, 2026-12-07 later, a slower day (the sparse steps at ~1.37 ns each, 0.84 before):
the dense linear now takes the tensor as well (linear.lean_calls: one compiled call that quantizes
and runs the jobs, the layer's arrays from one table). In one run, dense 16.0-16.7 -> 12.1-12.5 us
and sparse 6.35-6.6 us: 2.46-2.57x against the old dense path, 1.88-1.95x against the new one.
Section 3 in 9 runs after it: 1.69-2.18x (sparse 6.5-10.6 us, dense 13.4-19.4 us). Tried for the
sparse steps and not kept (the step loop is ~70 % of the call and costs about the same a step
whether its steps sit in L1 or L2 on this VM: core-bound, not bandwidth-bound): windows of 128 k
with vpermi2b (1967 steps, 10 % fewer: the call 15 % slower), the same with steps on 64-byte
boundaries (2085 steps, two aligned loads: no faster), rows sorted by their nonzeros before slicing
(2129 steps, 3 % fewer), 8 rows of 8 slots (2445 steps), windows placed after the densest row
(3079 steps), two threads at M=1 (slower: Numba's parallel launch costs more than half the steps).
"""
import argparse
import platform
import warnings

import numpy as np
import torch
from torch.nn.utils import prune

import fxopt
from fxopt.bench.timing import interleaved_medians
from fxopt.kernels import api as K
from fxopt.runtime import kernel_ops

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
ROWS = (1, 8, 32, 128)
SIZE = 1024


def weights(sparsity, seed=0):
    """int8 weights (SIZE, SIZE) of a random layer with `sparsity` of them zero (unstructured)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    return K.quantize_weights_s8(w)


def break_even(threads, repeats, rows=ROWS, sparsities=SPARSITIES):
    """{(m, sparsity): (dense s, sparse s)}, printed row by row."""
    table = {}
    print(f"{'sparsity':>8} " + " ".join(f"{'M=' + str(m) + ' dense/sparse us':>26}" for m in rows))
    for sp in sparsities:
        q, s = weights(sp)
        pw, ps = K.pack_weights_s8(q, s), K.pack_sparse_s8(q, s)
        dense, sparse = K.bind_linear(pw), K.bind_linear_sparse(ps)
        cells = []
        for m in rows:
            x = np.random.default_rng(m).standard_normal((m, SIZE)).astype(np.float32)
            med = interleaved_medians({"dense": lambda: dense(x, n_threads=threads),
                                       "sparse": lambda: sparse(x, n_threads=threads)},
                                      repeats=repeats, min_batch_s=2e-3)
            table[m, sp] = med["dense"], med["sparse"]
            cells.append(f"{med['dense'] * 1e6:8.1f} /{med['sparse'] * 1e6:8.1f} ={med['dense'] / med['sparse']:5.2f}x")
        print(f"{sp:8.0%} " + " ".join(f"{c:>26}" for c in cells), flush=True)
    for m in rows:
        wins = [sp for sp in sparsities if table[m, sp][0] > table[m, sp][1]]
        print(f"  M={m}: sparse faster from {min(wins):.0%} sparsity" if wins else
              f"  M={m}: dense faster at every sparsity measured")
    return table


def kernels_on_pruned(threads, repeats, rows=(1, 8)):
    """{m: (dense s, sparse s)} on the int8 weights of pruned_linear(0.9), printed."""
    lin = pruned_linear(0.9)[0]
    q, s = K.quantize_weights_s8(lin.weight.detach().numpy())
    pw, ps = K.pack_weights_s8(q, s), K.pack_sparse_s8(q, s)
    dense, sparse = K.bind_linear(pw), K.bind_linear_sparse(ps)
    table = {}
    for m in rows:
        x = np.random.default_rng(m).standard_normal((m, SIZE)).astype(np.float32)
        med = interleaved_medians({"dense": lambda: dense(x, n_threads=threads),
                                   "sparse": lambda: sparse(x, n_threads=threads)},
                                  repeats=repeats, min_batch_s=2e-3)
        table[m] = med["dense"], med["sparse"]
        print(f"   M={m}: dense {med['dense'] * 1e6:8.1f} us, sparse {med['sparse'] * 1e6:8.1f} us = "
              f"{med['dense'] / med['sparse']:.2f}x ({ps.steps} steps of 32 slots, "
              f"{ps.wide.starts.size} wide steps of 64, for {np.count_nonzero(q)} weights)")
    return table


def pruned_linear(sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(SIZE, SIZE)
    prune.l1_unstructured(lin, "weight", amount=sparsity)
    prune.remove(lin, "weight")
    return torch.nn.Sequential(lin).eval()


def through_optimize(repeats, sparsity=0.9):
    """(sparse module s, dense module s, the layer's report row) for the pruned linear at M=1."""
    model = pruned_linear(sparsity)
    x = torch.randn(1, SIZE)
    calib = [(torch.randn(8, SIZE),)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(target="cpu-int8", calibration_data=calib, latency_aware=False, latency_repeats=0)
        fast = fxopt.optimize(model, (x,), sparse=True, **kw)
        dense = fxopt.optimize(model, (x,), sparse=False, **kw)
    ops = [n.target for n in fast.graph.nodes if n.target in kernel_ops.LINEARS]
    with torch.no_grad():
        assert torch.equal(fast(x), dense(x)), "sparse and dense int8 models differ"
        med = interleaved_medians({"sparse": lambda: fast(x), "dense": lambda: dense(x)},
                                  repeats=repeats, min_batch_s=2e-3)
    why = next(r["why"] for r in fast.fxopt_report.layers)
    return med["sparse"], med["dense"], ops == [kernel_ops.linear_int8_sparse], why


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fxopt.bench.sparse", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="M=1 and 32, sparsities 80/90/95 %% only")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    K.set_num_threads(ns.threads)
    print(f"cpu: {platform.processor() or platform.machine()}, kernel isa {K.isa()}, {ns.threads} threads")
    print(f"\n1. int8 linear {SIZE}x{SIZE}, unstructured sparsity: dense / sparse kernel (us, medians)")
    if ns.quick:
        break_even(ns.threads, ns.repeats, rows=(1, 32), sparsities=(0.8, 0.9, 0.95))
    else:
        break_even(ns.threads, ns.repeats)
    print(f"\n2. the same kernels on nn.Linear({SIZE}, {SIZE})'s weights pruned to 90 % by l1_unstructured:")
    kernels_on_pruned(ns.threads, ns.repeats)
    sparse_s, dense_s, picked, why = through_optimize(ns.repeats)
    print(f"\n3. nn.Linear({SIZE}, {SIZE}) pruned to 90 % (torch prune.l1_unstructured), fxopt.optimize "
          f"cpu-int8, 1x{SIZE} input, module calls:")
    print(f"   sparse=True:  {sparse_s * 1e6:8.1f} us  ({'linear_int8_sparse' if picked else 'dense kernel kept'}; "
          f"{why})")
    print(f"   sparse=False: {dense_s * 1e6:8.1f} us  (dense int8 kernel)")
    print(f"   sparse path {dense_s / sparse_s:.2f}x faster than dense int8 (same outputs, bit for bit)")


if __name__ == "__main__":
    main()
