"""Hostile and careless input (issue 8, items 8, 9, 11, 12): every case ends in a result or in one
line naming the problem (exit 2), never in an internal error, a crash or a half-written output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fuzzing import FAILURES, fuzz, run_case
from models import activation_as_output, cnn, dense_with, f32, legacy_ir3, model, single, with_if
from onnx import TensorProto, helper

from onnx_sap import make_session
from onnx_sap.api import harden
from onnx_sap.bench import bench
from onnx_sap.errors import OnnxSapError
from onnx_sap.evaluate import EvaluateOptions, evaluate
from onnx_sap.verify import verify

CORPUS = Path(__file__).parent / "fuzz_corpus"
IMG = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_sap", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", sorted(p.stem for p in CORPUS.glob("*.onnx")))
def test_regression_corpus(case):
    """Models that once ended in internal errors (from fuzzing) or wrong results: success or one line."""
    doc = json.loads((CORPUS / f"{case}.json").read_text())
    outcome, detail = run_case((CORPUS / f"{case}.onnx").read_bytes(), doc["options"])
    assert outcome in ("ok", "user-error"), f"{outcome}: {detail}"
    assert outcome == doc.get("expect", outcome), detail
    assert "please report" not in detail


def test_seeded_fuzz_run():
    """A few fresh mutations per test run (CI runs many more: scripts/ci/fuzz.sh)."""
    counts = fuzz(12, seed=20261129)
    assert sum(counts[f] for f in FAILURES) == 0, counts


def invalid(m: onnx.ModelProto, fragment: str = "") -> str:
    with pytest.raises(OnnxSapError, match="the input model is invalid") as e:
        harden(m)
    assert fragment in str(e.value) and "please report" not in str(e.value)
    return str(e.value)


def test_invalid_inputs_are_named_as_such_not_blamed_on_the_rewriter():
    wrong_dims = dense_with(single("Relu"))
    wrong_dims.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 13  # logits are [N, 10]
    invalid(wrong_dims, "ShapeInferenceError")

    truncated = dense_with(single("Relu"))
    truncated.graph.initializer[0].raw_data = truncated.graph.initializer[0].raw_data[:10]
    invalid(truncated, "initializer 'W1' holds 10 bytes")

    not_ssa = dense_with(single("Relu"))
    not_ssa.graph.node[-1].output[0] = "act"  # two nodes write "act"
    invalid(not_ssa)

    non_utf8 = dense_with(single("Relu"))
    non_utf8.graph.node[1].name = "@@@@"
    data = non_utf8.SerializeToString().replace(b"@@@@", b"\xff\xfe\xc3\x28")
    invalid(onnx.load_from_string(data), "not valid UTF-8")


def _save_with_external_ref(path, key: str, value: str):
    """A dense+Relu model whose first initializer points at external data through (key, value)."""
    m = dense_with(single("Relu"))
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key=key, value=value)
    onnx.save(m, path)
    return path


def test_external_data_outside_the_model_folder_is_a_user_error(tmp_path):
    _save_with_external_ref(tmp_path / "m.onnx", "location", "../elsewhere.bin")
    with pytest.raises(OnnxSapError, match="external data could not be read"):
        harden(tmp_path / "m.onnx")


def test_onnx_warnings_do_not_add_lines(tmp_path):
    """An unknown external-data key made onnx print a UserWarning before the one-line error."""
    _save_with_external_ref(tmp_path / "m.onnx", "locatoin", "w.bin")
    res = cli("harden", tmp_path / "m.onnx")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_custom_domain_op_with_a_standard_name_and_no_inputs():
    """An Erf of another domain, with no inputs, where the GELU matcher looks for one."""
    m = dense_with(lambda x: ([helper.make_node("Relu", [x], ["r"], name="relu"),
                               helper.make_node("Erf", [], ["e"], name="erf", domain="custom"),
                               helper.make_node("Add", ["r", "e"], ["act"], name="add")], "act", []),
                   extra_opsets=(("custom", 1),))
    report = harden(m, check=False)
    assert [s.kind for s in report.plan.sites] == ["relu"]


def test_check_refuses_huge_random_inputs():
    with pytest.raises(OnnxSapError, match="input 'x' has shape .* pass --no-check"):
        harden(cnn(batch=2**31))
    hardened = harden(cnn(batch=2**31), check=False).model
    # verify and bench feed random data too, but have no --no-check: their message names their own way out.
    with pytest.raises(OnnxSapError, match="input 'x' has shape .* verify feeds at most; pass feeds= ") as e:
        verify(hardened)
    assert "--no-check" not in str(e.value)
    with pytest.raises(OnnxSapError, match="input 'x' has shape .* bench feeds at most; pass a smaller --batch") as e:
        bench(cnn(batch=2**31), hardened, rounds=1)
    assert "--no-check" not in str(e.value)


def test_bfloat16_sites_and_outputs_are_refused_clearly():
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 16])
    m = model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y])
    with pytest.raises(OnnxSapError, match="bfloat16: SAP takes float16/32/64"):
        harden(m)
    mixed = model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                   helper.make_node("Cast", ["r"], ["y"], name="to_bf16", to=TensorProto.BFLOAT16)],
                  [f32("x", ["N", 16])], [y])
    with pytest.raises(OnnxSapError, match="--ensemble needs float16/float32/float64 outputs; output 'y' is bfloat16"):
        harden(mixed, ensemble=2)


@pytest.mark.parametrize("reduce", ["probs", "logits"])
def test_ensemble_at_opset_8(reduce):
    """Slice took its bounds as attributes before opset 10: the regrouping node was invalid there."""
    report = harden(legacy_ir3(), ensemble=2, ensemble_reduce=reduce, mode="bernoulli")
    assert report.check.equivalence_checked


def test_ensemble_of_a_model_whose_activation_is_also_an_output():
    """The features output feeds the classifier head too: the head must go on reading every member
    (it read the reduced features, placed after it: a graph the checker refused)."""
    m = activation_as_output()
    report = harden(m, ensemble=3, ensemble_reduce="logits", mode="bernoulli")
    assert report.check.equivalence_checked
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    assert [o.shape for o in make_session(report.model).run(None, {"x": x})] == [(4, 10), (4, 12)]


def test_ensemble_with_a_static_batch():
    m = cnn(batch=2)
    report = harden(m, ensemble=3, mode="bernoulli")
    assert report.check.equivalence_checked
    assert make_session(report.model).run(None, {"x": IMG[:2]})[0].shape == (2, 10)


def test_ir3_unused_initializer_listed_as_input_keeps_inputs_and_initializers_consistent(tmp_path):
    m = legacy_ir3()
    m.graph.initializer.append(helper.make_tensor("unused_w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    m.graph.input.append(helper.make_tensor_value_info("unused_w", TensorProto.FLOAT, [3]))
    report = harden(m, tmp_path / "h.onnx")
    inits = {t.name for t in report.model.graph.initializer}
    inputs = {i.name for i in report.model.graph.input}
    assert inputs - inits == {"x"} and inits <= inputs
    sess = make_session(report.output)
    assert [i.name for i in sess.get_inputs() if i.name not in inits] == ["x"]


def test_ensemble_probs_stay_finite_for_confident_logits():
    """log(mean_k softmax(z_k)) with logits 1000 apart: -inf before the log-sum-exp form."""
    big = helper.make_tensor("big", TensorProto.FLOAT, [], [1000.0])
    m = model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
               helper.make_node("Mul", ["r", "big"], ["logits"], name="scale")],
              [f32("x", ["N", 10])], [f32("logits", ["N", 10])], [big])
    report = harden(m, ensemble=4, mode="bernoulli", seed=5)  # the check compares with log_softmax
    x = np.eye(10, dtype=np.float32)[:3] * 5  # one logit 5000 above the others
    out = make_session(report.model).run(None, {"x": x})[0]
    assert np.isfinite(out).all() and (out.argmax(axis=1) == [0, 1, 2]).all()
    lse = np.log(np.exp(out.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(lse, 0.0, atol=1e-5)  # still log-probabilities


# ---------------------------------------------------------------------------------------------
# evaluate, verify, bench: data that does not fit, seeds, counts.


def tiny_options(**kw) -> EvaluateOptions:
    return EvaluateOptions(eps=[0.1], attacks=["transfer"], passes=2, transfer_steps=1, **kw)


@pytest.mark.parametrize("x, y, fragment", [
    (np.zeros((20, 3, 32, 32), np.float32), np.zeros(20, np.int64), "x has shape [20, 3, 32, 32]"),
    (np.zeros((20, 64), np.float32), np.zeros(20, np.int64), "x has shape [20, 64]"),
    (IMG, np.full(6, 42), "labels must be class indices in [0, 10)"),
])
def test_evaluate_data_that_does_not_fit_the_model(x, y, fragment):
    hardened = harden(cnn(), check=False).model
    with pytest.raises(OnnxSapError) as e:
        evaluate(cnn(), hardened, x, y, tiny_options())
    assert fragment in str(e.value)


def test_evaluate_cli_data_errors_are_one_line(tmp_path):
    onnx.save(cnn(), tmp_path / "m.onnx")
    assert cli("harden", tmp_path / "m.onnx", "-o", tmp_path / "h.onnx", "--no-check").returncode == 0
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    res = cli("evaluate", tmp_path / "m.onnx", tmp_path / "h.onnx", "--data", tmp_path / "d.npz", "--eps", "0.1",
              "--attacks", "transfer")
    assert res.returncode == 2 and "x has shape [4, 64]" in res.stderr and "internal" not in res.stderr
    np.savez(tmp_path / "s.npz", x=np.float32(1.0), y=np.int64(1))
    res = cli("evaluate", tmp_path / "h.onnx", "--data", tmp_path / "s.npz")
    assert res.returncode == 2 and "one label per row" in res.stderr


def test_evaluate_accepts_sap_only_inside_if_bodies():
    m = with_if()
    report = harden(m, mode="bernoulli", check=False)
    assert all(n.op_type != "StochasticActivationPruning" for n in report.model.graph.node)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    y = make_session(m).run(None, {"x": x})[0].argmax(axis=1)
    result = evaluate(m, report.model, x, y, tiny_options(seed=3))
    assert result["models"]["original"]["clean_single"] == 1.0


def test_seeds_that_would_overflow_are_refused(tmp_path):
    hardened = harden(cnn(), check=False).model
    with pytest.raises(OnnxSapError, match=r"^seed must be in \[0, 2\^53\)"):  # the API names its parameter
        verify(hardened, seed=10**17)
    with pytest.raises(OnnxSapError, match="seed"):
        tiny_options(seed=-1).validate()
    # evaluate derives each shard's SAP seed from its own (seed * 1000 + i used to overflow int64)
    y = make_session(cnn()).run(None, {"x": IMG})[0].argmax(axis=1)
    assert evaluate(cnn(), hardened, IMG, y, tiny_options(seed=10**17))["examples"] == len(IMG)
    onnx.save(hardened, tmp_path / "h.onnx")
    res = cli("verify", tmp_path / "h.onnx", "--seed", str(10**17))
    assert res.returncode == 2 and "--seed must be" in res.stderr


def test_api_validates_counts():
    hardened = harden(cnn(), check=False).model
    with pytest.raises(OnnxSapError, match="^runs must be >= 1"):
        verify(hardened, runs=0)
    with pytest.raises(OnnxSapError, match="rounds"):
        bench(cnn(), hardened, rounds=0)


def test_verify_portable_external_data_from_another_folder(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    onnx.save(dense_with(single("Relu"), width=64), a / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=256)
    harden(a / "m.onnx", a / "h.onnx", portable=True, mode="bernoulli")
    assert list(a.glob("h.onnx*.data"))  # external data (under the name the atomic save gave it)
    monkeypatch.chdir(b)
    reports = verify(Path("..") / "a" / "h.onnx", runs=2)
    assert [r.form for r in reports] == ["portable"]


# ---------------------------------------------------------------------------------------------
# What the CLI prints: user text is never Rich markup, --json is strict JSON.


def test_paths_with_brackets_print_as_given(tmp_path):
    odd = tmp_path / "a["
    odd.mkdir()
    onnx.save(cnn(), odd / "x].onnx")
    res = cli("inspect", odd / "x].onnx")
    assert res.returncode == 0, res.stderr
    assert "a[/x].onnx" in res.stdout.replace("\n", "")
    onnx.save(cnn(), tmp_path / "model[v2].onnx")
    res = cli("harden", tmp_path / "model[v2].onnx", "--mode", "bernoulli")
    assert res.returncode == 0, res.stderr
    assert "model[v2].sap.onnx" in res.stdout.replace("\n", "")
    res = cli("harden", tmp_path / "b[/y].onnx")
    assert res.returncode == 2 and "b[/y].onnx" in res.stderr and "Traceback" not in res.stderr


def test_portable_json_is_strict_json(tmp_path):
    onnx.save(cnn(), tmp_path / "m.onnx")
    res = cli("harden", tmp_path / "m.onnx", "--portable", "--json")
    assert res.returncode == 0, res.stderr

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    doc = json.loads(res.stdout, parse_constant=refuse)
    assert doc["check"]["max_abs_diff"] is None and not doc["check"]["equivalence_checked"]
