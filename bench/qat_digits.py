"""Quantization-aware training on the digits: test accuracy of fp32, PTQ and QAT.

    python -m fxopt.bench.qat_digits            # digits CNN and two MLPs, a few minutes on 1 thread
    python -m fxopt.bench.qat_digits --int4-splits 10   # int4 PTQ vs QAT on a tiny MLP, 10 splits

Per model: fp32; int8 post-training quantization and int8 QAT (fxopt.optimize with
and without finetune=, on the real kernels); int4 (weights of the linears in groups,
quantize_weight_groups, int8 activations as the int8 linear) post-training and after
QAT (and int3, as a harder case), evaluated on the fake-quant graph, whose codes are the ones an int4 kernel gets
(exact, tests/test_qat.py). Calibration and training
batches are the training images without labels (distillation from the fp32 model);
accuracy is on the held-out test split. Seeds fixed, torch on 1 thread.

--int4-splits N: the model where int4 PTQ loses most of those tried (TinyMLP, four hidden
layers of 32: 5.6 K weights, a microcontroller's size) on N random train/test splits of the
digits (split s: ex.digits(seed=s), trained from seed s), each through target="cpu-int4"
on the int4 kernels: PTQ with round to nearest (the default without calibration_data), PTQ
with GPTQ (the default with it), and QAT from the round-to-nearest start (finetune=, the
unlabeled training images, distillation from the fp32 model). The table gives each one's
test accuracy change from fp32 (points), mean +- standard deviation, median and range over
splits.
"""
from __future__ import annotations

import argparse
import statistics
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


class TinyMLP(nn.Module):
    """64 -> 32 -> 32 -> 32 -> 32 -> 10: every linear's K a multiple of int4's group of 32."""

    def __init__(self, hidden: int = 32, depth: int = 4):
        super().__init__()
        layers = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(64 if i == 0 else hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


# the --int4-splits protocol: training epochs (fp32), then QAT's epochs and learning rate
INT4 = {"train_epochs": 30, "qat_epochs": 5, "qat_lr": 1e-3}


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
    p.add_argument("--int4-splits", type=int, default=0, metavar="N",
                   help="instead: int4 PTQ (nearest, GPTQ) and QAT of TinyMLP on N train/test splits")
    args = p.parse_args(argv)
    one_thread()
    if args.int4_splits:
        return int4_splits(args.int4_splits)
    data = ex.digits()
    calib = [x for x, _ in data.batches(64, seed=1)]
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}; QAT: {args.epochs} epochs, lr {args.lr}, "
          f"distillation (T=4) on {len(calib)} unlabeled batches of 64")
    for name in args.models.split(","):
        run(name, CONFIGS[name], data, calib, args)


def int4_split(seed: int, runs=("PTQ nearest", "PTQ gptq", "QAT")) -> dict:
    """Test accuracy (%) of TinyMLP on split `seed`: fp32 and `runs` (int4 PTQ nearest / GPTQ, int4 QAT)."""
    one_thread()
    data = ex.digits(seed=seed)
    calib = [x for x, _ in data.batches(64, seed=1)]
    torch.manual_seed(seed)
    model = ex.train(TinyMLP(), data, epochs=INT4["train_epochs"], seed=seed)
    example = (data.x_train[:8],)
    options = dict(target="cpu-int4", latency_repeats=0, drift=False, report_layers=False)
    builds = {
        "PTQ nearest": lambda: fxopt.optimize(model, example, **options),       # no calibration: nearest
        "PTQ gptq": lambda: fxopt.optimize(model, example, calibration_data=calib, int4_rounding="gptq", **options),
        "QAT": lambda: fxopt.optimize(model, example, calibration_data=calib, int4_rounding="nearest",
                                      finetune={"epochs": INT4["qat_epochs"], "lr": INT4["qat_lr"]}, **options),
    }
    acc = {"fp32": 100 * ex.accuracy(model, data.x_test, data.y_test)}
    for label in runs:
        fast = builds[label]()
        acc[label] = 100 * ex.accuracy(fast, data.x_test, data.y_test)
        one_thread()
    return acc


def int4_splits(n: int) -> None:
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}; TinyMLP (64-32-32-32-32-10, 5 int4 linears, "
          f"group 32) trained {INT4['train_epochs']} epochs on each of {n} train/test splits of the digits; "
          f"QAT {INT4['qat_epochs']} epochs, lr {INT4['qat_lr']}, distillation from fp32")
    runs = []
    for seed in range(n):
        t = time.perf_counter()
        runs.append(int4_split(seed))
        r = runs[-1]
        print(f"  split {seed}: fp32 {r['fp32']:.2f}  " + "  ".join(
            f"{k} {r[k] - r['fp32']:+.2f}" for k in r if k != "fp32") + f"  ({time.perf_counter() - t:.0f} s)",
            flush=True)
    size = len(ex.digits().y_test)
    print(f"\nTinyMLP int4 on the digits: test accuracy (%) on {size} held-out images per split "
          f"(one image = {100 / size:.2f} points); mean +- sd, median (min .. max) over {n} splits")
    fp32 = [r["fp32"] for r in runs]
    print(f"  {'fp32':<40} {_spread(fp32)}")
    labels = {"PTQ nearest": "int4 PTQ, round to nearest (default)", "PTQ gptq": "int4 PTQ, GPTQ (with calibration)",
              "QAT": "int4 QAT (from nearest)"}
    print("  change from fp32 (points):")
    for key, label in labels.items():
        print(f"  {label:<40} {_spread([r[key] - r['fp32'] for r in runs], signed=True)}")


def _spread(xs: list, signed: bool = False) -> str:
    f = "+.2f" if signed else ".2f"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return (f"{statistics.mean(xs):{f}} +- {sd:.2f}  median {statistics.median(xs):{f}}  "
            f"({min(xs):{f}} .. {max(xs):{f}})")


if __name__ == "__main__":
    main()
