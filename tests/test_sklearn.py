"""scikit-learn classifiers exported by skl2onnx: label + probabilities outputs, the latter as a tensor
or, by skl2onnx's default, a ZipMap's sequence of maps. Built here from sklearn's bundled digits."""

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from onnx_sap import make_session
from onnx_sap.api import harden, strip
from onnx_sap.bench import bench
from onnx_sap.errors import OnnxSapError
from onnx_sap.evaluate import EvaluateOptions, evaluate
from onnx_sap.metrics import Classifier, softmax
from onnx_sap.runtime import as_scores, score_output
from onnx_sap.verify import verify

SMALL = dict(eps=[0.1], attacks=["transfer", "square"], passes=4, transfer_steps=4, square_iters=20, square_passes=2,
             seed=3)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def exported(digits):
    """{(estimator, zipmap): (fitted estimator, ONNX model)}."""
    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = {"mlp": MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0).fit(x[:1400], y[:1400]),
                  "logreg": LogisticRegression(max_iter=200).fit(x[:1400], y[:1400])}
    return {(name, zipmap): (clf, to_onnx(clf, x[:1], target_opset=17,
                                          options=None if zipmap else {id(clf): {"zipmap": False}}))
            for name, clf in fitted.items() for zipmap in (True, False)}


def outputs_of(model: onnx.ModelProto) -> list[tuple[str, bytes]]:
    return [(o.name, o.type.SerializeToString()) for o in model.graph.output]


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
def test_mlp_hardens_keeping_its_outputs_and_strips_back(exported, digits, zipmap):
    _, original = exported["mlp", zipmap]
    report = harden(original, mode="bernoulli")  # the check loads and runs the hardened model
    assert [s.kind for s in report.plan.sites] == ["relu"]
    assert outputs_of(report.model) == outputs_of(original)  # a sequence of maps stays one
    x = digits[0][1400:1420]
    label, probs = make_session(report.model).run(None, {"X": x})
    assert isinstance(probs, list) == zipmap and label.shape == (20,)
    stripped, _, _ = strip(report.model)
    for a, b in zip(make_session(original).run(None, {"X": x}), make_session(stripped).run(None, {"X": x})):
        np.testing.assert_array_equal(as_scores(a), as_scores(b))


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
def test_score_output_is_the_probabilities_never_the_label(exported, zipmap):
    for name in ("mlp", "logreg"):
        sess = make_session(exported[name, zipmap][1])
        assert score_output(sess) == ("output_probability" if zipmap else "probabilities")
        label = sess.get_outputs()[0].name
        with pytest.raises(OnnxSapError, match=f"--output {label} is tensor\\(int64\\)"):
            score_output(sess, label)
        with pytest.raises(OnnxSapError, match="no such output"):
            score_output(sess, "logits")


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
def test_probabilities_are_scored_as_their_log_in_class_order(exported, digits, zipmap):
    clf, original = exported["logreg", zipmap]
    x = digits[0][1400:1450]
    z = Classifier(original).logits(x)
    np.testing.assert_allclose(softmax(z), clf.predict_proba(x), atol=1e-4)


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "tensor"])
def test_evaluate_verify_and_bench_read_the_probabilities(exported, digits, zipmap):
    clf, original = exported["mlp", zipmap]
    hardened = harden(original, mode="multinomial").model
    x, y = digits[0][1400:1460], digits[1][1400:1460]
    result = evaluate(original, hardened, x, y, EvaluateOptions(**SMALL))
    assert result["models"]["original"]["clean_single"] == pytest.approx(clf.score(x, y), abs=1 / len(y))
    assert 0.5 < result["models"]["hardened"]["clean_multi"] <= 1.0
    assert result["models"]["original"]["accuracy"]["worst"]["0.1"] < result["models"]["original"]["clean_single"]
    assert all(r.ok for r in verify(hardened, runs=4))
    [timing] = bench(original, hardened, rounds=3, batches=(4,))
    assert timing.hardened.p50_ms > 0
    with pytest.raises(OnnxSapError, match="--output (output_)?label is tensor"):
        evaluate(original, hardened, x, y, EvaluateOptions(**SMALL, output="label" if not zipmap else "output_label"))


def test_a_linear_model_has_nothing_to_harden_and_the_cli_prints_no_graphsurgeon_lines(exported, tmp_path):
    for (name, zipmap), (_, model) in exported.items():
        onnx.save(model, tmp_path / f"{name}_{zipmap}.onnx")
    res = subprocess.run([sys.executable, "-m", "onnx_sap", "harden", tmp_path / "mlp_True.onnx", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["plan"]["selected"] == 1 and "[W]" not in res.stdout + res.stderr
    res = subprocess.run([sys.executable, "-m", "onnx_sap", "harden", tmp_path / "logreg_True.onnx"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "a linear model has none" in res.stderr
