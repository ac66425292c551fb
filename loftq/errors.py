"""Typed errors of the engine.

Every error carries a stable machine-readable ``code`` so that callers (CLI, job service)
can map it to an exit status or an HTTP response in one place.
"""

from __future__ import annotations


class LoftQError(Exception):
    """Base class: something about the request or its input is wrong."""

    code = "loftq_error"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class InvalidOptions(LoftQError):
    code = "invalid_options"


class SourceNotFound(LoftQError):
    code = "source_not_found"


class NoSafetensors(SourceNotFound):
    """The source exists but holds no safetensors weights (and no pickle files either): the
    wrong directory or prefix, or a repository without a model."""

    code = "no_safetensors"


class UnsupportedCheckpoint(LoftQError):
    """A checkpoint we refuse on principle (pickle files) or cannot interpret."""

    code = "unsupported_checkpoint"


class PickleCheckpoint(UnsupportedCheckpoint):
    """Weights only as pickle files (pytorch_model.bin, *.pt, *.pkl, ...): unpickling runs
    arbitrary code, so they are never loaded; the fix is a conversion to safetensors."""

    code = "pickle_checkpoint"


class CorruptCheckpoint(LoftQError):
    """A safetensors file or index that contradicts itself or the bytes on disk, or a config.json
    that declares more (layers, modules, buffers) than the checkpoint holds."""

    code = "corrupt_checkpoint"


class UnsafePath(LoftQError):
    """A file name that would escape the checkpoint or output directory (``..``, an absolute
    path, NUL): from a hostile index, object listing or request."""

    code = "unsafe_path"


class NoTargetModules(LoftQError):
    code = "no_target_modules"


class Cancelled(LoftQError):
    code = "cancelled"


class InsufficientMemory(LoftQError):
    """A stage that must hold more than this machine (or the job's memory limit) has, refused
    before it starts (the model stage of refinement holds the whole model)."""

    code = "out_of_memory"


class InvalidCalibrationData(LoftQError):
    """Calibration text that cannot be read or tokenised into the requested sequences."""

    code = "invalid_calibration_data"


class UnsupportedArchitecture(LoftQError):
    """A calibrated conversion of an architecture whose blocks cannot be streamed one by one, or
    a config.json whose ``architectures`` names something other than a transformers model class."""

    code = "unsupported_architecture"
