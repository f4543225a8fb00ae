"""The portable form's arithmetic: the keep probability in float32 against the float64 formula."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from onnx_sap.portable import CELL_DRAWS, keep_gain


def gain_model(dtype) -> onnx.ModelProto:
    """A graph computing keep_gain (1/q) from p and r/2, element by element."""
    nodes = []
    p, half_r = gs.Variable("p", dtype=dtype, shape=["n"]), gs.Variable("half_r", dtype=dtype, shape=["n"])

    def const(tag, value, dtype=dtype):
        return gs.Constant(tag, np.asarray(value, dtype=dtype))

    def op(op_type, role, inputs, attrs=None):
        out = gs.Variable(role)
        nodes.append(gs.Node(op_type, name=role, inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    g = keep_gain(op, const, p, half_r, dtype)
    g.dtype = dtype
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[p, half_r], outputs=[g], opset=17))
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keep_probability_matches_float64_formula(dtype):
    # p over [1e-12, 1] (with 1 - p rounding to 1, values just below 1, and 1 itself), r over [1, 1e7].
    ps = np.concatenate([np.logspace(-12, 0, 2000), 1 - np.logspace(-7, -1, 200), [1.0, 2.0**-25, 2.0**-24]])
    rs = np.unique(np.round(np.logspace(0, 7, 300)))
    p, r = (v.ravel() for v in np.meshgrid(ps.astype(dtype), rs))
    sess = ort.InferenceSession(gain_model(dtype).SerializeToString(), providers=["CPUExecutionProvider"])
    q = 1.0 / sess.run(None, {"p": p, "half_r": (r / 2).astype(dtype)})[0].astype(np.float64)
    with np.errstate(divide="ignore"):  # log1p(-1) = -Inf: q = 1
        expected = -np.expm1(r * np.log1p(-p.astype(np.float64)))  # p as the graph sees it
    rel = np.abs(q - expected) / expected
    assert rel.max() <= 1e-5, f"worst at p={p[rel.argmax()]}, r={r[rel.argmax()]}: {rel.max():.2e}"


def test_keep_probability_of_zero_is_finite_gain():
    sess = ort.InferenceSession(gain_model(np.float32).SerializeToString(), providers=["CPUExecutionProvider"])
    g = sess.run(None, {"p": np.zeros(3, np.float32), "half_r": np.array([0.5, 50, 5e6], np.float32)})[0]
    assert np.all(np.isfinite(g)) and np.all(g > 1e30)  # 0 * g = 0 for elements never kept


def relu_model(opset: int, dtype=np.float32, width: int = 12) -> onnx.ModelProto:
    """x[N, width] -> Relu -> y: the portable form's input is x itself."""
    t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu",
                                   [onnx.helper.make_tensor_value_info("x", t, ["N", width])],
                                   [onnx.helper.make_tensor_value_info("y", t, ["N", width])])
    return onnx.helper.make_model(graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", opset)])


# Opsets 17 and 18 (the portable form reads them alike); float16 works in float32.
@pytest.mark.parametrize("opset,dtype", [(17, np.float32), (18, np.float32), (18, np.float16), (18, np.float64)])
@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_portable_keeps_each_element_with_probability_q(opset, dtype, mode):
    from onnx_sap import harden

    x = np.array([[3.0, 0.0, 0.5, 1.0, 0.01, 2.0, 0.0, 0.2, 4.0, 0.05, 1.5, 0.7],
                  [0.0] * 12, [1.0] * 11 + [np.inf]], dtype=dtype)  # an all-zero and a non-finite example
    r = 3
    h = harden(relu_model(opset, dtype), portable=True, mode=mode, samples=r).model
    sess = ort.InferenceSession(h.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = 4000
    ys = np.stack([sess.run(None, {"x": x})[0] for _ in range(runs)]).astype(np.float64)
    assert np.array_equal(ys[:, 1:], np.broadcast_to(x[1:], ys[:, 1:].shape))  # passed through unchanged
    a = x[0].astype(np.float64)
    q = -np.expm1(r * np.log1p(-a / a.sum()))
    kept = (ys[:, 0] != 0).mean(axis=0)
    assert np.all(np.abs(kept - q) <= 5 * np.sqrt(q * (1 - q) / runs) + 1e-9)
    assert np.all(kept[a == 0] == 0)
    nonzero = ys[:, 0][:, a > 0]
    survived = nonzero != 0  # scaled by 1/q
    np.testing.assert_allclose(nonzero[survived], np.broadcast_to(a[a > 0] / q[a > 0], nonzero.shape)[survived],
                               rtol=2e-3 if dtype == np.float16 else 1e-5)
    if mode == "multinomial":
        assert (ys[:, 0] != 0).sum(axis=1).max() <= r


def tapped(model: onnx.ModelProto, roles: dict[str, int]) -> onnx.ModelProto:
    """model with the outputs of its portable nodes of these roles (role -> element type) as graph outputs."""
    from onnx_sap.sap_nodes import parse_name

    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_role = {parse_name(n.name).role: n for n in out.graph.node if parse_name(n.name) is not None}
    for role, elem in roles.items():
        out.graph.output.append(onnx.helper.make_tensor_value_info(by_role[role].output[0], elem, None))
    return out


@pytest.mark.parametrize("opset", [17, 18])
def test_portable_multinomial_keeps_exactly_the_elements_its_draws_land_on(opset):
    """Element j is kept iff some draw T lands on it (j = the smallest index with C_j > T, as
    np.searchsorted finds it), on rows made to strain the search: long runs of zeros (a dead
    channel), one element holding nearly all the mass among many tiny ones, ReLU-like and even rows.
    However the mass lies, the draws are spread evenly over [0, S), so the search needs few rounds."""
    from onnx_sap import harden

    width, rng = 4096, np.random.default_rng(5)
    dead = np.abs(rng.standard_normal(width))
    dead[100:3100] = 0.0
    dominant = np.full(width, 1e-6)
    dominant[2000] = 1e6
    relu = np.maximum(rng.standard_normal(width), 0)
    x = np.stack([dead, dominant, relu, np.ones(width)]).astype(np.float32)
    h = harden(relu_model(opset, np.float32, width), portable=True, mode="multinomial").model  # r = m
    T = onnx.TensorProto
    sess = ort.InferenceSession(tapped(h, {"prefix": T.DOUBLE, "targets": T.DOUBLE, "kept": T.FLOAT,
                                           "rounds": T.INT64}).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for _ in range(5):
        _, c, t, kept, rounds = sess.run(None, {"x": x})
        assert t.shape == (len(x), width) and np.all(np.diff(t, axis=1) >= 0)  # r = m sorted draws per example
        for row in range(len(x)):
            lands = np.searchsorted(c[row], t[row], side="right")
            expected = np.zeros(width)
            expected[lands[lands < width]] = 1
            np.testing.assert_array_equal(kept[row], expected)
        assert rounds <= np.log2(4 * CELL_DRAWS)
