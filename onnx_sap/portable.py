"""SAP as standard ONNX operators (SPEC.md, "Portable form"): runs on any ONNX runtime, no op library.

Arithmetic is float32 for float32/float16 data (float64 for float64 data), arranged so that the keep
probability q = -expm1(r * log1p(-p)) stays within 1e-5 of the float64 formula without log1p or
expm1 ops (see keep_gain). Sums and, in multinomial mode, prefix sums are float64. Random numbers
come from RandomUniformLike (a SplitMix64 hash in integer ops was tried from opset 18 and was slower
in ONNX Runtime on an idle machine: README, Performance). Multinomial draws are SPEC.md's sampler:
r sorted uniform positions from running sums of exponential variates; each element counts the
positions below its prefix sum by a two-level branchless search (_multinomial_keep), not ONNX
Runtime's Multinomial, which is serial and was most of the time.

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

# Draws per cell of the multinomial search's first level (_multinomial_keep): the table costs the full
# search over r / CELL_DRAWS points, and each draw then needs about log2(CELL_DRAWS) + 3 rounds.
CELL_DRAWS = 32

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
    all_valid = op("Greater", "all_valid", [op("ReduceMin", "min_valid", [
        op("Cast", "valid_f", [valid], {"to": FLOAT})], {"keepdims": 0}), const("half_v", 0.5, np.float32)])
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
    if options.mode == "bernoulli":
        words = _uniform_words(op, a, options, stream, work)
        # u < q with u = words / 2^64, as words * (1/q) < 2^64; the bound is one ulp above 2^64 so that
        # q = 1 always keeps (words may round up to 2^64): the check relies on it.
        keep = op("Cast", "keep", [op("Less", "kept", [op("Mul", "u_over_q", [words, g]), const(
            "two64", np.nextafter(work(2.0**64), work(np.inf)))])], {"to": _tensor_type(work)})
    else:
        keep = _multinomial_keep(op, const, a64, valid, all_valid, shape, axis, static_m,
                                 sample_count(static_m, options.ratio, options.samples), options, stream, work)
    # Products, not Where (which ONNX Runtime runs 50-100 times slower than Mul): 1/q is finite
    # (keep_gain), so dropped elements are exactly 0.
    sap = op("Mul", "x_over_q", [xw, op("Mul", "scale", [g, keep])])
    # Examples whose sum is 0 or not finite pass through unchanged; checked once, so that the common
    # case costs no per-element select.
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


def _random_attrs(options, stream: int, **attrs) -> dict:
    """RandomUniformLike's attributes, with a seed only for a seeded SAP node (--seed: the node's
    stream offsets it); unseeded, the node draws from the runtime's own stream."""
    if options.seed:
        attrs["seed"] = float(options.seed + stream)
    return attrs


def _uniform_words(op, a: gs.Variable, options, stream: int, dtype) -> gs.Variable:
    """Uniform values on [0, 2^64) of type dtype, shaped like a, from RandomUniformLike."""
    # verify tells the modes apart by this role ("u"; multinomial's is "draws")
    return op("RandomUniformLike", "u", [a], _random_attrs(options, stream, high=2.0**64, dtype=_tensor_type(dtype)))


def _multinomial_keep(op, const, a64: gs.Variable, valid: gs.Variable, all_valid: gs.Variable, shape: gs.Variable,
                      axis: int, m: int, r: int, options, stream: int, work) -> gs.Variable:
    """keep mask (0 or 1, of type work) from r draws with replacement (SPEC.md's sampler): draw k lands
    on the smallest j with C_j > T_k, where C is the float64 prefix sum of a and T_0 <= .. <= T_{r-1}
    are sorted uniform positions on [0, S). So element j is kept iff N_j > N_{j-1}, where
    N_j = #{k : T_k < C_j} (N_{-1} = 0): as N never decreases and ends at most at r, at most r
    elements are kept, exactly, whatever the rounding.

    N_j comes from a search of C_j among the T in two levels. A table first holds N at B + 1 evenly
    spaced points G_b = S * b / B (a full binary search, over B = r / CELL_DRAWS points); element j in
    cell b (G_b <= C_j < G_{b+1}) then needs a search over only the draws between G_b and G_{b+1},
    about CELL_DRAWS of them as the T are uniform, in as many rounds as the fullest cell needs (a Loop
    whose trip count is computed at run time). A search per draw over C instead needed as many rounds
    as the widest run of elements within one cell, which a dead channel makes thousands long."""
    levels = max(1, math.ceil(math.log2(r + 1)))  # a search over the r draws
    index_type = np.int32 if r < 2**30 else np.int64  # below may overshoot r - 1 by less than 2^levels
    itype = _tensor_type(index_type)
    cells = max(1, -(-r // CELL_DRAWS))
    c = op("CumSum", "prefix", [op("Flatten", "rows", [a64], {"axis": axis}), const("col_axis", 1, np.int32)])
    # [examples, 1]; 1 where S is 0 or not finite (such examples pass through), so that every T is finite.
    valid_rows = op("Reshape", "valid_rows", [valid, const("col", [-1, 1], np.int64)])
    total = op("Where", "total", [valid_rows, op("Slice", "last_sum", [c, const("last", [m - 1], np.int64),
                                                                       const("end", [m], np.int64),
                                                                       const("cols", [1], np.int64)]),
                                  const("one_t", 1.0, np.float64)])
    targets = _sorted_targets(op, const, valid_rows, total, r, options, stream)
    last = const("last_draw", r - 1, index_type)

    def search_round(emit, below, step, bounds):
        """One branchless round: below (the last k with T_k < bound found so far) moves up by step
        where T[below + step] < bound; arithmetic rather than Where, which ONNX Runtime runs slowly.
        Probes past the last draw read it instead (no padded copy of T): where it is below the bound
        too, below may overshoot r - 1, and the search's result is clamped to r - 1 once, at the end."""
        probe = emit("Min", "probe", [emit("Add", "ahead", [below, step]), last])
        less = emit("Less", "below_t", [emit("GatherElements", "draw", [targets, probe], {"axis": 1}), bounds])
        return emit("Add", "narrow", [below, emit("Mul", "up", [emit("Cast", "up_i", [less], {"to": itype}), step])])

    # Level 1: the table, by the full search over the B + 1 edges (in order).
    edges = op("Mul", "edges", [total, op("Mul", "edge_fracs", [
        op("Range", "edge_steps", [const("e0", 0.0, np.float64), const("e1", float(cells) + 0.5, np.float64),
                                   const("e_step", 1.0, np.float64)]), const("inv_cells", 1.0 / cells, np.float64)])])
    table = op("Expand", "table_start", [const("minus_one", -1, index_type), op("Shape", "edges_shape", [edges])])
    for level in range(levels - 1, -1, -1):
        table = search_round(lambda t, role, ins, attrs=None: op(t, f"table_{role}{level}", ins, attrs),
                             table, const(f"step{level}", 2**level, index_type), edges)
    table = op("Min", "table", [table, last])
    # Level 2: rounds = ceil(log2(fullest + 1)), steps 2^(rounds-1) .. 1.
    widths = op("Sub", "widths", [op("Slice", "table_hi", [table, const("w1", [1], np.int64),
                                                           const("w_end", [cells + 1], np.int64),
                                                           const("w_axis", [1], np.int64)]),
                                  op("Slice", "table_lo", [table, const("w0", [0], np.int64),
                                                           const("w_last", [cells], np.int64),
                                                           const("w_axis0", [1], np.int64)])])
    widest = op("Cast", "widest", [op("ReduceMax", "widest_i", [widths], {"keepdims": 0})], {"to": DOUBLE})
    rounds = op("Ceil", "rounds_f", [op("Div", "log2_width", [
        op("Log", "log_width", [op("Add", "width_plus", [widest, const("one_w", 1.0, np.float64)])]),
        const("ln2", math.log(2.0), np.float64)])])
    trips = op("Cast", "rounds", [rounds], {"to": onnx.TensorProto.INT64})
    # 2^rounds exactly (Pow may be an ulp off): the first step is half of it (0 when rounds = 0: no trips).
    reach = op("Floor", "reach", [op("Add", "reach_r", [op("Pow", "reach_pow", [const("two", 2.0, np.float64), rounds]),
                                                        const("round_half", 0.5, np.float64)])])
    first_step = op("Cast", "first_step", [op("Mul", "first_step_f", [reach, const("half_s", 0.5, np.float64)])],
                    {"to": itype})
    # Each element's cell, by the same product as the edges' up to an ulp (an element an ulp across an
    # edge may be placed an ulp away: far below the 1e-5 of S that SPEC.md allows). Examples whose
    # C is not finite are zeroed first, as casting NaN or Inf to an integer is undefined; checked once.
    cell_f = op("Mul", "cell_f", [c, op("Div", "cell_scale", [const("cells_f", float(cells), np.float64), total])])
    cell_then = gs.Variable(f"{cell_f.name}_then", dtype=index_type)
    cell_else, finite_cells = gs.Variable(f"{cell_f.name}_else", dtype=index_type), gs.Variable(f"{cell_f.name}_fin")
    zero_cell = gs.Constant(f"{cell_f.name}_zero", np.asarray(0.0, np.float64))
    cell = op("If", "cell", [all_valid], {
        "then_branch": gs.Graph(nodes=[gs.Node("Cast", inputs=[cell_f], outputs=[cell_then], attrs={"to": itype})],
                                outputs=[cell_then], name=f"{cell_f.name}_all_valid"),
        "else_branch": gs.Graph(nodes=[gs.Node("Where", inputs=[valid_rows, cell_f, zero_cell], outputs=[finite_cells]),
                                       gs.Node("Cast", inputs=[finite_cells], outputs=[cell_else], attrs={"to": itype})],
                                outputs=[cell_else], name=f"{cell_f.name}_some_invalid")})
    start = op("GatherElements", "start", [table, cell], {"axis": 1})
    body_nodes: list[gs.Node] = []

    def body_op(op_type, role, inputs, attrs=None):
        out = gs.Variable(f"{start.name}_loop_{role}")
        body_nodes.append(gs.Node(op_type, inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    # Body nodes stay unnamed, like the If branches': names of the region's scheme mark the main graph's nodes.
    trip, cond_in = (gs.Variable(f"{start.name}_loop_trip", dtype=np.int64, shape=[]),
                     gs.Variable(f"{start.name}_loop_cond", dtype=bool, shape=[]))
    below_in = gs.Variable(f"{start.name}_loop_below", dtype=index_type, shape=None)
    step_in = gs.Variable(f"{start.name}_loop_step", dtype=index_type, shape=[])
    below_out = search_round(body_op, below_in, step_in, c)
    below_out.dtype = index_type
    step_out = body_op("Div", "half_step", [step_in, gs.Constant(f"{start.name}_loop_two", np.asarray(2, index_type))])
    step_out.dtype, step_out.shape = index_type, []
    cond_out = body_op("Identity", "cond_out", [cond_in])
    cond_out.dtype, cond_out.shape = bool, []
    body = gs.Graph(nodes=body_nodes, inputs=[trip, cond_in, below_in, step_in],
                    outputs=[cond_out, below_out, step_out], name=f"{start.name}_rounds")
    below = op("Loop", "rounds_loop", [trips, const("go", True, np.bool_), start, first_step], {"body": body})
    below.inputs[0].outputs.append(gs.Variable(f"{start.name}_last_step"))  # the carried step, unused
    below = op("Min", "below", [below, last])
    # N_j - 1 against N_{j-1} - 1: the row shifted right by one (a negative pad drops its last column).
    before = op("Pad", "before", [below, const("shift", [0, 1, 0, -1], np.int64), const("minus_one_b", -1, index_type)])
    kept = op("Cast", "kept", [op("Greater", "drawn", [below, before])], {"to": _tensor_type(work)})
    return op("Reshape", "keep", [kept, shape])


def _sorted_targets(op, const, rows: gs.Variable, total: gs.Variable, r: int, options, stream: int) -> gs.Variable:
    """T_k = S * G_k / G_r, k = 0..r-1, with G the running sums of r + 1 exponential variates: r
    sorted uniform positions on [0, S) per example (SPEC.md's canonical sampler), [examples, r] float64.

    Sorted, they can be searched (the elements' prefix sums, in order, probe them like a stream). The
    variates are float32 (-log of a float32 uniform in [2^-32, 1]: finite, and 0 at most), as the
    kernel's are; their sums are float64. Both sums are negative, so their ratio needs no negation."""
    attrs = _random_attrs(options, stream, low=2.0**-32, high=1.0, dtype=FLOAT)
    like = op("Expand", "like_d", [rows, const("draw_dims", [r + 1], np.int64)])  # rows: [examples, 1] bool
    logs = op("Log", "log_u", [op("RandomUniformLike", "draws", [like], attrs)])  # verify's sign of multinomial
    first = op("Split", "split_last", [logs, const("split_sizes", [r, 1], np.int64)], {"axis": 1})
    last = gs.Variable(f"{first.name}_last")
    first.inputs[0].outputs.append(last)
    sums = op("CumSum", "spacings", [op("Cast", "log_u64", [first], {"to": DOUBLE}), const("draw_axis", 1, np.int32)])
    g_r = op("Add", "sum_all", [op("Slice", "sum_r", [sums, const("r_last", [r - 1], np.int64),
                                                      const("r_end", [r], np.int64),
                                                      const("r_axis", [1], np.int64)]),
                                op("Cast", "last64", [last], {"to": DOUBLE})])
    return op("Mul", "targets", [sums, op("Div", "t_scale", [total, g_r])])
