"""Test models built in code (onnx.helper): no network, no torch.

Each activation is written the way some exporter writes it; `ACTIVATIONS` maps a test id to
(expected kind, builder), where a builder takes the input tensor name and returns the nodes,
the output name and any initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)


def const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def model(nodes, inputs, outputs, inits=(), opset=17, ir=9, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(graph, ir_version=ir, opset_imports=ops, producer_name="onnx-sap-tests")


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def dense_with(act, width=24, opset=17, extra_opsets=(), seed=0) -> onnx.ModelProto:
    """x[N,16] -> MatMul -> activation -> MatMul -> logits[N,10] (weights fixed by seed)."""
    rng = np.random.default_rng(seed)
    w1 = const("W1", rng.standard_normal((16, width)) * 0.5)
    w2 = const("W2", rng.standard_normal((width, 10)) * 0.5)
    nodes, out, inits = act("h")
    return model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1")] + nodes
                 + [helper.make_node("MatMul", [out, "W2"], ["logits"], name="fc2")],
                 [f32("x", ["N", 16])], [f32("logits", ["N", 10])], [w1, w2] + inits, opset=opset,
                 extra_opsets=extra_opsets)


def single(op, **attrs):
    def build(x):
        return [helper.make_node(op, [x], ["act"], name=f"{op.lower()}_0", **attrs)], "act", []
    return build


def prelu(x):
    return [helper.make_node("PRelu", [x, "slope"], ["act"], name="prelu_0")], "act", [const("slope", [0.1])]


def clip(lo, hi):
    def build(x):
        return ([helper.make_node("Clip", [x, "lo", "hi"], ["act"], name="clip_0")], "act",
                [const("lo", lo), const("hi", hi)])
    return build


def silu(swap=False):
    def build(x):
        ins = ["sig", x] if swap else [x, "sig"]
        return [helper.make_node("Sigmoid", [x], ["sig"], name="sig"),
                helper.make_node("Mul", ins, ["act"], name="silu_mul")], "act", []
    return build


def swish(beta):
    def build(x):
        return [helper.make_node("Mul", [x, "beta"], ["bx"], name="beta_mul"),
                helper.make_node("Sigmoid", ["bx"], ["sig"], name="sig"),
                helper.make_node("Mul", [x, "sig"], ["act"], name="swish_mul")], "act", [const("beta", beta)]
    return build


def gelu_erf(order):
    """Three orders of 0.5*x*(1+erf(x/sqrt2)): torch (x*t)*0.5, (x*0.5)*t, and x*(t*0.5) with x*0.7071."""
    def build(x):
        inits = [const("sqrt2", np.sqrt(2.0)), const("one", 1.0), const("half", 0.5), const("rsqrt2", 1 / np.sqrt(2))]
        if order == "mul_rsqrt2":
            head = [helper.make_node("Mul", [x, "rsqrt2"], ["s"], name="g_scale")]
        else:
            head = [helper.make_node("Div", [x, "sqrt2"], ["s"], name="g_scale")]
        core = [helper.make_node("Erf", ["s"], ["e"], name="g_erf"),
                helper.make_node("Add", ["e", "one"], ["t"], name="g_add")]
        if order == "torch":
            tail = [helper.make_node("Mul", [x, "t"], ["xt"], name="g_mul"),
                    helper.make_node("Mul", ["xt", "half"], ["act"], name="g_half")]
        elif order == "half_first":
            tail = [helper.make_node("Mul", [x, "half"], ["xh"], name="g_half"),
                    helper.make_node("Mul", ["xh", "t"], ["act"], name="g_mul")]
        else:
            tail = [helper.make_node("Mul", ["t", "half"], ["th"], name="g_half"),
                    helper.make_node("Mul", ["th", x], ["act"], name="g_mul")]
        return head + core + tail, "act", inits
    return build


def gelu_tanh(cube):
    def build(x):
        inits = [const("c", np.sqrt(2 / np.pi)), const("k", 0.044715), const("three", 3.0), const("one", 1.0),
                 const("half", 0.5)]
        if cube == "pow":
            c = [helper.make_node("Pow", [x, "three"], ["x3"], name="t_pow")]
        else:
            c = [helper.make_node("Mul", [x, x], ["x2"], name="t_sq"), helper.make_node("Mul", [x, "x2"], ["x3"],
                                                                                       name="t_cube")]
        return c + [helper.make_node("Mul", ["k", "x3"], ["kx3"], name="t_k"),
                    helper.make_node("Add", [x, "kx3"], ["inner"], name="t_inner"),
                    helper.make_node("Mul", ["inner", "c"], ["arg"], name="t_c"),
                    helper.make_node("Tanh", ["arg"], ["th"], name="t_tanh"),
                    helper.make_node("Add", ["th", "one"], ["t"], name="t_one"),
                    helper.make_node("Mul", [x, "t"], ["xt"], name="t_mul"),
                    helper.make_node("Mul", ["xt", "half"], ["act"], name="t_half")], "act", inits
    return build


def mish(x):
    return [helper.make_node("Softplus", [x], ["sp"], name="m_sp"),
            helper.make_node("Tanh", ["sp"], ["tsp"], name="m_tanh"),
            helper.make_node("Mul", [x, "tsp"], ["act"], name="m_mul")], "act", []


def hardswish(form):
    def build(x):
        inits = [const("three", 3.0), const("zero", 0.0), const("six", 6.0), const("sixth", 1 / 6)]
        if form == "hardsigmoid":
            return [helper.make_node("HardSigmoid", [x], ["hs"], name="h_sig", alpha=1 / 6, beta=0.5),
                    helper.make_node("Mul", [x, "hs"], ["act"], name="h_mul")], "act", []
        head = [helper.make_node("Add", [x, "three"], ["x3"], name="h_add"),
                helper.make_node("Clip", ["x3", "zero", "six"], ["c"], name="h_clip")]
        if form == "mul_div":
            tail = [helper.make_node("Mul", [x, "c"], ["xc"], name="h_mul"),
                    helper.make_node("Div", ["xc", "six"], ["act"], name="h_div")]
        else:
            tail = [helper.make_node("Mul", ["c", "sixth"], ["c6"], name="h_sixth"),
                    helper.make_node("Mul", [x, "c6"], ["act"], name="h_mul")]
        return head + tail, "act", inits
    return build


def min_max(outer_min: bool, lo=0.0, hi=6.0):
    """ReLU6 as Min(Max(x, 0), 6) (outer_min) or Max(Min(x, 6), 0)."""
    def build(x):
        inits = [const("lo", lo), const("hi", hi)]
        if outer_min:
            return [helper.make_node("Max", [x, "lo"], ["inner"], name="mm_max"),
                    helper.make_node("Min", ["inner", "hi"], ["act"], name="mm_min")], "act", inits
        return [helper.make_node("Min", ["hi", x], ["inner"], name="mm_min"),
                helper.make_node("Max", ["inner", "lo"], ["act"], name="mm_max")], "act", inits
    return build


def leaky_max(swap=False):
    """LeakyRelu as Max(x, 0.1*x)."""
    def build(x):
        ins = ["ax", x] if swap else [x, "ax"]
        return [helper.make_node("Mul", ["alpha", x], ["ax"], name="lk_mul"),
                helper.make_node("Max", ins, ["act"], name="lk_max")], "act", [const("alpha", 0.1)]
    return build


def softplus_log_exp(x, out="act"):
    return [helper.make_node("Exp", [x], [f"{out}_e"], name=f"{out}_exp"),
            helper.make_node("Add", [f"{out}_e", "one"], [f"{out}_e1"], name=f"{out}_add"),
            helper.make_node("Log", [f"{out}_e1"], [out], name=f"{out}_log")], out, [const("one", 1.0)]


def mish_log_exp(x):
    sp, _, inits = softplus_log_exp(x, "sp")
    return sp + [helper.make_node("Tanh", ["sp"], ["tsp"], name="m_tanh"),
                 helper.make_node("Mul", [x, "tsp"], ["act"], name="m_mul")], "act", inits


def passthrough(op):
    """Identity, or a float-to-float Cast, placed between the nodes of a pattern."""
    def attrs(to):
        return {"to": to} if op == "Cast" else {}

    def silu_broken(x):  # Sigmoid -> pass-through -> Mul
        return [helper.make_node("Sigmoid", [x], ["sig"], name="sig"),
                helper.make_node(op, ["sig"], ["sig_p"], name="gate_pass", **attrs(TensorProto.FLOAT)),
                helper.make_node("Mul", [x, "sig_p"], ["act"], name="silu_mul")], "act", []

    def mish_broken(x):  # Tanh -> float64 -> float32 -> Mul
        if op == "Identity":
            tail = [helper.make_node("Identity", ["tsp"], ["tsp_p"], name="tanh_pass")]
        else:
            tail = [helper.make_node("Cast", ["tsp"], ["tsp64"], name="tanh_to64", to=TensorProto.DOUBLE),
                    helper.make_node("Cast", ["tsp64"], ["tsp_p"], name="tanh_to32", to=TensorProto.FLOAT)]
        return [helper.make_node("Softplus", [x], ["sp"], name="m_sp"),
                helper.make_node("Tanh", ["sp"], ["tsp"], name="m_tanh")] + tail + [
                helper.make_node("Mul", ["tsp_p", x], ["act"], name="m_mul")], "act", []

    def gelu_broken(x):  # torch's GELU with the pass-through between Div and Erf
        nodes, out, inits = gelu_erf("torch")(x)
        div = next(n for n in nodes if n.op_type == "Div")
        erf = next(n for n in nodes if n.op_type == "Erf")
        erf.input[0] = "div_p"
        at = list(nodes).index(div) + 1
        return nodes[:at] + [helper.make_node(op, [div.output[0]], ["div_p"], name="div_pass",
                                              **attrs(TensorProto.FLOAT))] + nodes[at:], out, inits

    return {"silu": silu_broken, "mish": mish_broken, "gelu": gelu_broken}


def ms_op(op):
    def build(x):
        return [helper.make_node(op, [x], ["act"], name=f"ms_{op.lower()}", domain="com.microsoft")], "act", []
    return build


ACTIVATIONS = {
    "relu": ("relu", single("Relu")),
    "leakyrelu": ("leakyrelu", single("LeakyRelu", alpha=0.1)),
    "prelu": ("prelu", prelu),
    "elu": ("elu", single("Elu")),
    "selu": ("selu", single("Selu")),
    "celu": ("celu", single("Celu")),
    "thresholdedrelu": ("thresholdedrelu", single("ThresholdedRelu", alpha=0.1)),
    "hardswish_op": ("hardswish", single("HardSwish")),
    "hardsigmoid": ("hardsigmoid", single("HardSigmoid")),
    "sigmoid": ("sigmoid", single("Sigmoid")),
    "tanh": ("tanh", single("Tanh")),
    "softplus": ("softplus", single("Softplus")),
    "softsign": ("softsign", single("Softsign")),
    "relu6": ("relu6", clip(0.0, 6.0)),
    "clip": ("clip", clip(0.0, 3.0)),
    "silu": ("silu", silu()),
    "silu_swapped": ("silu", silu(swap=True)),
    "swish_beta": ("swish", swish(1.5)),
    "quickgelu": ("quickgelu", swish(1.702)),
    "gelu_erf_torch": ("gelu", gelu_erf("torch")),
    "gelu_erf_half_first": ("gelu", gelu_erf("half_first")),
    "gelu_erf_rsqrt2": ("gelu", gelu_erf("mul_rsqrt2")),
    "gelu_tanh_pow": ("gelu_tanh", gelu_tanh("pow")),
    "gelu_tanh_mul": ("gelu_tanh", gelu_tanh("mul")),
    "mish_pattern": ("mish", mish),
    "hardswish_hardsigmoid": ("hardswish", hardswish("hardsigmoid")),
    "hardswish_mul_div": ("hardswish", hardswish("mul_div")),
    "hardswish_sixth": ("hardswish", hardswish("sixth")),
    "relu6_min_max": ("relu6", min_max(outer_min=True)),
    "relu6_max_min": ("relu6", min_max(outer_min=False)),
    "clip_min_max": ("clip", min_max(outer_min=True, hi=3.0)),
    "leakyrelu_max": ("leakyrelu", leaky_max()),
    "leakyrelu_max_swapped": ("leakyrelu", leaky_max(swap=True)),
    "softplus_log_exp": ("softplus", softplus_log_exp),
    "mish_log_exp": ("mish", mish_log_exp),
    **{f"{kind}_{op.lower()}_inside": (kind, build) for op in ("Identity", "Cast")
       for kind, build in passthrough(op).items()},
}

# Clamps that pass negative values: listed by inspect, never hardened (the reason says why).
NOT_ACTIVATIONS = {
    "clip_symmetric": clip(-1.0, 1.0),
    "min_max_symmetric": min_max(outer_min=True, lo=-1.0, hi=1.0),
}

# Activations needing a newer opset or a contrib domain: (kind, builder, opset, extra opsets)
SPECIAL = {
    "gelu_op20": ("gelu", single("Gelu"), 20, ()),
    "mish_op18": ("mish", single("Mish"), 18, ()),
    "ms_gelu": ("gelu", ms_op("Gelu"), 17, (("com.microsoft", 1),)),
    "ms_fastgelu": ("gelu_tanh", ms_op("FastGelu"), 17, (("com.microsoft", 1),)),
    "ms_quickgelu": ("quickgelu", ms_op("QuickGelu"), 17, (("com.microsoft", 1),)),
}


def cnn(batch="N", opset=17) -> onnx.ModelProto:
    """Conv-Relu-Conv-ReLU6(Clip)-GlobalAveragePool-Flatten-Gemm on 1x8x8 images."""
    inits = [const("k1", RNG.standard_normal((4, 1, 3, 3)) * 0.5), const("b1", np.zeros(4)),
             const("k2", RNG.standard_normal((6, 4, 3, 3)) * 0.3), const("lo", 0.0), const("hi", 6.0),
             const("fw", RNG.standard_normal((6, 10)) * 0.5), const("fb", np.zeros(10))]
    nodes = [helper.make_node("Conv", ["x", "k1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1", doc_string="first activation"),
             helper.make_node("Conv", ["r1", "k2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc")]
    m = model(nodes, [f32("x", [batch, 1, 8, 8])], [f32("logits", [batch, 10])], inits, opset=opset)
    m.doc_string = "a small CNN"
    m.metadata_props.add(key="author", value="tests")
    return m


def residual() -> onnx.ModelProto:
    """A residual block whose first Relu feeds both the conv branch and the skip Add (two consumers)."""
    inits = [const("k0", RNG.standard_normal((4, 1, 3, 3)) * 0.5), const("k1", RNG.standard_normal((4, 4, 3, 3)) * 0.3),
             const("fw", RNG.standard_normal((4, 10)) * 0.5)]
    nodes = [helper.make_node("Conv", ["x", "k0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu_shared"),
             helper.make_node("Conv", ["r0", "k1"], ["c1"], name="conv_branch", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "r0"], ["s"], name="skip"),
             helper.make_node("Relu", ["s"], ["r1"], name="relu_out"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fw"], ["logits"], name="fc")]
    return model(nodes, [f32("x", ["N", 1, 8, 8])], [f32("logits", ["N", 10])], inits)


def activation_as_output() -> onnx.ModelProto:
    """The Relu's output is also a graph output (features), beside the logits."""
    inits = [const("W1", RNG.standard_normal((16, 12))), const("W2", RNG.standard_normal((12, 10)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["features"], name="relu"),
             helper.make_node("MatMul", ["features", "W2"], ["logits"], name="fc2")]
    return model(nodes, [f32("x", ["N", 16])], [f32("logits", ["N", 10]), f32("features", ["N", 12])], inits)


def with_if() -> onnx.ModelProto:
    """Relus inside both branches of an If (a subgraph each)."""
    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["x", w], [f"{name}_h"], name=f"{name}_fc"),
                                  helper.make_node("Relu", [f"{name}_h"], [f"{name}_out"], name=f"{name}_relu")],
                                 name, [], [f32(f"{name}_out", ["N", 10])])
    inits = [const("Wa", RNG.standard_normal((16, 10))), const("Wb", RNG.standard_normal((16, 10))),
             const("flag", True, np.bool_)]
    nodes = [helper.make_node("If", ["flag"], ["logits"], name="choose",
                              then_branch=branch("then", "Wa"), else_branch=branch("else", "Wb"))]
    return model(nodes, [f32("x", ["N", 16])], [f32("logits", ["N", 10])], inits)


def legacy_ir3() -> onnx.ModelProto:
    """An opset-8, IR-3 model in the Model Zoo's style: initializers also listed as graph inputs."""
    m = dense_with(single("Relu"), opset=8)
    m.ir_version = 3
    for init in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return m


def with_loop() -> onnx.ModelProto:
    """A Relu inside a Loop body (run twice), reading an outer-scope weight."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("MatMul", ["carried", "Wl"], ["lh"], name="loop_fc"),
         helper.make_node("Relu", ["lh"], ["carried_out"], name="loop_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         f32("carried", ["N", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), f32("carried_out", ["N", 16])])
    inits = [const("Wl", RNG.standard_normal((16, 16)) * 0.3), const("W2", RNG.standard_normal((16, 10))),
             const("trips", 2, np.int64), const("go", True, np.bool_)]
    nodes = [helper.make_node("Loop", ["trips", "go", "x"], ["looped"], name="loop", body=body),
             helper.make_node("MatMul", ["looped", "W2"], ["logits"], name="fc")]
    return model(nodes, [f32("x", ["N", 16])], [f32("logits", ["N", 10])], inits)
