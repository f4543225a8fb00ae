"""The built op library: what it exports and what it needs at load time."""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import sap_model

from onnx_sap import get_library_path, has_cuda_kernels, make_session
from onnx_sap.runtime import LIBRARY_NAME

needs_readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")


def _readelf(*args: str) -> str:
    return subprocess.run(["readelf", *args, get_library_path()], capture_output=True, text=True, check=True).stdout


@needs_readelf
def test_exports_only_the_registration_and_c_entry_points():
    exported = set()
    for line in _readelf("--dyn-syms", "-W").splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[4] == "GLOBAL" and parts[6] != "UND" and parts[3] == "FUNC":
            exported.add(parts[7])
    expected = {"RegisterCustomOps", "onnx_sap_has_cuda", "onnx_sap_cpu_isa_available", "onnx_sap_cpu_isa_name",
                "onnx_sap_cpu_isa_last", "onnx_sap_cpu_in_place_last"}
    if has_cuda_kernels():
        expected |= {"onnx_sap_cuda_run", "onnx_sap_cuda_last_error", "onnx_sap_cuda_device_count"}
    assert exported == expected


@needs_readelf
def test_needs_no_cuda_library_at_load_time():
    # Static cudart: a CUDA build loads on machines without CUDA, like a CPU build.
    needed = [line.split("[")[1].rstrip("]") for line in _readelf("-d").splitlines() if "(NEEDED)" in line]
    assert not any("cuda" in n or "cublas" in n for n in needed), needed
    assert set(needed) <= {"libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2",
                           "libdl.so.2", "libpthread.so.0", "librt.so.1"}


# ---------------------------------------------------------------------------------------------
# RegisterCustomOps against runtimes of other C API versions, simulated by handing it an OrtApiBase
# whose GetApi refuses versions above `newest`, as an older onnxruntime does.

# Slots of OrtApi (fixed by ONNX Runtime's ABI: functions are only ever appended).
_CREATE_STATUS, _GET_ERROR_MESSAGE, _CREATE_ENV, _CREATE_SESSION_FROM_ARRAY, _CREATE_SESSION_OPTIONS = 0, 2, 3, 8, 10
_RELEASE_ENV, _RELEASE_STATUS, _RELEASE_SESSION, _RELEASE_SESSION_OPTIONS = 92, 93, 95, 100


class _ApiBase(ctypes.Structure):
    _fields_ = [("GetApi", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)),
                ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_void_p))]


def _runtime_api_base():
    import onnxruntime

    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not found:  # before 1.19 or so, the C API sat inside the Python extension, not exported
        pytest.skip("this onnxruntime ships no libonnxruntime.so to take the C API from")
    lib = ctypes.CDLL(str(found[0]))
    lib.OrtGetApiBase.restype = ctypes.POINTER(_ApiBase)
    return lib.OrtGetApiBase().contents


def _fn(api: int, slot: int, restype, *argtypes):
    address = ctypes.cast(api, ctypes.POINTER(ctypes.c_void_p))[slot]
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def _older_runtime(newest: int, version_string: bytes):
    real = _runtime_api_base()
    get_api = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)(lambda v: real.GetApi(v) if v <= newest else None)
    text = ctypes.create_string_buffer(version_string)
    version = ctypes.CFUNCTYPE(ctypes.c_void_p)(lambda: ctypes.addressof(text))
    base = _ApiBase(get_api, version)
    base.keep = text
    return base, real.GetApi(1)


def _register(base, options=None):
    lib = ctypes.CDLL(get_library_path())
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ApiBase)]
    return lib.RegisterCustomOps(options, ctypes.byref(base))


def _message(api: int, status: int) -> str:
    text = _fn(api, _GET_ERROR_MESSAGE, ctypes.c_char_p, ctypes.c_void_p)(status).decode()
    _fn(api, _RELEASE_STATUS, None, ctypes.c_void_p)(status)
    return text


def test_registration_fails_loudly_on_a_runtime_older_than_needed():
    base, api = _older_runtime(16, b"1.16.3")
    status = _register(base)
    assert status, "registration reported success on a runtime it cannot use"
    text = _message(api, status)
    assert "1.16.3" in text and "onnxruntime 1.17 or newer" in text, text


@pytest.mark.parametrize("newest, version", [(20, b"1.20.1"), (17, b"1.17.3")])
def test_registration_uses_the_runtimes_version_when_older_than_the_headers(newest, version):
    # A runtime one version behind the headers (onnxruntime 1.20 with 1.21 headers) used to get
    # nothing registered, silently; sessions then failed with "not a registered function/op". 1.17,
    # the oldest supported, knows the output shape function but not the in-place fields (C API 18).
    base, api = _older_runtime(newest, version)
    options, env, session = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    assert not _fn(api, _CREATE_SESSION_OPTIONS, ctypes.c_void_p, ctypes.c_void_p)(ctypes.byref(options))
    assert not _fn(api, _CREATE_ENV, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
        3, b"test", ctypes.byref(env))
    try:
        status = _register(base, options)
        assert not status, _message(api, status)
        model = sap_model(seed=1).SerializeToString()
        status = _fn(api, _CREATE_SESSION_FROM_ARRAY, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                     ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)(env, model, len(model), options,
                                                                         ctypes.byref(session))
        assert not status, _message(api, status)
    finally:
        if session:
            _fn(api, _RELEASE_SESSION, None, ctypes.c_void_p)(session)
        _fn(api, _RELEASE_SESSION_OPTIONS, None, ctypes.c_void_p)(options)
        _fn(api, _RELEASE_ENV, None, ctypes.c_void_p)(env)


def test_the_loaded_library_is_get_library_path():
    # The sanitizer jobs force their build with ONNX_SAP_LIBRARY: make sure it is the one that ran.
    # One intra-op thread: under TSan, ONNX Runtime's pool hand-offs (not instrumented) would look racy.
    make_session(sap_model(seed=1), threads=1).run(None, {"x": np.ones((1, 4), np.float32)})
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if LIBRARY_NAME in line}
    expected = os.environ.get("ONNX_SAP_LIBRARY") or get_library_path()
    assert loaded == {str(Path(expected).resolve())}


def test_stays_loaded_until_exit():
    # ONNX Runtime dlclose()s the library with its last SessionOptions; queued thread_local destructors
    # would then run at exit from unmapped code (a crash at exit, seen with the zig-built wheel).
    flags = next(line for line in _readelf("-d").splitlines() if "FLAGS_1" in line)
    assert "NODELETE" in flags
