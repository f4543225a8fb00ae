"""verify: passes on hardened models, fails on a corrupted SAP node."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from models import cnn, with_if, with_loop

from onnx_sap import reference
from onnx_sap.api import harden
from onnx_sap.reference import compare_with_reference
from onnx_sap.verify import verify


@pytest.mark.parametrize("mode", ["multinomial", "bernoulli"])
def test_verify_passes_on_hardened_models(mode):
    reports = verify(harden(cnn(), mode=mode, ratio=0.5).model, runs=4)
    assert len(reports) == 2 and all(r.ok for r in reports), [r.problems for r in reports]
    assert all(r.mask_disagreements == 0 and r.max_ulps <= 4 for r in reports)


def test_compare_detects_a_wrong_scale_and_a_wrong_mask():
    x = np.abs(np.random.default_rng(0).standard_normal((3, 50))).astype(np.float32)
    attrs = dict(mode="bernoulli", ratio=1.0, samples=0, axis=1, seed=5, stream=2)
    y = reference.sap(x, call=1, **{k: v for k, v in attrs.items()})
    assert compare_with_reference(x, y, attrs, call=1) == (0, 0.0)
    assert compare_with_reference(x, y * np.float32(1.01), attrs, call=1)[1] > 4
    assert compare_with_reference(x, y, attrs, call=2)[0] > 0  # another call's mask
    x[0] = 0  # an all-zero example is copied: any change to it is a disagreement
    y = reference.sap(x, call=1, **attrs)
    assert compare_with_reference(x, y, attrs, call=1)[0] == 0
    y[0, 3] = 1.0
    assert compare_with_reference(x, y, attrs, call=1)[0] == 1


def test_verify_portable_form_statistically_and_catches_a_corrupted_scale(tmp_path):
    h = harden(cnn(), portable=True, mode="bernoulli").model
    assert all(r.ok for r in verify(h, runs=200))
    # Corrupt the survivors' scale (x / q becomes 1.25 x / q): E[Y] = X no longer holds.
    scale = onnx.numpy_helper.from_array(np.array(1.25, np.float32), name="corrupt_scale")  # float32 math
    h.graph.initializer.append(scale)  # once: initializer names are unique in a valid model
    for node in h.graph.node:
        if node.name.endswith("#x_over_q"):
            mul_out = node.output[0] + "_corrupt"
            h.graph.node.append(onnx.helper.make_node("Mul", [mul_out, "corrupt_scale"], [node.output[0]]))
            node.output[0] = mul_out
    sorted_nodes = _toposort(h.graph)
    del h.graph.node[:]
    h.graph.node.extend(sorted_nodes)
    reports = verify(h, runs=200)
    assert not all(r.ok for r in reports)
    path = tmp_path / "corrupt.onnx"
    onnx.save(h, path)
    res = subprocess.run([sys.executable, "-m", "onnx_sap", "verify", str(path)], capture_output=True, text=True)
    assert res.returncode == 1 and "E[Y] != X" in res.stderr


def test_verify_refuses_cuda_without_gpu_runtime():
    h = harden(cnn()).model
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(Exception, match="no CUDA provider"):
        verify(h, provider="cuda")


@pytest.mark.parametrize("build", [with_if, with_loop])
def test_end_to_end_reaches_sap_inside_bodies(build):
    reports = verify(harden(build()).model, end_to_end=3)
    assert len(reports) == 0 and reports.ok  # no main-graph node to tap: the end-to-end comparison is the check
    e2e = reports.end_to_end
    assert e2e.runs == 3 and e2e.sap_nodes >= 1 and not e2e.skipped and e2e.differing_runs == 0


def test_end_to_end_needs_the_same_call_indices(monkeypatch):
    # A reference one call ahead of the operator (as if ONNX Runtime's counter skipped a run) differs.
    from onnx_sap.reference_op import StochasticActivationPruning

    run = StochasticActivationPruning._run
    monkeypatch.setattr(StochasticActivationPruning, "_run",
                        lambda self, x, **a: (setattr(self, "calls", self.calls + 1), run(self, x, **a))[1])
    reports = verify(harden(with_loop()).model, end_to_end=2)
    assert reports.end_to_end.differing_runs == 2 and not reports.ok


def test_verify_refuses_body_only_models_without_end_to_end():
    with pytest.raises(Exception, match="nothing to verify"):
        verify(harden(with_if()).model, end_to_end=0)


def test_portable_models_are_not_compared_end_to_end():
    reports = verify(harden(cnn(), portable=True, mode="bernoulli").model, runs=4)
    assert reports.end_to_end.skipped.startswith("the portable form")


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads, including those its If/Loop bodies read from the outer graph."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names |= _reads(n)
    return names


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced = {o for n in graph.node for o in n.output}
    pending, done = list(graph.node), []
    while pending:
        for n in pending:
            if all(i in available or i not in produced for i in _reads(n)):
                done.append(n)
                available.update(n.output)
                pending.remove(n)
                break
        else:
            raise AssertionError("cycle")
    return done
