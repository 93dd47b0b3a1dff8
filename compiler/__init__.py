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

from fxopt.core.errors import (ArtifactError, CalibrationError, CaptureError, FxoptError, PassError,
                               PipelineError)
from fxopt.core.version import VERSION as __version__
from fxopt.core.capture import capture
from fxopt.core import fxops as _fxops              # registers the fxopt:: torch ops
from fxopt.quant import qops as _qops               # (a loaded graph calls them)
from fxopt.runtime import kernel_ops as _kernel_ops
from fxopt.core.pipeline import TARGETS, Pipeline
from fxopt.api import bisect, optimize, prune
from fxopt.artifact.serialize import load, save
from fxopt.pruning.finetune import finetune

__all__ = ["optimize", "bisect", "capture", "prune", "finetune", "save", "load", "Pipeline",
           "TARGETS", "FxoptError", "ArtifactError", "CalibrationError", "CaptureError",
           "PassError", "PipelineError"]
