"""evaluate and bench with small budgets: the attacks must bite, the worst case must be the minimum."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_sap.api import harden
from onnx_sap.bench import bench
from onnx_sap.errors import OptionError
from onnx_sap.evaluate import EvaluateOptions, EvaluateProgress, evaluate, run_attack
from onnx_sap.metrics import Classifier, expected_calibration_error, load_data, score
from onnx_sap.runtime import example_file

SMALL = dict(eps=[0.1, 0.3], passes=4, transfer_steps=6, spsa_steps=6, spsa_pairs=8, spsa_passes=2,
             square_iters=40, square_passes=2, seed=7)


@pytest.fixture(scope="module")
def example():
    original = onnx.load(example_file("digits_cnn.onnx"))
    hardened = harden(original, mode="multinomial").model
    x, y = load_data("digits", limit=60)
    return original, hardened, x, y


def test_example_model_is_accurate(example):
    original, _, _, _ = example
    x, y = load_data("digits")
    single, _, _ = score(Classifier(original, "cpu", 4096), x, y, 1)
    assert single.mean() > 0.95


@pytest.mark.parametrize("attack", ["transfer", "spsa", "square"])
def test_each_attack_lowers_a_plain_models_accuracy_within_eps(example, attack):
    original, _, x, y = example
    clf = Classifier(original, "cpu", 4096)
    opts = EvaluateOptions(**SMALL, clip_min=0.0, clip_max=1.0)
    x_adv = run_attack(attack, clf, x, y, 0.3, opts, np.random.default_rng(0), lambda: None)
    assert np.max(np.abs(x_adv - x)) <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    before, after = score(clf, x, y, 1)[0].mean(), score(clf, x_adv, y, 1)[0].mean()
    assert after < before - 0.2, (before, after)


def test_worst_case_is_never_above_any_attack_and_is_reproducible(example):
    original, hardened, x, y = example
    a = evaluate(original, hardened, x, y, EvaluateOptions(**SMALL))
    b = evaluate(original, hardened, x, y, EvaluateOptions(**SMALL))
    assert a["models"] == b["models"]  # --seed: the same numbers twice
    for name in ("original", "hardened"):
        acc = a["models"][name]["accuracy"]
        for eps in ("0.1", "0.3"):
            assert acc["worst"][eps] <= min(acc[k][eps] for k in ("transfer", "spsa", "square"))
        assert acc["worst"]["0.3"] < a["models"][name]["clean_single"]


class Recorder(EvaluateProgress):
    def __init__(self):
        self.stages, self.finished = [], 0

    def begin(self, total, unit):
        self.total = total

    def stage(self, label, total):
        entry = {"label": label, "total": total, "ticks": 0}
        self.stages.append(entry)
        return lambda: entry.update(ticks=entry["ticks"] + 1)

    def done(self, label, units):
        self.finished += units


def test_every_progress_stage_runs_to_its_total(example):
    """The transfer attack's stage used to be shown for the hardened model and never advanced."""
    original, hardened, x, y = example
    recorder = Recorder()
    evaluate(original, hardened, x[:20], y[:20], EvaluateOptions(**dict(SMALL, shard_size=10)), recorder)
    assert recorder.finished == recorder.total == 20
    assert len(recorder.stages) == 2 * 2 * 5  # shards x eps x (transfer once, spsa and square per model)
    assert all(s["ticks"] == s["total"] > 0 for s in recorder.stages), recorder.stages


def test_option_errors_name_the_python_parameter():
    with pytest.raises(OptionError, match=r"^passes must be >= 1, got 0"):
        EvaluateOptions(passes=0).validate()
    with pytest.raises(OptionError, match=r"^eps must be"):
        EvaluateOptions(eps=[float("nan")]).validate()
    with pytest.raises(OptionError, match=r"^spsa_delta must be in \(0, 1\]"):
        EvaluateOptions(spsa_delta=2).validate()


def test_ece_on_constructed_cases():
    y = np.array([0, 1, 0, 1])
    perfect = np.eye(2)[y]
    assert expected_calibration_error(perfect, y) == 0.0
    overconfident = np.array([[0.9, 0.1]] * 4)  # 90% confident, 50% right
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.4)
    hedged = np.array([[0.5 + 1e-9, 0.5 - 1e-9]] * 4)
    assert expected_calibration_error(hedged, y) == pytest.approx(0.0, abs=1e-6)


def test_evaluate_cli_json_and_plot(tmp_path, example):
    _, hardened, _, _ = example
    path = tmp_path / "h.onnx"
    onnx.save(hardened, path)
    res = subprocess.run([sys.executable, "-m", "onnx_sap", "evaluate", str(path), "--limit", "20", "--eps", "0.2",
                          "--attacks", "transfer,square", "--transfer-steps", "3", "--square-iters", "10",
                          "--passes", "3", "--seed", "1", "--json", "--plot", str(tmp_path / "p.png")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc["models"]) == {"original", "hardened"} and doc["examples"] == 20
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "p.png").stat().st_size > 1000
    except ImportError:
        pass


def test_bench_runs_side_by_side(example):
    original, hardened, _, _ = example
    results = bench(original, hardened, batches=(1, 8), rounds=5, warmup=1)
    assert [r.batch for r in results] == [1, 8]
    assert all(r.ratio_p50 > 0 and r.original.p50_ms > 0 and r.hardened.throughput > 0 for r in results)
