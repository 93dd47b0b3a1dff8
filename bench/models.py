"""Whole-model benchmark: fxopt cpu-int8 against torch, ONNX Runtime and OpenVINO, fp32 and int8.

    fxopt bench models [--models bert_b8_s128,resnet50_b8] [--systems torch_fp32,fxopt]
                       [--threads 2] [--repeats 20] [--warmup 3] [--small] [--out PATH]

Per model (BERT-base b8xs128 and b1xs32, ResNet-50 b1 and b8, MobileNetV2 b1 and b8,
EfficientNet-B0 b1, SqueezeNet 1.1 b1; random weights, nothing downloads; fidelity on
trained weights and photographs is fxopt.bench.pretrained's) and per system (torch fp32 eager, torch
dynamic int8, ONNX Runtime fp32, dynamic int8 and static QDQ int8, OpenVINO at
its default precision and int8 through NNCF (fxopt.bench.openvino_peers),
fxopt cpu-int8):
median wall latency after warm-up, speedup over torch fp32, and cosine of the
flattened last_hidden_state (SqueezeNet: logits) against torch fp32 on the same inputs. Every
system gets its own copy of the model and the same thread count. Rows print
as they are measured; with --out PATH, models.json (models_small.json with
--small) and a PNG chart are written there, nothing otherwise.

Systems are timed in turns: every system is set up first, then the timed
calls run in ROUNDS rounds, each system taking its share of calls in every
round (after one untimed call, so threads a previous system left spinning
have settled). A machine that slows down for a minute (shared hosts do)
then slows every system alike and the speedups stay honest; timed one
after another, the same fxopt build measured 251 to 295 ms on BERT b8
while torch fp32 moved by 3%. The price: all systems of one model are
in memory at once (BERT-base: ~1.5 GB).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch

from fxopt.bench import model_specs as specs_mod
from fxopt.bench import report as rep
from fxopt.bench.peers import Context
from fxopt.bench.systems import LABELS, SYSTEMS
from fxopt.bench.timing import call_faults, call_peak_mb

ROUNDS = 5                 # timed calls are spread over this many rounds of all systems
DRIFT_TOLERANCE = 0.10     # warn when torch fp32's last round differs from its first by more


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn() after `warmup` calls.

    The bench needs every sample (spread and min go in the JSON), which
    fxopt.bench.timing.median_seconds does not return; model calls are long
    enough (> 1 ms) that batching calls against timer resolution is not needed.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def _failure(e: Exception, t0: float) -> dict:
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return {"status": "failed", "error": msg, "setup_s": time.perf_counter() - t0}


def prepare_system(name, prepare, model, inputs, ctx, reference, args) -> tuple[dict, object]:
    """Set one system up on one model, call it once (timed: first call), compare its
    output, warm it up; never raises. Returns (row, prepared or None)."""
    t0 = time.perf_counter()
    try:
        prepared = prepare(model, inputs, ctx)
        setup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = prepared.fn()
        first_s = time.perf_counter() - t1
        time_calls(prepared.fn, args.warmup, 0)
        peak_mb = call_peak_mb(prepared.fn)
        faults = call_faults(prepared.fn)
    except Exception as e:  # a failing system is a result, not the end of the run
        row = _failure(e, t0)
        print(f"  {LABELS[name]}: failed: {row['error']}", flush=True)
        return row, None
    row = {"status": "ok", "setup_s": setup_s, "first_call_s": first_s, "call_peak_mb": peak_mb,
           "call_faults": faults, "output_pages": -(-out.numel() * out.element_size() // 4096), **prepared.info,
           "cosine": 1.0 if reference is None else cosine(out, reference)}
    print(f"  {LABELS[name]}: set up in {setup_s:.1f} s", flush=True)
    return row, prepared


def time_in_turns(prepared: dict, results: dict, repeats: int) -> None:
    """args.repeats timed calls per system, spread over ROUNDS rounds of all systems
    (see the module docstring); fills median, min, samples and per-round medians."""
    rounds = max(1, min(ROUNDS, repeats))
    samples = {name: [[] for _ in range(rounds)] for name in prepared}
    for r in range(rounds):
        calls = repeats // rounds + (r < repeats % rounds)
        for name, p in list(prepared.items()):
            t0 = time.perf_counter()
            try:
                samples[name][r] = time_calls(p.fn, 1, calls)
            except Exception as e:  # failing mid-run: report it, time the others on
                results[name] = _failure(e, t0)
                del prepared[name], samples[name]
    for name, per_round in samples.items():
        flat = [s for chunk in per_round for s in chunk]
        results[name].update({"median_ms": 1e3 * statistics.median(flat), "min_ms": 1e3 * min(flat),
                              "samples_ms": [1e3 * s for s in flat],
                              "round_medians_ms": [1e3 * statistics.median(c) for c in per_round]})
        print(f"  {LABELS.get(name, name)}: {results[name]['median_ms']:.2f} ms", flush=True)


def run_model(spec, pristine, family_dir, family_cache, args, small: bool) -> dict:
    """Every selected system on one model: all set up, then timed in turns.

    `family_dir`/`family_cache` hold what systems share across the sizes of
    one architecture (the dynamic-shape ONNX files).
    """
    inputs = specs_mod.make_inputs(spec, small)
    print(f"\n{spec.name}: {spec.family} {spec.shape_text()}", flush=True)
    ctx = Context(threads=args.threads, tmpdir=family_dir, output=spec.output,
                  calibration=specs_mod.calibration_batches(spec, small),
                  export_inputs=specs_mod.make_inputs(spec, small, batch=max(2, spec.batch)),
                  dynamic_dims=(0, 1) if spec.family == "bert" else (0,), cache=family_cache,
                  family=spec.family)
    reference = SYSTEMS["torch_fp32"](copy.deepcopy(pristine), inputs, ctx).fn()
    ctx.reference_shape = tuple(reference.shape)
    results, prepared = {}, {}
    for name in args.systems:
        # Why a deep copy each: an exporter can change the model it is given
        # (Hugging Face BERT ran 1.5x slower eagerly after torch.onnx.export).
        row, p = prepare_system(name, SYSTEMS[name], copy.deepcopy(pristine), inputs, ctx,
                                reference, args)
        results[name] = row
        if p is not None:
            prepared[name] = p
    time_in_turns(prepared, results, args.repeats)
    del prepared
    gc.collect()
    drift = _drift(results)
    _add_speedups(results)
    return {"model": spec.name, "family": spec.family, "shape": spec.shape_text(),
            "batch": spec.batch, "size": spec.size, "output": spec.output,
            "calibration": f"{spec.calib_batches} batches of {spec.calib_batch}",
            "config": specs_mod.config_of(spec.family, small),
            "torch_fp32_drift": drift, "systems": results}


def _drift(results) -> dict | None:
    """torch fp32's last round against its first: how much the machine moved meanwhile
    (every system was timed in the same rounds, so the ratios are not skewed by it)."""
    rounds = results.get("torch_fp32", {}).get("round_medians_ms")
    if not rounds or len(rounds) < 2:
        return None
    drift = rounds[-1] / rounds[0] - 1.0
    if abs(drift) > DRIFT_TOLERANCE:
        print(f"  warning: torch fp32 took {rounds[-1]:.2f} ms in the last round vs {rounds[0]:.2f} ms "
              f"in the first ({100 * drift:+.0f}%): the machine is noisy")
    return {"first_round_ms": rounds[0], "last_round_ms": rounds[-1], "drift": drift}


def _add_speedups(results: dict) -> None:
    base = results.get("torch_fp32", {}).get("median_ms")
    for row in results.values():
        if row["status"] == "ok" and base:
            row["speedup"] = base / row["median_ms"]


def set_threads(n: int) -> dict:
    """One thread count for torch and fxopt's kernels (ORT gets it per session)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before torch's first parallel work
        pass
    from fxopt.kernels import api as kernels
    kernels.set_num_threads(n)
    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
            "fxopt_kernels": kernels.get_num_threads(), "ort_intra_op": n, "ort_inter_op": 1}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fxopt bench models", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(specs_mod.SPECS),
                   help="comma-separated subset of: %(default)s (default: all)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of: %(default)s (default: all)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads of every system (torch, ONNX Runtime, fxopt kernels) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per system and model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default: %(default)s)")
    p.add_argument("--out", metavar="PATH",
                   help="write models.json (models_small.json with --small) and a PNG chart into the folder "
                        "PATH, the JSON rewritten after every model (default: write nothing)")
    p.add_argument("--small", action="store_true", help="tiny configs and shapes: a smoke run of about a minute")
    args = p.parse_args(argv)
    args.models = _subset(p, "--models", args.models, specs_mod.SPECS)
    args.systems = _subset(p, "--systems", args.systems, SYSTEMS)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def _subset(parser, flag, text, known) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{flag}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(known)}")
    return [n for n in known if n in names]   # canonical order: torch fp32 first


@contextlib.contextmanager
def kept_threads():
    """Put torch's and the kernels' thread counts back on exit: a caller in the same process
    (a test session) keeps its own."""
    from fxopt.kernels import api as kernels
    saved = torch.get_num_threads(), kernels.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        kernels.set_num_threads(saved[1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args([str(a) for a in argv])
    with kept_threads():
        return _run(args, argv)


def _run(args, argv) -> int:
    threads = set_threads(args.threads)
    info = rep.run_info(args, threads, "fxopt bench models " + shlex.join(map(str, argv)))
    rep.print_header(info)
    table = specs_mod.specs(args.small)
    out_base = args.out and os.path.join(args.out, "models_small" if args.small else "models")
    results, families = [], {}
    with tempfile.TemporaryDirectory(prefix="fxopt_bench_") as tmp:
        for name in args.models:
            spec = table[name]
            if spec.family not in families:
                # built once per family from the seed; never run, only copied
                families[spec.family] = (specs_mod.build(spec.family, args.small),
                                         tempfile.mkdtemp(dir=tmp), {})
            results.append(run_model(spec, *families[spec.family], args, args.small))
            rep.print_table(results[-1])
            if out_base:
                rep.write_json(out_base + ".json", info, results, complete=False)
    info["load_average_end"] = os.getloadavg()
    goals = rep.check_goals(results, args.small)
    rep.print_goals(goals)
    if out_base:
        rep.write_json(out_base + ".json", info, results, complete=True, goals=goals)
        png = rep.plot(results, out_base + ".png", rep.chart_title(info))
        print(f"\nwrote {out_base}.json" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
