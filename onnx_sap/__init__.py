"""onnx-sap: Stochastic Activation Pruning for exported ONNX classifiers, without retraining."""

__version__ = "0.1.0"

from .errors import OnnxSapError
from .runtime import (
    DOMAIN,
    OP_TYPE,
    cuda_device_count,
    get_library_path,
    has_cuda_kernels,
    make_session,
    run_cuda_kernel,
    session_options,
)

_LAZY = {"harden": "api", "inspect": "api", "strip": "api", "sweep": "api", "tune": "api", "HardenOptions": "rewrite"}


def __getattr__(name: str):
    # The rewriter's API is imported on first use, so that running hardened models (make_session)
    # needs neither onnx-graphsurgeon nor the attack code.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "HardenOptions",
    "harden",
    "inspect",
    "strip",
    "sweep",
    "tune",
    "DOMAIN",
    "OP_TYPE",
    "OnnxSapError",
    "__version__",
    "cuda_device_count",
    "get_library_path",
    "has_cuda_kernels",
    "make_session",
    "run_cuda_kernel",
    "session_options",
]
