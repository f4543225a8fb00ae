"""sweep and tune on the digits model with small budgets; bad input refused before any work."""

import json
import subprocess
import sys

import onnx
import pytest

from onnx_sap.api import harden, sweep, tune
from onnx_sap.errors import OptionError
from onnx_sap.evaluate import EvaluateOptions, evaluate
from onnx_sap.metrics import load_data
from onnx_sap.runtime import example_file
from onnx_sap.sap_nodes import is_custom, iter_nodes

SMALL = dict(eps=[0.2], attacks=["transfer", "spsa"], passes=3, transfer_steps=3, spsa_steps=3, spsa_pairs=4,
             seed=1, shard_size=12)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_sap", *args], capture_output=True, text=True, timeout=300)


def test_sweep_over_two_ratios_on_a_local_cluster_orders_rows_and_matches_evaluate_in_process(tmp_path):
    model = str(example_file("digits_cnn.onnx"))
    res = _cli("sweep", model, "--scheduler", "local:2", "--limit", "24", "--ratio", "0.1,1", "--mode", "multinomial", "--eps", "0.2",
               "--passes", "3", "--transfer-steps", "3", "--spsa-steps", "3", "--shard-size", "12", "--json",
               "--plot", str(tmp_path / "sweep.png"))
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert [r["label"] for r in rows][0] == "original" and len(rows) == 3
    assert {r["ratio"] for r in rows[1:]} == {0.1, 1.0}
    assert rows[1]["worst"]["0.2"] >= rows[2]["worst"]["0.2"]
    assert all(r["latency_ratio"] > 0 for r in rows)
    # A configuration's figures are evaluate's for the same model, seed and shards (spsa_pairs: the CLI default).
    original = onnx.load(model)
    x, y = load_data("digits", limit=24)
    expected = evaluate(original, harden(original, ratio=1.0).model, x, y,
                        EvaluateOptions(**dict(SMALL, spsa_pairs=32)))["models"]
    row = next(r for r in rows if r["ratio"] == 1.0)
    assert row["clean_multi"] == expected["hardened"]["clean_multi"]
    assert row["accuracy"] == expected["hardened"]["accuracy"]
    assert rows[0]["accuracy"] == expected["original"]["accuracy"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_tune_with_a_loose_budget_prunes_and_gives_the_same_choice_on_a_local_cluster(tmp_path):
    model = example_file("digits_cnn.onnx")
    x, y = load_data("digits")
    out = tmp_path / "tuned.onnx"
    a = tune(model, x, y, out, budget=30.0, evaluations=6, passes=4)
    b = tune(model, x, y, budget=30.0, evaluations=6, passes=4, scheduler="local:2")  # and on Dask
    assert a.ratios == b.ratios and [s.accuracy for s in a.steps] == [s.accuracy for s in b.steps]
    assert len(a.steps) <= 6 and min(a.ratios.values()) < 1.0
    assert a.tuned["clean_multi"] >= a.target
    sizes = [a.activations[n] for n in a.ratios]
    assert sizes == sorted(sizes, reverse=True)  # most activations first
    written = onnx.load(out)
    ratios = {n.name: next(at.f for at in n.attribute if at.name == "ratio")
              for _, n in iter_nodes(written.graph) if is_custom(n)}
    assert ratios == pytest.approx(a.ratios)
    meta = {p.key: p.value for p in written.metadata_props}
    assert json.loads(meta["onnx_sap.site_ratios"]) == a.ratios
    seeds = {next(at.i for at in n.attribute if at.name == "seed") for _, n in iter_nodes(written.graph) if is_custom(n)}
    assert seeds == {0}  # deployed: fresh entropy on every run


def test_bad_sweep_and_tune_input_is_refused_before_any_work(tmp_path):
    missing = str(tmp_path / "missing.onnx")  # options are checked before the model is even read
    x, y = load_data("digits", limit=4)
    with pytest.raises(OptionError, match=r"^ratios must be"):
        sweep(missing, x, y, ratios=[0.1, 0.0])
    with pytest.raises(OptionError, match=r"^budget must be"):
        tune(missing, x, y, budget=-1.0)
    res = _cli("sweep", missing, "--ratio", "0.1,-1")
    assert res.returncode == 2 and "--ratio must be" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = _cli("tune", missing, "--budget", "-0.5")
    assert res.returncode == 2 and "--budget must be" in res.stderr, res.stderr


def test_tune_table_and_json_give_the_samples_the_operator_draws_floor_not_round(tmp_path, monkeypatch):
    """ratio 0.5 of m = 3 activations is r = floor(1.5) = 1 in the operator (SPEC.md), not round(1.5) = 2."""
    from typer.testing import CliRunner

    import onnx_sap.api
    import onnx_sap.metrics
    from onnx_sap.cli import app
    from onnx_sap.search import TuneResult, TuneStep

    result = TuneResult(model=onnx.ModelProto(), ratios={"sap_a": 0.5, "sap_b": 0.3, "sap_c": 1.0},
                        activations={"sap_a": 3, "sap_b": 10, "sap_c": None},
                        steps=[TuneStep(None, 1.0, 0.9, True)], original={"clean_single": 0.9, "clean_multi": 0.9,
                                                                         "ece": 0.1},
                        tuned={"clean_single": 0.9, "clean_multi": 0.9, "ece": 0.1}, target=0.89,
                        output=tmp_path / "t.onnx")
    assert result.samples == {"sap_a": 1, "sap_b": 3, "sap_c": None}
    assert result.to_dict()["samples"] == result.samples
    monkeypatch.setattr(onnx_sap.api, "tune", lambda *a, **k: result)
    monkeypatch.setattr(onnx_sap.metrics, "load_data", lambda data, limit: ([0], [0]))
    res = CliRunner().invoke(app, ["tune", str(example_file("digits_cnn.onnx")), "-o", str(tmp_path / "t.onnx"),
                                   "--data", "digits"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "sap_a" in line)
    assert row.replace("│", " ").split()[-1] == "1", row
