"""Small builders shared by the tests: single-node SAP models and the op-vs-reference comparison."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_sap import reference

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
    """Check an op output against the reference per SPEC.md: masks equal outside the 1e-5 margin
    band, kept values within 4 ulps of the output type."""
    ref = reference.sap(x, call=call, return_details=True, **attrs)
    assert y.shape == ref.y.shape and y.dtype == ref.y.dtype
    passthrough = _passthrough_examples(x, attrs.get("axis", 1))
    kept = y != 0
    decided = (ref.margin > 1e-5) & ~passthrough
    bad = decided & (kept != ref.keep)
    assert not bad.any(), f"{int(bad.sum())} mask disagreements outside the band (of {y.size})"
    both = kept & ref.keep
    ulp = np.spacing(np.abs(ref.y[both]).astype(y.dtype)).astype(np.float64)
    err = np.abs(y[both].astype(np.float64) - ref.y[both].astype(np.float64))
    assert np.all(err <= 4 * ulp), f"kept values differ by up to {np.max(err / ulp):.1f} ulp"
    np.testing.assert_array_equal(y[passthrough], x[passthrough])


def _passthrough_examples(x: np.ndarray, axis: int) -> np.ndarray:
    """Elements of examples whose |x| sum is 0 or not finite (the op copies them)."""
    flat = np.abs(x.astype(np.float64)).reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    with np.errstate(invalid="ignore", over="ignore"):
        s = flat.sum(axis=1)
    bad = (s == 0) | ~np.isfinite(s)
    return np.broadcast_to(bad[:, None], flat.shape).reshape(x.shape)
