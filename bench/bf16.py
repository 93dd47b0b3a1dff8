"""bf16 (target cpu-bf16) against eager fp32 and cpu-int8: linear speed, BERT-base speed and fidelity.

    python -m fxopt.bench.bf16 [--threads 2] [--repeats 15] [--quick] [--no-bert]

1. nn.Linear at (M, K, N) = (1, 4096, 4096), (8, 768, 768), (128, 768, 3072): the module
   fxopt.optimize returns for cpu-bf16 and for cpu-int8 (both latency_aware=False, so neither
   falls back to fp32 on a noisy timing: the kernels themselves are measured), called as a
   user calls them, against the eager fp32 module, taking turns (interleaved rounds),
   medians; "x fp32" > 1 means faster than fp32.
2. BERT-base from config (transformers.BertModel(BertConfig()), random init, eval) at 8 x 128
   and 1 x 32 tokens through cpu-bf16: time against eager fp32 (interleaved medians) and the
   minimum over the samples of held-out batches of the per-sample cosine of last_hidden_state
   to fp32. The target on a CPU with AMX-BF16 is >= 3x fp32 at cos >= 0.999; on a CPU without
   bf16 instructions the avx2 path runs (printed), and the numbers are what it does.

--quick: 5 rounds, one held-out batch, BERT at 1 x 32 only (about a minute once the
kernels are compiled).
"""
import argparse
import platform
import time
import warnings

import torch

import fxopt
from fxopt.kernels import api as K
from fxopt.report.timing import interleaved_medians

SHAPES = ((1, 4096, 4096), (8, 768, 768), (128, 768, 3072))


def _optimize(model, example, target, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.optimize(model, example, target, latency_aware=False, report_layers=False,
                              latency_repeats=0, drift=False, **options)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bf16_path() -> str:
    """The path the bf16 kernel takes on this CPU: its vector path, or portable loops."""
    return "portable loops" if K.isa() == "portable" else "avx2 FMA on widened bf16 (no AVX512-BF16/AMX-BF16 path)"


def linear_speed(repeats, shapes=SHAPES):
    """{(m, k, n): {name: seconds}} for fp32 eager, cpu-bf16 and cpu-int8, printed row by row."""
    print(f"{'M x K x N':>16} {'fp32 ms':>9} {'bf16 ms':>9} {'int8 ms':>9} {'bf16 x fp32':>12} "
          f"{'int8 x fp32':>12} {'bf16/int8':>10}")
    table = {}
    for m, k, n in shapes:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(k, n)).eval()
        x = torch.randn(m, k)
        fns = {"fp32": model, **{t: _optimize(model, (x,), t) for t in ("cpu-bf16", "cpu-int8")}}
        with torch.no_grad():
            med = interleaved_medians({name: (lambda f=f: f(x)) for name, f in fns.items()}, repeats=repeats,
                                      min_batch_s=5e-3, warmup=2)
        table[(m, k, n)] = med
        f32, b16, i8 = med["fp32"], med["cpu-bf16"], med["cpu-int8"]
        print(f"{f'{m}x{k}x{n}':>16} {f32 * 1e3:9.3f} {b16 * 1e3:9.3f} {i8 * 1e3:9.3f} {f32 / b16:11.2f}x "
              f"{f32 / i8:11.2f}x {i8 / b16:9.2f}x", flush=True)
    return table


def _bert():
    import transformers
    cfg = transformers.BertConfig()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval(), cfg.vocab_size


def bert(shapes, repeats, held_out):
    """{(batch, seq): (fp32 s, bf16 s, min cosine)} for BERT-base through cpu-bf16, printed."""
    model, vocab = _bert()
    g = torch.Generator().manual_seed(1)

    def tokens(b, s):
        ids = torch.randint(0, vocab, (b, s), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = {}
    print("BERT-base from config through cpu-bf16: time against eager fp32, min per-sample cosine of "
          "last_hidden_state to fp32")
    for b, s in shapes:
        t0 = time.perf_counter()
        example = tokens(b, s)
        fast = _optimize(model, example, "cpu-bf16")
        compile_s = time.perf_counter() - t0
        cos = []
        with torch.no_grad():
            for e in [example] + [tokens(b, s) for _ in range(held_out)]:
                ref, got = model(**e).last_hidden_state, fast(**e).last_hidden_state
                cos += torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1).tolist()
            med = interleaved_medians({"fp32": lambda: model(**example), "bf16": lambda: fast(**example)},
                                      repeats=repeats, min_batch_s=5e-3, warmup=1)
        out[(b, s)] = med["fp32"], med["bf16"], min(cos)
        print(f"  {b} x {s:<4d} fp32 {med['fp32'] * 1e3:9.2f} ms  bf16 {med['bf16'] * 1e3:9.2f} ms  "
              f"{med['fp32'] / med['bf16']:5.2f}x fp32   min cos {min(cos):.6f} over {len(cos)} samples  "
              f"[compile {compile_s:.0f} s]", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fxopt.bench.bf16", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (medians over them)")
    p.add_argument("--quick", action="store_true", help="5 rounds, one held-out batch, BERT at 1 x 32 only")
    p.add_argument("--no-bert", action="store_true", help="the linears only")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    repeats = 5 if ns.quick else ns.repeats
    print(f"fxopt bf16 bench: torch {torch.__version__}, python {platform.python_version()}, CPU {cpu_name()}, "
          f"threads {ns.threads}\nkernel ISA {K.isa()} (available: {', '.join(K.available_isas())}); "
          f"bf16 path: {bf16_path()}")
    linear_speed(repeats)
    if not ns.no_bert:
        bert([(1, 32)] if ns.quick else [(8, 128), (1, 32)], repeats, 1 if ns.quick else 3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
