"""optimize and capture from several threads give what they give alone, and one optimized
model answers several threads at once correctly, under every Numba threading layer here."""
import builtins
import math
import os
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.utils._pytree as pytree

import fxopt
from zoo import ZOO

# threads racing whole-model optimizes, and every Numba threading layer in subprocesses
pytestmark = pytest.mark.slow

MODELS = ("mlp", "cnn_bn_residual", "bert")
FAST = {"latency_repeats": 0, "report_layers": False, "drift": False}


def _optimized_outputs(built):
    model, example, other = built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example, other], **FAST)
    with torch.no_grad():
        out = fast(**other) if isinstance(other, dict) else fast(*other)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_optimize_from_three_threads_equals_sequential():
    # the zoo draws weights and inputs from torch's global RNG: build them in one thread
    built = {name: ZOO[name]() for name in MODELS}
    sequential = {name: _optimized_outputs(built[name]) for name in MODELS}
    for _ in range(8):        # 8 races of 3 (20 took 97 s of CI's 25 minutes)
        with ThreadPoolExecutor(len(MODELS)) as pool:
            threaded = dict(zip(MODELS, pool.map(_optimized_outputs, built.values())))
        for name in MODELS:
            assert all(torch.equal(a, b) for a, b in zip(threaded[name], sequential[name])), name


def _captured(built):
    model, example, _ = built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.capture(model, example)


def _outputs(gm, other):
    with torch.no_grad():
        out = gm(**other) if isinstance(other, dict) else gm(*other)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_capture_from_three_threads_equals_sequential_and_leaves_builtins_alone():
    # non-strict torch.export swaps builtins.max/min and math.pow while it traces: two
    # exports at once failed ("... is not tracked with proxy") and left torch's swaps in
    # place. The graphs run after the threads end: while any thread exports, torch turns
    # its oneDNN backend off process-wide, so float ops running meanwhile differ in bits.
    originals = (builtins.max, builtins.min, math.pow)
    built = {name: ZOO[name]() for name in MODELS}
    sequential = {name: _outputs(_captured(built[name]), built[name][2]) for name in MODELS}
    for _ in range(5):
        with ThreadPoolExecutor(len(MODELS)) as pool:
            graphs = dict(zip(MODELS, pool.map(_captured, built.values())))
        for name in MODELS:
            got = _outputs(graphs[name], built[name][2])
            assert all(torch.equal(a, b) for a, b in zip(got, sequential[name])), name
    assert (builtins.max, builtins.min, math.pow) == originals


_CALLS = textwrap.dedent("""
    import sys, warnings
    from concurrent.futures import ThreadPoolExecutor
    sys.path.insert(0, {tests!r})
    warnings.simplefilter("ignore")
    import numba, torch, fxopt
    from fxopt.kernels import threads
    from zoo import ZOO
    threads.THREADSAFE = threads.THREADSAFE if {guarded} else True
    model, example, _ = ZOO["mlp"]()
    fast = fxopt.optimize(model, example, target="cpu-int8", calibration_data=[example],
                          latency_repeats=0, report_layers=False, drift=False)
    xs = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    want = [fast(x) for x in xs]
    def work(t):
        return all(torch.equal(fast(xs[(t + i) % 8]), want[(t + i) % 8]) for i in range(200))
    with ThreadPoolExecutor(4) as pool:
        ok = all(pool.map(work, range(4)))
    print("layer", numba.threading_layer(), "equal", ok)
""")


def _calls(layer, guarded=True, **env):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2", **env)
    code = _CALLS.format(tests=os.path.dirname(__file__), guarded=guarded)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


# forksafe and a priority order putting workqueue first both load workqueue here (Linux,
# no TBB) although OpenMP is installed: the guard must follow the layer Numba loaded
ASKS = {"forksafe": ("forksafe", {}),
        "workqueue first": ("default", {"NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb"})}


@pytest.mark.parametrize("layer", ["default", "workqueue", "omp", "tbb", *ASKS])
def test_one_model_answers_four_threads_under_every_threading_layer(layer):
    if layer in ("workqueue", "omp", "tbb") and not _available(layer):
        pytest.skip(f"Numba's {layer} threading layer is not installed here")
    asked, env = ASKS.get(layer, (layer, {}))
    done = _calls(asked, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("equal True"), done.stdout


def test_workqueue_without_the_guard_is_what_the_guard_prevents():
    done = _calls("workqueue", guarded=False)          # control: unguarded, Numba aborts
    assert done.returncode != 0 and "workqueue threading layer is not threadsafe" in done.stderr, \
        (done.returncode, done.stderr[-500:])


def _available(layer):
    module = {"omp": "numba.np.ufunc.omppool", "tbb": "numba.np.ufunc.tbbpool",
              "workqueue": "numba.np.ufunc.workqueue"}[layer]
    # Why a child process: the calls run in one, and a library loaded into this process
    # (OpenVINO brings its own libtbb) would make the layer look installed when it is not.
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def test_a_users_torch_thread_count_survives_the_first_kernel_call():
    # Loading Numba's OpenMP layer set the process's OpenMP thread count (torch's too): a
    # torch.set_num_threads(1) made before optimize became 2 at the first kernel call.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 or more CPUs to tell 1 thread from the default")
    code = ("import torch; torch.set_num_threads(1)\n"
            "import fxopt\n"
            "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()\n"
            "x = torch.randn(16, 64)\n"
            "fast = fxopt.optimize(m, (x,), 'cpu-int8'); fast(x)\n"
            "print('threads', torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("threads 1"), done.stdout
