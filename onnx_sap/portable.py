"""SAP as standard ONNX operators (SPEC.md, "Portable form"): runs on any ONNX runtime, no op library.

Arithmetic is float32 for float32/float16 data (float64 for float64 data), arranged so that the keep
probability q = -expm1(r * log1p(-p)) stays within 1e-5 of the float64 formula without log1p or
expm1 ops (see keep_gain). Sums and, in multinomial mode, prefix sums are float64. Random numbers
come from RandomUniformLike (a SplitMix64 hash in integer ops was tried from opset 18 and was slower
in ONNX Runtime on an idle machine: README, Performance). Multinomial draws are r uniforms, each
placed by a branchless binary search over the prefix sums (the inverse-CDF sampler of SPEC.md
without the sorting), not ONNX Runtime's Multinomial, which is serial and was most of the time.

Such a graph cannot reproduce the Philox stream; it is checked statistically. Every node is named
``<prefix>#<role>`` (sap_nodes.py owns the scheme) so that `strip` and `inspect` find the region,
and the node holding r is ``<prefix>#r`` so that the post-rewrite check can make it huge.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .reference import sample_count
from .sap_nodes import node_name

DOUBLE = onnx.TensorProto.DOUBLE
FLOAT = onnx.TensorProto.FLOAT

# What harden --portable warns about. Measured (README, "--portable"): ONNX Runtime seeds each random
# op without a seed attribute from one process-wide value, so a new session (or a new page in the
# browser) restarts the same stream; seed attributes only fix it further. No standard op reads
# anything that changes between sessions, so the graph itself cannot avoid it.
RANDOMNESS_WARNING = ("--portable: runtimes seed random ops once per process, so every session of this model in "
                      "one process (or one web page) repeats the same SAP stream, and an attacker who can open "
                      "sessions can replay it; keep one session per process, reseed the runtime before each "
                      "session (Python: onnxruntime.set_seed), or use the custom op")


def emit_portable_sap(x: gs.Variable, y: gs.Variable, stream: int, options, prefix: str,
                      fresh: Callable[[str], str]) -> list[gs.Node]:
    """Nodes computing y = SAP(x) with standard operators (opset >= 13), in topological order."""
    nodes: list[gs.Node] = []
    in_type = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    work = np.float64 if in_type == np.float64 else np.float32

    def const(tag: str, value, dtype=work) -> gs.Constant:
        return gs.Constant(fresh(f"{y.name}__sap_{tag}"), np.asarray(value, dtype=dtype))

    def op(op_type: str, role: str, inputs: list, attrs: dict | None = None, out: gs.Variable | None = None):
        o = out if out is not None else gs.Variable(fresh(f"{y.name}__sap_{role}"))
        nodes.append(gs.Node(op_type, name=node_name(prefix, role), inputs=inputs, outputs=[o], attrs=attrs or {}))
        return o

    axis = int(options.axis)
    # verify finds the region's input as the input of the "in" node, or of "abs" when no cast is needed.
    xw = op("Cast", "in", [x], {"to": _tensor_type(work)}) if x.dtype is None or in_type != work else x
    a = op("Abs", "abs", [xw])
    shape = op("Shape", "shape", [xw])
    axes = op("Range", "axes", [const("axis", axis, np.int64), op("Size", "rank", [shape]), const("one", 1, np.int64)])
    a64 = a if work == np.float64 else op("Cast", "abs64", [a], {"to": DOUBLE})
    s = op("ReduceSum", "sum", [a64, axes], {"keepdims": 1})  # float64 per example, broadcastable against a
    valid = op("And", "valid", [op("Greater", "positive", [s, const("zero_s", 0.0, np.float64)]),
                                op("Less", "finite", [s, const("inf", np.inf, np.float64)])])
    s_safe = op("Where", "safe_sum", [valid, s, const("one_s", 1.0, np.float64)])
    static_m = _static_m(x, axis)
    if options.mode == "multinomial" or options.samples > 0:
        m = 0 if options.samples else static_m
        r = op("Constant", "r", [], {"value": gs.Constant("r", np.array(float(sample_count(m, options.ratio,
                                                                                             options.samples))))})
    else:
        m_dyn = op("Cast", "m", [op("Div", "m_i64", [op("Size", "n_all", [xw]), op("Size", "n_rows", [s])])],
                   {"to": DOUBLE})
        r_dyn = op("Max", "r_dyn", [op("Floor", "r_floor", [op("Mul", "r_mul", [
            m_dyn, const("ratio", float(np.float32(options.ratio)), np.float64)])]), const("one_f", 1.0, np.float64)])
        # The post-rewrite check sets the "#r" node to a huge value; here it is a factor of 1.
        r = op("Mul", "r_total", [r_dyn, op("Constant", "r", [], {"value": gs.Constant("r", np.array(1.0))})])
    # Per-example factors, small tensors: 1/S and r/2 in the working type.
    inv_s = op("Cast", "inv_sum", [op("Div", "inv_sum64", [const("one_i", 1.0, np.float64), s_safe])],
               {"to": _tensor_type(work)})
    half_r = op("Cast", "half_r", [op("Mul", "half_r64", [r, const("half64", 0.5, np.float64)])],
                {"to": _tensor_type(work)})
    g = keep_gain(op, const, op("Mul", "p", [a, inv_s]), half_r, work)
    sub_shape = [int(d) for d in x.shape[axis:]] if static_m is not None else None
    if options.mode == "bernoulli":
        words = _uniform_words(op, const, a, s, sub_shape, shape, axis, options, stream, work)
        # u < q with u = words / 2^64, as words * (1/q) < 2^64; the bound is one ulp above 2^64 so that
        # q = 1 always keeps (words may round up to 2^64): the check relies on it.
        keep = op("Cast", "keep", [op("Less", "kept", [op("Mul", "u_over_q", [words, g]), const(
            "two64", np.nextafter(work(2.0**64), work(np.inf)))])], {"to": _tensor_type(work)})
    else:
        keep = _multinomial_keep(op, const, a64, shape, axis, static_m,
                                 sample_count(static_m, options.ratio, options.samples), options, stream, work)
    # Products, not Where (which ONNX Runtime runs 50-100 times slower than Mul): 1/q is finite
    # (keep_gain), so dropped elements are exactly 0.
    sap = op("Mul", "x_over_q", [xw, op("Mul", "scale", [g, keep])])
    # Examples whose sum is 0 or not finite pass through unchanged; checked once, so that the common
    # case costs no per-element select.
    all_valid = op("Greater", "all_valid", [op("ReduceMin", "min_valid", [
        op("Cast", "valid_f", [valid], {"to": FLOAT})], {"keepdims": 0}), const("half_v", 0.5, np.float32)])
    then_out = gs.Variable(fresh(f"{y.name}__sap_then"), dtype=work)
    else_out = gs.Variable(fresh(f"{y.name}__sap_else"), dtype=work)
    branches = {"then_branch": gs.Graph(nodes=[gs.Node("Identity", inputs=[sap], outputs=[then_out])],
                                        outputs=[then_out], name=fresh(f"{y.name}__sap_all_valid")),
                "else_branch": gs.Graph(nodes=[gs.Node("Where", inputs=[valid, sap, xw], outputs=[else_out])],
                                        outputs=[else_out], name=fresh(f"{y.name}__sap_passthrough"))}
    if xw is x:
        op("If", "out", [all_valid], branches, out=y)
    else:
        op("Cast", "out", [op("If", "passthrough", [all_valid], branches)], {"to": _tensor_type(in_type)}, out=y)
    return nodes


def keep_gain(op, const, p: gs.Variable, half_r: gs.Variable, work) -> gs.Variable:
    """1/q with q = 1 - (1 - p)^r = -expm1(r * log1p(-p)), in the working type without cancellation.

    log1p(-p): u = 1 - p rounds by e = p - (1 - u) (both differences exact in binary floating
    point), and log1p(-p) = log(u) - e to within e*p + e^2, far below 1e-5 of |log1p(-p)| >= p.
    expm1: with h = -r/2 * log1p(-p) >= 0 and t = tanh(h), q = 2t / (1 + t), so 1/q = (1 + 1/t) / 2;
    tanh is accurate relative to its value near 0, where 1 - exp(-2h) would cancel. p = 1 gives
    log(0) = -Inf, t = 1 and q = 1; p = 0 gives a huge 1/q (such elements are never kept).
    """
    u = op("Sub", "one_minus_p", [const("one_p", 1.0), p])
    e = op("Sub", "rounding", [p, op("Sub", "one_minus_u", [const("one_u", 1.0), u])])
    neg_log1p = op("Sub", "neg_log1p", [e, op("Log", "log", [u])])
    t = op("Tanh", "tanh", [op("Mul", "h", [neg_log1p, half_r])])
    # t >= the smallest normal keeps 1/q finite where p = 0 (or underflows), so 0 * (1/q) = 0.
    t = op("Max", "tanh_floor", [t, const("tiny", np.finfo(work).tiny)])
    return op("Add", "gain", [op("Div", "half_over_t", [const("half", 0.5), t]), const("half_g", 0.5)])


def _tensor_type(dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _static_m(x: gs.Variable, axis: int) -> int | None:
    if x.shape is None or len(x.shape) <= axis or not all(isinstance(d, int) and d >= 0 for d in x.shape[axis:]):
        return None
    return int(np.prod([int(d) for d in x.shape[axis:]], dtype=np.int64))


def _uniform_words(op, const, full: gs.Variable | None, per_example: gs.Variable, sub_shape: list[int] | None,
                   shape: gs.Variable, axis: int, options, stream: int, dtype, tag: str = "") -> gs.Variable:
    """Uniform values on [0, 2^64) of type dtype, shaped [examples..., *sub_shape] like `full` when
    given (sub_shape None: x's dims from axis on, read at run time), from RandomUniformLike."""
    attrs = {"high": 2.0**64}
    if options.seed:
        attrs["seed"] = float(options.seed + stream)
    role = "draws" if tag else "u"  # verify tells the modes apart by these roles
    if full is None:
        if sub_shape is not None:
            dims = const(f"dims{tag}", sub_shape, np.int64)
        else:
            dims = op("Slice", f"dims{tag}", [shape, const(f"from{tag}", [axis], np.int64),
                                              const(f"to{tag}", [2**62], np.int64)])
        full = op("Expand", f"like{tag}", [per_example, dims])
    return op("RandomUniformLike", role, [full], {**attrs, "dtype": _tensor_type(dtype)})


def _multinomial_keep(op, const, a64: gs.Variable, shape: gs.Variable, axis: int, m: int, r: int, options,
                      stream: int, work) -> gs.Variable:
    """keep mask (0 or 1, of type work) from r draws with replacement: draw k lands on the smallest j
    with C_j > T_k, where C is the float64 prefix sum of a and T_k = u_k * C_{m-1}; a branchless
    binary search over C padded with +Inf to 2^levels entries finds it in `levels` rounds of gather
    and compare."""
    levels = max(1, math.ceil(math.log2(m + 1)))
    index_type = np.int32 if levels < 31 else np.int64
    c = op("CumSum", "prefix", [op("Flatten", "rows", [a64], {"axis": axis}), const("col_axis", 1, np.int32)])
    total = op("Slice", "total", [c, const("last", [m - 1], np.int64), const("end", [m], np.int64),
                                  const("cols", [1], np.int64)])  # [examples, 1]
    padded = op("Pad", "padded", [c, const("pads", [0, 0, 0, 2**levels - m], np.int64),
                                  const("pad_inf", np.inf, np.float64)])
    words = _uniform_words(op, const, None, total, [r], shape, 1, options, stream, np.float64, tag="_d")
    targets = op("Mul", "targets", [words, op("Mul", "t_scale", [total, const("two_m64", 2.0**-64, np.float64)])])
    # below = index of the last C_j <= T (-1: none), narrowed one bit per round; arithmetic rather
    # than Where, which ONNX Runtime runs 50-100 times slower.
    below = op("Expand", "below", [const("minus_one", -1, index_type), op("Shape", "draws_shape", [targets])])
    for level in range(levels - 1, -1, -1):
        step = const(f"step{level}", 2**level, index_type)
        probe = op("Add", f"probe{level}", [below, step])
        above = op("Greater", f"above{level}", [op("GatherElements", f"boundary{level}", [padded, probe],
                                                   {"axis": 1}), targets])
        below = op("Sub", f"narrow{level}", [probe, op("Mul", f"back{level}", [
            op("Cast", f"above_i{level}", [above], {"to": _tensor_type(index_type)}), step])])
    # Draw k lands on j = below + 1; j = m (only through rounding, T = C_{m-1}) falls in a column cut off.
    lands = op("Add", "lands", [below, const("one_l", 1, index_type)])
    hits = op("ScatterElements", "hits", [op("ConstantOfShape", "none", [op("Shape", "padded_shape", [padded])],
                                             {"value": gs.Constant("zero_h", np.array([0], dtype=work))}),
                                          lands, op("ConstantOfShape", "hit", [op("Shape", "lands_shape", [lands])],
                                                    {"value": gs.Constant("one_h", np.array([1], dtype=work))})],
              {"axis": 1})
    kept = op("Slice", "kept", [hits, const("first", [0], np.int64), const("m", [m], np.int64),
                                const("cols_k", [1], np.int64)])
    return op("Reshape", "keep", [kept, shape])
