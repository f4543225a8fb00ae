"""`onnx-sap harden` on a ~500 MB model: wall time and peak resident memory of the harden process.

The model (five 5000x5000 float32 MatMuls with Relus between, random weights) is built with
onnx.helper in a temporary folder (by a child process, so that this one stays small: a forked child
starts with its parent's resident pages); `onnx-sap harden` (with its post-rewrite check unless
--no-check) runs in another child, whose own peak RSS (ru_maxrss, as resource.getrusage(
RUSAGE_CHILDREN) reports it, here from os.wait4 for that child alone) is reported. Targets: under
10 s on 2 cores, peak RSS under 3x the model file.

    python benchmarks/harden_scale.py [--width 5000] [--layers 5] [--external] [--no-check] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp(width: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """x[N, width] -> (MatMul -> Relu) x (layers - 1) -> MatMul -> y[N, width]."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) * np.float32(1 / np.sqrt(width))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=5000)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--external", action="store_true", help="store the input's tensors as external data")
    ap.add_argument("--no-check", action="store_true", help="pass --no-check to harden")
    ap.add_argument("--repeat", type=int, default=1, help="runs, each in a fresh child")
    ap.add_argument("--build", metavar="PATH", help=argparse.SUPPRESS)  # the child that writes the model
    args = ap.parse_args()
    if args.build:
        model = mlp(args.width, args.layers)
        if args.external:
            onnx.save(model, args.build, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=Path(args.build).name + ".data")
        else:
            onnx.save(model, args.build)
        return
    with tempfile.TemporaryDirectory(prefix="harden-scale-") as tmp:
        src = Path(tmp) / "mlp.onnx"
        subprocess.run([sys.executable, __file__, "--build", str(src), "--width", str(args.width), "--layers",
                        str(args.layers)] + (["--external"] if args.external else []), check=True)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        print(f"model: {args.layers} MatMuls of {args.width}x{args.width} float32, {size / 1e6:.0f} MB on disk"
              f"{' (external data)' if args.external else ''}; harden{' --no-check' if args.no_check else ''}")
        cmd = [sys.executable, "-m", "onnx_sap", "harden", str(src), "-o", str(Path(tmp) / "mlp.sap.onnx")]
        cmd += ["--no-check"] if args.no_check else []
        for run in range(args.repeat):
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - t0
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode != 0:
                sys.exit(f"harden failed ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
            peak = usage.ru_maxrss * 1024  # KiB on Linux
            print(f"  run {run + 1}: wall {wall:.1f} s (target < 10), peak RSS {peak / 1e9:.2f} GB = "
                  f"{peak / size:.2f}x the model (target < 3x)")


if __name__ == "__main__":
    main()
