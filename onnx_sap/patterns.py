"""Finding activations in an onnx-graphsurgeon graph: one small matcher per activation form.

A match is the set of nodes that together compute one activation and the tensor that carries its
result; SAP goes after that tensor. Patterns (several nodes) are matched before single ops so that,
say, the Sigmoid inside x*Sigmoid(x) is not also taken on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

MS_DOMAIN = "com.microsoft"

# Single ONNX ops that are activations, with the kind each reports.
SINGLE_OPS: dict[str, str] = {
    "Relu": "relu",
    "LeakyRelu": "leakyrelu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "ThresholdedRelu": "thresholdedrelu",
    "Gelu": "gelu",
    "HardSwish": "hardswish",
    "HardSigmoid": "hardsigmoid",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "Mish": "mish",
}

# ONNX Runtime's fused contrib ops (optimized models).
FUSED_OPS: dict[str, str] = {
    "Gelu": "gelu",
    "FastGelu": "gelu_tanh",
    "BiasGelu": "gelu",
    "QuickGelu": "quickgelu",
}

KINDS = sorted(
    set(SINGLE_OPS.values()) | set(FUSED_OPS.values())
    | {"relu6", "clip", "silu", "swish", "quickgelu", "gelu_tanh", "mish", "hardswish", "fusedconv"}
)


@dataclass
class Match:
    """One activation: its kind, how it was written, its nodes and the tensor carrying its output."""

    kind: str
    form: str  # "op", "pattern" or "fused"
    nodes: list[gs.Node]
    output: gs.Variable
    detail: str = ""
    extra: dict = field(default_factory=dict)
    excluded: str = ""  # why this look-alike is listed but never hardened (inspect shows it)


# ---------------------------------------------------------------------------------------------
# Small helpers over the graph.


def is_standard(node: gs.Node) -> bool:
    """Whether node is in the default (ai.onnx) domain."""
    return node.domain in (None, "", "ai.onnx")


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def is_passthrough(node: gs.Node | None) -> bool:
    """Identity, or a Cast from one float type to another: exporters put them between the nodes of
    a pattern, and a matcher looks through them (they are part of the match, never its end)."""
    if node is None or not is_standard(node) or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    if node.op == "Identity":
        return True
    if node.op != "Cast" or node.inputs[0].dtype is None:
        return False
    try:
        src = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(node.inputs[0].dtype))
    except (TypeError, KeyError, ValueError):
        return False
    return src in FLOAT_TYPES and node.attrs.get("to") in FLOAT_TYPES


def raw_producer(t: gs.Tensor) -> gs.Node | None:
    """The node that writes tensor t, or None for graph inputs and constants."""
    return t.inputs[0] if len(t.inputs) == 1 else None


def source(t: gs.Tensor) -> gs.Tensor:
    """t with pass-through nodes before it skipped: the tensor they copy or cast."""
    p = raw_producer(t)
    while is_passthrough(p):
        t = p.inputs[0]
        p = raw_producer(t)
    return t


def same(a: gs.Tensor | None, b: gs.Tensor | None) -> bool:
    """Whether a and b carry the same value up to pass-through nodes."""
    return a is not None and b is not None and source(a) is source(b)


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node that computes t, looking through pass-through nodes; None for inputs and constants,
    and for ops of other domains: matchers rely on the input counts of the standard ops' schemas
    (which onnx.checker enforced), and an op of another domain may share a name but not a schema."""
    p = raw_producer(source(t))
    return p if p is None or is_standard(p) else None


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """t's value if it is a constant (initializer or Constant node output), else None."""
    t = source(t)
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = raw_producer(t)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return np.asarray(v.values) if isinstance(v, gs.Constant) else None
    return None


def is_scalar(t: gs.Tensor | None, value: float, rtol: float = 1e-3) -> bool:
    """Whether t is a constant whose elements all equal value (within rtol)."""
    if t is None:
        return False
    v = constant_value(t)
    return v is not None and v.size >= 1 and bool(np.allclose(v.astype(np.float64), value, rtol=rtol, atol=0))


def scalar_value(t: gs.Tensor | None) -> float | None:
    """t's value if it is a constant with one element, else None."""
    v = constant_value(t) if t is not None else None
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _sole_reader(t: gs.Tensor) -> gs.Node | None:
    """t's only consumer, looking through pass-through nodes that are themselves sole consumers."""
    while len(t.outputs) == 1:
        node = t.outputs[0]
        if not is_passthrough(node):
            return node
        t = node.outputs[0]
    return None


def only_consumer(t: gs.Tensor, node: gs.Node) -> bool:
    """Whether node is t's only consumer (so the pattern owns t)."""
    return _sole_reader(t) is node


def sole_consumer(t: gs.Tensor, op: str) -> gs.Node | None:
    """t's only consumer when it has op type op, else None."""
    node = _sole_reader(t)
    return node if node is not None and node.op == op and is_standard(node) else None


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a two-input node, the input that is not t (pass-through nodes skipped on both)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if same(a, t):
        return source(b)
    if same(b, t):
        return source(a)
    return None


def clip_bounds(node: gs.Node) -> tuple[float | None, float | None]:
    """(min, max) of a Clip node, from attributes (opset < 11) or constant inputs."""
    if "min" in node.attrs or "max" in node.attrs:
        return node.attrs.get("min"), node.attrs.get("max")
    bounds: list[float | None] = []
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i].name:
            v = constant_value(node.inputs[i])
            bounds.append(float(v) if v is not None and v.size == 1 else None)
        else:
            bounds.append(None)
    return bounds[0], bounds[1]


# ---------------------------------------------------------------------------------------------
# Patterns. Each matcher starts from one anchor node and returns a Match or None.


def _times_x_half(t: gs.Tensor, x: gs.Tensor, nodes: list[gs.Node]) -> gs.Variable | None:
    """Match 0.5 * x * t in the orders exporters write it; returns the product's tensor.

    Forms: (x * t) * 0.5, (t * x) * 0.5, (x * 0.5) * t, x * (t * 0.5), (t * 0.5) * x.
    """
    m1 = sole_consumer(t, "Mul")
    if m1 is None:
        return None
    o = other_input(m1, t)
    if o is None:
        return None
    if same(o, x):  # x * t, then * 0.5
        m2 = sole_consumer(m1.outputs[0], "Mul")
        if m2 is not None and is_scalar(other_input(m2, m1.outputs[0]), 0.5):
            nodes += [m1, m2]
            return m2.outputs[0]
        return None
    if is_scalar(o, 0.5):  # t * 0.5, then * x
        m2 = sole_consumer(m1.outputs[0], "Mul")
        if m2 is not None and same(other_input(m2, m1.outputs[0]), x):
            nodes += [m1, m2]
            return m2.outputs[0]
        return None
    half = producer(o)  # (x * 0.5) * t
    if half is not None and half.op == "Mul" and only_consumer(o, m1):
        hx = other_input(half, x)
        if hx is not None and is_scalar(hx, 0.5):
            nodes += [half, m1]
            return m1.outputs[0]
    return None


def match_gelu_erf(erf: gs.Node) -> Match | None:
    """0.5 * x * (1 + Erf(x / sqrt(2))), with x / sqrt(2) also written x * (1 / sqrt(2))."""
    if erf.op != "Erf":
        return None
    scaled = producer(erf.inputs[0])
    if scaled is None or not only_consumer(erf.inputs[0], erf):
        return None
    if scaled.op == "Div" and is_scalar(scaled.inputs[1], np.sqrt(2.0)):
        x = scaled.inputs[0]
    elif scaled.op == "Mul":
        x = next((i for i in scaled.inputs if not is_scalar(i, 1 / np.sqrt(2.0))), None)
        if x is None or not is_scalar(other_input(scaled, x), 1 / np.sqrt(2.0)):
            return None
    else:
        return None
    add = sole_consumer(erf.outputs[0], "Add")
    if add is None or not is_scalar(other_input(add, erf.outputs[0]), 1.0):
        return None
    nodes = [scaled, erf, add]
    out = _times_x_half(add.outputs[0], x, nodes)
    return Match("gelu", "pattern", nodes, out, "0.5*x*(1+erf(x/sqrt2))") if out is not None else None


def _cube_nodes(t: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """Nodes computing x^3 into t: Pow(x, 3), x*(x*x) or (x*x)*x."""
    p = producer(t)
    if p is None:
        return None
    if p.op == "Pow" and same(p.inputs[0], x) and is_scalar(p.inputs[1], 3.0):
        return [p]
    if p.op == "Mul":
        o = other_input(p, x)
        q = producer(o) if o is not None else None
        if q is not None and q.op == "Mul" and same(q.inputs[0], x) and same(q.inputs[1], x):
            return [q, p]
    return None


def match_gelu_tanh(tanh: gs.Node) -> Match | None:
    """0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), with the constant on either side."""
    if tanh.op != "Tanh":
        return None
    outer = producer(tanh.inputs[0])
    if outer is None or outer.op != "Mul":
        return None
    inner_t = next((i for i in outer.inputs if not is_scalar(i, np.sqrt(2 / np.pi))), None)
    if inner_t is None or not is_scalar(other_input(outer, inner_t), np.sqrt(2 / np.pi)):
        return None
    add = producer(inner_t)
    if add is None or add.op != "Add":
        return None
    for x in add.inputs:
        cubic_t = other_input(add, x)
        cm = producer(cubic_t) if cubic_t is not None else None
        if cm is None or cm.op != "Mul":
            continue
        cube_t = next((i for i in cm.inputs if not is_scalar(i, 0.044715)), None)
        if cube_t is None or not is_scalar(other_input(cm, cube_t), 0.044715):
            continue
        cube = _cube_nodes(cube_t, x)
        if cube is None:
            continue
        one = sole_consumer(tanh.outputs[0], "Add")
        if one is None or not is_scalar(other_input(one, tanh.outputs[0]), 1.0):
            return None
        nodes = cube + [cm, add, outer, tanh, one]
        out = _times_x_half(one.outputs[0], x, nodes)
        if out is not None:
            return Match("gelu_tanh", "pattern", nodes, out, "0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715x^3)))")
    return None


def match_sigmoid_gate(sig: gs.Node) -> Match | None:
    """x * Sigmoid(x) (SiLU/Swish), x * Sigmoid(b*x) (Swish-b; QuickGELU when b = 1.702)."""
    if sig.op != "Sigmoid":
        return None
    mul = sole_consumer(sig.outputs[0], "Mul")
    if mul is None:
        return None
    x = other_input(mul, sig.outputs[0])
    if x is None:
        return None
    if same(sig.inputs[0], x):
        return Match("silu", "pattern", [sig, mul], mul.outputs[0], "x*sigmoid(x)")
    scale = producer(sig.inputs[0])
    if scale is not None and scale.op == "Mul" and only_consumer(sig.inputs[0], sig):
        b = other_input(scale, x)
        v = constant_value(b) if b is not None else None
        if v is not None and v.size == 1:
            kind = "quickgelu" if np.isclose(float(v), 1.702, rtol=1e-3) else "swish"
            return Match(kind, "pattern", [scale, sig, mul], mul.outputs[0], f"x*sigmoid({float(v):g}x)")
    return None


def _softplus_of(t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """(x, nodes) when t is Softplus(x) or Log(Exp(x) + 1)."""
    p = producer(t)
    if p is None:
        return None
    if p.op == "Softplus":
        return p.inputs[0], [p]
    if p.op != "Log":
        return None
    add = producer(p.inputs[0])
    if add is None or add.op != "Add" or not only_consumer(p.inputs[0], p):
        return None
    for e in add.inputs:
        exp = producer(e)
        if exp is not None and exp.op == "Exp" and only_consumer(e, add) and is_scalar(other_input(add, e), 1.0):
            return exp.inputs[0], [exp, add, p]
    return None


def match_softplus(log: gs.Node) -> Match | None:
    """Softplus written as Log(Exp(x) + 1)."""
    if log.op != "Log":
        return None
    found = _softplus_of(log.outputs[0])
    return Match("softplus", "pattern", found[1], log.outputs[0], "log(exp(x)+1)") if found else None


def match_mish(tanh: gs.Node) -> Match | None:
    """x * Tanh(Softplus(x)), with Softplus as the op or as Log(Exp(x) + 1)."""
    if tanh.op != "Tanh" or not only_consumer(tanh.inputs[0], tanh):
        return None
    found = _softplus_of(tanh.inputs[0])
    if found is None:
        return None
    x, nodes = found
    mul = sole_consumer(tanh.outputs[0], "Mul")
    if mul is None or not same(other_input(mul, tanh.outputs[0]), x):
        return None
    detail = "x*tanh(softplus(x))" if nodes[-1].op == "Softplus" else "x*tanh(log(exp(x)+1))"
    return Match("mish", "pattern", nodes + [tanh, mul], mul.outputs[0], detail)


def match_leaky_max(mx: gs.Node) -> Match | None:
    """LeakyRelu written as Max(x, a*x) (either order), 0 < a < 1."""
    if mx.op != "Max" or len(mx.inputs) != 2:
        return None
    for t in mx.inputs:
        mul = producer(t)
        if mul is None or mul.op != "Mul" or not only_consumer(t, mx):
            continue
        x = other_input(mx, t)
        a = scalar_value(other_input(mul, x)) if x is not None else None
        if a is not None and 0 < a < 1:
            return Match("leakyrelu", "pattern", [mul, mx], mx.outputs[0], f"max(x,{a:g}*x)")
    return None


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _clamp(lo: float | None, hi: float | None, form: str, nodes: list[gs.Node], out: gs.Variable,
           detail: str) -> Match:
    """A clamp as ReLU6, as a clipped ReLU, or listed but excluded when it passes negative values."""
    if lo == 0.0 and hi == 6.0:
        return Match("relu6", form, nodes, out, detail)
    if lo is not None and lo >= 0.0:
        return Match("clip", form, nodes, out, detail)
    why = "lower bound is not a constant" if lo is None else f"lower bound {lo:g} < 0"
    return Match("clip", form, nodes, out, detail,
                 excluded=f"{why}: a clamp that passes negative values, not an activation SAP expects")


def match_min_max(inner: gs.Node) -> Match | None:
    """ReLU6 (or a clipped ReLU) written as Min(Max(x, lo), hi) or Max(Min(x, hi), lo)."""
    if inner.op not in ("Max", "Min") or len(inner.inputs) != 2:
        return None
    c = next((i for i in inner.inputs if scalar_value(i) is not None), None)
    x = other_input(inner, c) if c is not None else None
    if x is None or scalar_value(x) is not None:
        return None
    outer = sole_consumer(inner.outputs[0], "Min" if inner.op == "Max" else "Max")
    bound = scalar_value(other_input(outer, inner.outputs[0])) if outer is not None and len(outer.inputs) == 2 else None
    if bound is None:
        return None
    lo, hi = (scalar_value(c), bound) if inner.op == "Max" else (bound, scalar_value(c))
    detail = f"min(max(x,{_num(lo)}),{_num(hi)})" if inner.op == "Max" else f"max(min(x,{_num(hi)}),{_num(lo)})"
    return _clamp(lo, hi, "pattern", [inner, outer], outer.outputs[0], detail)


def match_hardswish(anchor: gs.Node) -> Match | None:
    """x * HardSigmoid(x), and x * Clip(x + 3, 0, 6) / 6 (division by 6 or product with 1/6)."""
    if anchor.op == "HardSigmoid":
        mul = sole_consumer(anchor.outputs[0], "Mul")
        if mul is not None and same(other_input(mul, anchor.outputs[0]), anchor.inputs[0]):
            return Match("hardswish", "pattern", [anchor, mul], mul.outputs[0], "x*hardsigmoid(x)")
        return None
    if anchor.op != "Add":
        return None
    x = next((i for i in anchor.inputs if not is_scalar(i, 3.0)), None)
    if x is None or not is_scalar(other_input(anchor, x), 3.0):
        return None
    clip = sole_consumer(anchor.outputs[0], "Clip")
    if clip is None or clip_bounds(clip) != (0.0, 6.0):
        return None
    c = clip.outputs[0]
    first = _sole_reader(c)
    if first is None:
        return None
    if first.op == "Mul" and same(other_input(first, c), x):  # (x * clip) / 6
        t = first.outputs[0]
        last = _sole_reader(t)
        if last is not None and _divides_by_six(last, t):
            return Match("hardswish", "pattern", [anchor, clip, first, last], last.outputs[0], "x*clip(x+3,0,6)/6")
        return None
    if _divides_by_six(first, c):  # x * (clip / 6)
        mul = sole_consumer(first.outputs[0], "Mul")
        if mul is not None and same(other_input(mul, first.outputs[0]), x):
            return Match("hardswish", "pattern", [anchor, clip, first, mul], mul.outputs[0], "x*(clip(x+3,0,6)/6)")
    return None


def _divides_by_six(n: gs.Node, t: gs.Tensor) -> bool:
    """Whether node n computes t / 6 or t * (1/6)."""
    o = other_input(n, t)
    return o is not None and ((n.op == "Div" and same(n.inputs[1], o) and is_scalar(o, 6.0))
                              or (n.op == "Mul" and is_scalar(o, 1 / 6)))


PATTERN_MATCHERS: list[Callable[[gs.Node], Match | None]] = [
    match_gelu_erf,
    match_gelu_tanh,
    match_hardswish,
    match_mish,  # before match_softplus: its Softplus is part of it
    match_sigmoid_gate,
    match_softplus,
    match_leaky_max,
    match_min_max,
]


def match_single(node: gs.Node) -> Match | None:
    """Single-op activations, Clip as ReLU6 or a bounded clip, and ONNX Runtime's fused forms."""
    if is_standard(node) and node.op in SINGLE_OPS:
        return Match(SINGLE_OPS[node.op], "op", [node], node.outputs[0], node.op)
    if is_standard(node) and node.op == "Clip":
        lo, hi = clip_bounds(node)
        return _clamp(lo, hi, "op", [node], node.outputs[0], f"Clip({_num(lo)},{_num(hi)})")
    if node.domain == MS_DOMAIN and node.op in FUSED_OPS:
        return Match(FUSED_OPS[node.op], "fused", [node], node.outputs[0], f"{node.op} ({MS_DOMAIN})")
    if node.domain == MS_DOMAIN and node.op == "FusedConv":
        act = node.attrs.get("activation", "")
        act = act.decode() if isinstance(act, bytes) else act
        if act:
            return Match("fusedconv", "fused", [node], node.outputs[0], f"FusedConv+{act} ({MS_DOMAIN})")
    return None


def _with_inner_passthroughs(nodes: list[gs.Node], graph: gs.Graph) -> list[gs.Node]:
    """nodes plus the pass-through nodes between them, in graph order."""
    ids = {id(n) for n in nodes}
    inner = list(nodes)
    for n in nodes:
        for t in n.inputs:
            chain, p = [], raw_producer(t)
            while is_passthrough(p):
                chain.append(p)
                p = raw_producer(p.inputs[0])
            if p is not None and id(p) in ids:
                inner += [c for c in chain if id(c) not in {id(i) for i in inner}]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    return sorted(inner, key=lambda n: order[id(n)])


def find_activations(graph: gs.Graph) -> list[Match]:
    """All activations of one graph (not its subgraphs), patterns first, in node order."""
    taken: set[int] = set()
    matches: list[Match] = []
    for matcher in PATTERN_MATCHERS:
        for node in graph.nodes:
            if id(node) in taken or not is_standard(node):  # patterns are made of standard ops
                continue
            m = matcher(node)
            if m is not None and not any(id(n) in taken for n in m.nodes) and isinstance(m.output, gs.Variable):
                m.nodes = _with_inner_passthroughs(m.nodes, graph)
                matches.append(m)
                taken.update(id(n) for n in m.nodes)
    for node in graph.nodes:
        if id(node) in taken or not node.outputs:
            continue
        m = match_single(node)
        if m is not None:
            matches.append(m)
            taken.add(id(node))
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    matches.sort(key=lambda m: max(order[id(n)] for n in m.nodes))
    return matches
