"""`fxopt demo`: train a CNN on sklearn's digits, optimize it, compare before and after."""
from __future__ import annotations

import time

import fxopt
from fxopt.examples import DigitsCNN, accuracy, digits, train
from fxopt.report.model_report import median_latency, model_bytes


def run_demo(target: str | None = None, epochs: int = 15) -> dict:
    target = target or ("cpu-int8" if "cpu-int8" in fxopt.TARGETS else "cpu-fp32")
    t0 = time.perf_counter()
    data = digits()
    model = train(DigitsCNN(), data, epochs=epochs)
    print(f"trained DigitsCNN on sklearn digits ({len(data.x_train)} images) in {time.perf_counter() - t0:.1f}s")
    calib = [(x,) for x, _ in data.batches(batch_size=64)][:8]
    fast = fxopt.optimize(model, (data.x_test[:64],), target=target, calibration_data=calib)
    print(fast.fxopt_report)
    batch = data.x_test[:64]
    rows = {
        "original": (accuracy(model, data.x_test, data.y_test), model_bytes(model), median_latency(lambda: model(batch), 50, warmup=5)),
        f"fxopt {target}": (accuracy(fast, data.x_test, data.y_test), model_bytes(fast), median_latency(lambda: fast(batch), 50, warmup=5)),
    }
    print(f"\n{'model':20s} {'test acc':>9s} {'size KB':>9s} {'latency ms (batch 64)':>22s}")
    for name, (acc, size, lat) in rows.items():
        print(f"{name:20s} {acc * 100:8.2f}% {size / 1024:9.1f} {lat * 1e3:22.3f}")
    base = rows["original"][2]
    print(f"speed-up: {base / rows[f'fxopt {target}'][2]:.2f}x")
    return rows
