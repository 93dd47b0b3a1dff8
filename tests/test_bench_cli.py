"""`fxopt bench`: rows stream as they are measured, files only with --out, no torch deprecation notes."""
import os
import subprocess
import sys
import time
import warnings

import pytest

from fxopt.bench import gemm
from fxopt.cli import main

PEER_THEN_RAW = """
import sys
import torch
from fxopt.bench.peers import quantize_dynamic_int8
model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
quantize_dynamic_int8(model)(torch.randn(2, 64))
print("--- raw torch.ao", file=sys.stderr, flush=True)
torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)(torch.randn(2, 64))
"""


@pytest.mark.slow
def test_torch_dynamic_int8_peer_is_built_without_torch_deprecation_notes():
    err = subprocess.run([sys.executable, "-W", "always", "-c", PEER_THEN_RAW], capture_output=True, text=True,
                         check=True).stderr
    peer, raw = err.split("--- raw torch.ao")
    assert peer == ""
    assert "deprecated" in raw      # torch does say it, so the check above can fail


@pytest.mark.slow
def test_gemm_bench_prints_rows_writes_nothing_without_out_and_warns_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gemm, "BERT_SHAPES", [(1, 64, 64), (8, 64, 128)])
    monkeypatch.setattr(gemm, "PEAK_ITERS", 20_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["bench", "gemm", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "bert 1x64x64" in out and "bert 8x64x128" in out and "speedup" in out
    assert os.listdir(tmp_path) == [] and "wrote" not in out
    noted = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecated" in str(w.message)]
    assert noted == []
    assert main(["bench", "gemm", "--quick", "--out", "results"]) == 0
    assert "wrote results/gemm.json" in capsys.readouterr().out
    assert (tmp_path / "results" / "gemm.json").stat().st_size > 0


@pytest.mark.slow
def test_models_bench_writes_nothing_without_out(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "models", "--small", "--models", "resnet50_b1", "--systems", "torch_fp32,fxopt",
                 "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "resnet50_b1" in out and "fxopt cpu-int8" in out
    assert os.listdir(tmp_path) == [] and "wrote" not in out


@pytest.mark.slow
def test_gemm_bench_streams_rows_through_a_pipe(tmp_path):
    """The first table row reaches a pipe while later shapes are still being measured."""
    proc = subprocess.Popen([sys.executable, "-m", "fxopt.cli", "bench", "gemm", "--quick"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_row_at = None
    for line in proc.stdout:
        if line.startswith("bert 1x768x768"):
            first_row_at = time.perf_counter()
            break
    rest = proc.stdout.read()
    proc.wait()
    done_at = time.perf_counter()
    assert proc.returncode == 0, proc.stderr.read()
    assert first_row_at is not None and "bert 512x1024x1024" in rest
    assert done_at - first_row_at > 1.0, "rows arrived only at the end"
    assert os.listdir(tmp_path) == []


def test_paired_difference_takes_turns_and_sees_only_the_difference(monkeypatch):
    """Two calls that differ by 0.25 s under a load growing from pair to pair: the estimate
    is 0.25, and each goes first in half of the pairs (a fake clock, advanced by the calls)."""
    from fxopt.bench import timing
    clock, firsts, last = [0.0], [], [None]

    def fake(name, cost):
        def call():
            load = 0.01 * len(firsts)   # the same for both calls of a pair
            if last[0] is None or last[0] == "pair done":
                firsts.append(name)
            last[0] = name if last[0] in (None, "pair done") else "pair done"
            clock[0] += cost + load
        return call
    monkeypatch.setattr(timing, "_clock", lambda: clock[0])
    base, other = fake("base", 1.0), fake("other", 1.25)
    assert timing.paired_difference_seconds(base, other, pairs=20, warmup=0) == pytest.approx(0.25)
    assert firsts.count("base") == firsts.count("other") == 10


def test_mix_table_names_the_shapes_where_2x_fbgemm_would_pass_the_peak(capsys, monkeypatch):
    """fbgemm at 60 % of the peak on the K = 4096 row at M = 8 (2x would need 120 %), at
    30 % elsewhere: the share table shows both, and the closing line counts that row's 6
    shapes, on a path without AMX; with AMX (not bound by fbgemm's VNNI peak) no such line."""
    peak = 1000.0       # GOP/s

    def row(m, k, n, share, ratio):
        fbgemm_us = 2e-3 * m * k * n / (share * peak)
        return {"m": m, "k": k, "n": n, "fbgemm_us": fbgemm_us, "fxopt_us": fbgemm_us / ratio, "peak_gops": peak}
    rows = [row(m, k, n, 0.6 if (m, k) == (8, 4096) else 0.3, 1.5) for m in gemm.MIX_ROWS
            for k in gemm.MIX_SIZES for n in gemm.MIX_SIZES]
    monkeypatch.setattr(gemm.K, "isa", lambda: "avx512_vnni")
    gemm._print_mix(rows)
    out = capsys.readouterr().out
    assert "least: 1.50x" in out and "fbgemm's GOP/s as % of the measured vpdpbusd.512 peak" in out
    assert out.count("     60%") == len(gemm.MIX_SIZES) and "     30%" in out
    assert "2x fbgemm needs more than that peak at 6 of 36 shapes" in out
    assert out.count("2x fbgemm needs") == 1
    monkeypatch.setattr(gemm.K, "isa", lambda: "amx_int8")
    gemm._print_mix(rows)
    assert "2x fbgemm needs" not in capsys.readouterr().out
