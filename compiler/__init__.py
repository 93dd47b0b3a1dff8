"""fxopt: make trained PyTorch models small and fast on CPUs.

    import fxopt
    fast = fxopt.optimize(model, example_inputs, target="cpu-int8", calibration_data=batches)
    print(fast.fxopt_report)
    fxopt.save(fast, "model.fxopt"); fast = fxopt.load("model.fxopt")

This folder (compiler/) is the package `fxopt`; its subpackages each own one
concern: core/ (capture, IR, passes, pass manager), quant/, pruning/, runtime/,
report/, artifact/ (save/load), driver/ (the compile driver), search/ (the
accuracy-budgeted search). passes/, kernels/ and bench/ are fxopt.passes,
fxopt.kernels and fxopt.bench.
"""


def _defer_to_installed(name: str, folder: str):
    """Load the installed top-level package `name`, skipping the repository root.

    `python -m ...` or `python -c ...` run from the repository root put the root first
    on sys.path, where this folder looks like a package named `compiler` (a name the
    package index has too). It is only fxopt's source, so the import goes on to the
    package of that name installed elsewhere on sys.path, or fails as it would without
    this folder.
    """
    import os
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    root = os.path.realpath(os.path.dirname(folder))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r} (the repository's {name}/ folder is "
                                  "fxopt's source; import fxopt instead)", name=name)
    module = module_from_spec(spec)
    sys.modules[name] = module          # the import statement hands back what sys.modules holds
    spec.loader.exec_module(module)


if __name__ != "fxopt":
    _defer_to_installed(__name__, __path__[0])
else:
    import warnings as _warnings
    from numba.core.errors import NumbaIRAssumptionWarning as _NumbaIRAssumptionWarning
    # Numba's own IR check flags a variable of gemm._staged, inlined into the sparse kernel's
    # workers, as "not in scope" when they compile, and asks to report it to Numba: nothing
    # a user of fxopt can act on (the kernels' results are tested bit for bit on every ISA).
    _warnings.filterwarnings("ignore", category=_NumbaIRAssumptionWarning, module=r".*fxopt[/.]kernels[/.]")
    from fxopt.core.errors import (ArtifactError, CalibrationError, CaptureError, FxoptError,
                                   NoCalibrationWarning, PassError, PipelineError)
    from fxopt.core.version import VERSION as __version__
    from fxopt.core.capture import capture
    from fxopt.core import fxops as _fxops              # registers the fxopt:: torch ops
    from fxopt.quant import qops as _qops               # (a loaded graph calls them)
    from fxopt.runtime import kernel_ops as _kernel_ops, nonfinite as _nonfinite
    from fxopt.core.pipeline import TARGETS, Pipeline
    from fxopt.api import bisect, optimize, profile, prune
    from fxopt.artifact.serialize import load, save
    from fxopt.kernel_warmup import warmup
    from fxopt.lottery import lottery_ticket
    from fxopt.qat import finetune
    from fxopt.runtime.saturation import monitor as saturation_monitor

    __all__ = ["optimize", "bisect", "capture", "prune", "profile", "finetune", "lottery_ticket", "save", "load",
               "Pipeline", "TARGETS", "saturation_monitor", "warmup", "FxoptError", "ArtifactError",
               "CalibrationError", "CaptureError", "PassError", "PipelineError", "NoCalibrationWarning"]
