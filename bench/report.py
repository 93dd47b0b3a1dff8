"""Output of `fxopt bench models`: run info, tables, the issue's goals, JSON and chart.

    info = run_info(args, threads, command)
    print_table(model_result)
    write_json("bench_results/models.json", info, results, complete=True)
    plot(results, "bench_results/models.png")
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

from fxopt.bench.peers import cpu_has_vnni
from fxopt.bench.systems import LABELS


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import numba
    import torch
    from fxopt.kernels import api as kernels
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numba": numba.__version__, "fxopt_isa": kernels.isa()}
    for name in ("onnxruntime", "onnx", "onnxscript", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # a missing peer is reported, its systems fail on their own
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def run_info(args, threads: dict, command: str) -> dict:
    from fxopt.core.pipeline import TARGETS
    return {"command": command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "vnni": cpu_has_vnni(),
            "threads": threads, "versions": versions(), "repeats": args.repeats,
            "warmup": args.warmup, "small": args.small, "systems": args.systems,
            "fxopt_pipeline": TARGETS["cpu-int8"], "load_average_start": os.getloadavg(),
            "latency": "median wall time of --repeats calls after --warmup calls, inference_mode",
            "cosine": "flattened last_hidden_state vs torch fp32 on the same inputs, float64"}


def print_header(info: dict) -> None:
    v = info["versions"]
    print(f"$ {info['command']}")
    print(f"cpu: {info['cpu']} ({info['cpu_count']} logical, VNNI {'yes' if info['vnni'] else 'no'}), "
          f"load average {' '.join(f'{x:.2f}' for x in info['load_average_start'])}")
    print(f"torch {v['torch']} | onnxruntime {v['onnxruntime']} | numba {v['numba']} | "
          f"transformers {v['transformers']} | fxopt kernel isa {v['fxopt_isa']}")
    t = info["threads"]
    print(f"threads: torch {t['torch']} (interop {t['torch_interop']}), fxopt kernels "
          f"{t['fxopt_kernels']}, ORT intra-op {t['ort_intra_op']} / inter-op 1, ORT spinning off")
    print(f"fxopt pipeline cpu-int8: {info['fxopt_pipeline']}")
    print(f"latency: median of {info['repeats']} after {info['warmup']} warm-up calls"
          + ("  [--small: tiny models, numbers mean nothing]" if info["small"] else ""))


def chart_title(info: dict) -> str:
    t, v = info["threads"], info["versions"]
    return (f"fxopt bench models | {info['cpu']}, {t['torch']} threads\ntorch {v['torch']}, "
            f"onnxruntime {v['onnxruntime']}, fxopt isa {v['fxopt_isa']} | load avg "
            f"{info['load_average_start'][0]:.1f}" + (" | --small" if info["small"] else ""))


def print_table(result: dict) -> None:
    """One model's table: system, median ms, speedup over torch fp32, cosine, notes."""
    print(f"\n{result['model']} ({result['shape']}, cosine on {result['output']})")
    head = (f"{'system':<20}{'median ms':>11}{'min ms':>9}{'speedup':>9}{'cosine':>10}{'outside kernels':>16}"
            f"{'call peak MB':>13}{'faults/call':>12}  notes")
    print(head)
    print("-" * len(head))
    for name, row in result["systems"].items():
        if row["status"] != "ok":
            print(f"{LABELS[name]:<20}{'failed':>11}{'':>9}{'':>9}{'':>10}{'':>16}{'':>13}{'':>12}  "
                  f"{row['error'][:90]}")
            continue
        speed = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        # % of a call outside the kernel steps (fxopt.profile of the execution plan)
        outside = f"{row['outside_kernels_pct']:.1f}%" if "outside_kernels_pct" in row else "-"
        # resident memory one call adds at its peak (RSS high-water mark, after warm-up)
        peak = f"{row['call_peak_mb']:.1f}" if row.get("call_peak_mb") is not None else "-"
        # minor page faults a warm call takes (the output's pages, when the allocator maps them anew)
        faults = f"{row['call_faults']:.0f}" if row.get("call_faults") is not None else "-"
        print(f"{LABELS[name]:<20}{row['median_ms']:>11.2f}{row['min_ms']:>9.2f}{speed:>9}"
              f"{row['cosine']:>10.5f}{outside:>16}{peak:>13}{faults:>12}  {_notes(row)}")
    drift = result.get("torch_fp32_drift")
    if drift:
        print(f"systems timed in {len(result['systems']['torch_fp32']['round_medians_ms'])} rounds, in turns; "
              f"torch fp32 first round {drift['first_round_ms']:.2f} ms, last {drift['last_round_ms']:.2f} ms "
              f"({100 * drift['drift']:+.1f}%)")
    pages = next((row["output_pages"] for row in result["systems"].values() if "output_pages" in row), None)
    if pages is not None:
        print(f"the compared output fills {pages} pages of 4 KiB (what writing it into fresh memory faults in)")


def _notes(row: dict) -> str:
    notes = []
    if "optimize_s" in row:
        slowest = sorted(row.get("pass_seconds", {}).items(), key=lambda kv: -kv[1])[:2]
        where = ", ".join([f"capture+drift+report {row.get('outside_passes_s', 0):.0f}s"] +
                          [f"{k} {v:.0f}s" for k, v in slowest])
        notes.append(f"optimize {row['optimize_s']:.1f}s ({where}), first call "
                     f"{row['first_call_s']:.2f}s, int8 layers {row['layers_int8']}/{row['layers_total']}")
    shared = " (shared, done for an earlier size)" if row.get("export_reused") else ""
    if "export_s" in row:
        notes.append(f"export {row['export_s']:.1f}s")
    if "quantize_s" in row:
        notes.append(f"quantize {row['quantize_s']:.1f}s")
    if notes and shared:
        notes[-1] += shared
    return ", ".join(notes)


def _row(results, model, system):
    for r in results:
        if r["model"] == model:
            row = r["systems"].get(system)
            return row if row and row["status"] == "ok" else None
    return None


def _goal(text, *rows, check):
    if any(r is None for r in rows):
        return {"goal": text, "status": "n/a (model or system not run, or failed)"}
    return {"goal": text, "status": "met" if check(*rows) else "NOT met"}


def check_goals(results: list, small: bool) -> list:
    """The issue's must-reach targets, judged on this run's medians."""
    goals = [
        _goal("BERT b8xs128: fxopt >= 4x torch fp32", _row(results, "bert_b8_s128", "fxopt"),
              check=lambda f: f["speedup"] >= 4.0),
        _goal("BERT b8xs128: fxopt faster than ORT dynamic int8",
              _row(results, "bert_b8_s128", "fxopt"), _row(results, "bert_b8_s128", "ort_int8"),
              check=lambda f, o: f["median_ms"] < o["median_ms"]),
        _goal("BERT b8xs128: fxopt cosine >= 0.99", _row(results, "bert_b8_s128", "fxopt"),
              check=lambda f: f["cosine"] >= 0.99),
        _goal("ResNet-50 b8: fxopt >= 2x torch fp32", _row(results, "resnet50_b8", "fxopt"),
              check=lambda f: f["speedup"] >= 2.0),
    ]
    for model in ("bert_b1_s32", "mobilenetv2_b1"):
        goals.append(_goal(f"{model}: fxopt faster than torch fp32 and torch dynamic int8",
                           _row(results, model, "fxopt"), _row(results, model, "torch_fp32"),
                           _row(results, model, "torch_int8"),
                           check=lambda f, a, b: f["median_ms"] < min(a["median_ms"], b["median_ms"])))
    # issues 20 and 21: the peer users deploy on CPUs, at its int8 and its default precision
    for model in ("bert_b8_s128", "bert_b1_s32", "resnet50_b8", "resnet50_b1", "mobilenetv2_b1", "mobilenetv2_b8",
                  "efficientnet_b0_b1", "squeezenet_b1"):
        for peer, label in (("ov_int8", "OpenVINO int8 (NNCF)"), ("ov_default", "OpenVINO default")):
            goals.append(_goal(f"{model}: fxopt faster than {label}", _row(results, model, "fxopt"),
                               _row(results, model, peer), check=lambda f, o: f["median_ms"] < o["median_ms"]))
    goals.append(_goal("BERT-base optimize (32 calibration samples) < 60 s",
                       _row(results, "bert_b8_s128", "fxopt"), check=lambda f: f["optimize_s"] < 60))
    for g in goals:
        g["small"] = small
    return goals


def print_goals(goals: list) -> None:
    small = any(g.get("small") for g in goals)
    print("\nissue goals (this run, medians)" + (" [--small: tiny models, form only]:" if small else ":"))
    for g in goals:
        print(f"  {g['status']:<8} {g['goal']}")


def write_json(path: str, info: dict, results: list, complete: bool, goals=None) -> str:
    """Write the results atomically (temp file in the same folder, then os.replace)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    doc = {"info": info, "complete": complete, "results": results, "goals": goals or []}
    fd, tmp = tempfile.mkstemp(prefix=".models_", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def plot(results: list, path: str, title: str = "fxopt bench models") -> str | None:
    """Grouped bars per model and system: speedup over torch fp32, or median ms without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    systems = [s for s in LABELS if any(s in r["systems"] for r in results)]
    key = "speedup" if any("speedup" in row for r in results for row in r["systems"].values()) \
        else "median_ms"
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(results)), 4.5))
    for i, name in enumerate(systems):
        xs, ys = [], []
        for j, r in enumerate(results):
            row = r["systems"].get(name)
            if row and row["status"] == "ok" and key in row:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(row[key])
        # fixed colour per system, so a system keeps its colour when others failed
        bars = ax.bar(xs, ys, width, label=LABELS[name], color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    if key == "speedup":
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_ylabel("speedup over torch fp32 (median latency)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("median latency, ms")
    ax.set_xticks(range(len(results)), [f"{r['model']}\n{r['shape']}" for r in results], fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
