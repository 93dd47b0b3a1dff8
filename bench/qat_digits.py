"""Quantization-aware training on the digits: test accuracy of fp32, PTQ and QAT.

    python -m fxopt.bench.qat_digits            # digits CNN and two MLPs, a few minutes on 1 thread

Per model: fp32; int8 post-training quantization and int8 QAT (fxopt.optimize with
and without finetune=, on the real kernels); int4 (weights of the linears in groups,
quantize_weight_groups, int8 activations as the int8 linear) post-training and after
QAT (and int3, as a harder case), evaluated on the fake-quant graph, whose codes are the ones an int4 kernel gets
(exact, tests/test_qat.py): fxopt has no int4 kernels yet. Calibration and training
batches are the training images without labels (distillation from the fp32 model);
accuracy is on the held-out test split. Seeds fixed, torch on 1 thread.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fxopt
from fxopt import examples as ex
from fxopt.driver.compile import compile_model
from fxopt.pruning.finetune import finetune
from fxopt.quant import qat


class DeepMLP(nn.Module):
    """Four hidden layers of 64: the digits model found here whose low-bit PTQ loses most."""

    def __init__(self, hidden: int = 64, depth: int = 4):
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(64, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


# (build, training epochs, low-bit settings (bits, group) to fake-quantize the linears with)
CONFIGS = {
    "cnn": (lambda: ex.DigitsCNN(), 15, [(4, 32)]),
    "mlp": (lambda: ex.DigitsMLP(hidden=128), 15, [(4, 32)]),
    "deep_mlp": (DeepMLP, 30, [(4, 32), (3, 32)]),
}


def one_thread():
    # a Numba OpenMP launch sets torch's thread count to Numba's: training small models on
    # 2 threads of a shared 2-core machine ran 10-100x slower than on one
    torch.set_num_threads(1)


def fake_int4(model, data, calib, bits, group, epochs, lr):
    """(PTQ accuracy, QAT accuracy) of the graph with grouped low-bit linears, fake-quantized."""
    options = dict(stop_after="quantize_int8", latency_repeats=0, drift=False, report_layers=False)
    gm, _, manager = compile_model(model, (data.x_train[:8],), "cpu-int8", calib, True, options, keep=True)
    units = qat.prepare(gm, manager.ctx.state["quantize_int8"]["float_weights"], linear_bits=bits,
                        group_size=group)
    ptq = ex.accuracy(gm, data.x_test, data.y_test)
    one_thread()
    finetune(gm, model, calib, epochs=epochs, lr=lr, progress=False, after_step=units.clamp_steps,
             param_lr=units.step_lrs(lr))
    return ptq, ex.accuracy(gm, data.x_test, data.y_test), units.simulated


def run(name, cfg, data, calib, args):
    build, epochs, lowbit = cfg
    one_thread()
    torch.manual_seed(0)            # the initial weights; train() seeds the training
    model = ex.train(build(), data, epochs=epochs, seed=0)
    acc = lambda m: 100 * ex.accuracy(m, data.x_test, data.y_test)  # noqa: E731
    rows = [("fp32", acc(model), "")]
    t = time.perf_counter()
    ptq = fxopt.optimize(model, (data.x_train[:8],), calibration_data=calib, latency_repeats=0)
    rows.append(("int8 PTQ (kernels)", acc(ptq), f"{time.perf_counter() - t:.1f} s"))
    one_thread()
    t = time.perf_counter()
    tuned = fxopt.optimize(model, (data.x_train[:8],), calibration_data=calib, latency_repeats=0,
                           finetune={"epochs": args.epochs, "lr": args.lr})
    rows.append(("int8 QAT (kernels)", acc(tuned), f"{time.perf_counter() - t:.1f} s"))
    for bits, group in lowbit:
        t = time.perf_counter()
        p, q, n = fake_int4(model, data, calib, bits, group, args.epochs, args.lr)
        what = f"int{bits} g{group} ({n} linears)"
        rows.append((f"{what} PTQ, fake quant", 100 * p, ""))
        rows.append((f"{what} QAT, fake quant", 100 * q, f"{time.perf_counter() - t:.1f} s"))
    base = rows[0][1]
    print(f"\n{name}: test accuracy (%) on {len(data.y_test)} held-out digits, change from fp32")
    for label, a, secs in rows:
        print(f"  {label:<38} {a:6.2f}  {a - base:+6.2f}  {secs}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="fxopt bench qat", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cnn,mlp,deep_mlp", help="comma-separated: cnn, mlp, deep_mlp (default all)")
    p.add_argument("--epochs", type=int, default=10, help="QAT epochs over the training images (default 10)")
    p.add_argument("--lr", type=float, default=3e-4, help="QAT learning rate (default 3e-4)")
    args = p.parse_args(argv)
    one_thread()
    data = ex.digits()
    calib = [x for x, _ in data.batches(64, seed=1)]
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}; QAT: {args.epochs} epochs, lr {args.lr}, "
          f"distillation (T=4) on {len(calib)} unlabeled batches of 64")
    for name in args.models.split(","):
        run(name, CONFIGS[name], data, calib, args)


if __name__ == "__main__":
    main()
