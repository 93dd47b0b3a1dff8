"""Latency of structured pruning: fp32 and cpu-int8 at 0%, 30% and 50%.

    fxopt bench prune                                   # BERT-base encoder + ResNet-50
    fxopt bench prune --models bert --layers 2 --repeats 3

Models have random weights (nothing is downloaded): a BERT-base-shaped
encoder (hidden 768, 12 heads, intermediate 3072, batch 8 x seq 128) and a
ResNet-50-shaped net (bottleneck, depths [3,4,6,3], 224x224, batch 8).
Pruning uses prune_channels with round_to=16 (the int8 kernel's 16-wide
output columns). Every variant is compiled first, then all are timed
round-robin (one call each per round, --repeats rounds, after a warm-up
call) so load on a shared machine hits them alike; medians, compile excluded. The int8 column runs when "cpu-int8" is a target.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

from fxopt.bench.timing import median_seconds


def bert_base(layers=12, batch=8, seq=128):
    import transformers
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=30522)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def resnet50(batch=8, size=224):
    import transformers
    cfg = transformers.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                    embedding_size=64, layer_type="bottleneck")
    torch.manual_seed(0)
    model = transformers.ResNetModel(cfg).eval()
    return model, {"pixel_values": torch.randn(batch, 3, size, size)}


def _compile(model, example, target, ratio, round_to):
    import fxopt
    options = dict(drift=False, report_layers=False, latency_repeats=0)
    if ratio:
        options["prune"] = {"ratio": ratio, "round_to": round_to}
    if target == "cpu-int8":
        options["calibration_data"] = [example]
    return fxopt.optimize(model, example, target=target, **options)


def run(name, model, example, ratios, repeats, round_to, out):
    """Compile every (ratio, target) variant, then time them round-robin so that
    load drifting on a shared machine hits all variants alike; medians per variant."""
    import fxopt
    from fxopt.core.macs import count_params, total_macs
    captured = fxopt.capture(model, example)
    full = {"params": count_params(captured), "macs": total_macs(captured)}
    del captured
    targets = [t for t in ("cpu-fp32", "cpu-int8") if t in fxopt.TARGETS]
    rows, variants = [], []
    for ratio in ratios:
        row = {"model": name, "ratio": ratio, **full}
        for target in targets:
            gm = _compile(model, example, target, ratio, round_to)
            prune_rec = [r for r in gm.fxopt_report.records if r.name == "prune_channels"]
            if prune_rec:
                row["params"] = prune_rec[0].stats["params_after"]
                row["macs"] = prune_rec[0].stats["macs_after"]
            variants.append((row, target, gm))
        rows.append(row)
    samples = {id(gm): [] for _, _, gm in variants}
    with torch.no_grad():
        for _, _, gm in variants:          # warm-up: JIT, caches, allocator
            gm(**example)
        for _ in range(repeats):
            for _, _, gm in variants:
                t0 = time.perf_counter()
                gm(**example)
                samples[id(gm)].append(time.perf_counter() - t0)
    for row, target, gm in variants:
        row[target] = statistics.median(samples[id(gm)])
    base = {t: rows[0].get(t) for t in targets}
    for row in rows:
        out(_fmt(row, base))


def _fmt(row, base):
    def cell(target):
        t = row.get(target)
        if t is None:
            return f"{'n/a':>10} {'':>8}"
        return f"{t * 1e3:>8.1f}ms {(1 - t / base[target]) * 100:>+6.1f}%"
    params = f"{row['params'] / 1e6:.1f}M" if "params" in row else "-"
    macs = f"{row['macs'] / 1e9:.1f}G" if "macs" in row else "-"
    return (f"{row['model']:<10} {int(row['ratio'] * 100):>4}% {params:>8} {macs:>8}  "
            f"{cell('cpu-fp32')}  {cell('cpu-int8')}")


def scan_round_to(m=1024, k=768, widths=range(1504, 1553, 4), repeats=7, out=print):
    """int8 kernel time per MAC of x[m, k] @ W[n, k].T for kept widths n around 1536
    (the FFN of a half-pruned BERT-base): which multiples does the kernel favour?"""
    import numpy as np
    from fxopt.kernels.linear import linear_f32
    from fxopt.kernels.pack import pack_weights_s8, quantize_weights_s8
    x = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    out(f"round_to scan: int8 linear_f32, M={m} K={k}; ps per MAC by kept width N")
    for n in widths:
        w = np.random.default_rng(n).standard_normal((n, k), dtype=np.float32)
        pw = pack_weights_s8(*quantize_weights_s8(w))
        t = median_seconds(lambda: linear_f32(x, pw), repeats=repeats, min_batch_s=0.01)
        tags = ",".join(str(r) for r in (64, 32, 16, 8, 4) if n % r == 0) or "-"
        out(f"  N={n:<5} {t * 1e3:7.3f} ms  {t / (m * n * k) * 1e12:6.2f} ps/MAC  multiple of {tags}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fxopt bench prune", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert,resnet50", help="comma-separated (default: %(default)s)")
    p.add_argument("--ratios", default="0,0.3,0.5", help="prune ratios, comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of all variants (default: %(default)s)")
    p.add_argument("--layers", type=int, default=12,
                   help="BERT encoder layers; 12 = BERT-base (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="batch of both models (default: %(default)s)")
    p.add_argument("--seq", type=int, default=128, help="BERT sequence length (default: %(default)s)")
    p.add_argument("--image", type=int, default=224, help="ResNet-50 image size (default: %(default)s)")
    p.add_argument("--round-to", type=int, default=16,
                   help="kept widths are multiples of this (default: %(default)s)")
    p.add_argument("--scan-round-to", action="store_true",
                   help="only time the int8 kernel at kept widths around 1536")
    ns = p.parse_args(argv)
    if ns.scan_round_to:
        scan_round_to()
        return 0
    warnings.filterwarnings("ignore")
    import fxopt
    ratios = [float(r) for r in ns.ratios.split(",")]
    print(f"fxopt {fxopt.__version__}  torch {torch.__version__}  {platform.processor() or platform.machine()}"
          f"  threads {torch.get_num_threads()}")
    print(f"pipelines: cpu-fp32 = {fxopt.TARGETS['cpu-fp32']}")
    print(f"           cpu-int8 = {fxopt.TARGETS.get('cpu-int8', 'n/a')}")
    print(f"pruning: prune_channels{{ratio=R,round_to={ns.round_to}}} spliced before fold_batchnorm; "
          f"latency = median of {ns.repeats} calls (+% = faster than 0%)")
    print(f"{'model':<10} {'prune':>5} {'params':>8} {'MACs':>8}  {'fp32':>10} {'':>7}  {'int8':>10}")
    for name in ns.models.split(","):
        if name == "bert":
            model, example = bert_base(ns.layers, ns.batch, ns.seq)
        elif name == "resnet50":
            model, example = resnet50(ns.batch, ns.image)
        else:
            raise SystemExit(f"unknown model {name!r}; use bert, resnet50")
        run(name, model, example, ratios, ns.repeats, ns.round_to, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
