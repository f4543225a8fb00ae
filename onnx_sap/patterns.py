"""Finding activations in an onnx-graphsurgeon graph: one small matcher per activation form.

A match is the set of nodes that together compute one activation and the tensor that carries its
result; SAP goes after that tensor. Patterns (several nodes) are matched before single ops so that,
say, the Sigmoid inside x*Sigmoid(x) is not also taken on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Small helpers over the graph.


def is_standard(node: gs.Node) -> bool:
    """Whether node is in the default (ai.onnx) domain."""
    return node.domain in (None, "", "ai.onnx")


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node that produces tensor t, or None for graph inputs and constants."""
    return t.inputs[0] if len(t.inputs) == 1 else None


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """t's value if it is a constant (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = producer(t)
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


def only_consumer(t: gs.Tensor, node: gs.Node) -> bool:
    """Whether node is t's only consumer (so the pattern owns t)."""
    return len(t.outputs) == 1 and t.outputs[0] is node


def sole_consumer(t: gs.Tensor, op: str) -> gs.Node | None:
    """t's only consumer when it has op type op, else None."""
    return t.outputs[0] if len(t.outputs) == 1 and t.outputs[0].op == op else None


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a two-input node, the input that is not t."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is t:
        return b
    if b is t:
        return a
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
    if o is x:  # x * t, then * 0.5
        m2 = sole_consumer(m1.outputs[0], "Mul")
        if m2 is not None and is_scalar(other_input(m2, m1.outputs[0]), 0.5):
            nodes += [m1, m2]
            return m2.outputs[0]
        return None
    if is_scalar(o, 0.5):  # t * 0.5, then * x
        m2 = sole_consumer(m1.outputs[0], "Mul")
        if m2 is not None and other_input(m2, m1.outputs[0]) is x:
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
    if p.op == "Pow" and p.inputs[0] is x and is_scalar(p.inputs[1], 3.0):
        return [p]
    if p.op == "Mul":
        o = other_input(p, x)
        q = producer(o) if o is not None else None
        if q is not None and q.op == "Mul" and q.inputs[0] is x and q.inputs[1] is x:
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
    if sig.inputs[0] is x:
        return Match("silu", "pattern", [sig, mul], mul.outputs[0], "x*sigmoid(x)")
    scale = producer(sig.inputs[0])
    if scale is not None and scale.op == "Mul" and only_consumer(sig.inputs[0], sig):
        b = other_input(scale, x)
        v = constant_value(b) if b is not None else None
        if v is not None and v.size == 1:
            kind = "quickgelu" if np.isclose(float(v), 1.702, rtol=1e-3) else "swish"
            return Match(kind, "pattern", [scale, sig, mul], mul.outputs[0], f"x*sigmoid({float(v):g}x)")
    return None


def match_mish(softplus: gs.Node) -> Match | None:
    """x * Tanh(Softplus(x))."""
    if softplus.op != "Softplus":
        return None
    tanh = sole_consumer(softplus.outputs[0], "Tanh")
    if tanh is None:
        return None
    mul = sole_consumer(tanh.outputs[0], "Mul")
    if mul is None or other_input(mul, tanh.outputs[0]) is not softplus.inputs[0]:
        return None
    return Match("mish", "pattern", [softplus, tanh, mul], mul.outputs[0], "x*tanh(softplus(x))")


def match_hardswish(anchor: gs.Node) -> Match | None:
    """x * HardSigmoid(x), and x * Clip(x + 3, 0, 6) / 6 (division by 6 or product with 1/6)."""
    if anchor.op == "HardSigmoid":
        mul = sole_consumer(anchor.outputs[0], "Mul")
        if mul is not None and other_input(mul, anchor.outputs[0]) is anchor.inputs[0]:
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
    first = c.outputs[0] if len(c.outputs) == 1 else None
    if first is None:
        return None
    if first.op == "Mul" and other_input(first, c) is x:  # (x * clip) / 6
        t = first.outputs[0]
        last = t.outputs[0] if len(t.outputs) == 1 else None
        if last is not None and _divides_by_six(last, t):
            return Match("hardswish", "pattern", [anchor, clip, first, last], last.outputs[0], "x*clip(x+3,0,6)/6")
        return None
    if _divides_by_six(first, c):  # x * (clip / 6)
        mul = sole_consumer(first.outputs[0], "Mul")
        if mul is not None and other_input(mul, first.outputs[0]) is x:
            return Match("hardswish", "pattern", [anchor, clip, first, mul], mul.outputs[0], "x*(clip(x+3,0,6)/6)")
    return None


def _divides_by_six(n: gs.Node, t: gs.Tensor) -> bool:
    """Whether node n computes t / 6 or t * (1/6)."""
    o = other_input(n, t)
    return o is not None and ((n.op == "Div" and n.inputs[1] is o and is_scalar(o, 6.0))
                              or (n.op == "Mul" and is_scalar(o, 1 / 6)))


PATTERN_MATCHERS: list[Callable[[gs.Node], Match | None]] = [
    match_gelu_erf,
    match_gelu_tanh,
    match_hardswish,
    match_mish,
    match_sigmoid_gate,
]


def match_single(node: gs.Node) -> Match | None:
    """Single-op activations, Clip as ReLU6 or a bounded clip, and ONNX Runtime's fused forms."""
    if is_standard(node) and node.op in SINGLE_OPS:
        return Match(SINGLE_OPS[node.op], "op", [node], node.outputs[0], node.op)
    if is_standard(node) and node.op == "Clip":
        lo, hi = clip_bounds(node)
        if lo == 0.0 and hi == 6.0:
            return Match("relu6", "op", [node], node.outputs[0], "Clip(0,6)")
        if lo is not None and lo >= 0.0:  # a clipped ReLU; a symmetric clamp is no activation
            return Match("clip", "op", [node], node.outputs[0], f"Clip({lo:g},{hi})")
        return None
    if node.domain == MS_DOMAIN and node.op in FUSED_OPS:
        return Match(FUSED_OPS[node.op], "fused", [node], node.outputs[0], f"{node.op} ({MS_DOMAIN})")
    if node.domain == MS_DOMAIN and node.op == "FusedConv":
        act = node.attrs.get("activation", "")
        act = act.decode() if isinstance(act, bytes) else act
        if act:
            return Match("fusedconv", "fused", [node], node.outputs[0], f"FusedConv+{act} ({MS_DOMAIN})")
    return None


def find_activations(graph: gs.Graph) -> list[Match]:
    """All activations of one graph (not its subgraphs), patterns first, in node order."""
    taken: set[int] = set()
    matches: list[Match] = []
    for matcher in PATTERN_MATCHERS:
        for node in graph.nodes:
            if id(node) in taken:
                continue
            m = matcher(node)
            if m is not None and not any(id(n) in taken for n in m.nodes) and isinstance(m.output, gs.Variable):
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
