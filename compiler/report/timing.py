"""Timing two or more callables fairly on a shared machine: they take turns.

    med = interleaved_medians({"eager": lambda: model(x), "fxopt": lambda: fast(x)})
"""
import statistics
import time


def _calibrate(fn, min_batch_s):
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - t0 >= min_batch_s or number >= 1 << 20:
            return number
        number *= 2


def interleaved_medians(fns, repeats=21, min_batch_s=2e-3, warmup=2):
    """Median seconds per call for each of ``fns`` (name -> callable).

    The candidates take turns (one batch each per round), so a change in
    machine load during the run hits all of them alike and their ratios
    stay meaningful on a shared machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    numbers = {name: _calibrate(fn, min_batch_s) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            number = numbers[name]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - t0) / number)
    return {name: statistics.median(v) for name, v in samples.items()}
