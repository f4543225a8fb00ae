"""harden / strip / inspect on models built in code, each hardened model run in ONNX Runtime."""

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from models import (ACTIVATIONS, NOT_ACTIVATIONS, SPECIAL, activation_as_output, cnn, dense_with, legacy_ir3,
                    residual, with_if, with_loop)

from onnx_sap import DOMAIN, OP_TYPE, make_session
from onnx_sap.api import harden, inspect, strip
from onnx_sap.errors import OnnxSapError, OptionError
from onnx_sap.rewrite import HardenOptions

X16 = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
IMG = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)


def sap_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    found, graphs = [], [model.graph]
    while graphs:
        g = graphs.pop()
        for n in g.node:
            if n.op_type == OP_TYPE and n.domain == DOMAIN:
                found.append(n)
            graphs.extend(a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return found


def run(model, feeds):
    return make_session(model).run(None, feeds)


def assert_strip_restores(original: onnx.ModelProto, hardened: onnx.ModelProto, feeds):
    stripped, removed, _ = strip(hardened)
    assert removed >= 1 and not sap_nodes(stripped)
    for a, b in zip(run(original, feeds), run(stripped, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_form_is_found_hardened_and_stripped(name):
    kind, build = ACTIVATIONS[name]
    m = dense_with(build)
    report = harden(m, mode="bernoulli", seed=3)  # check=True: runs both models, deterministic equivalence
    assert [s.kind for s in report.plan.sites] == [kind]
    assert report.plan.sites[0].tensor == "act"  # SAP on the form's output, never inside it
    assert report.check.equivalence_checked and report.check.max_abs_diff < 1e-4
    assert len(sap_nodes(report.model)) == 1
    assert_strip_restores(m, report.model, {"x": X16})


@pytest.mark.parametrize("name", sorted(NOT_ACTIVATIONS))
def test_clamps_passing_negative_values_are_listed_with_the_reason_and_never_hardened(name):
    m = dense_with(NOT_ACTIVATIONS[name])
    [site] = inspect(m).sites
    assert site.kind == "clip" and not site.selected and "lower bound -1 < 0" in site.reason
    with pytest.raises(OnnxSapError, match="all 1 activation sites are excluded .*lower bound -1 < 0"):
        harden(m)


def test_inspect_suggests_harden_only_where_harden_has_a_site_to_rewrite(tmp_path):
    excluded, hardenable = tmp_path / "clip.onnx", tmp_path / "relu.onnx"
    onnx.save(dense_with(NOT_ACTIVATIONS["clip_symmetric"]), str(excluded))
    onnx.save(dense_with(ACTIVATIONS["relu"][1]), str(hardenable))
    cli = lambda path: subprocess.run([sys.executable, "-m", "onnx_sap", "inspect", str(path)],  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    res = cli(excluded)
    text = " ".join(res.stdout.split())  # Rich wraps at the terminal's width
    assert res.returncode == 0, res.stderr
    assert "Harden with:" not in text and "no activation site harden would rewrite (the SAP column says why)" in text
    res = cli(hardenable)
    assert res.returncode == 0 and "Harden with: onnx-sap harden" in " ".join(res.stdout.split())


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_newer_opset_and_onnxruntime_fused_forms(name):
    kind, build, opset, extra = SPECIAL[name]
    m = dense_with(build, opset=opset, extra_opsets=extra)
    report = harden(m)
    assert [(s.kind, s.form) for s in report.plan.sites] == [(kind, "fused" if name.startswith("ms_") else "op")]
    assert_strip_restores(m, report.model, {"x": X16})


def test_cnn_keeps_model_fields_and_records_provenance():
    m = cnn()
    report = harden(m, mode="multinomial", seed=5)
    h = report.model
    assert [s.kind for s in report.plan.sites] == ["relu", "relu6"]
    assert [s.m for s in report.plan.sites] == [4 * 64, 6 * 64]
    assert h.ir_version == m.ir_version and h.doc_string == "a small CNN"
    assert {(o.domain, o.version) for o in h.opset_import} == {("", 17), (DOMAIN, 1)}
    props = {p.key: p.value for p in h.metadata_props}
    assert props["author"] == "tests" and props["onnx_sap.version"] and '"mode": "multinomial"' in props["onnx_sap.options"]
    assert [i.name for i in h.graph.input] == ["x"] and [o.name for o in h.graph.output] == ["logits"]
    assert next(n for n in h.graph.node if n.name == "relu1").doc_string == "first activation"
    assert sorted(n.attribute[-1].i for n in sap_nodes(h)) == [0, 1]  # stream numbers are unique
    onnx.checker.check_model(h, full_check=True)
    for batch in (1, 5):  # dynamic batch
        x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
        assert run(h, {"x": x})[0].shape == (batch, 10)
    assert_strip_restores(m, h, {"x": IMG})


def test_shared_activation_gets_one_sap_read_by_both_consumers():
    m = residual()
    h = harden(m).model
    by_name = {n.name: n for n in h.graph.node}
    sap = next(n for n in sap_nodes(h) if n.input[0].startswith("r0"))
    assert sap.output[0] == "r0" and by_name["relu_shared"].output[0] == sap.input[0]
    assert "r0" in by_name["conv_branch"].input and "r0" in by_name["skip"].input
    assert len(sap_nodes(h)) == 2
    assert_strip_restores(m, h, {"x": IMG})


def test_activation_that_is_a_graph_output_keeps_its_name():
    m = activation_as_output()
    h = harden(m, mode="bernoulli", seed=1, ratio=0.2).model
    assert [o.name for o in h.graph.output] == ["logits", "features"]
    logits, features = run(h, {"x": X16})
    relu = np.maximum(X16 @ onnx.numpy_helper.to_array(m.graph.initializer[0]), 0)
    assert ((features == 0) & (relu > 0)).any()  # the output now carries the pruned value
    assert_strip_restores(m, h, {"x": X16})


def test_activations_inside_if_branches():
    m = with_if()
    report = harden(m, mode="bernoulli", seed=2)
    assert sorted(s.graph for s in report.plan.sites) == ["main/choose.else_branch", "main/choose.then_branch"]
    assert len(sap_nodes(report.model)) == 2
    assert_strip_restores(m, report.model, {"x": X16})


def test_activation_inside_a_loop_body():
    m = with_loop()
    report = harden(m, mode="bernoulli", seed=4)
    assert [s.graph for s in report.plan.sites] == ["main/loop.body"]
    assert_strip_restores(m, report.model, {"x": X16})


def test_legacy_ir3_model_keeps_initializers_as_inputs(tmp_path):
    m = legacy_ir3()
    src = tmp_path / "legacy.onnx"
    onnx.save(m, src)
    report = harden(src, tmp_path / "legacy.sap.onnx")
    h = onnx.load(report.output)
    assert h.ir_version == 3 and {"x", "W1", "W2"} <= {i.name for i in h.graph.input}
    onnx.checker.check_model(h, full_check=True)


def test_external_data_is_read_and_written(tmp_path):
    m = dense_with(ACTIVATIONS["gelu_erf_torch"][1], width=64)  # W1 is 4 KiB: stored outside
    src = tmp_path / "ext.onnx"
    onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    report = harden(src, tmp_path / "out.onnx", mode="bernoulli", seed=1)
    assert len(list(tmp_path.glob("out.onnx.*.data"))) == 1
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(report.output, load_external_data=False).graph.initializer)
    assert run(str(report.output), {"x": X16})[0].shape == (3, 10)
    _, _, stripped = strip(report.output, tmp_path / "back.onnx")
    np.testing.assert_array_equal(run(str(src), {"x": X16})[0], run(str(stripped), {"x": X16})[0])


def test_input_is_never_modified_and_default_output_is_beside_it(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(cnn(), src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    report = harden(src)
    assert report.output == tmp_path / "cnn.sap.onnx" and report.output.exists()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    with pytest.raises(OnnxSapError, match="is the input model"):
        harden(src, src)


def test_include_exclude_by_kind_and_glob():
    m = cnn()
    assert [s.selected for s in harden(m, include=["relu6"], dry_run=True).plan.sites] == [False, True]
    assert [s.selected for s in harden(m, exclude=["relu*"], dry_run=True).plan.sites] == [False, False]
    h = harden(m, exclude=["relu1"]).model
    assert len(sap_nodes(h)) == 1
    with pytest.raises(OnnxSapError, match="excluded"):
        harden(m, exclude=["relu", "relu6"])


def test_rehardening_needs_force_and_never_stacks():
    h = harden(cnn()).model
    with pytest.raises(OnnxSapError, match="--force"):
        harden(h)
    again = harden(h, force=True, mode="bernoulli").model
    nodes = sap_nodes(again)
    assert len(nodes) == 2 and all(onnx.helper.get_attribute_value(n.attribute[0]) == b"bernoulli" for n in nodes)


def test_inspect_lists_sites_and_existing_sap_nodes():
    plan = inspect(harden(cnn(), seed=9).model)
    assert [s.kind for s in plan.sites] == ["relu", "relu6"]
    assert [e["attributes"]["seed"] for e in plan.existing] == [9, 9]


@pytest.mark.parametrize("reduce", ["probs", "logits"])
def test_ensemble_averages_k_passes_in_one_run(reduce):
    m = cnn()
    report = harden(m, ensemble=4, ensemble_reduce=reduce, mode="bernoulli", seed=3)
    out = run(report.model, {"x": IMG})[0]
    assert out.shape == (3, 10) and np.all(np.isfinite(out))
    if reduce == "probs":  # log of a mean of probabilities: exp sums to 1
        np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-5)
    assert_strip_restores(m, report.model, {"x": IMG})


def test_portable_bernoulli_is_unbiased_and_runs_without_the_op():
    m = dense_with(ACTIVATIONS["relu"][1])
    h = harden(m, portable=True, mode="bernoulli", samples=3).model
    assert not sap_nodes(h) and all(o.domain != DOMAIN for o in h.opset_import)
    import onnxruntime as ort

    sess = ort.InferenceSession(h.SerializeToString(), providers=["CPUExecutionProvider"])  # no op library
    x = X16[:1]
    w1 = onnx.numpy_helper.to_array(m.graph.initializer[0])
    assert (x @ w1 > 0).sum() >= 3  # several activations compete, so SAP is random here
    outs = np.stack([sess.run(None, {"x": x})[0] for _ in range(3000)]).astype(np.float64)
    expected = run(m, {"x": x})[0].astype(np.float64)
    assert outs.std(axis=0).min() > 0
    sem = outs.std(axis=0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(axis=0) - expected) <= 5 * sem + 1e-5 * np.abs(expected))
    assert_strip_restores(m, h, {"x": X16})


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_portable_sessions_in_one_process_repeat_the_stream_unless_the_runtime_is_reseeded(mode):
    """What harden --portable warns about, as ONNX Runtime does it: every new session of the model in one
    process restarts the same stream (runs within a session differ); onnxruntime.set_seed before each
    session is the Python way out."""
    import onnxruntime as ort

    h = harden(dense_with(ACTIVATIONS["relu"][1]), portable=True, mode=mode, samples=3).model.SerializeToString()

    def three_runs():
        sess = ort.InferenceSession(h, providers=["CPUExecutionProvider"])
        return np.stack([sess.run(None, {"x": X16})[0] for _ in range(3)])

    first, second = three_runs(), three_runs()
    assert not np.array_equal(first[0], first[1])  # random within a session
    np.testing.assert_array_equal(first, second)  # but the same from session to session
    ort.set_seed(11)
    reseeded = three_runs()
    ort.set_seed(12)
    assert not np.array_equal(reseeded, three_runs())


def test_portable_multinomial_ensemble_runs():
    # The ensemble forgets inferred shapes (the batch grows k times) but not those of the portable
    # form's Loop body inputs, which ONNX Runtime needs.
    m = cnn()
    out = run(harden(m, portable=True, mode="multinomial", ensemble=3).model, {"x": IMG})[0]
    assert out.shape == (3, 10) and np.all(np.isfinite(out))


def test_portable_multinomial_keeps_at_most_r():
    m = activation_as_output()
    h = harden(m, portable=True, mode="multinomial", samples=4).model
    for _ in range(50):
        features = run(h, {"x": X16})[1]
        assert np.all((features != 0).sum(axis=1) <= 4)
    assert_strip_restores(m, h, {"x": X16})


def test_no_activations_and_bad_options_are_errors():
    m = dense_with(lambda x: ([], x, []))
    with pytest.raises(OnnxSapError, match="no activations"):
        harden(m)
    for bad in ({"ratio": 0}, {"samples": -1}, {"mode": "x"}, {"ensemble": 0}, {"ensemble_reduce": "max"},
                {"include": ["relu", ""]}):
        with pytest.raises(OptionError, match=f"^{next(iter(bad))} must") as caught:  # the Python name, not a flag
            harden(cnn(), **bad)
        assert caught.value.name == next(iter(bad)) and "--" not in str(caught.value)
    with pytest.raises(OnnxSapError, match="opset >= 13"):
        harden(legacy_ir3(), portable=True)


def test_options_dataclass_matches_cli_defaults():
    assert HardenOptions().mode == "multinomial" and HardenOptions().ratio == 1.0
