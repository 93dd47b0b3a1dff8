"""Mixed precision chosen by the accuracy-budgeted search on the digits CNN and MLP.

    python -m fxopt.bench.mixed_digits                          # eps 0.005 (0.5 points), int4/int8/fp32
    python -m fxopt.bench.mixed_digits --eps 0.005 0.02 --precisions int4 int8 bf16 fp32 --plots /tmp

Same split as tests/test_budget.py and bench/budget_digits.py: 300 training images held out
for eval_fn (validation), the 450 test images checked after. Per model: the search
(search_cost="latency" unless --cost macs, no pruning unless --prune) over --precisions;
the chosen mix and its per-layer table; the search's own latency of the chosen configuration and of plain int8
(evaluations[0], median of --repeats on the batch of 64 the search times); then a separate
interleaved timing (taking turns, medians) of the chosen model, all-int8, all-fp32 and the eager
model at batch 64 and batch 1; validation and test accuracy of each against fp32.

Threads: torch and the Numba kernels both on --threads (default 1). On a shared 2-vCPU
machine two kernel threads make every timing swing by 2-4x with the other processes' load,
which would decide the search by noise; one thread for everything is the fair, steady peer.
"""
from __future__ import annotations

import argparse
import platform
import warnings

import numba
import torch

import fxopt
from fxopt.bench.budget_digits import split
from fxopt.core.pipeline import target_pipeline
from fxopt.examples import DigitsCNN, DigitsMLP, accuracy, train
from fxopt.report import pareto
from fxopt.report.timing import interleaved_medians
from fxopt.search.budget import with_fp32_layers


def search(model, fit, val, eps, precisions, prune, repeats, plot, cost):
    calib = [(fit.x_train[i:i + 64],) for i in range(0, len(fit.x_train), 64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxopt.optimize(model, (fit.x_train[:64],), "cpu-int8", calibration_data=calib,
                              eval_fn=lambda m: accuracy(m, *val), max_accuracy_drop=eps,
                              search_precisions=tuple(precisions), search_cost=cost,
                              search_prune=(0.0, 0.1, 0.2, 0.3, 0.5) if prune else (),
                              prune={"round_to": 4}, latency_repeats=repeats, plot_path=plot), calib


def peers(model, fit, calib, layers):
    """All-int8 (the plain target, as the search's evaluations[0]) and all-fp32 (every searched
    layer fp32 in the same pipeline, as its all-fp32 evaluation)."""
    ex = (fit.x_train[:64],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        int8 = fxopt.optimize(model, ex, "cpu-int8", calibration_data=calib, latency_repeats=0,
                              latency_aware=False)
        fp32 = fxopt.optimize(model, ex, str(with_fp32_layers(target_pipeline("cpu-int8"), layers)),
                              calibration_data=calib, latency_repeats=0, latency_aware=False)
    return int8, fp32


def run(name, model, fit, val, test, ns, eps):
    plot = f"{ns.plots}/mixed_{name}_{eps}_{ns.cost}.png" if ns.plots else None
    fast, calib = search(model, fit, val, eps, ns.precisions, ns.prune, ns.repeats, plot, ns.cost)
    s = fast.fxopt_report.search
    plain, chosen = s["evaluations"][0], s["evaluations"][s["chosen"]]
    print(f"\n== {name} eps={eps} precisions={','.join(ns.precisions)} cost={ns.cost}: chosen {chosen['label']}  "
          f"mix [{chosen['mix']}]  met={s['met']}  evals={len(s['evaluations'])}")
    print(pareto.format_layers(s["layers"]))
    print(f"  search's own latency (batch 64, median of {max(ns.repeats, 3)}): chosen "
          f"{chosen['latency_s'] * 1e3:.3f} ms vs all-int8 {plain['latency_s'] * 1e3:.3f} ms "
          f"({plain['latency_s'] / chosen['latency_s']:.2f}x)")
    int8, fp32 = peers(model, fit, calib, [r["layer"] for r in s["layers"]])
    models = {"chosen": fast, "int8": int8, "fp32": fp32, "eager": model}
    for batch in (64, 1):
        x = fit.x_train[:batch]
        with torch.no_grad():
            med = interleaved_medians({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats=ns.rounds,
                                      min_batch_s=1e-2, warmup=2)
        print(f"  interleaved batch {batch:>2}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in med.items())
              + f"; chosen vs int8 {med['int8'] / med['chosen']:.2f}x, vs fp32 {med['fp32'] / med['chosen']:.2f}x")
    ref_val, ref_test = accuracy(model, *val), accuracy(model, *test)
    for k in ("chosen", "int8", "fp32"):
        v, t = accuracy(models[k], *val), accuracy(models[k], *test)
        print(f"  {k:>6}: val {v:.4f} ({100 * (v - ref_val):+.2f} pt)  test {t:.4f} ({100 * (t - ref_test):+.2f} pt)"
              f"  vs fp32 model val {ref_val:.4f} test {ref_test:.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.005], help="max_accuracy_drop (fraction)")
    ap.add_argument("--precisions", nargs="+", default=["int4", "int8", "fp32"])
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=("cnn", "mlp"))
    ap.add_argument("--width", type=int, default=16, help="DigitsCNN width (16 as tests/test_budget.py)")
    ap.add_argument("--prune", action="store_true", help="let the search prune too")
    ap.add_argument("--cost", default="latency", choices=("latency", "macs"),
                    help="the search's cost: measured latency, or MACs weighed by precision")
    ap.add_argument("--repeats", type=int, default=9, help="the search's timing repeats per evaluation")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plots", default=None, help="folder for the Pareto PNGs")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    numba.set_num_threads(min(ns.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{ns.threads} thread(s) (torch and kernels)")
    fit, val, test = split()
    torch.manual_seed(0)   # initial weights as in tests/test_budget.py: both built, then trained
    mlp, cnn = DigitsMLP(), DigitsCNN(width=ns.width)
    models = {"mlp": train(mlp, fit, epochs=10), "cnn": train(cnn, fit, epochs=5)}
    for name in ns.models:
        for eps in ns.eps:
            run(name, models[name], fit, val, test, ns, eps)


if __name__ == "__main__":
    main()
