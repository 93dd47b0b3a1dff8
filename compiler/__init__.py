"""fxopt: make trained PyTorch models small and fast on CPUs."""
from fxopt.errors import CaptureError, FxoptError, PassError, PipelineError

__version__ = "0.1.0"
