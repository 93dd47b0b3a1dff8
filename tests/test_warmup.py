"""Kernel compilation a user can see (the compile notice), the cache folder, and warmup."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

from fxopt.driver.compile_notice import CompileNotice, cached_kernels
from fxopt.kernels import _cache


def _child(code, cache_dir, timeout=900):
    env = {**os.environ, "FXOPT_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_the_cache_folder_is_the_user_cache_keyed_on_the_source(tmp_path):
    here = _cache.cache_dir()
    assert not here.startswith(_cache._PKG_DIR)           # never inside the install
    assert os.path.basename(here) == f"kernels-{_cache.package_stamp()[:16]}"
    done = _child("from fxopt.kernels import _cache; print(_cache.cache_dir(), _cache.CACHE)", tmp_path / "c")
    assert done.returncode == 0, done.stderr[-2000:]
    folder, cache = done.stdout.split()
    assert folder == str(tmp_path / "c" / os.path.basename(here)) and cache == "True"


def _fake_kernel(module):
    def add(a, b):
        return a + b
    add.__module__ = module
    return njit(cache=False)(add)


def test_the_notice_announces_once_counts_kernels_and_sums_up():
    out = io.StringIO()
    notice = CompileNotice(stream=out, min_interval_s=0.0)
    from numba.core import event
    event.register("numba:compile", notice)
    try:
        _fake_kernel("someone.else")(1, 2)                     # not fxopt's: not counted
        assert out.getvalue() == "" and notice.compiled == 0
        kernel = _fake_kernel("fxopt.kernels.fake")
        assert kernel(1, 2) == 3 and kernel(1.5, 2.0) == 3.5   # two signatures: two compiles
        kernel(3, 4)                                           # compiled already: no event
    finally:
        event.unregister("numba:compile", notice)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fxopt: compiling kernels for this CPU, once")
    assert "fxopt warmup" in lines[0] and sum("compiling kernels" in line for line in lines) == 1
    assert [line.split()[1] for line in lines[1:]] == ["1", "2"]   # "  compiled N kernels (T s)..."
    notice.finish()
    assert out.getvalue().splitlines()[-1].startswith("fxopt: compiled 2 kernels in ")
    notice.finish()                                            # nothing new: no second summary
    assert out.getvalue().count("fxopt: compiled") == 1


def test_the_notice_can_be_silenced(monkeypatch):
    out = io.StringIO()
    notice = CompileNotice(stream=out)
    monkeypatch.setenv("FXOPT_COMPILE_NOTICE", "0")
    notice.before(["lower_to_kernels"])
    notice.announce()
    assert out.getvalue() == ""


def _stderr_until(patch, marker, code, cache_dir):
    """stderr lines of a child running `code` with `patch` ("module:attribute") replaced by a
    stop that prints `marker` and exits: what was said before that point."""
    module, attribute = patch.split(":")
    done = _child(f"""
        import sys
        import {module} as patched
        def stop(*a, **k):
            print({marker!r}, file=sys.stderr, flush=True)
            raise SystemExit(0)
        patched.{attribute} = stop
        {code}
    """, cache_dir, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if line.strip()]


@pytest.mark.slow
def test_an_int8_optimize_with_an_empty_cache_says_so_before_it_captures(tmp_path):
    # the child stops where capture would start: the notice must come first (no compile yet)
    lines = _stderr_until("fxopt.driver.compile:capture", "CAPTURE",
                          'import torch, fxopt; print("START", file=sys.stderr, flush=True); '
                          'fxopt.optimize(torch.nn.Linear(8, 8), (torch.randn(2, 8),), target="cpu-int8", '
                          'latency_repeats=0)', tmp_path / "empty")
    start = lines.index("START")
    assert lines[start + 1].startswith("fxopt: compiling kernels for this CPU, once"), lines
    assert str(tmp_path / "empty") in lines[start + 1] and lines[start + 2] == "CAPTURE"


def test_fp32_targets_and_a_warm_cache_say_nothing(tmp_path, capfd):
    import torch
    import fxopt
    fxopt.optimize(torch.nn.Linear(8, 8), (torch.randn(2, 8),), target="cpu-fp32", latency_repeats=0)
    assert "compiling kernels" not in capfd.readouterr().err
    if cached_kernels():                # this process's cache folder is warm: no notice either
        fxopt.optimize(torch.nn.Linear(8, 8), (torch.randn(2, 8),), target="cpu-int8", latency_repeats=0)
        assert "compiling kernels for this CPU" not in capfd.readouterr().err


# every signature of fxopt's disk-cached kernels this process holds (compiled or loaded)
_SIGNATURES = textwrap.dedent("""
    import gc, json, re
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    def signatures():
        held = set()
        for d in gc.get_objects():
            if not isinstance(d, Dispatcher):
                continue
            module = d.py_func.__module__ or ""
            if module.startswith("fxopt.kernels.") and not isinstance(d._cache, NullCache):
                cells = [re.sub(r" at 0x[0-9a-f]+", "", repr(c.cell_contents))
                         for c in d.py_func.__closure__ or ()]      # an ISA's entries: its tag
                held.update(f"{module}.{d.py_func.__qualname__}{cells}{sig}" for sig in d.signatures)
        return sorted(held)
""")


@pytest.mark.slow
def test_after_warmup_a_new_process_compiles_nothing_for_the_zoo():
    """warmup() in one process; a later process optimizes and calls the zoo's models, at the
    captured shape and another, on both runtimes: it compiles nothing, and every kernel
    signature it uses is one warmup used (so warmup alone, into an empty cache, compiles
    them all). Both run on the user's cache folder: once earlier tests filled it this takes
    seconds, not the minutes of compiling everything into an empty one; on an empty cache
    the warmup process compiles what the rest of the suite would."""
    cache = os.path.dirname(_cache.cache_dir())
    done = _child(_SIGNATURES + "import fxopt; fxopt.warmup(progress=False); print(json.dumps(signatures()))",
                  cache, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    warmed = set(json.loads(done.stdout.splitlines()[-1]))
    assert any("gemm._entries.<locals>.serial" in s for s in warmed), sorted(warmed)[:5]
    tests = os.path.dirname(os.path.abspath(__file__))
    done = _child(_SIGNATURES + textwrap.dedent(f"""
    import sys, torch, fxopt
    sys.path.insert(0, {tests!r})
    import zoo
    from fxopt.driver.compile_notice import NOTICE
    for name in ("mlp", "cnn_bn_residual", "dwsep_cnn", "transformer_encoder", "bert", "gpt2"):
        model, example, other = getattr(zoo, name)()
        args = lambda e: ((), e) if isinstance(e, dict) else (e, {{}})
        for calibration in (None, [example, other]):
            fast = fxopt.optimize(model, example, "cpu-int8", calibration_data=calibration,
                                  latency_repeats=0, report_layers=False)
            with torch.no_grad():
                for inputs in (example, other):
                    a, k = args(inputs)
                    fast(*a, **k)
        print(name, NOTICE.total, flush=True)
    print(json.dumps(signatures()))
    """), cache, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    compiled = dict(line.split() for line in lines[:-1])
    assert set(compiled.values()) == {"0"}, (compiled, done.stderr[-3000:])
    used = set(json.loads(lines[-1]))
    assert used and used <= warmed, sorted(used - warmed)


@pytest.mark.slow
def test_the_cli_says_so_before_it_loads_the_model(tmp_path):
    # importing a model's library and building it can take seconds: the notice comes first
    lines = _stderr_until("fxopt.cli:load_factory", "FACTORY",
                          'patched.main(["optimize", "tests/zoo.py:bert", "--target", "cpu-int8", "-o", "x.fxopt"])',
                          tmp_path / "empty")
    assert lines[0].startswith("fxopt: compiling kernels for this CPU, once") and lines[1] == "FACTORY", lines
    for fp32 in (["--target", "cpu-fp32"], []):    # inspect's default target is cpu-fp32: no notice
        lines = _stderr_until("fxopt.cli:load_factory", "FACTORY",
                              f'patched.main(["inspect", "tests/zoo.py:bert", *{fp32!r}])', tmp_path / "empty2")
        assert lines == ["FACTORY"], lines
