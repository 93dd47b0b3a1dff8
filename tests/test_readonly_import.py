"""fxopt imports and computes where no cache location is writable (a read-only install,
HOME read-only, no FXOPT_CACHE_DIR or NUMBA_CACHE_DIR): kernels compile without a cache, with one warning."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fxopt.kernels import _cache

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numpy as np
    from fxopt.kernels import _cache
    from fxopt.kernels.api import linear_f32, pack_weights_s8, quantize_weights_s8
    w = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    x = np.ones((2, 8), np.float32)
    y = linear_f32(x, pack_weights_s8(*quantize_weights_s8(w)))
print("cache", _cache.CACHE, "close", bool(np.allclose(y, x @ w.T, rtol=0.02)),
      "warnings", sum("no writable folder for compiled kernels" in str(m.message) for m in caught))
"""


def test_a_writable_location_is_used_here():
    assert _cache.CACHE is True


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0,
                    reason="needs root and unshare to mount the install read-only")
def test_import_and_compute_when_nothing_is_writable(tmp_path):
    package = Path(_cache.__file__).resolve().parent          # this checkout's kernels/
    readonly = sorted({str(ROOT), str(Path(_cache._PKG_DIR)), os.path.expanduser("~")})
    mounts = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in readonly)
    # the cache folder is $XDG_CACHE_HOME/fxopt when set: leave it to HOME (read-only)
    env = {k: v for k, v in os.environ.items() if k not in ("FXOPT_CACHE_DIR", "NUMBA_CACHE_DIR", "PYTHONPATH",
                                                         "XDG_CACHE_HOME")}
    done = subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && "$0" -c "$1"', sys.executable, CHILD],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    if "mount" in done.stderr and "ermission" in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cache", "False", "close", "True", "warnings", "1"], (done.stdout, package)
