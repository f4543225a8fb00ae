"""Evaluation data, batched forward passes and the metrics evaluate reports.

Everything here is deterministic given its inputs: the randomness of an evaluation lives in the
attacks (their NumPy generators) and in the SAP nodes of the model being scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxSapError, first_line
from .runtime import NUMPY_TYPES, as_scores, example_file, make_session, score_output
from .sap_nodes import has_sap, with_seed


def load_data(spec: str | Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays x and y, or the bundled test split for 'digits'."""
    path = example_file("digits_test.npz") if str(spec) == "digits" else Path(spec)
    if not path.is_file():
        raise OnnxSapError(f"--data {spec}: no such file; give an .npz with arrays x and y, or 'digits'")
    try:
        with np.load(path) as d:
            x, y = d["x"], d["y"]
    except (KeyError, ValueError, OSError) as e:
        raise OnnxSapError(f"--data {spec}: expected an .npz with arrays 'x' and 'y' ({e})") from None
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise OnnxSapError(f"--data {spec}: x has shape {list(x.shape)} and y {list(y.shape)}; give one label "
                           "per row of x (y of rank 1, same length, non-empty)")
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biu":
        raise OnnxSapError(f"--data {spec}: x must hold numbers and y integer class indices, got {x.dtype} and "
                           f"{y.dtype}")
    if limit:
        x, y = x[:limit], y[:limit]
    return x.astype(np.float32), y.astype(np.int64)


def check_data_fits(clf: Classifier, x: np.ndarray, y: np.ndarray) -> None:
    """Raise OnnxSapError unless x fits the model's input (rank and static dims) and every label is
    one of the classes of its score output."""
    inp = clf.session.get_inputs()[0]
    dims = list(inp.shape)
    if len(dims) != x.ndim or any(isinstance(d, int) and d > 0 and d != n for d, n in zip(dims[1:], x.shape[1:])):
        raise OnnxSapError(f"--data: x has shape {list(x.shape)} but the model's input {inp.name!r} is {dims}; "
                           "give an .npz whose x rows have the model's input shape")
    try:
        classes = clf.logits(x[:1]).shape[-1]
    except Exception as e:  # ONNX Runtime's errors are long: keep the first line
        raise OnnxSapError(f"--data: the model fails on the first row of x ({first_line(e)}); check that the data "
                           "is the model's input") from None
    if y.min() < 0 or y.max() >= classes:
        raise OnnxSapError(f"--data: labels must be class indices in [0, {classes}) for this model's output, got "
                           f"{int(y.min())}..{int(y.max())}")


class Classifier:
    """Batched forward passes of an ONNX classifier, read from its score output (runtime.score_output:
    logits, log-probabilities, probabilities or a ZipMap's probabilities)."""

    def __init__(self, model: onnx.ModelProto, provider: str = "cpu", batch_rows: int = 16384,
                 seed: int | None = None, *, threads: int | None = None, session=None, output: str | None = None):
        """seed (non-zero) gives the SAP nodes reproducible streams; session, an already open session
        of model, is used instead of opening one (evaluate keeps deterministic models' sessions);
        output names the score output (default: the one score_output picks)."""
        self.stochastic = has_sap(model)
        if self.stochastic and seed:
            model = with_seed(model, seed)
        self.session = session or make_session(model, provider, threads=threads)
        self.output = score_output(self.session, output)
        inp = self.session.get_inputs()[0]
        self.input = inp.name
        fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.chunk = fixed or batch_rows
        self.dtype = NUMPY_TYPES.get(inp.type, np.float32)
        self.fixed = fixed is not None
        self.queries = 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Scores for every row of x in float64, as logits or log-probabilities (probabilities are
        turned into their logarithm, so that margins and softmax mean the same for every model), run
        in chunks of at most batch_rows."""
        outs = []
        x = np.asarray(x, dtype=self.dtype)
        for i in range(0, len(x), self.chunk):
            part = x[i:i + self.chunk]
            n = len(part)
            if self.fixed and n < self.chunk:  # a static batch: pad the last chunk
                part = np.concatenate([part, np.repeat(part[-1:], self.chunk - n, axis=0)])
            outs.append(as_scores(self.session.run([self.output], {self.input: part})[0])[:n])
        self.queries += len(x)
        z = np.concatenate(outs)
        if z.size and z.min() >= 0 and np.allclose(z.sum(axis=-1), 1.0, atol=1e-3):  # probabilities
            z = np.log(np.maximum(z, 1e-12))
        return z


def margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """z_y - max_{j != y} z_j: negative means misclassified (the attacks minimise it)."""
    true = logits[np.arange(len(y)), y]
    other = logits.copy()
    other[np.arange(len(y)), y] = -np.inf
    return true - other.max(axis=1)


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, shifted by the maximum for stability."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += abs(correct[inside].mean() - conf[inside].mean()) * inside.mean()
    return float(ece)


def score(clf: Classifier, x: np.ndarray, y: np.ndarray, passes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct in a single pass, survives = correct in the majority of passes, mean probabilities)."""
    k = passes if clf.stochastic else 1
    z = clf.logits(np.repeat(x, k, axis=0)).reshape(len(x), k, -1)
    correct = z.argmax(axis=2) == y[:, None]
    return correct[:, 0], correct.mean(axis=1) > 0.5, softmax(z).mean(axis=1)


def mean_margin(clf: Classifier, x: np.ndarray, y: np.ndarray, passes: int) -> np.ndarray:
    """Margin averaged over passes (EOT) for each row of x."""
    k = passes if clf.stochastic else 1
    z = clf.logits(np.repeat(x, k, axis=0))
    return margin(z, np.repeat(y, k)).reshape(len(x), k).mean(axis=1)
