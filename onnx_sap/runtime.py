"""Finding the custom-op library and opening ONNX Runtime sessions with it registered."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .errors import OnnxSapError, OptionError

DOMAIN = "onnx_sap"
OP_TYPE = "StochasticActivationPruning"
LIBRARY_NAME = "libonnx_sap_ops.so"

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# ONNX Runtime's input type strings -> NumPy dtypes (for feeding sessions).
NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _is_float_tensor(type_name: str) -> bool:
    return type_name in ("tensor(float)", "tensor(double)", "tensor(float16)")


def _is_zipmap(type_name: str) -> bool:
    return type_name.startswith("seq(map(") and type_name.endswith(",tensor(float)))")


def score_output(session, name: str | None = None) -> str:
    """The output of a classifier session that holds its class scores: `name` when given, else the
    first float output with a class axis (logits, log-probabilities or probabilities), else the
    probabilities of a ZipMap (a sequence of maps, as scikit-learn's exporter writes by default).
    A label output (int64) is never it."""
    outputs = session.get_outputs()
    listing = ", ".join(f"{o.name} ({o.type})" for o in outputs)
    if name is not None:
        found = next((o for o in outputs if o.name == name), None)
        if found is None:
            raise OnnxSapError(f"--output {name}: the model has no such output; its outputs: {listing}")
        if not (_is_float_tensor(found.type) or _is_zipmap(found.type)):
            raise OnnxSapError(f"--output {name} is {found.type}; give a float output of class scores or a "
                               f"ZipMap's probabilities (outputs: {listing})")
        return name
    for o in outputs:
        if _is_float_tensor(o.type) and len(o.shape) >= 2:
            return o.name
    for o in outputs:
        if _is_zipmap(o.type):
            return o.name
    raise OnnxSapError(f"no output holds class scores (a float output with a class axis or a ZipMap's "
                       f"probabilities) among {listing}; name one with --output NAME")


def as_scores(value) -> np.ndarray:
    """A score output's value as a float64 array [rows, classes]: a ZipMap's sequence of maps
    becomes one column per class, in the maps' key order (the classes' order in the model)."""
    if isinstance(value, list):
        if not value:
            return np.zeros((0, 0))
        keys = list(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float64)
    return np.asarray(value, dtype=np.float64)


def installed_file(relative: str) -> Path | None:
    """A file installed inside the onnx_sap package by the build (op library, example data).

    Looked up beside this module first, then in every onnx_sap folder on sys.path: running from a
    source checkout puts its onnx_sap/ first, while the build's files sit in the installed copy.
    """
    path = resources.files("onnx_sap").joinpath(relative)
    if path.is_file():
        return Path(str(path))
    for entry in sys.path:
        candidate = Path(entry or ".") / "onnx_sap" / relative
        if candidate.is_file():
            return candidate
    return None


def get_library_path() -> str:
    """Path of the installed custom-op shared library (``ONNX_SAP_LIBRARY`` overrides it)."""
    override = os.environ.get("ONNX_SAP_LIBRARY")
    if override:
        if not Path(override).is_file():
            raise OnnxSapError(f"ONNX_SAP_LIBRARY={override} does not exist; unset it or point it at {LIBRARY_NAME}")
        return override
    path = installed_file(LIBRARY_NAME)
    if path is None:
        raise OnnxSapError(f"{LIBRARY_NAME} is not installed; build and install the package with `pip install .`")
    return str(path)


def example_file(name: str) -> Path:
    """A file of the bundled example (examples/digits/, installed as onnx_sap/data/)."""
    path = installed_file(f"data/{name}")
    if path is None:
        raise OnnxSapError(f"example file {name} is not installed; reinstall the package with `pip install .`")
    return path


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(get_library_path())
    lib.onnx_sap_has_cuda.restype = ctypes.c_int
    return lib


def has_cuda_kernels() -> bool:
    """Whether the installed library was built with the CUDA kernels."""
    return bool(_library().onnx_sap_has_cuda())


CPU_ISA_LEVELS = ("scalar", "avx2", "avx512")  # the library's level numbers 0, 1, 2


def cpu_isa_levels() -> list[str]:
    """The CPU kernel's instruction-set levels this build and this CPU can run, slowest first.

    Sessions use the last one unless the environment variable ``ONNX_SAP_ISA`` names another when
    the session is created (a level this CPU lacks makes session creation fail).
    """
    lib = _library()
    return [name for level, name in enumerate(CPU_ISA_LEVELS) if lib.onnx_sap_cpu_isa_available(level)]


def last_cpu_isa() -> str | None:
    """The level the most recent CPU run of the op used in this process (None before any)."""
    level = _library().onnx_sap_cpu_isa_last()
    return CPU_ISA_LEVELS[level] if level >= 0 else None


def last_cpu_in_place() -> bool | None:
    """Whether the most recent CPU run of the op in this process wrote its output over its input
    (ONNX Runtime reused the input's buffer); None before any run."""
    state = _library().onnx_sap_cpu_in_place_last()
    return bool(state) if state >= 0 else None


def provider_name(provider: str) -> str:
    """Map ``cpu``/``cuda`` (or a full ONNX Runtime provider name) to the provider name."""
    name = _PROVIDER_NAMES.get(provider.lower(), provider)
    if name not in _PROVIDER_NAMES.values():
        raise OptionError("provider", f"must be 'cpu' or 'cuda', got {provider!r}")
    return name


def register_library(options):
    """Register the SAP op library in an ``onnxruntime.SessionOptions`` of your own and return it.

    Without it, ONNX Runtime refuses a hardened model ("... is not a registered function/op")::

        so = onnxruntime.SessionOptions()
        onnx_sap.register_library(so)
        session = onnxruntime.InferenceSession("model.sap.onnx", so)
    """
    options.register_custom_ops_library(get_library_path())
    return options


def session_options(threads: int | None = None, base=None, *, spin: bool = True):
    """SessionOptions with the op library registered.

    ``threads`` sets the intra-op thread count; ``spin=False`` stops idle pool threads from spinning,
    which matters when several sessions take turns on the same cores (benchmarks).
    """
    import onnxruntime as ort

    opts = register_library(base if base is not None else ort.SessionOptions())
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def make_session(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    spin: bool = True,
    options=None,
    initializers: dict | None = None,
):
    """An ``onnxruntime.InferenceSession`` for ``model`` with the SAP library registered.

    ``initializers`` (name -> NumPy array) supply the values of initializers that ``model`` stores as
    external data, without copies: the session reads the arrays, which it keeps alive (a lean model,
    modelio.LeanModel). Weight prepacking, a second copy of them, is then off.

    ``provider`` is ``cpu`` or ``cuda``. Asking for CUDA where ONNX Runtime would silently run on the
    CPU (no onnxruntime-gpu, no GPU, no CUDA kernels in the library) raises :class:`OnnxSapError`.
    """
    import onnxruntime as ort

    wanted = provider_name(provider)
    if wanted == "CUDAExecutionProvider":
        if wanted not in ort.get_available_providers():
            raise OnnxSapError(
                "this onnxruntime has no CUDA provider; swap it for onnxruntime-gpu (README: GPU) or use --provider cpu"
            )
        if not has_cuda_kernels():
            raise OnnxSapError("the op library was built without CUDA kernels; rebuild with ONNX_SAP_CUDA=ON")
    providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto) and not initializers:
        model = model.SerializeToString()
    elif not isinstance(model, (bytes, onnx.ModelProto)):
        model = os.fspath(model)
    opts = session_options(threads, options, spin=spin)
    if not initializers:
        sess = ort.InferenceSession(model, sess_options=opts, providers=providers)
    else:
        sess = _session_sharing(model, initializers, opts, providers)
    if wanted not in sess.get_providers():
        raise OnnxSapError(f"ONNX Runtime fell back from {wanted} to {sess.get_providers()}; check the CUDA install")
    return sess


def _session_sharing(model, initializers: dict, opts, providers):
    """A session reading the named initializers from the given arrays, not copying them:
    add_initializer shares the buffer, but ONNX Runtime wants the model's external-data file to exist,
    so the model (a ModelProto) is written, lean, beside an empty stand-in file."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        raise TypeError("initializers go with a ModelProto")
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in initializers.items()}
    lean = onnx.ModelProto()
    lean.CopyFrom(model)
    for t in lean.graph.initializer:
        if t.name in values:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value="stand-in.data")
            opts.add_initializer(t.name, values[t.name])
    opts.add_session_config_entry("session.disable_prepacking", "1")  # a packed copy of each weight
    with tempfile.TemporaryDirectory(prefix="onnx-sap-session-") as folder:
        (Path(folder) / "stand-in.data").touch()
        onnx.save_model(lean, str(Path(folder) / "model.onnx"))
        sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), sess_options=opts, providers=providers)
    sess._onnx_sap_initializers = values  # the session reads them for as long as it lives
    return sess


def cuda_device_count() -> int:
    """Number of CUDA devices the library's static CUDA runtime sees (0 without CUDA kernels or GPU)."""
    if not has_cuda_kernels():
        return 0
    lib = _library()
    lib.onnx_sap_cuda_device_count.restype = ctypes.c_int
    return int(lib.onnx_sap_cuda_device_count())


_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def run_cuda_kernel(
    x: np.ndarray,
    *,
    key: int,
    call: int = 0,
    ratio: float = 1.0,
    samples: int = 0,
    mode: str = "multinomial",
    axis: int = 1,
) -> np.ndarray:
    """Run the CUDA kernel on host data through the library's C entry point (no onnxruntime-gpu needed).

    ``key`` is the 64-bit Philox key (``reference.derive_key(seed, stream)``) and ``call`` the call index.
    """
    if cuda_device_count() == 0:
        raise OnnxSapError("no CUDA device (or no CUDA kernels in the library)")
    x = np.ascontiguousarray(x)
    if x.dtype not in _DTYPE_CODES:
        raise OnnxSapError(f"dtype {x.dtype} is not supported; use float32, float16 or float64")
    examples = int(np.prod(x.shape[:axis], dtype=np.int64))
    m = int(np.prod(x.shape[axis:], dtype=np.int64))
    y = np.empty_like(x)
    lib = _library()
    fn = lib.onnx_sap_cuda_run
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_double, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32]
    rc = fn(x.ctypes.data, y.ctypes.data, _DTYPE_CODES[x.dtype], examples, m, 1 if mode == "bernoulli" else 0,
            float(np.float32(ratio)), samples, key & ((1 << 64) - 1), call & 0xFFFFFFFF)
    if rc != 0:
        lib.onnx_sap_cuda_last_error.restype = ctypes.c_char_p
        raise OnnxSapError(f"CUDA kernel failed: {lib.onnx_sap_cuda_last_error().decode()}")
    return y
