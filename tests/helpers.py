"""Small builders shared by the tests: single-node SAP models and the op-vs-reference comparison."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_sap.reference import ATTRIBUTE_DEFAULTS, compare_with_reference

_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.float64): TensorProto.DOUBLE}


def sap_model(dtype=np.float32, rank: int | None = None, name: str = "sap_node", **attrs) -> onnx.ModelProto:
    """A model with one StochasticActivationPruning node from input x to output y."""
    t = _ONNX_TYPES[np.dtype(dtype)]
    shape = None if rank is None else [f"d{i}" for i in range(rank)]
    node = helper.make_node("StochasticActivationPruning", ["x"], ["y"], domain="onnx_sap", name=name, **attrs)
    graph = helper.make_graph([node], "sap", [helper.make_tensor_value_info("x", t, shape)],
                              [helper.make_tensor_value_info("y", t, shape)])
    # IR 9: what ONNX Runtime releases from 1.16 on accept (the newest onnx writes a newer IR by default).
    return helper.make_model(graph, ir_version=9,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnx_sap", 1)])


def assert_matches_reference(y: np.ndarray, x: np.ndarray, *, call: int, **attrs) -> None:
    """Check an op output against the reference per SPEC.md (the comparison verify uses): masks equal
    outside the 1e-5 margin band, kept values within 4 ulps of the output type, pass-through exact."""
    full = {**ATTRIBUTE_DEFAULTS, **attrs}
    assert y.shape == x.shape and y.dtype == x.dtype
    disagreements, ulps = compare_with_reference(x, y, full, call)
    assert disagreements == 0, f"{disagreements} mask disagreements outside the band (of {y.size})"
    assert ulps <= 4, f"kept values differ by up to {ulps:.1f} ulp"
