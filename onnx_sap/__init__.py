"""onnx-sap: Stochastic Activation Pruning for exported ONNX classifiers, without retraining."""

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

__version__ = "0.1.0"

__all__ = [
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
