"""Overhead of SAP on a ResNet-18 (224x224, 17 Relus, 11.7 M parameters, random weights, built here with
onnx.helper): hardened / original latency on the CPU, batch 1 and 32, both modes, from interleaved
rounds in one run (onnx_sap.bench). Targets: <= 1.10 with bernoulli, <= 1.25 with multinomial; with
--portable (standard ops only), <= 2.5 and <= 8. The model's opset is 17 unless --opset says otherwise
(the portable form draws its random numbers faster from opset 18 on).

With --floor, also the same graph with ONNX's Abs in place of each SAP node: ONNX Runtime runs its
convolutions in a blocked channel layout (NCHWc) and brackets every op outside that path, SAP as much
as Abs, with layout conversions (ReorderOutput, ReorderInput); Abs adds one cheap pass on top, so its
ratio is about the least any op in SAP's place costs in this model.

    python benchmarks/resnet18.py [--threads 2] [--rounds 20] [--batch 1 32] [--portable] [--opset 18] [--floor]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_sap.bench import bench
from onnx_sap.rewrite import HardenOptions, harden_model


def resnet18(num_classes: int = 1000, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """ResNet-18 (v1.5 layout, batch norm folded into conv biases) with He-initialised random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = {"n": 0}

    def conv(x, cin, cout, k, stride, relu):
        i = counter["n"] = counter["n"] + 1
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")])
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        if not relu:
            return f"c{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        return f"r{i}"

    x = conv("input", 3, 64, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h = conv(x, cin, cout, 3, stride, True)
            h = conv(h, cout, cout, 3, 1, False)
            skip = conv(x, cin, cout, 1, stride, False) if (stride != 1 or cin != cout) else x
            name = f"add{stage}_{block}"
            nodes.append(helper.make_node("Add", [h, skip], [name], name=name))
            nodes.append(helper.make_node("Relu", [name], [name + "_relu"], name=name + "_relu"))
            x, cin = name + "_relu", cout
    fc_w = (rng.standard_normal((512, num_classes)) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "resnet18", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", opset)])


def abs_in_place_of_sap(hardened: onnx.ModelProto) -> onnx.ModelProto:
    """hardened with each SAP node replaced by an ONNX Abs (the identity on post-ReLU activations)."""
    m = onnx.ModelProto()
    m.CopyFrom(hardened)
    for node in m.graph.node:
        if node.domain == "onnx_sap":
            node.op_type, node.domain = "Abs", ""
            del node.attribute[:]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--portable", action="store_true", help="time the standard-ops form instead of the custom op")
    ap.add_argument("--opset", type=int, default=17, help="the model's opset (Conv, Relu, ... read the same from 13 on)")
    ap.add_argument("--floor", action="store_true", help="also time Abs in place of each SAP node (see above)")
    args = ap.parse_args()
    model = resnet18(opset=args.opset)
    relus = sum(n.op_type == "Relu" for n in model.graph.node)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    form = "portable" if args.portable else "custom op"
    print(f"ResNet-18 (opset {args.opset}): {relus} Relus, {params / 1e6:.1f} M parameters; {form}; {args.threads} "
          f"threads, {args.rounds} rounds")
    targets = (("bernoulli", 2.5), ("multinomial", 8.0)) if args.portable else (("bernoulli", 1.10), ("multinomial", 1.25))
    for mode, target in targets:
        for r in bench(model, batches=tuple(args.batch), threads=args.threads, rounds=args.rounds,
                       harden=HardenOptions(mode=mode, portable=args.portable)):
            print(f"  {mode:<11} batch {r.batch:>3}: original p50 {r.original.p50_ms:8.2f} ms, hardened p50 "
                  f"{r.hardened.p50_ms:8.2f} ms, hardened/original {r.ratio_p50:.3f} (p90 {r.ratio_p90:.3f}; "
                  f"target <= {target})")
    if args.floor:
        floor = abs_in_place_of_sap(harden_model(model, HardenOptions(mode="bernoulli")).model)
        for r in bench(model, floor, batches=tuple(args.batch), threads=args.threads, rounds=args.rounds):
            print(f"  Abs for SAP batch {r.batch:>3}: original p50 {r.original.p50_ms:8.2f} ms, with Abs p50 "
                  f"{r.hardened.p50_ms:8.2f} ms, with Abs/original {r.ratio_p50:.3f} (p90 {r.ratio_p90:.3f})")


if __name__ == "__main__":
    main()
