"""int8 GEMM benchmark: fxopt kernels against torch fp32 and torch int8.

    fxopt bench gemm [--threads 2] [--repeats 21] [--quick] [--mix] [--out PATH]

Per shape (M, K, N): our GEMM (uint8 in, fp32 out), our full linear (fp32
in/out, quantization included), the module fxopt.optimize returns for that
nn.Linear (what a user calls: "optimize/int8", and its time over the linear
kernel's, "call-kernel us": the median difference of calls in pairs, back to
back), torch fp32 nn.Linear and torch dynamic int8 Linear (quantize_dynamic,
fbgemm). Prints GOP/s (2*M*N*K ops), % of the measured peak of the path's
multiply-accumulate (vpdpbusd; vpmaddwd + vpaddd on avx2; none on portable) and
ratios to torch int8 (medians, compile excluded), the first-call (compile or
cache-load) times, the warm call overhead of a 1x64x64 linear, and two batch-1
models through optimize against eager fp32; rows print as they are measured.
--mix runs only a sweep of the module against fbgemm at M = 1 and 8 over every
(K, N) of MIX_SIZES, with fbgemm's share of the peak (above half of it, 2x
fbgemm is out of reach without AMX). With --out PATH, writes PATH/gemm.json (+
gemm.png if matplotlib is present); without it, nothing is written.
"""
import argparse
import json
import os
import platform
import time

import numba
import numpy as np
from numba import njit, prange

from fxopt.bench.peers import quantize_dynamic_int8
from fxopt.bench.timing import first_call_seconds, interleaved_medians, median_seconds, paired_difference_seconds
from fxopt.kernels import amx, api as K
from fxopt.kernels.simd import AMX_ISAS, PEAK_CHAINS, PEAK_OPS, TAGS, peak_chains

BERT_SHAPES = [(1, 768, 768), (8, 768, 768), (128, 768, 768), (128, 768, 3072),
               (128, 3072, 768), (512, 1024, 1024)]
# ResNet-50, batch 1, as im2col GEMMs: (OH*OW, Cin*kh*kw, Cout)
CONV_SHAPES = {"conv3x3 64->64 @56": (56 * 56, 64 * 9, 64),
               "conv1x1 256->64 @56": (56 * 56, 256, 64),
               "conv3x3 256->256 @14": (14 * 14, 256 * 9, 256)}
# the same convolutions end to end: (C, O, kernel, H), stride 1, same padding
CONVS = {"conv3x3 64->64 @56": (64, 64, 3, 56), "conv1x1 256->64 @56": (256, 64, 1, 56),
         "conv3x3 256->256 @14": (256, 256, 3, 14)}
PEAK_ITERS = 2_000_000
# --mix: every (K, N) of these at M = 1 and 8 (the runtime issue's sweep against fbgemm)
MIX_SIZES = (384, 768, 1024, 1536, 3072, 4096)
MIX_ROWS = (1, 8)


def _peak_probes(tag):
    """Serial and threaded peak probes of one ISA (the tag a closure constant)."""
    @njit
    def serial(n):
        return peak_chains(tag, n, 3)

    @njit(parallel=True)
    def parallel(n, threads):
        total = 0
        for i in prange(threads):
            total += peak_chains(tag, n, 3 + i)
        return total
    return serial, parallel


_PROBES = {}


def peak_probe(isa):
    """(serial, parallel, int8 ops per iteration) of the ISA's peak probe, or None for
    a path without one (portable)."""
    if isa not in PEAK_CHAINS:
        return None
    if isa not in _PROBES:
        chains, macs = PEAK_CHAINS[isa]
        _PROBES[isa] = (*_peak_probes(TAGS[isa]), chains * macs * 2)
    return _PROBES[isa]


def measure_peak(threads, isa=None):
    """Measured int8 TOP/s of independent chains of the ISA's multiply-accumulate
    (vpdpbusd, or vpmaddwd + vpaddd on avx2), 1 and n threads; (None, None) if the
    path has no probe."""
    probe = peak_probe(isa or K.isa())
    if probe is None:
        return None, None
    serial, parallel, ops = probe
    serial(10)
    parallel(10, threads)
    one = median_seconds(lambda: serial(PEAK_ITERS), repeats=7, warmup=1)
    many = median_seconds(lambda: parallel(PEAK_ITERS, threads), repeats=7, warmup=1)
    return PEAK_ITERS * ops / one / 1e12, threads * PEAK_ITERS * ops / many / 1e12


def _peak_candidate(ops, threads):
    """(a call of the ISA's peak probe sized to about `ops` int8 ops on `threads` threads,
    the ops it runs), for a benchmark's rounds; (None, None) on a path without a probe."""
    probe = peak_probe(K.isa())
    if probe is None:
        return None, None
    serial, parallel, per_iter = probe
    iters = max(1000, int(ops / (threads * per_iter)))
    return ((lambda: parallel(iters, threads)) if threads > 1 else (lambda: serial(iters))), threads * iters * per_iter


@njit(parallel=True)
def _amx_peak_parallel(n, threads):
    total = 0
    for _ in prange(threads):
        total += amx.peak_probe(n)
    return total


def measure_amx_peak(threads):
    """Measured int8 TOP/s of AMX tdpbusd (amx.peak_probe), 1 and n threads; (None,
    None) on a CPU (or path) without AMX."""
    if K.isa() not in AMX_ISAS:
        return None, None
    amx.peak_probe(10)
    _amx_peak_parallel(10, threads)
    iters = PEAK_ITERS // 8   # a tdpbusd step is 16 cycles
    one = median_seconds(lambda: amx.peak_probe(iters), repeats=7, warmup=1)
    many = median_seconds(lambda: _amx_peak_parallel(iters, threads), repeats=7, warmup=1)
    ops = amx.PEAK_OPS_PER_STEP * iters
    return ops / one / 1e12, threads * ops / many / 1e12


def _torch_models(w, b):
    import torch
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    model = torch.nn.Sequential(lin).eval()
    return model, quantize_dynamic_int8(model)


def bench_shape(name, m, k, n, repeats, threads, rng):
    """Medians of every candidate and of the peak probe (same thread count),
    interleaved."""
    import torch
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(w))
    aq, s, z = K.quantize_rows_f32_u8(x)
    aq = K.pad_rows_u8(aq)  # the GEMM's own A layout, as linear_f32 quantizes into it
    fp32, int8 = _torch_models(w, b)
    xt = torch.from_numpy(x)
    optimized = _optimized(fp32, xt)
    ops = 2.0 * m * n * k
    runs = {
        "ours_gemm": lambda: K.gemm_u8s8_f32(aq, s, z, pw, b),
        "ours_linear": lambda: K.linear_f32(x, pw, b),
        "ours_optimize": lambda: optimized(xt),     # what a user calls: the module optimize returns
        "torch_fp32": lambda: fp32(xt),
        "torch_int8": lambda: int8(xt),
    }
    peak, peak_ops = _peak_candidate(ops, threads)   # sized to about one GEMM call: the same load
    if peak is not None:
        runs["peak"] = peak
    with torch.no_grad():
        med = interleaved_medians(runs, repeats=repeats)
    row = {"name": name, "m": m, "k": k, "n": n,
           "peak_gops": peak_ops / med.pop("peak") / 1e9 if peak else None}
    for key, sec in med.items():
        row[key + "_us"] = sec * 1e6
        row[key + "_gops"] = ops / sec / 1e9
    # the module's time over its kernel's, from calls in pairs (at M >= 128 the difference
    # of the two medians above moves by tens of us from run to run on a shared machine).
    # What is left at large M is mostly the Python after the kernel, on caches the kernel
    # has flushed: right after a 512x1024x1024 call np.ones(4) takes 4.2 us, 0.9 otherwise
    # (AMD EPYC, 2 threads)
    pairs = int(min(501, max(51, 0.3 / med["ours_linear"])))
    with torch.no_grad():
        row["call_kernel_us"] = paired_difference_seconds(runs["ours_linear"], runs["ours_optimize"], pairs) * 1e6
    return row


def bench_mix(repeats, rng, out=lambda row: None):
    """The module optimize returns for one nn.Linear against torch dynamic int8 (fbgemm) at
    M = 1 and 8, for every (K, N) of MIX_SIZES: medians, the two interleaved per shape with
    the ISA's peak probe (sized to about one fbgemm call: "peak_gops", None without one).
    out(row) is called as each row is measured."""
    import torch
    threads = K.get_num_threads()
    rows = []
    for m in MIX_ROWS:
        for k in MIX_SIZES:
            for n in MIX_SIZES:
                w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
                fp32, int8 = _torch_models(w, rng.standard_normal(n, dtype=np.float32))
                xt = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
                optimized = _optimized(fp32, xt)
                runs = {"fxopt": lambda: optimized(xt), "fbgemm": lambda: int8(xt)}
                peak, peak_ops = _peak_candidate(2.0 * m * k * n, threads)
                if peak is not None:
                    runs["peak"] = peak
                with torch.no_grad():
                    med = interleaved_medians(runs, repeats=repeats)
                rows.append({"m": m, "k": k, "n": n, "fxopt_us": med["fxopt"] * 1e6,
                             "fbgemm_us": med["fbgemm"] * 1e6,
                             "peak_gops": peak_ops / med["peak"] / 1e9 if peak else None})
                out(rows[-1])
    return rows


def _print_mix(rows):
    """One table per M: K down, N across, fbgemm's time over fxopt's; then the least of each.
    With a peak probe, fbgemm's share of it too: where fbgemm runs above half the peak of
    the multiply-accumulate both use, 2x fbgemm is out of reach on that path (AMX is not
    bound by it: fbgemm runs on VNNI there)."""
    for m in MIX_ROWS:
        ratio = {(r["k"], r["n"]): r["fbgemm_us"] / r["fxopt_us"] for r in rows if r["m"] == m}
        print(f"\nM = {m}: speed of optimize over fbgemm (fbgemm us / fxopt us), K down, N across")
        print(f"{'K / N':>8}" + "".join(f"{n:>8}" for n in MIX_SIZES))
        for k in MIX_SIZES:
            print(f"{k:>8}" + "".join(f"{ratio[k, n]:>7.2f}x" for n in MIX_SIZES))
        k, n = min(ratio, key=ratio.get)
        print(f"least: {ratio[k, n]:.2f}x at K={k}, N={n}", flush=True)
        share = {(r["k"], r["n"]): 2e-3 * r["m"] * r["k"] * r["n"] / r["fbgemm_us"] / r["peak_gops"]
                 for r in rows if r["m"] == m and r.get("peak_gops")}
        if not share:
            continue
        print(f"M = {m}: fbgemm's GOP/s as % of the measured {PEAK_OPS[K.isa()]} peak (same rounds)")
        for k in MIX_SIZES:
            print(f"{k:>8}" + "".join(f"{100 * share[k, n]:>7.0f}%" for n in MIX_SIZES))
        over = sorted(kn for kn, v in share.items() if v > 0.5)
        if over and K.isa() not in AMX_ISAS:
            print(f"2x fbgemm needs more than that peak at {len(over)} of {len(share)} shapes "
                  f"(fbgemm above 50 %), smallest K x N {over[0][0]}x{over[0][1]}", flush=True)


def _optimized(model, x):
    """fxopt.optimize(model) with cpu-int8, without the report's per-layer rows and timing."""
    import fxopt
    return fxopt.optimize(model, (x,), target="cpu-int8", report_layers=False, latency_repeats=0)


def bench_small_models(repeats, out=lambda row: None):
    """Batch-1 models where call overhead decides: one 64x64 Linear, and four
    Linear(256, 256)+ReLU; fxopt through optimize's module against eager fp32.
    out(row) is called as each row is measured."""
    import torch
    torch.manual_seed(0)
    models = {"linear 1x64x64": (torch.nn.Sequential(torch.nn.Linear(64, 64)), torch.randn(1, 64)),
              "mlp 4x(256+relu) b1": (torch.nn.Sequential(*[layer for _ in range(4) for layer in
                                                          (torch.nn.Linear(256, 256), torch.nn.ReLU())]),
                                      torch.randn(1, 256))}
    rows = []
    for name, (model, x) in models.items():
        model.eval()
        fast = _optimized(model, x)
        with torch.no_grad():
            med = interleaved_medians({"eager": lambda: model(x), "fxopt": lambda: fast(x)}, repeats=repeats)
        rows.append({"name": name, "eager_us": med["eager"] * 1e6, "fxopt_us": med["fxopt"] * 1e6})
        out(rows[-1])
    return rows


def bench_conv(name, c, o, k, h, repeats, rng):
    """conv2d_f32 (quantize + im2col + GEMM, NCHW) against torch fp32 conv2d."""
    import torch
    import torch.nn.functional as F
    x = rng.standard_normal((1, c, h, h), dtype=np.float32)
    w = (rng.standard_normal((o, c, k, k), dtype=np.float32) / np.sqrt(c * k * k)).astype(np.float32)
    b = rng.standard_normal(o, dtype=np.float32)
    pc = K.pack_conv_weights_s8(w)
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
    with torch.no_grad():
        med = interleaved_medians({
            "ours_conv": lambda: K.conv2d_f32(x, pc, b, padding=k // 2),
            "torch_fp32": lambda: F.conv2d(xt, wt, bt, padding=k // 2)}, repeats=repeats)
    ops = 2.0 * h * h * c * k * k * o
    return {"name": name, **{key + "_us": v * 1e6 for key, v in med.items()},
            **{key + "_gops": ops / v / 1e9 for key, v in med.items()}}


def _fmt_head():
    head = (f"{'shape':<22}{'M':>5}{'K':>6}{'N':>6} | {'gemm GOP/s':>10}{'%peak':>7} | "
            f"{'linear GOP/s':>12}{'%peak':>7} | {'torch fp32':>10} {'torch int8':>10} | "
            f"{'gemm/int8':>9} {'linear/int8':>11} | {'optimize/int8':>13} {'call-kernel us':>14} | "
            f"{'peak GOP/s':>10}")
    return head + "\n" + "-" * len(head)


def _fmt_row(r):
    def pct(gops, peak):
        return f"{100 * gops / peak:>6.1f}%" if peak else f"{'n/a':>7}"
    peak = r["peak_gops"]
    return (f"{r['name']:<22}{r['m']:>5}{r['k']:>6}{r['n']:>6} | "
            f"{r['ours_gemm_gops']:>10.1f}{pct(r['ours_gemm_gops'], peak)} | "
            f"{r['ours_linear_gops']:>12.1f}{pct(r['ours_linear_gops'], peak)} | "
            f"{r['torch_fp32_gops']:>10.1f} {r['torch_int8_gops']:>10.1f} | "
            f"{r['ours_gemm_gops'] / r['torch_int8_gops']:>8.2f}x "
            f"{r['ours_linear_gops'] / r['torch_int8_gops']:>10.2f}x | "
            f"{r['ours_optimize_gops'] / r['torch_int8_gops']:>12.2f}x "
            f"{r['call_kernel_us']:>14.1f} | "
            + (f"{peak:>10.1f}" if peak else f"{'n/a':>10}"))


def _first_calls(rng):
    """First-call times (JIT compile, or load from Numba's cache) per entry."""
    x = rng.standard_normal((8, 96), dtype=np.float32)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(x[:70]))
    big = rng.standard_normal((256, 96), dtype=np.float32)
    K.set_num_threads(K.get_num_threads())
    return {"linear_f32 serial": first_call_seconds(lambda: K.linear_f32(x, pw)),
            "linear_f32 parallel": first_call_seconds(
                lambda: K.linear_f32(np.repeat(big, 64, axis=0), pw)),
            "gemm_u8s8_s32": first_call_seconds(
                lambda: K.gemm_u8s8_s32(np.zeros((8, 96), np.uint8), pw))}


def _cache_state():
    """'warm' if Numba's on-disk cache holds the GEMM entry for this source."""
    import glob
    import pickle
    from fxopt.kernels._cache import cache_dir, package_stamp
    pattern = os.path.join(cache_dir(), "**", "gemm._entries.locals.serial-*.nbi")
    for path in glob.glob(pattern, recursive=True):
        try:
            with open(path, "rb") as f:
                pickle.load(f)
                stamp, _ = pickle.loads(f.read())
        except Exception:
            continue
        if stamp == package_stamp():
            return "warm"
    return "cold"


def _call_overhead_us(rng):
    x = rng.standard_normal((1, 64), dtype=np.float32)
    pw = K.pack_weights_s8(*K.quantize_weights_s8(rng.standard_normal((64, 64), dtype=np.float32)))
    return median_seconds(lambda: K.linear_f32(x, pw), repeats=31, min_batch_s=5e-3) * 1e6


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = ["ours_gemm", "ours_linear", "torch_int8", "torch_fp32"]
    idx = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(12, 5))
    for i, key in enumerate(keys):
        ax.bar(idx + (i - 1.5) * 0.2, [r[key + "_gops"] for r in rows], 0.2, label=key)
    ax.plot(idx, [r["peak_gops"] or np.nan for r in rows], "k_", ms=20, label="measured peak")
    ax.set_xticks(idx, [f"{r['m']}x{r['k']}x{r['n']}" for r in rows], rotation=30, fontsize=8)
    ax.set_ylabel("GOP/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="fxopt bench gemm", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch and kernel threads (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=21,
                   help="timed calls per candidate and shape; --quick uses 7 (default: %(default)s)")
    p.add_argument("--out", metavar="PATH",
                   help="write gemm.json (and gemm.png with matplotlib) into the folder PATH "
                        "(default: write nothing)")
    p.add_argument("--quick", action="store_true", help="BERT shapes only, no convs, 7 repeats")
    p.add_argument("--mix", action="store_true",
                   help="only the sweep: optimize's module against fbgemm at M = 1 and 8 for every K, N "
                        f"in {MIX_SIZES}")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    K.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    info = _header(args, rng)
    if args.mix:
        mix = bench_mix(args.repeats, rng)
        _print_mix(mix)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "gemm_mix.json"), "w") as f:
                json.dump({"info": info, "mix": mix}, f, indent=1)
        return 0
    shapes = [(f"bert {m}x{k}x{n}", m, k, n) for m, k, n in BERT_SHAPES]
    if not args.quick:
        shapes += [(name, *s) for name, s in CONV_SHAPES.items()]
    repeats = 7 if args.quick else args.repeats
    print(_fmt_head(), flush=True)
    rows = []
    for name, m, k, n in shapes:
        rows.append(bench_shape(name, m, k, n, repeats, args.threads, rng))
        print(_fmt_row(rows[-1]), flush=True)
    convs = []
    if not args.quick:
        print("\nend-to-end conv2d (batch 1, NCHW, fp32 in/out): ours int8 vs torch fp32", flush=True)
        for name, cfg in CONVS.items():
            convs.append(bench_conv(name, *cfg, repeats, rng))
            r = convs[-1]
            print(f"{r['name']:<22} ours {r['ours_conv_us']:>8.1f} us ({r['ours_conv_gops']:6.1f} GOP/s)"
                  f"  torch fp32 {r['torch_fp32_us']:>8.1f} us ({r['torch_fp32_gops']:6.1f} GOP/s)"
                  f"  speedup {r['torch_fp32_us'] / r['ours_conv_us']:5.2f}x", flush=True)
    info["linear_1x64x64_call_us"] = _call_overhead_us(rng)
    print(f"\nwarm linear_f32 call, 1x64x64: {info['linear_1x64x64_call_us']:.2f} us")
    print("batch-1 models through fxopt.optimize's module (cpu-int8) against eager fp32:", flush=True)
    small = bench_small_models(repeats, lambda r: print(
        f"  {r['name']:<22} eager {r['eager_us']:8.1f} us  fxopt {r['fxopt_us']:8.1f} us  "
        f"speedup {r['eager_us'] / r['fxopt_us']:5.2f}x", flush=True))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemm.json"), "w") as f:
            json.dump({"info": info, "rows": rows, "convs": convs, "small_models": small}, f, indent=1)
        png = _plot(rows, os.path.join(args.out, "gemm.png"))
        print(f"wrote {os.path.join(args.out, 'gemm.json')}" + (f" and {png}" if png else ""))
    return 0


def _header(args, rng) -> dict:
    """Measure the first calls and the peaks, print them with the versions; the run's info."""
    import torch
    cache = _cache_state()
    first = _first_calls(rng)
    peak1, peak = measure_peak(args.threads)
    amx1, amx_peak = measure_amx_peak(args.threads)
    info = {"torch": torch.__version__, "numba": numba.__version__, "numpy": np.__version__,
            "isa": K.isa(), "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "peak_tops_1thread": peak1, "peak_tops": peak,
            "amx_peak_tops_1thread": amx1, "amx_peak_tops": amx_peak, "first_call_s": first, "numba_cache": cache,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"fxopt bench gemm | torch {info['torch']} | numba {info['numba']} | "
          f"isa {info['isa']} | threads {args.threads} (torch and numba)")
    probe_op = PEAK_OPS.get(info["isa"])
    if peak:
        print(f"measured {probe_op} peak: {peak1:.3f} TOP/s (1 thread), {peak:.3f} TOP/s "
              f"({args.threads} threads)")
    else:
        print(f"no peak probe for the {info['isa']} path: %peak columns are n/a")
    if amx_peak:
        print(f"measured AMX tdpbusd peak: {amx1:.3f} TOP/s (1 thread), {amx_peak:.3f} TOP/s "
              f"({args.threads} threads); GEMMs with K % 64 == 0 and at least 4 rows run on AMX tiles, "
              f"so %peak (of {probe_op}) passes 100% there")
    print(f"first call (numba cache {cache}: {'load' if cache == 'warm' else 'JIT compile'}): " +
          ", ".join(f"{k} {v:.2f}s" for k, v in first.items()))
    print(f"medians, candidates interleaved; %peak against a {args.threads}-thread {probe_op} "
          "probe interleaved with each shape (last column)\n", flush=True)
    return info


if __name__ == "__main__":
    raise SystemExit(main())
