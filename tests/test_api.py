"""The Python API as a user meets it: options classes own validation, exports are discoverable."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from models import cnn

import onnx_sap
from onnx_sap import BenchOptions, HardenOptions, OptionError, VerifyOptions
from onnx_sap.bench import bench
from onnx_sap.verify import verify


@pytest.mark.parametrize("options, parameter", [
    (VerifyOptions(runs=0), "runs"), (VerifyOptions(provider="tpu"), "provider"), (VerifyOptions(seed=-1), "seed"),
    (BenchOptions(rounds=0), "rounds"), (BenchOptions(batches=()), "batches"), (BenchOptions(batches=(1, 0)), "batches"),
    (BenchOptions(threads=0), "threads"), (BenchOptions(warmup=-1), "warmup"),
    (BenchOptions(harden=HardenOptions(mode="x")), "mode"),
])
def test_options_name_the_python_parameter(options, parameter):
    with pytest.raises(OptionError, match=f"^{parameter} must") as caught:
        options.validate()
    assert caught.value.name == parameter


def test_functions_validate_what_the_cli_would_refuse():
    hardened = onnx_sap.harden(cnn(), check=False).model
    with pytest.raises(OptionError, match="^runs must"):
        verify(hardened, runs=0)
    with pytest.raises(OptionError, match="^rounds must"):
        bench(cnn(), rounds=0)


def test_lazy_exports_are_listed_and_resolve():
    listed = dir(onnx_sap)
    for name in onnx_sap.__all__:
        assert name in listed and getattr(onnx_sap, name) is not None
    assert {"harden", "strip", "inspect", "VerifyOptions", "register_library"} <= set(listed)


def test_importing_the_package_does_not_load_the_rewriter():
    code = "import sys, onnx_sap; print('onnx_graphsurgeon' in sys.modules, 'onnx_sap.rewrite' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_strip_result_names_its_fields():
    report = onnx_sap.harden(cnn(), check=False)
    result = onnx_sap.strip(report.model)
    assert result.regions_removed == len(report.plan.selected) and result.output is None
    model, removed, output = result  # still unpacks
    assert model is result.model and removed == result.regions_removed


def test_register_library_in_own_session_options():
    hardened = onnx_sap.harden(cnn(), check=False).model.SerializeToString()
    with pytest.raises(Exception, match="not a registered function/op"):
        ort.InferenceSession(hardened, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    assert onnx_sap.register_library(so) is so
    sess = ort.InferenceSession(hardened, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape[0] == 2
