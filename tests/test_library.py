"""The built op library: what it exports and what it needs at load time."""

import shutil
import subprocess

import pytest

from onnx_sap import get_library_path, has_cuda_kernels

pytestmark = pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")


def _readelf(*args: str) -> str:
    return subprocess.run(["readelf", *args, get_library_path()], capture_output=True, text=True, check=True).stdout


def test_exports_only_the_registration_and_c_entry_points():
    exported = set()
    for line in _readelf("--dyn-syms", "-W").splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[4] == "GLOBAL" and parts[6] != "UND" and parts[3] == "FUNC":
            exported.add(parts[7])
    expected = {"RegisterCustomOps", "onnx_sap_has_cuda"}
    if has_cuda_kernels():
        expected |= {"onnx_sap_cuda_run", "onnx_sap_cuda_last_error", "onnx_sap_cuda_device_count"}
    assert exported == expected


def test_needs_no_cuda_library_at_load_time():
    # Static cudart: a CUDA build loads on machines without CUDA, like a CPU build.
    needed = [line.split("[")[1].rstrip("]") for line in _readelf("-d").splitlines() if "(NEEDED)" in line]
    assert not any("cuda" in n or "cublas" in n for n in needed), needed
    assert set(needed) <= {"libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2",
                           "libdl.so.2", "libpthread.so.0", "librt.so.1"}
