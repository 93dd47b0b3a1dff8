"""Attention benchmark: fxopt's fused int8 attention against torch's fp32 sdpa.

    python -m fxopt.bench.attention [--threads 2] [--repeats 21] [--no-models]

1. The op alone, as BERT-base calls it: H=12, D=64, q/k/v strided views of one
   fused QKV projection, a (B, 1, S, S) bool mask with padding on the last row;
   at b8xs128 and b1xs32. Candidates: torch.nn.functional.scaled_dot_product_attention
   (fp32), the graph's op torch.ops.fxopt.attention_int8 (numpy conversions and
   op dispatch included) and the bare kernel fxopt.kernels.attention_int8.
2. BERT-base end to end (random weights, the bench models specs) optimized
   with cpu-int8 twice: quantize_int8{attention=int8} and {attention=fp32}.

Medians of interleaved batches (timing.interleaved_medians), compile and
optimize excluded; prints the pipeline, thread counts and versions.
"""
import argparse
import platform

import numba
import numpy as np
import torch
import torch.nn.functional as F

from fxopt.bench import model_specs
from fxopt.bench.timing import interleaved_medians
from fxopt.kernels import api as K
from fxopt.runtime import kernel_ops

HEADS, HEAD_DIM = 12, 64
SHAPES = {"b8xs128": (8, 128), "b1xs32": (1, 32)}


def attention_inputs(batch, seq, seed=0):
    """q, k, v (B, H, S, D) as views of a fused (B, S, 3*H*D) projection, and a bool
    (B, 1, S, S) mask whose last row pads its final eighth of keys, as in BERT."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3 * HEADS * HEAD_DIM, generator=gen)
    q, k, v = (t.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
               for t in qkv.split(HEADS * HEAD_DIM, dim=-1))
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool)
    mask[-1, ..., seq - max(1, seq // 8):] = False
    return q, k, v, mask


def bench_op(batch, seq, repeats):
    q, k, v, mask = attention_inputs(batch, seq)
    qn, kn, vn, mn = (t.numpy() for t in (q, k, v, mask))
    threads = torch.get_num_threads()
    runs = {"torch sdpa fp32": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "fxopt op (graph)": lambda: kernel_ops.attention_int8(q, k, v, mask),
            "fxopt kernel": lambda: K.attention_int8(qn, kn, vn, mn, n_threads=threads)}
    with torch.inference_mode():
        ref = runs["torch sdpa fp32"]()
        got = runs["fxopt op (graph)"]()
        cos = F.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
        med = interleaved_medians(runs, repeats=repeats)
    return med, cos


def optimized_bert(spec, attention):
    import fxopt
    target = fxopt.TARGETS["cpu-int8"].replace("quantize_int8", f"quantize_int8{{attention={attention}}}")
    model = model_specs.build("bert", small=False)
    fast = fxopt.optimize(model, model_specs.make_inputs(spec, False), target=target,
                          calibration_data=model_specs.calibration_batches(spec, False),
                          latency_repeats=0, drift=False)
    return fast, target


def bench_model(name, repeats):
    spec = model_specs.SPECS[name]
    inputs = model_specs.make_inputs(spec, False)
    runs, targets = {}, []
    for attention in ("int8", "fp32"):
        fast, target = optimized_bert(spec, attention)
        runs[f"attention={attention}"] = (lambda m: lambda: m(**inputs))(fast)
        targets.append(target)
    with torch.inference_mode():
        return interleaved_medians(runs, repeats=repeats, min_batch_s=0.0), targets[0]


def _print(title, med):
    base = next(iter(med.values()))
    print(title)
    for key, sec in med.items():
        print(f"  {key:<22}{sec * 1e3:10.3f} ms   {base / sec:5.2f}x vs {next(iter(med))}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="fxopt bench attention", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--model-repeats", type=int, default=10)
    p.add_argument("--no-models", action="store_true", help="skip the BERT-base end-to-end runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    K.set_num_threads(args.threads)
    print(f"threads: torch {torch.get_num_threads()}, fxopt kernels {K.get_num_threads()}; "
          f"isa {K.isa()}; cpu {platform.processor() or platform.machine()}; torch {torch.__version__}, "
          f"numba {numba.__version__}, numpy {np.__version__}")
    for name, (batch, seq) in SHAPES.items():
        med, cos = bench_op(batch, seq, args.repeats)
        _print(f"attention B={batch} H={HEADS} S={seq} D={HEAD_DIM}, bool (B,1,S,S) mask, strided q/k/v "
               f"(cosine int8 vs fp32 {cos:.5f}), median of {args.repeats}:", med)
    if not args.no_models:
        for name in ("bert_b8_s128", "bert_b1_s32"):
            med, target = bench_model(name, args.model_repeats)
            _print(f"BERT-base {name}, fxopt {target} (and attention=fp32), "
                   f"median of {args.model_repeats}:", med)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
