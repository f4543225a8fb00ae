"""Rewriting a model: find activation sites, plan, insert SAP after each, and the reverse (strip).

One path: ModelProto -> shape inference -> onnx-graphsurgeon graph -> find sites (patterns.py) ->
plan -> rewrite (custom op or portable form, optional ensemble) -> export -> restore what the export
drops (model fields, node doc strings, IR < 4 initializer inputs) -> ModelProto.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from . import __version__
from .errors import OnnxSapError, OptionError, check_choice
from .modelio import default_opset
from .patterns import KINDS, Match, find_activations, raw_producer
from .portable import RANDOMNESS_WARNING as PORTABLE_RANDOMNESS_WARNING, emit_portable_sap
from .reference import MAX_SAMPLES, MODES, sample_count
from .runtime import DOMAIN, OP_TYPE
from .sap_nodes import (CUSTOM, ENSEMBLE_IN, ENSEMBLE_OUT, PORTABLE, find_sap_nodes, iter_graphs, iter_nodes,
                        node_name, region_name, region_of)

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)
ENSEMBLE_REDUCES = ("probs", "logits")
# Element types the SAP op (and the ensemble's reduction) takes; others (bfloat16, integers) are refused.
SAP_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def dtype_name(dtype) -> str:
    """A readable name for an onnx-graphsurgeon dtype (a NumPy dtype, or an ONNX type number when NumPy
    has none, as for bfloat16)."""
    if isinstance(dtype, int):
        return onnx.TensorProto.DataType.Name(dtype).lower() if dtype in onnx.TensorProto.DataType.values() \
            else f"type {dtype}"
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


@dataclass
class HardenOptions:
    """How SAP is inserted; the CLI's options, one for one."""

    ratio: float = 1.0
    samples: int = 0
    mode: str = "multinomial"
    axis: int = 1
    seed: int = 0
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    portable: bool = False
    ensemble: int = 1
    ensemble_reduce: str = "probs"
    force: bool = False

    def validate(self) -> None:
        """Raise OptionError naming the first bad option."""
        # The node holds ratio as a float32: it must stay finite and non-zero there.
        if not (math.isfinite(self.ratio) and _FLOAT32_TINY <= self.ratio <= _FLOAT32_MAX):
            raise OptionError("ratio", f"must be > 0 and at most {_FLOAT32_MAX:.4g} (a finite float32), got {self.ratio}")
        if not 0 <= self.samples <= MAX_SAMPLES:
            raise OptionError("samples", f"must be in [0, {MAX_SAMPLES}] (0: use ratio), got {self.samples}")
        check_choice("mode", self.mode, MODES)
        if self.axis < 0:
            raise OptionError("axis", f"must be >= 0 (dims before it index examples), got {self.axis}")
        if not 0 <= self.seed < 2**63:
            raise OptionError("seed", f"must be in [0, 2^63), got {self.seed}")
        if self.ensemble < 1:
            raise OptionError("ensemble", f"must be >= 1, got {self.ensemble}")
        check_choice("ensemble_reduce", self.ensemble_reduce, ENSEMBLE_REDUCES)
        for name in ("include", "exclude"):
            if any(not pat for pat in getattr(self, name)):
                raise OptionError(name, "must not hold an empty pattern")

    def warnings(self) -> list[str]:
        """What these options give up (harden prints each on stderr and lists them in --json)."""
        found = []
        if self.seed:
            found.append("--seed makes SAP's randomness predictable to an attacker; use it for tests and "
                         "evaluation only")
        if self.portable:
            found.append(PORTABLE_RANDOMNESS_WARNING)
        return found


@dataclass
class Site:
    """One activation site of the plan."""

    graph: str
    kind: str
    form: str
    detail: str
    nodes: list[str]
    tensor: str
    shape: list[int | str] | None
    m: int | None
    r: int | None
    selected: bool = True
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """What harden found and what it will do (or did)."""

    sites: list[Site]
    existing: list[dict] = field(default_factory=list)
    options: HardenOptions | None = None

    @property
    def selected(self) -> list[Site]:
        return [s for s in self.sites if s.selected]

    def to_dict(self) -> dict:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "selected": len(self.selected),
            "activations": sum(s.m or 0 for s in self.selected),
            "existing_sap_nodes": self.existing,
            "options": asdict(self.options) if self.options else None,
        }


def _shape_of(t: gs.Variable) -> list[int | str] | None:
    if t.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else (str(d) if d else "?") for d in t.shape]


def _site_size(shape: list[int | str] | None, axis: int) -> int | None:
    if shape is None or len(shape) <= axis or not all(isinstance(d, int) for d in shape[axis:]):
        return None
    return int(np.prod(shape[axis:], dtype=np.int64))


def _selected(kind: str, names: list[str], include: Sequence[str], exclude: Sequence[str]) -> tuple[bool, str]:
    def hit(pat: str) -> bool:
        return pat == kind or any(fnmatch.fnmatchcase(n, pat) for n in names)

    if include and not any(hit(p) for p in include):
        return False, "not in --include"
    for p in exclude:
        if hit(p):
            return False, f"--exclude {p}"
    return True, ""


def existing_sap_nodes(graph: gs.Graph) -> list[dict]:
    """SAP nodes already in the graph (custom op, portable form, ensemble), with their attributes."""
    return [found.to_dict() for found in find_sap_nodes(graph)]


def make_plan(graph: gs.Graph, options: HardenOptions) -> tuple[Plan, list[tuple[gs.Graph, Match, Site]]]:
    """Find and select the activation sites of every graph."""
    plan = Plan([], existing_sap_nodes(graph), options)
    chosen = []
    for path, g in iter_graphs(graph):
        for match in find_activations(g):
            names = [n.name for n in match.nodes]
            shape = _shape_of(match.output)
            m = _site_size(shape, options.axis)
            site = Site(path, match.kind, match.form, match.detail, names, match.output.name, shape, m,
                        sample_count(m, options.ratio, options.samples) if m else None)
            site.selected, site.reason = _selected(match.kind, names, options.include, options.exclude)
            if match.excluded:
                site.selected, site.reason = False, match.excluded
            if site.selected and shape is not None and len(shape) <= options.axis:
                site.selected, site.reason = False, f"rank {len(shape)} <= --axis {options.axis}"
            if site.selected and match.output.dtype is not None and match.output.dtype not in SAP_DTYPES:
                site.selected, site.reason = False, f"{dtype_name(match.output.dtype)}: SAP takes float16/32/64"
            plan.sites.append(site)
            if site.selected:
                chosen.append((g, match, site))
    return plan, chosen


# ---------------------------------------------------------------------------------------------
# Rewriting.


class _Names:
    """Fresh tensor names that collide with nothing in the model."""

    def __init__(self, graph: gs.Graph):
        self.used = set()
        for _, g in iter_graphs(graph):
            self.used.update(g.tensors().keys())

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _detach_output(graph: gs.Graph, out: gs.Variable, names: _Names, suffix: str) -> tuple[gs.Variable, int]:
    """Make out's producer write a new tensor instead; returns (new tensor, producer's index in nodes).
    out keeps its name (and its place among graph outputs and consumers' inputs)."""
    node = raw_producer(out)
    pre = gs.Variable(names.fresh(out.name + suffix), dtype=out.dtype, shape=out.shape)
    node.outputs[node.outputs.index(out)] = pre
    return pre, next(i for i, n in enumerate(graph.nodes) if n is node)


def _insert_sap(graph: gs.Graph, match: Match, stream: int, options: HardenOptions, names: _Names) -> None:
    out = match.output
    pre, at = _detach_output(graph, out, names, "__pre_sap")
    if options.portable:
        nodes = emit_portable_sap(pre, out, stream, options, region_name(PORTABLE, stream), names.fresh)
    else:
        nodes = [gs.Node(OP_TYPE, name=region_name(CUSTOM, stream), domain=DOMAIN, inputs=[pre], outputs=[out],
                         attrs={"mode": options.mode, "ratio": float(options.ratio), "samples": int(options.samples),
                                "axis": int(options.axis), "seed": int(options.seed), "stream": int(stream)})]
    graph.nodes[at + 1:at + 1] = nodes


def _add_ensemble(graph: gs.Graph, k: int, reduce: str, opset: int, names: _Names) -> None:
    """Average k stochastic passes in one run: tile the batch k times at the inputs, and at each output
    regroup to [k, N, ...] and reduce (log of mean softmax, or mean of logits)."""
    for i, x in enumerate(list(graph.inputs)):
        if x.shape is not None and len(x.shape) == 0:
            continue
        tiled = gs.Variable(names.fresh(x.name + "__ensemble"), dtype=x.dtype)
        for consumer in list(x.outputs):
            consumer.inputs[consumer.inputs.index(x)] = tiled
        graph.nodes.insert(0, gs.Node("Concat", name=node_name(region_name(ENSEMBLE_IN, i), "out"), inputs=[x] * k,
                                      outputs=[tiled], attrs={"axis": 0}))
    # Every tensor after the inputs now holds k times the batch: shapes inferred for the original
    # (a static batch size) would contradict it, so they are left for inference to redo. Scalars stay
    # scalars (and ONNX Runtime needs the shapes of a Loop body's iteration count and condition).
    outputs = {id(t) for t in graph.outputs}
    for _, g in iter_graphs(graph):
        for t in g.tensors().values():
            if (isinstance(t, gs.Variable) and id(t) not in outputs and not any(t is x for x in graph.inputs)
                    and not (t.shape is not None and len(t.shape) == 0)):
                t.shape = None
    for i, y in enumerate(list(graph.outputs)):
        if y.dtype is not None and y.dtype not in SAP_DTYPES:
            raise OnnxSapError(f"--ensemble needs float16/float32/float64 outputs; output {y.name!r} is "
                               f"{dtype_name(y.dtype)}")
        src = raw_producer(y)
        if src is None:
            raise OnnxSapError(f"--ensemble: output {y.name!r} is not computed by the graph")
        already_probs = src.op == "Softmax"
        members, _ = _detach_output(graph, y, names, "__members")
        members.shape = None  # k times the output's batch
        for consumer in list(y.outputs):  # nodes that read the output go on computing on every member
            for j, t in enumerate(list(consumer.inputs)):
                if t is y:
                    consumer.inputs[j] = members
        p = region_name(ENSEMBLE_OUT, i)

        def v(tag: str) -> gs.Variable:
            return gs.Variable(names.fresh(f"{y.name}__ens_{tag}"))

        def const(tag: str, arr) -> gs.Constant:
            return gs.Constant(names.fresh(f"{y.name}__ens_{tag}"), np.asarray(arr, dtype=np.int64))

        shape, rest, new_shape, grouped = v("shape"), v("rest"), v("grouped_shape"), v("grouped")
        nodes = [
            gs.Node("Shape", name=f"{p}#shape", inputs=[members], outputs=[shape]),
            gs.Node("Slice", name=f"{p}#rest", inputs=[shape, const("one", [1]), const("end", [2**62])],
                    outputs=[rest]) if opset >= 10 else  # before opset 10, Slice's bounds are attributes
            gs.Node("Slice", name=f"{p}#rest", inputs=[shape], outputs=[rest],
                    attrs={"starts": [1], "ends": [2**62], "axes": [0]}),
            gs.Node("Concat", name=f"{p}#target", inputs=[const("kn", [k, -1]), rest], outputs=[new_shape],
                    attrs={"axis": 0}),
            gs.Node("Reshape", name=f"{p}#regroup", inputs=[members, new_shape], outputs=[grouped]),
        ]

        def reduce_first(op: str, x: gs.Variable, out: gs.Variable, role: str, keepdims: int) -> gs.Node:
            if opset >= 18:
                return gs.Node(op, name=f"{p}#{role}", inputs=[x, const("axes", [0])], outputs=[out],
                               attrs={"keepdims": keepdims})
            return gs.Node(op, name=f"{p}#{role}", inputs=[x], outputs=[out], attrs={"axes": [0], "keepdims": keepdims})

        if reduce == "probs" and not already_probs:
            # log(mean_k softmax(z_k)) as a log-sum-exp over k of l_k = log_softmax(z_k), shifted by
            # max_k l_k: finite for any finite logits (log(mean(softmax)) underflows to -inf once a
            # logit trails the top one by more than about 104).
            logp, top, top_k, shifted, e, mean, log_mean = (v(t) for t in ("logp", "max", "max_k", "shifted", "exp",
                                                                            "mean", "log_mean"))
            nodes += [gs.Node("LogSoftmax", name=f"{p}#log_softmax", inputs=[grouped], outputs=[logp],
                              attrs={"axis": -1}),
                      reduce_first("ReduceMax", logp, top, "max", 0),
                      reduce_first("ReduceMax", logp, top_k, "max_k", 1),
                      gs.Node("Sub", name=f"{p}#shift", inputs=[logp, top_k], outputs=[shifted]),
                      gs.Node("Exp", name=f"{p}#exp", inputs=[shifted], outputs=[e]),
                      reduce_first("ReduceMean", e, mean, "mean", 0),
                      gs.Node("Log", name=f"{p}#log", inputs=[mean], outputs=[log_mean]),
                      gs.Node("Add", name=f"{p}#out", inputs=[top, log_mean], outputs=[y])]
        else:
            nodes.append(reduce_first("ReduceMean", grouped, y, "out", 0))
        graph.nodes.extend(nodes)


def strip_graph(graph: gs.Graph) -> int:
    """Remove every SAP region (custom node, portable subgraph, ensemble) from graph and its
    subgraphs, reconnecting the tensors around each. Returns the number of regions removed."""
    removed = 0
    for _, g in list(iter_graphs(graph)):
        regions: dict[str, list[gs.Node]] = {}
        for node in g.nodes:
            key = region_of(node)
            if key is not None:
                regions.setdefault(key, []).append(node)
        for nodes in regions.values():
            _bypass_region(g, nodes)
            removed += 1
        ids = {id(n) for ns in regions.values() for n in ns}
        g.nodes = [n for n in g.nodes if id(n) not in ids]
    return removed


def _bypass_region(graph: gs.Graph, nodes: list[gs.Node]) -> None:
    # Nodes in the region's own subgraphs (the portable form's If) read its tensors from inside.
    ids = {id(n) for node in nodes for _, g in iter_graphs(gs.Graph(nodes=[node])) for n in g.nodes}
    produced = {id(t) for n in nodes for t in n.outputs}
    sources = []
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Variable) and id(t) not in produced and all(t is not s for s in sources):
                sources.append(t)
    graph_outputs = {id(t) for t in graph.outputs}
    sinks = [t for n in nodes for t in n.outputs
             if id(t) in graph_outputs or any(id(c) not in ids for c in t.outputs)]
    if len(sources) == 1 and len(sinks) == 0:  # e.g. ensemble input Concat of an unused input
        return
    if len(sources) != 1 or len(sinks) != 1:
        raise OnnxSapError(f"cannot strip SAP region {nodes[0].name!r}: it has {len(sources)} inputs and "
                           f"{len(sinks)} outputs (expected 1 and 1); was the model edited after hardening?")
    src, dst = sources[0], sinks[0]
    src_producer = raw_producer(src)
    outside_consumers = [c for c in dst.outputs if id(c) not in ids]
    for n in nodes:  # detach the region so that no tensor still names its nodes
        n.inputs.clear()
        n.outputs.clear()
    if src_producer is not None:
        # The region sits after a node: that node writes dst again, as before hardening.
        src_producer.outputs[src_producer.outputs.index(src)] = dst
    else:
        # The region sits after a graph input (ensemble tiling): its consumers read the input again.
        for c in outside_consumers:
            c.inputs[c.inputs.index(dst)] = src


# ---------------------------------------------------------------------------------------------
# Model-level bookkeeping around the onnx-graphsurgeon round trip.


@contextlib.contextmanager
def _graphsurgeon_quiet():
    """onnx-graphsurgeon prints its log lines on stdout (into --json output too). What it warns about
    on import and export (sequence/map types it cannot map to NumPy, which _export restores; no
    colors) is handled here, so only its errors are kept, and those go to stderr."""
    with G_LOGGER.suppress(G_LOGGER.ERROR), contextlib.redirect_stdout(sys.stderr):
        yield


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model as an onnx-graphsurgeon graph, with inferred shapes where inference succeeds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shapes are a convenience here (m and r in the plan), not a requirement
        inferred = model
    with _graphsurgeon_quiet():
        return gs.import_onnx(inferred)


def _has_undefined(t: onnx.TypeProto) -> bool:
    """Whether t is, or holds, a tensor of UNDEFINED element type."""
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        return t.tensor_type.elem_type == onnx.TensorProto.UNDEFINED
    if kind == "sequence_type":
        return _has_undefined(t.sequence_type.elem_type)
    if kind == "optional_type":
        return _has_undefined(t.optional_type.elem_type)
    if kind == "map_type":
        return _has_undefined(t.map_type.value_type)
    return False


def _restore_interface(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The main graph's inputs and outputs exactly as they were (shape inference names unknown dims,
    and onnx-graphsurgeon exports a sequence of maps, a ZipMap's output, as a sequence of UNDEFINED
    tensors, which ONNX Runtime refuses to load). In bodies, values of such a type get their original
    type back, and value_info entries of such a type are dropped (value_info is optional)."""
    interface = {vi.name: vi for vi in (*original.graph.input, *original.graph.output)}
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name in interface:
            vi.CopyFrom(interface[vi.name])
    types = {vi.name: vi.type for _, g in iter_graphs(original.graph) for vi in (*g.input, *g.output, *g.value_info)}
    for _, g in iter_graphs(model.graph):
        for vi in (*g.input, *g.output):
            if _has_undefined(vi.type) and vi.name in types:
                vi.type.CopyFrom(types[vi.name])
        kept = [vi for vi in g.value_info if not _has_undefined(vi.type)]
        if len(kept) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(kept)


def _node_doc_strings(graph: onnx.GraphProto) -> dict[str, str]:
    return {n.name: n.doc_string for _, n in iter_nodes(graph) if n.doc_string and n.name}


def _restore_doc_strings(graph: onnx.GraphProto, docs: dict[str, str]) -> None:
    for _, n in iter_nodes(graph):
        if n.name in docs:
            n.doc_string = docs[n.name]


def _export(graph: gs.Graph, original: onnx.ModelProto, provenance: dict | None) -> onnx.ModelProto:
    with _graphsurgeon_quiet():
        model = gs.export_onnx(graph, do_type_check=False)
    _restore_interface(model, original)
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, f, getattr(original, f))
    del model.opset_import[:]
    model.opset_import.extend(imp for imp in original.opset_import if imp.domain != DOMAIN)
    has_sap = any(n.domain == DOMAIN for _, n in iter_nodes(graph))
    if has_sap:
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    del model.metadata_props[:]
    for prop in original.metadata_props:
        if not prop.key.startswith("onnx_sap."):
            model.metadata_props.add(key=prop.key, value=prop.value)
    if provenance is not None:
        for key, value in provenance.items():
            model.metadata_props.add(key=f"onnx_sap.{key}", value=value)
    _restore_doc_strings(model.graph, _node_doc_strings(original.graph))
    model.graph.doc_string = original.graph.doc_string
    if original.ir_version < 4:
        # IR < 4 lists every initializer as a graph input, which the export drops; the checker
        # requires them back, in the original order: those of the initializers still there (an
        # unused one is dropped, and its input with it, or the model would require it as an input).
        initializers = {t.name for t in original.graph.initializer}
        kept = {t.name for t in model.graph.initializer}
        del model.graph.input[:]
        model.graph.input.extend(i for i in original.graph.input if i.name not in initializers or i.name in kept)
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer if t.name not in initializers)  # ours (--ensemble)
    return model


# ---------------------------------------------------------------------------------------------
# Public API.


@dataclass
class HardenResult:
    """A hardened model and the plan that produced it."""

    model: onnx.ModelProto
    plan: Plan


def plan_model(model: onnx.ModelProto, options: HardenOptions | None = None) -> Plan:
    """The sites harden would rewrite (nothing is changed)."""
    options = options or HardenOptions()
    options.validate()
    plan, _ = make_plan(import_graph(model), options)
    return plan


def harden_model(model: onnx.ModelProto, options: HardenOptions | None = None) -> HardenResult:
    """Insert SAP after every selected activation of model (which is not modified)."""
    options = options or HardenOptions()
    options.validate()
    opset = default_opset(model)
    graph = import_graph(model)
    existing = existing_sap_nodes(graph)
    if existing and not options.force:
        raise OnnxSapError(f"the model already has {len(existing)} SAP node(s); pass --force to replace them "
                           "(they are never stacked)")
    if existing:
        strip_graph(graph)
    plan, chosen = make_plan(graph, options)
    plan.existing = existing
    if not plan.sites:
        raise OnnxSapError("no activations found (Relu, Clip, Gelu, SiLU, ...; a linear model has none): nothing to "
                           "harden; `onnx-sap inspect` lists what is recognised")
    if not chosen:
        reasons = "; ".join(sorted({s.reason for s in plan.sites}))
        raise OnnxSapError(f"all {len(plan.sites)} activation sites are excluded ({reasons}); "
                           "widen --include/--exclude/--axis, or see `onnx-sap inspect`")
    if options.portable and opset < 13:
        raise OnnxSapError(f"--portable needs opset >= 13 (the model has {opset}); convert the model with "
                           "onnx.version_converter or use the custom op")
    names = _Names(graph)
    for stream, (g, match, site) in enumerate(chosen):
        if options.portable and options.mode == "multinomial" and site.m is None:
            raise OnnxSapError(f"--portable multinomial needs a static activation size, and site {site.nodes[-1]!r} "
                               f"has shape {site.shape}; use --mode bernoulli")
        _insert_sap(g, match, stream, options, names)
    if options.ensemble > 1:
        _add_ensemble(graph, options.ensemble, options.ensemble_reduce, opset, names)
    provenance = {"version": __version__, "options": json.dumps(asdict(options), default=list),
                  "sites": str(len(chosen))}
    return HardenResult(_export(graph, model, provenance), plan)


def strip_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Remove all SAP nodes (custom, portable, ensemble); returns the model and how many regions went."""
    graph = import_graph(model)
    removed = strip_graph(graph)
    if removed == 0:
        raise OnnxSapError("the model has no SAP nodes: nothing to strip")
    return _export(graph, model, None), removed


__all__ = ["HardenOptions", "HardenResult", "KINDS", "Plan", "Site", "harden_model", "plan_model", "strip_model"]
