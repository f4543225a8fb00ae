"""`verify`: the SAP nodes of a hardened model, as they run in ONNX Runtime, against the reference.

Each custom SAP node's input and output are exposed as extra graph outputs of a copy whose nodes get
fixed seeds; over several runs (call indices 0, 1, ...) the op's keep mask must equal the reference's
outside SPEC.md's margin band, kept values must agree to 4 ulps, and the statistics must hold.
Portable-form regions cannot reproduce the Philox stream and are checked by statistics alone.

End to end, the same seeded copy also runs in onnx's reference runtime with every SAP node computed
by the NumPy reference (reference_op.py), If/Loop/Scan bodies included: with the same call indices
its outputs must equal ONNX Runtime's. That reaches SAP nodes inside bodies, which cannot be tapped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import reference
from .check import random_feeds
from .errors import OnnxSapError, OptionError, first_line
from .reference import MAX_ULPS, compare_with_reference
from .runtime import make_session, provider_name
from .sap_nodes import PORTABLE, check_derived_seed, find_sap_nodes, is_custom, node_attributes, parse_name, with_seed

Z_LIMIT = 6.0


@dataclass
class VerifyOptions:
    """How verify runs the hardened model; the CLI's options, one for one."""

    provider: str = "cpu"
    runs: int = 8  # call indices 0..runs-1 compared with the reference
    seed: int = 20260101  # the verified copy's SAP nodes get seeds derived from it
    end_to_end: int = 2  # runs also compared output for output with onnx's reference runtime (0: none)

    def validate(self) -> None:
        """Raise OptionError naming the first bad option."""
        provider_name(self.provider)
        if self.runs < 1:
            raise OptionError("runs", f"must be >= 1, got {self.runs}")
        if self.end_to_end < 0:
            raise OptionError("end_to_end", f"must be >= 0 (0: no end-to-end comparison), got {self.end_to_end}")
        check_derived_seed(self.seed)


@dataclass
class NodeReport:
    """What verify found for one SAP node."""

    node: str
    form: str
    mode: str
    shape: list[int]
    runs: int
    mask_disagreements: int = 0
    max_ulps: float = 0.0
    kept: int = 0
    expected_kept: float = 0.0
    z_kept: float = 0.0
    z_mean: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class EndToEndReport:
    """The whole model in ONNX Runtime against onnx's reference runtime with the NumPy SAP reference."""

    runs: int
    outputs: list[str]
    sap_nodes: int  # SAP nodes on the way, bodies included
    max_abs_diff: float = 0.0
    differing_runs: int = 0
    skipped: str = ""  # why nothing was compared, if so

    @property
    def ok(self) -> bool:
        return not self.differing_runs


class VerifyReport(list):
    """verify's result: a NodeReport per SAP node of the main graph, and the end-to-end comparison."""

    def __init__(self, nodes: list[NodeReport], end_to_end: EndToEndReport | None):
        super().__init__(nodes)
        self.end_to_end = end_to_end

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self) and (self.end_to_end is None or self.end_to_end.ok)


def _attrs(node: onnx.NodeProto) -> dict:
    return {**reference.ATTRIBUTE_DEFAULTS, **node_attributes(node)}


def statistics(xs: list[np.ndarray], ys: list[np.ndarray], attrs: dict, r_of_m) -> tuple[int, float, float, float]:
    """(kept, expected kept, z of the kept count, z of sum(y - x)) over runs, from q = 1 - (1 - p)^r.
    Multinomial keeps are negatively correlated, so the binomial variance used here is conservative."""
    kept = 0
    expected = var_k = diff = var_d = 0.0
    for x, y in zip(xs, ys):
        axis = attrs["axis"]
        n = int(np.prod(x.shape[:axis], dtype=np.int64))
        a = np.abs(x.astype(np.float64)).reshape(n, -1)
        s = a.sum(axis=1, keepdims=True)
        ok = (s[:, 0] > 0) & np.isfinite(s[:, 0])
        a, s = a[ok], s[ok]
        q = reference.keep_probability(a / s, r_of_m(a.shape[1]))
        yy = y.astype(np.float64).reshape(n, -1)[ok]
        xx = x.astype(np.float64).reshape(n, -1)[ok]
        kept += int((yy != 0).sum())
        expected += float(q.sum())
        var_k += float((q * (1 - q)).sum())
        nz = q > 0
        diff += float((yy - xx).sum())
        var_d += float((xx[nz] ** 2 * (1 - q[nz]) / q[nz]).sum())
    z_k = (kept - expected) / np.sqrt(var_k) if var_k > 0 else 0.0
    z_d = diff / np.sqrt(var_d) if var_d > 0 else 0.0
    return kept, expected, float(z_k), float(z_d)


def _value_info(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            return out
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def _portable_regions(graph: onnx.GraphProto) -> dict[str, tuple[str, str, dict]]:
    """Portable SAP regions of the main graph: prefix -> (input tensor, output tensor, facts)."""
    regions: dict[str, dict] = {}
    for n in graph.node:
        parsed = parse_name(n.name)
        if parsed is not None and parsed.region == PORTABLE:
            role = parsed.role
            reg = regions.setdefault(parsed.key, {})
            if role == "in" or (role == "abs" and "input" not in reg):
                reg["input"] = n.input[0]
            elif role == "out":
                reg["output"] = n.output[0]
            elif role == "draws":
                reg["mode"] = "multinomial"
            elif role == "u":
                reg["mode"] = "bernoulli"
            elif role == "axes":
                reg["axis_tensor"] = n.input[0]
    out = {}
    for key, reg in regions.items():
        reg["axis"] = int(_initializer(graph, reg.get("axis_tensor"), 1))
        out[key] = (reg["input"], reg["output"], reg)
    return out


def verify(model: onnx.ModelProto | str | Path, options: VerifyOptions | None = None, *,
           feeds: dict[str, np.ndarray] | None = None, progress: Callable[[str], None] = lambda message: None,
           **option_values) -> VerifyReport:
    """Check every SAP node of a hardened model against the reference (custom) or statistics (portable).

    Options come as a VerifyOptions or as keywords (provider=, runs=, seed=); progress is told what
    each stage did as it finishes."""
    options = options or VerifyOptions(**option_values)
    options.validate()
    provider, runs, seed, end_to_end = options.provider, options.runs, options.seed, options.end_to_end
    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    # From a file, tensors stay on disk (models over 2 GiB): the tapped copy is written beside it.
    m = model if path is None else onnx.load(str(path), load_external_data=False)
    m = onnx.shape_inference.infer_shapes(copy.deepcopy(m), strict_mode=False)
    m = with_seed(m, seed)  # reproducible copy: seed 0 would draw OS entropy on every run
    custom = [n for n in m.graph.node if is_custom(n)]
    portable = _portable_regions(m.graph)
    everywhere = find_sap_nodes(m.graph)
    in_bodies = [f for f in everywhere if f.graph != "main"]
    if not everywhere:
        raise OnnxSapError("the model has no SAP nodes: nothing to verify; harden the model first")
    if not custom and not portable and not end_to_end:
        raise OnnxSapError(f"the model's {len(in_bodies)} SAP nodes sit inside If/Loop/Scan bodies, which only the "
                           "end-to-end comparison reaches, and end_to_end is 0: nothing to verify")
    e2e_skip = ("the portable form cannot reproduce the operator's stream"
                if any(f.form == "portable" for f in everywhere) else "")
    runs_needed = max(runs if custom or portable else 0, end_to_end if not e2e_skip else 0)
    runs_needed = runs_needed if not portable else max(runs, 200)
    existing = {o.name for o in m.graph.output}
    taps: list[str] = []
    for n in custom:
        taps += [n.input[0], n.output[0]]
    for inp, outp, _ in portable.values():
        taps += [inp, outp]
    if end_to_end and not e2e_skip:
        taps += [o.name for o in m.graph.output if o.type.HasField("tensor_type")]
    for name in dict.fromkeys(taps):
        if name not in existing:
            m.graph.output.append(_value_info(m, name))
    if path is None:
        sess = make_session(m, provider)
    else:
        tapped = path.with_name(path.name + ".verify.onnx")
        onnx.save(m, str(tapped))
        try:
            sess = make_session(str(tapped), provider)
        finally:
            tapped.unlink(missing_ok=True)
    progress(f"loaded a seeded copy tapping {len(custom) + len(portable)} SAP nodes in ONNX Runtime ({provider})")
    feeds = feeds if feeds is not None else random_feeds(
        sess, batch=4, seed=seed, user="verify", fix="pass feeds= of your own to onnx_sap.verify (Python API)")
    names = list(dict.fromkeys(taps))  # only the tapped tensors: the model's own outputs may be maps
    captured: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for call in range(runs_needed):
        outs = dict(zip(names, sess.run(names, feeds)))
        for t in taps:
            captured[t].append(outs[t])
    progress(f"ran the model {runs_needed} times")
    reports = []
    for n in custom:
        attrs = _attrs(n)
        xs, ys = captured[n.input[0]][:runs], captured[n.output[0]][:runs]
        rep = NodeReport(n.name, "custom", attrs["mode"], list(xs[0].shape), len(xs))
        for call, (x, y) in enumerate(zip(xs, ys)):
            d, u = compare_with_reference(x, y, attrs, call)
            rep.mask_disagreements += d
            rep.max_ulps = max(rep.max_ulps, u)
        rep.kept, rep.expected_kept, rep.z_kept, rep.z_mean = statistics(
            xs, ys, attrs, lambda mm: reference.sample_count(mm, attrs["ratio"], attrs["samples"]))
        if rep.mask_disagreements:
            rep.problems.append(f"{rep.mask_disagreements} keep decisions differ from the reference outside the band")
        if rep.max_ulps > MAX_ULPS:
            rep.problems.append(f"kept values differ by {rep.max_ulps:.1f} ulps (> {MAX_ULPS})")
        _check_stats(rep)
        reports.append(rep)
    for key, (inp, outp, facts) in portable.items():
        xs, ys = captured[inp], captured[outp]
        rep = NodeReport(key, "portable", facts.get("mode", "?"), list(xs[0].shape), len(xs))
        attrs = {"axis": facts["axis"]}
        ratio = _portable_ratio(m.graph, key)
        r_fixed = ratio(0) if facts.get("mode") == "multinomial" else None
        rep.kept, rep.expected_kept, rep.z_kept, rep.z_mean = statistics(
            xs, ys, attrs, lambda mm: r_fixed if r_fixed else (ratio(mm)))
        if facts.get("mode") == "multinomial":
            n_ex = int(np.prod(xs[0].shape[:facts["axis"]], dtype=np.int64))
            most = max(int((y.reshape(n_ex, -1) != 0).sum(axis=1).max()) for y in ys)
            if most > r_fixed:
                rep.problems.append(f"{most} distinct elements kept, more than r = {r_fixed}")
        _check_stats(rep)
        reports.append(rep)
    e2e = None
    if end_to_end:
        outputs = [o.name for o in m.graph.output if o.type.HasField("tensor_type") and o.name in existing]
        e2e = EndToEndReport(min(end_to_end, runs_needed), outputs, len(everywhere), skipped=e2e_skip)
        if not e2e_skip:
            _compare_end_to_end(e2e, m, feeds, captured)
            progress(f"compared {e2e.runs} runs end to end with onnx's reference runtime")
    return VerifyReport(reports, e2e)


def _compare_end_to_end(report: EndToEndReport, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                        captured: dict[str, list[np.ndarray]]) -> None:
    """Run model in onnx's reference runtime for calls 0..runs-1 and compare with ONNX Runtime's outputs
    of the same calls. Float ops other than SAP may round differently there: values must agree to
    1e-4 relative; a SAP keep decision flipped inside the band would show as a differing run."""
    from .reference_op import reference_session

    try:
        ref = reference_session(model)
        results = [ref.run(report.outputs, feeds) for _ in range(report.runs)]
    except Exception as e:  # an op the reference runtime lacks (ai.onnx.ml's ZipMap, say) is not SAP's fault
        report.skipped = f"onnx's reference runtime cannot run this model ({first_line(e)})"
        return
    for call, outs in enumerate(results):
        differs = False
        for name, want in zip(report.outputs, outs):
            got = captured[name][call]
            want = np.asarray(want)
            if got.dtype.kind != "f":
                differs |= not np.array_equal(got, want)
                continue
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
            report.max_abs_diff = max(report.max_abs_diff, float(np.max(diff)) if diff.size else 0.0)
            differs |= not np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
        report.differing_runs += differs


def _initializer(graph: onnx.GraphProto, name: str | None, default: float) -> np.ndarray | float:
    """The value of one (small) initializer: reading them all would read the weights too, which stay
    on disk when stored as external data (and resolve relative to the model, not the current folder)."""
    t = next((t for t in graph.initializer if t.name == name), None)
    return default if t is None else onnx.numpy_helper.to_array(t)


def _portable_ratio(graph: onnx.GraphProto, key: str):
    """r as a function of m for a portable region: from its ratio constant, or its fixed r."""
    fixed = None
    ratio = None
    for n in graph.node:
        parsed = parse_name(n.name)
        if parsed is None or parsed.key != key:
            continue
        if parsed.role == "r" and n.op_type == "Constant":
            fixed = float(onnx.numpy_helper.to_array(n.attribute[0].t))
        if parsed.role == "r_mul":
            ratio = float(_initializer(graph, n.input[1], 1.0))
    if ratio is not None:
        return lambda m: max(1, int(np.floor(ratio * m))) * (fixed or 1.0)
    return lambda m: fixed


def _check_stats(rep: NodeReport) -> None:
    if abs(rep.z_kept) > Z_LIMIT:
        rep.problems.append(f"kept {rep.kept} elements where {rep.expected_kept:.0f} were expected "
                            f"(z = {rep.z_kept:.1f})")
    if abs(rep.z_mean) > Z_LIMIT:
        rep.problems.append(f"E[Y] != X: sum(Y - X) is {rep.z_mean:.1f} standard errors from 0")
