"""SAP as standard ONNX operators (SPEC.md, "Portable form"): runs on any ONNX runtime, no op library.

The arithmetic is done in float64 (1 - p rounds away small p in float32). Such a graph cannot
reproduce the Philox stream; it is checked statistically. Every node is named
``<prefix>#<role>`` (sap_nodes.py owns the scheme) so that `strip` and `inspect` find the region,
and the node holding r is ``<prefix>#r`` so that the post-rewrite check can make it huge.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .reference import sample_count
from .sap_nodes import node_name

DOUBLE = onnx.TensorProto.DOUBLE


def emit_portable_sap(x: gs.Variable, y: gs.Variable, stream: int, options, opset: int, prefix: str,
                      fresh: Callable[[str], str]) -> list[gs.Node]:
    """Nodes computing y = SAP(x) with standard operators (opset >= 13), in topological order."""
    nodes: list[gs.Node] = []

    def var(tag: str) -> gs.Variable:
        return gs.Variable(fresh(f"{y.name}__sap_{tag}"))

    def const(tag: str, value, dtype=np.float64) -> gs.Constant:
        return gs.Constant(fresh(f"{y.name}__sap_{tag}"), np.asarray(value, dtype=dtype))

    def op(op_type: str, role: str, inputs: list, attrs: dict | None = None, out: gs.Variable | None = None):
        o = out if out is not None else var(role)
        nodes.append(gs.Node(op_type, name=node_name(prefix, role), inputs=inputs, outputs=[o], attrs=attrs or {}))
        return o

    axis = int(options.axis)
    xd = op("Cast", "x64", [x], {"to": DOUBLE})
    a = op("Abs", "abs", [xd])
    shape = op("Shape", "shape", [xd])
    axes = op("Range", "axes", [const("axis", axis, np.int64), op("Size", "rank", [shape]), const("one", 1, np.int64)])
    s = op("ReduceSum", "sum", [a, axes], {"keepdims": 1})  # per example, broadcastable against a
    valid = op("And", "valid", [op("Greater", "positive", [s, const("zero_f", 0.0)]),
                                op("Less", "finite", [s, const("inf", np.inf)])])
    p = op("Div", "p", [a, s])
    if options.mode == "multinomial" or options.samples > 0:
        m = 0 if options.samples else _static_m(x, axis)
        r = op("Constant", "r", [], {"value": gs.Constant("r", np.array(float(sample_count(m, options.ratio,
                                                                                             options.samples))))})
    else:
        m = op("Cast", "m", [op("Div", "m_i64", [op("Size", "n_all", [xd]), op("Size", "n_rows", [s])])],
               {"to": DOUBLE})
        r_dyn = op("Max", "r_dyn", [op("Floor", "r_floor", [op("Mul", "r_mul", [
            m, const("ratio", float(np.float32(options.ratio)))])]), const("one_f", 1.0)])
        # The post-rewrite check sets the "#r" node to a huge value; here it is a factor of 1.
        r = op("Mul", "r_total", [r_dyn, op("Constant", "r", [], {"value": gs.Constant("r", np.array(1.0))})])
    # q = 1 - (1 - p)^r = 1 - exp(r * log(1 - p)), in float64
    q = op("Sub", "q", [const("one_q", 1.0), op("Exp", "exp", [op("Mul", "rlog", [
        r, op("Log", "log", [op("Sub", "one_minus_p", [const("one_p", 1.0), p])])])])])
    if options.mode == "bernoulli":
        attrs = {"dtype": DOUBLE}
        if options.seed:
            attrs["seed"] = float(options.seed + stream)
        keep = op("Less", "keep", [op("RandomUniformLike", "u", [a], attrs), q])
    else:
        keep = _multinomial_keep(op, const, a, s, shape, axis, sample_count(m, options.ratio, options.samples),
                                 options, stream)
    scaled = op("Where", "scaled", [keep, op("Div", "x_over_q", [xd, q]), const("zero_y", 0.0)])
    out64 = op("Where", "passthrough", [valid, scaled, xd])
    op("Cast", "out", [out64], {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(y.dtype))
                                 if y.dtype is not None else onnx.TensorProto.FLOAT}, out=y)
    return nodes


def _static_m(x: gs.Variable, axis: int) -> int:
    return int(np.prod([int(d) for d in x.shape[axis:]], dtype=np.int64))


def _multinomial_keep(op, const, a, s, shape, axis, r, options, stream) -> gs.Variable:
    """keep mask from r draws with replacement: Multinomial over log p per example, then a scatter."""
    rows = op("Flatten", "rows", [a], {"axis": axis})  # [examples, m]
    s2 = op("Reshape", "sum_rows", [s, const("col", [-1, 1], np.int64)])
    ok = op("And", "row_ok", [op("Greater", "row_pos", [s2, const("zero_r", 0.0)]),
                              op("Less", "row_fin", [s2, const("inf_r", np.inf)])])
    safe = op("Where", "safe_sum", [ok, s2, const("one_s", 1.0)])
    logp = op("Cast", "logp", [op("Log", "log_p", [op("Div", "p_rows", [rows, safe])])],
              {"to": onnx.TensorProto.FLOAT})
    attrs = {"sample_size": int(r), "dtype": onnx.TensorProto.INT64}
    if options.seed:
        attrs["seed"] = float(options.seed + stream)
    idx = op("Multinomial", "draws", [logp], attrs)
    zeros = op("ConstantOfShape", "zeros", [op("Shape", "rows_shape", [rows])],
               {"value": gs.Constant("zero_d", np.array([0.0]))})
    ones = op("ConstantOfShape", "ones", [op("Shape", "draws_shape", [idx])],
              {"value": gs.Constant("one_d", np.array([1.0]))})
    hits = op("ScatterElements", "hits", [zeros, idx, ones], {"axis": 1})
    return op("Reshape", "keep", [op("Greater", "kept", [hits, const("half", 0.5)]), shape])
