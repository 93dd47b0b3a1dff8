"""Timing helpers for benchmarks: warm up, batch calls, take medians."""
import statistics
import time

from fxopt.report.timing import interleaved_medians


def median_seconds(fn, repeats=21, min_batch_s=2e-3, warmup=3):
    """Median seconds per call of fn() over ``repeats`` batches.

    Each batch runs enough calls to last about ``min_batch_s`` so timer
    resolution and per-batch noise do not dominate short calls (one candidate
    of interleaved_medians).
    """
    return interleaved_medians({"fn": fn}, repeats, min_batch_s, warmup)["fn"]


_clock = time.perf_counter


def paired_difference_seconds(base, other, pairs=101, warmup=2):
    """Median over `pairs` rounds of (seconds of one call of other - seconds of one call of
    base), the two called back to back, in turns first. A small difference between two
    long calls (a module's call against its kernel's at M >= 128) is lost in the spread of
    their separate medians on a shared machine; the pairs' differences see the same load."""
    for _ in range(warmup):
        base(), other()
    diffs = []
    for i in range(pairs):
        first, second = (base, other) if i % 2 else (other, base)
        t0 = _clock()
        first()
        t1 = _clock()
        second()
        t2 = _clock()
        a, b = (t1 - t0, t2 - t1) if i % 2 else (t2 - t1, t1 - t0)
        diffs.append(b - a)
    return statistics.median(diffs)


def first_call_seconds(fn):
    """Wall time of one call (the first call includes JIT compile or cache load)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def call_peak_mb(fn):
    """Memory one call of fn adds at its peak, in MB: the process's resident set high-water
    mark during the call over its resident set before it (Linux: /proc/self/clear_refs
    resets the mark). Warm fn up first, so that one-time caches do not count. None where
    the mark cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) / 1024
    except OSError:
        return None


def call_faults(fn, calls: int = 5):
    """Minor page faults per call of fn, over `calls` calls (getrusage: the whole process,
    so its worker threads count too). Warm fn up first. None where it cannot be read."""
    try:
        import resource
    except ImportError:           # not on this platform
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")
