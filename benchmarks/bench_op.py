"""Speed of the SAP op against ONNX Runtime's Relu and the NumPy reference, measured side by side.

Not a test: prints median times and the ratios the project tracks (bernoulli / Relu, multinomial /
bernoulli, reference / op), all from one run with the contenders interleaved round by round, since
this machine is shared and noisy. The input is a post-ReLU activation (about half zeros), which is
what SAP sees in a hardened model.

    python benchmarks/bench_op.py [--threads 2] [--rounds 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from onnx import TensorProto, helper

from onnx_sap import make_session, reference

SHAPES = [(1, 64, 112, 112), (32, 64, 56, 56)]


def _model(op: str, **attrs):
    domain = "onnx_sap" if op == "StochasticActivationPruning" else ""
    node = helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "y")]
    graph = helper.make_graph([node], "bench", vi[:1], vi[1:])
    return helper.make_model(graph, ir_version=9,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnx_sap", 1)])


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_shape(shape, threads: int, rounds: int, ref_rounds: int) -> dict[str, float]:
    x = np.maximum(np.random.default_rng(0).standard_normal(shape, dtype=np.float32), 0)
    sessions = {
        "relu": make_session(_model("Relu"), threads=threads, spin=False),
        "bernoulli": make_session(_model("StochasticActivationPruning", mode="bernoulli", seed=1), threads=threads, spin=False),
        "multinomial": make_session(_model("StochasticActivationPruning", mode="multinomial", seed=1),
                                    threads=threads, spin=False),
    }
    feeds = {"x": x}
    for s in sessions.values():  # warm-up
        s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            times[name].append(_time(lambda s=s: s.run(None, feeds)))
    times["reference (bernoulli)"] = [_time(lambda: reference.sap(x, mode="bernoulli", seed=1))
                                      for _ in range(ref_rounds)]
    times["reference (multinomial)"] = [_time(lambda: reference.sap(x, mode="multinomial", seed=1))
                                        for _ in range(ref_rounds)]
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--ref-rounds", type=int, default=2)
    args = ap.parse_args()
    for shape in SHAPES:
        t = bench_shape(shape, args.threads, args.rounds, args.ref_rounds)
        print(f"\nfloat32 {'x'.join(map(str, shape))}, {args.threads} threads (median ms)")
        for name, v in t.items():
            print(f"  {name:<26} {v * 1e3:10.3f}")
        print("  ratios")
        print(f"    bernoulli / Relu               {t['bernoulli'] / t['relu']:8.2f}   (target <= 8)")
        print(f"    multinomial / bernoulli        {t['multinomial'] / t['bernoulli']:8.2f}   (target <= 2.5)")
        print(f"    reference / op (bernoulli)     {t['reference (bernoulli)'] / t['bernoulli']:8.1f}   (target >= 40)")
        print(f"    reference / op (multinomial)   {t['reference (multinomial)'] / t['multinomial']:8.1f}   (target >= 40)")


if __name__ == "__main__":
    main()
