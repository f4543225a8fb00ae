"""Two builds of the op library timed side by side in one process, rounds interleaved (A then B, then
B then A): the op on post-ReLU float32 tensors, both modes, and with --resnet the hardened ResNet-18
of benchmarks/resnet18.py. Prints each median time and the median of the per-round ratios B / A.

benchmarks/phase_profile.sh links the kernels into a program of its own, so it cannot see what the
library's build does to them: one change that left the per-element code alone made the op 8% slower
as built (README: The CPU kernel). Time a kernel change here too, against the build before it. With
a fixed seed two builds of the same math give the same bits, which is checked and printed.

    python benchmarks/compare_builds.py LIB_A LIB_B [--shapes 1x64x112x112 32x64x56x56]
                                         [--resnet 1 32] [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import onnx

from onnx_sap.rewrite import HardenOptions, harden_model
from onnx_sap.runtime import session_options

from bench_op import op_model  # beside this script


def _session(model: onnx.ModelProto, library: str, threads: int):
    import onnxruntime as ort

    before = os.environ.get("ONNX_SAP_LIBRARY")
    os.environ["ONNX_SAP_LIBRARY"] = library  # read by session_options when it registers the library
    try:
        options = session_options(threads, spin=False)
    finally:
        if before is None:
            del os.environ["ONNX_SAP_LIBRARY"]
        else:
            os.environ["ONNX_SAP_LIBRARY"] = before
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare(name: str, model: onnx.ModelProto, feeds: dict, libraries: list[str], threads: int,
            rounds: int) -> None:
    """Times `model` with each library, interleaved, and prints one line."""
    sessions = [_session(model, lib, threads) for lib in libraries]
    outputs = [s.run(None, feeds)[0] for s in sessions]  # also the warm-up
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    a, b = np.array(times[0]), np.array(times[1])
    same = "same output" if np.array_equal(outputs[0], outputs[1]) else "outputs differ"
    print(f"  {name:<28} A {np.median(a) * 1e3:9.3f} ms   B {np.median(b) * 1e3:9.3f} ms   "
          f"B / A {np.median(b / a):.3f}   {same}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("library_a")
    ap.add_argument("library_b")
    ap.add_argument("--shapes", nargs="*", default=["1x64x112x112", "32x64x56x56"],
                    help="op input shapes, NxCxHxW (none: skip the op)")
    ap.add_argument("--resnet", type=int, nargs="*", default=[], metavar="BATCH",
                    help="also the hardened ResNet-18 at these batch sizes")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # Each build from a path of its own: a library loaded twice from one path is loaded once.
        libraries = []
        for i, lib in enumerate((args.library_a, args.library_b)):
            if not os.path.isfile(lib):
                ap.error(f"{lib} is not a file; pass two builds of the op library (libonnx_sap_ops.so)")
            libraries.append(shutil.copy(lib, os.path.join(tmp, f"lib{i}_{os.path.basename(lib)}")))
        print(f"A = {args.library_a}\nB = {args.library_b}\n{args.threads} threads, {args.rounds} rounds")
        rng = np.random.default_rng(0)
        for text in args.shapes:
            shape = tuple(int(d) for d in text.split("x"))
            feeds = {"x": np.maximum(rng.standard_normal(shape, dtype=np.float32), 0)}
            for mode in ("bernoulli", "multinomial"):
                model = op_model("StochasticActivationPruning", mode=mode, seed=1)
                compare(f"op {mode} {text}", model, feeds, libraries, args.threads, args.rounds)
        if args.resnet:
            from resnet18 import resnet18

            base = resnet18()
            for mode in ("bernoulli", "multinomial"):
                hardened = harden_model(base, HardenOptions(mode=mode, seed=1)).model
                for batch in args.resnet:
                    feeds = {"input": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}
                    compare(f"ResNet-18 {mode} b{batch}", hardened, feeds, libraries, args.threads, args.rounds)


if __name__ == "__main__":
    main()
