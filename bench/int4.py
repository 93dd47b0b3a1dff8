"""int4 weights against int8: speed of one large linear, and BERT-base fidelity and file size.

    python -m fxopt.bench.int4 [--threads 2] [--repeats 15] [--rows 1,8,128] [--bert]

1. nn.Linear(4096, 4096) through fxopt.optimize with target cpu-int4 and cpu-int8 (both
   latency_aware=False, so neither falls back to fp32 on a noisy timing), one compile per row
   count M; the modules optimize returns, called as a user calls them on an M x 4096 input,
   taking turns (interleaved rounds), medians; int8 / int4 > 1 means int4 is faster.
2. --bert: transformers.BertModel(BertConfig()) (random init, eval), 1 x 32 tokens, through
   cpu-int8 and cpu-int4 (--groups, default 32): the minimum and mean over 16 held-out inputs
   of the cosine of last_hidden_state to fp32, and the fxopt.save file size against int8's.
"""
import argparse
import os
import platform
import tempfile
import time
import warnings

import torch

import fxopt
from fxopt.bench.timing import interleaved_medians
from fxopt.kernels import api as K

SIZE = 4096


def _optimize(model, example, target, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.optimize(model, example, target, latency_aware=False, report_layers=False,
                              latency_repeats=0, drift=False, **options)


def linear_speed(rows, repeats, size=SIZE):
    """{m: (int4 s, int8 s)} for the size x size linear, printed row by row."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(size, size)).eval()
    table = {}
    print(f"nn.Linear({size}, {size}) through fxopt.optimize, {torch.get_num_threads()} threads, "
          f"kernel ISA {K.isa()}")
    print(f"{'M':>5} {'int4 ms':>10} {'int8 ms':>10} {'int8/int4':>10}")
    for m in rows:
        x = torch.randn(m, size)
        fast = {t: _optimize(model, (x,), t) for t in ("cpu-int4", "cpu-int8")}
        with torch.no_grad():
            med = interleaved_medians({t: (lambda f=f: f(x)) for t, f in fast.items()}, repeats=repeats,
                                      min_batch_s=5e-3, warmup=2)
        table[m] = med["cpu-int4"], med["cpu-int8"]
        print(f"{m:5d} {med['cpu-int4'] * 1e3:10.3f} {med['cpu-int8'] * 1e3:10.3f} "
              f"{med['cpu-int8'] / med['cpu-int4']:9.2f}x", flush=True)
    return table


def bert_fidelity(groups=(32,), samples=16, seq=32):
    """{target: (min cosine, mean cosine, file bytes)} for BERT-base from config, printed."""
    import transformers
    cfg = transformers.BertConfig()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)

    def tokens():
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    example, calib, held_out = tokens(), [tokens() for _ in range(32)], [tokens() for _ in range(samples)]
    with torch.no_grad():
        ref = [model(**e).last_hidden_state for e in held_out]
    out, folder = {}, tempfile.mkdtemp()
    print(f"BERT-base from config, 1 x {seq} tokens, {samples} held-out inputs; cosine of "
          f"last_hidden_state to fp32")
    variants = [("cpu-int8", {})] + [("cpu-int4", {"group_size": gs}) for gs in groups]
    for target, opts in variants:
        t0 = time.perf_counter()
        fast = _optimize(model, example, target, calibration_data=calib, **opts)
        with torch.no_grad():
            cos = [float(torch.nn.functional.cosine_similarity(fast(**e).last_hidden_state.flatten(),
                                                               r.flatten(), dim=0)) for e, r in zip(held_out, ref)]
        name = target + (f" g{opts['group_size']}" if opts else "")
        path = os.path.join(folder, name.replace(" ", "_") + ".fxopt")
        fxopt.save(fast, path)
        out[name] = (min(cos), sum(cos) / len(cos), os.path.getsize(path))
        base = out["cpu-int8"][2]
        print(f"  {name:14s} min cos {min(cos):.5f}  mean {out[name][1]:.5f}  file {out[name][2] / 1e6:8.2f} MB "
              f"({out[name][2] / base:.3f}x int8)  [{time.perf_counter() - t0:.0f} s]", flush=True)
        os.remove(path) if name != "cpu-int8" else None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fxopt.bench.int4", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (medians over them)")
    p.add_argument("--rows", default="1,8,128", help="row counts M of the linear")
    p.add_argument("--bert", action="store_true", help="also BERT-base fidelity and file size (minutes)")
    p.add_argument("--groups", default="32", help="int4 group sizes for --bert")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    print(f"fxopt int4 bench: torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, threads {ns.threads}")
    linear_speed([int(r) for r in ns.rows.split(",")], ns.repeats)
    if ns.bert:
        bert_fidelity(tuple(int(g) for g in ns.groups.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
