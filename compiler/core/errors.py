"""Errors fxopt raises. Each message says what went wrong, where, and what to do."""


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """torch.export could not capture the model into a graph."""


class PassError(FxoptError):
    """A pass failed or left an invalid graph."""


class PipelineError(FxoptError):
    """An unknown target, pass or option, or a malformed pipeline string."""


class CalibrationError(FxoptError):
    """Calibration data does not match the model's inputs, or calibration is misconfigured."""


class ArtifactError(FxoptError):
    """A saved model file cannot be written or read: corrupt, foreign, too new, or unsafe."""
