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


class NoCalibrationWarning(UserWarning):
    """No calibration data was given: static ranges come from the example inputs alone.

    Its own category so that a front end can word the advice its way (the CLI names
    --calib where the Python message names calibration_data=)."""
