#!/usr/bin/env bash
# The main job on the bundled example (a CNN trained on scikit-learn's digits, examples/digits):
# set up, harden, verify the SAP op against the reference, evaluate clean and robust accuracy,
# calibration and overhead, original vs hardened. Trains nothing, downloads no model or data.
# Extra arguments go to `onnx-sap evaluate` (e.g. --limit 100 for a quicker run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
model=examples/digits/digits_cnn.onnx
sap=.venv/bin/onnx-sap
echo; echo "== harden"
$sap harden "$model" -o out/digits_cnn.sap.onnx
echo; echo "== verify (op vs NumPy reference)"
$sap verify out/digits_cnn.sap.onnx
echo; echo "== evaluate (forward-only attacks; worst case per example)"
$sap evaluate "$model" out/digits_cnn.sap.onnx --data digits --seed 1 --plot out/robustness.png "$@"
echo; echo "== bench (latency, interleaved rounds)"
$sap bench "$model" --hardened out/digits_cnn.sap.onnx --batch 1 --batch 64 --rounds 50
