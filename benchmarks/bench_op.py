"""Speed of the SAP op against ONNX Runtime's Relu and the NumPy reference, measured side by side.

Not a test: prints median wall and CPU times and the ratios the project tracks (bernoulli / Relu,
multinomial / bernoulli, reference / op) for every CPU instruction-set level this machine has
(ONNX_SAP_ISA, fixed when a session is created), all from one run with the contenders interleaved round by round,
since this machine is shared and noisy. The input is a post-ReLU activation (about half zeros),
which is what SAP sees in a hardened model. Each ratio is given twice, wall / CPU: the CPU time (all
threads of this process) is the work done, which the machine's load does not change; the wall time of
a long call grows with the load far more than that of a short one.

    python benchmarks/bench_op.py [--threads 2] [--rounds 20] [--levels scalar,avx2,avx512]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_sap import make_session, reference
from onnx_sap.runtime import cpu_isa_levels

SHAPES = [(1, 64, 112, 112), (32, 64, 56, 56)]


def op_model(op: str, **attrs) -> onnx.ModelProto:
    """One `op` node from x to y, float32 of any shape (the SAP op in its onnx_sap domain)."""
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


def _time_both(fn) -> tuple[float, float]:
    """Wall time and this process's CPU time (all threads) of one call.

    On a loaded shared machine the wall time of a 30 ms call is stretched by preemption far more
    than that of a 3 ms one; the CPU time is the work itself, whatever the load.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _session_at(level: str, model, threads: int):
    """A session whose SAP kernels run at CPU level `level` (read when the kernels are created)."""
    before = os.environ.get("ONNX_SAP_ISA")
    os.environ["ONNX_SAP_ISA"] = level
    try:
        return make_session(model, threads=threads, spin=False)
    finally:
        if before is None:
            del os.environ["ONNX_SAP_ISA"]
        else:
            os.environ["ONNX_SAP_ISA"] = before


def bench_shape(shape, levels: list[str], threads: int, rounds: int,
                ref_rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall times (op sessions and reference) and median CPU times (op sessions) in seconds."""
    x = np.maximum(np.random.default_rng(0).standard_normal(shape, dtype=np.float32), 0)
    sessions = {"relu": make_session(op_model("Relu"), threads=threads, spin=False)}
    for level in levels:
        for mode in ("bernoulli", "multinomial"):
            model = op_model("StochasticActivationPruning", mode=mode, seed=1)
            sessions[f"{mode} {level}"] = _session_at(level, model, threads)
    feeds = {"x": x}
    for s in sessions.values():  # warm-up
        s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            wall, used = _time_both(lambda s=s: s.run(None, feeds))
            times[name].append(wall)
            cpu[name].append(used)
    for mode in ("bernoulli", "multinomial"):
        times[f"reference ({mode})"] = [_time(lambda mode=mode: reference.sap(x, mode=mode, seed=1))
                                        for _ in range(ref_rounds)]
    return ({k: float(np.median(v)) for k, v in times.items() if v},
            {k: float(np.median(v)) for k, v in cpu.items() if v})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--ref-rounds", type=int, default=1, help="rounds of the NumPy reference (0: skip it)")
    ap.add_argument("--levels", default=",".join(cpu_isa_levels()),
                    help="comma-separated CPU levels to compare (default: every level this CPU has)")
    args = ap.parse_args()
    levels = [level for level in args.levels.split(",") if level]
    for shape in SHAPES:
        t, c = bench_shape(shape, levels, args.threads, args.rounds, args.ref_rounds)
        print(f"\nfloat32 {'x'.join(map(str, shape))}, {args.threads} threads (median ms: wall, CPU)")
        for name, v in t.items():
            print(f"  {name:<26} {v * 1e3:10.3f}" + (f" {c[name] * 1e3:10.3f}" if name in c else ""))
        print(f"  ratios (wall / CPU) {'':<6} {'bernoulli/Relu':>15} {'multinomial/bernoulli':>22}")
        for level in levels:
            b, m = t[f"bernoulli {level}"], t[f"multinomial {level}"]
            bc, mc = c[f"bernoulli {level}"], c[f"multinomial {level}"]
            br = f"{b / t['relu']:.2f} / {bc / c['relu']:.2f}"
            mb = f"{m / b:.2f} / {mc / bc:.2f}"
            print(f"    {level:<24} {br:>15} {mb:>22}")
        print(f"    {'target':<24} {'<= 4':>15} {'<= 2':>22}")
        best = levels[-1]
        for mode in ("bernoulli", "multinomial"):
            if f"reference ({mode})" in t:
                print(f"    reference / op ({mode}, {best}): {t[f'reference ({mode})'] / t[f'{mode} {best}']:.1f}")


if __name__ == "__main__":
    main()
