"""LoftQ checkpoints from Hugging Face safetensors checkpoints, streamed layer by layer.

    from loftq import ConvertOptions, convert_directory
    report = convert_directory("path/to/model", "path/to/out", ConvertOptions(rank=16, iters=5))
"""

from loftq.converter import convert, convert_directory
from loftq.errors import LoftQError
from loftq.options import ConvertOptions
from loftq.report import LayerReport, ProgressEvent, Report
from loftq.storage import LocalDestination, LocalSource

__all__ = [
    "ConvertOptions",
    "LayerReport",
    "LocalDestination",
    "LocalSource",
    "LoftQError",
    "ProgressEvent",
    "Report",
    "convert",
    "convert_directory",
]
