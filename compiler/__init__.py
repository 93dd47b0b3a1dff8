"""fxopt: make trained PyTorch models small and fast on CPUs.

    import fxopt
    fast = fxopt.optimize(model, example_inputs, target="cpu-fp32")
    print(fast.fxopt_report)
"""
from fxopt.errors import CaptureError, FxoptError, PassError, PipelineError
from fxopt.capture import capture
from fxopt import fxops as _fxops, qops as _qops, kernel_ops as _kernel_ops  # register fxopt:: ops
from fxopt.api import optimize
from fxopt.bisect import bisect
from fxopt.pipeline import TARGETS, Pipeline
from fxopt.serialize import save, load
from fxopt.pruning import prune
from fxopt.finetune import finetune

__version__ = "0.1.0"
__all__ = ["optimize", "bisect", "capture", "prune", "finetune", "Pipeline", "TARGETS", "FxoptError",
           "CaptureError", "PassError", "PipelineError"]
