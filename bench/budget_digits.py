"""Accuracy-budgeted search on the digits MLP and residual CNN (about a minute per cost).

    python -m fxopt.bench.budget_digits                       # cost = measured latency
    python -m fxopt.bench.budget_digits --cost macs --plots /tmp

Same split as tests/test_budget.py: 300 training images held out for eval_fn
(validation), the 450 test images checked after. Prints per model and budget the
chosen configuration, MACs and latency against plain cpu-int8 (both measured by the
search, median of 5 on a batch of 64), validation and test accuracy against fp32.
"""
from __future__ import annotations

import argparse
import platform
import warnings

import torch

import fxopt
from fxopt.examples import Digits, DigitsCNN, DigitsMLP, accuracy, digits, train


def split(n_val: int = 300):
    d = digits()
    fit = Digits(d.x_train[n_val:], d.y_train[n_val:], d.x_test, d.y_test)
    return fit, (d.x_train[:n_val], d.y_train[:n_val]), (d.x_test, d.y_test)


def run(name, model, fit, val, test, eps, cost, plots):
    calib = [(fit.x_train[i:i + 64],) for i in range(0, len(fit.x_train), 64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fast = fxopt.optimize(model, (fit.x_train[:64],), "cpu-int8", calibration_data=calib,
                              eval_fn=lambda m: accuracy(m, *val), max_accuracy_drop=eps,
                              search_cost=cost, prune={"round_to": 4}, finetune_budget=3, max_evals=20,
                              plot_path=f"{plots}/front_{name}_{eps}_{cost}.png" if plots else None)
    s = fast.fxopt_report.search
    plain, chosen = s["evaluations"][0], s["evaluations"][s["chosen"]]
    print(f"{name} eps={eps} cost={cost}: {chosen['label']}  met={s['met']}  evals={len(s['evaluations'])}")
    print(f"  MACs {chosen['macs'] / 1e6:.2f} M vs plain int8 {plain['macs'] / 1e6:.2f} M; latency "
          f"{chosen['latency_s'] * 1e3:.3f} ms vs plain int8 {plain['latency_s'] * 1e3:.3f} ms")
    print(f"  val {accuracy(fast, *val):.4f} (fp32 {accuracy(model, *val):.4f}, plain int8 {plain['metric']:.4f})"
          f"  test {accuracy(fast, *test):.4f} (fp32 {accuracy(model, *test):.4f})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost", default="latency", choices=("latency", "macs"))
    ap.add_argument("--eps", type=float, nargs="+", default=[0.005, 0.02])
    ap.add_argument("--plots", default=None, help="folder for the Pareto PNGs")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread")
    fit, val, test = split()
    torch.manual_seed(0)   # initial weights as in tests/test_budget.py: both built, then trained
    mlp, cnn = DigitsMLP(), DigitsCNN(width=16)
    models = {"mlp": train(mlp, fit, epochs=10), "cnn": train(cnn, fit, epochs=5)}
    for name, model in models.items():
        for eps in ns.eps:
            run(name, model, fit, val, test, eps, ns.cost, ns.plots)


if __name__ == "__main__":
    main()
