"""imgworker: image inference over an object store, with every image accounted for."""

from .config import Config, load_config
from .errors import (
    AlgoError,
    AlgoPermanent,
    AlgoTransient,
    ConfigError,
    ExitCode,
    ImageGone,
    ImgworkerError,
    ObjectMissing,
    StoreError,
    StoreFatal,
    StoreUnavailable,
)
from .outcomes import ImageRef, Outcome, Result
from .stats import Report

__all__ = [
    "AlgoError", "AlgoPermanent", "AlgoTransient", "Config", "ConfigError", "ExitCode", "ImageGone", "ImageRef",
    "ImgworkerError", "ObjectMissing", "Outcome", "Report", "Result", "StoreError", "StoreFatal",
    "StoreUnavailable", "load_config",
]
__version__ = "0.1.0"
