"""onnx-sap: Stochastic Activation Pruning for exported ONNX classifiers, without retraining."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import OnnxSapError, OptionError
from .runtime import (
    DOMAIN,
    OP_TYPE,
    cuda_device_count,
    get_library_path,
    has_cuda_kernels,
    make_session,
    register_library,
    run_cuda_kernel,
    session_options,
)

if TYPE_CHECKING:  # what __getattr__ below imports on first use, for type checkers and IDEs
    from .api import StripResult, harden, inspect, strip, sweep, tune
    from .bench import BenchOptions
    from .rewrite import HardenOptions
    from .verify import VerifyOptions

_LAZY = {"harden": "api", "inspect": "api", "strip": "api", "sweep": "api", "tune": "api", "StripResult": "api",
         "HardenOptions": "rewrite", "VerifyOptions": "verify", "BenchOptions": "bench"}


def __getattr__(name: str):
    # The rewriter's API is imported on first use, so that running hardened models (make_session)
    # needs neither onnx-graphsurgeon nor the attack code.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)  # the public names, the lazily imported ones included


__all__ = [
    "BenchOptions",
    "HardenOptions",
    "StripResult",
    "VerifyOptions",
    "harden",
    "inspect",
    "strip",
    "sweep",
    "tune",
    "DOMAIN",
    "OP_TYPE",
    "OnnxSapError",
    "OptionError",
    "__version__",
    "cuda_device_count",
    "get_library_path",
    "has_cuda_kernels",
    "make_session",
    "register_library",
    "run_cuda_kernel",
    "session_options",
]
