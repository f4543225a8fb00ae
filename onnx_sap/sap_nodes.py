"""The one module that knows what a SAP node is: its name, how to find it, how to edit it.

Naming: every node harden adds is named ``onnx_sap::<region>/<n>`` or ``onnx_sap::<region>/<n>#<role>``,
where region is ``sap`` (the custom op), ``portable`` (SAP as standard ops, one node per role) or
``ensemble-in`` / ``ensemble-out`` (the --ensemble tiling and reduction). The nodes of one region
share the part before ``#``, which is how strip removes a region whole and verify reads a portable
one. Detection walks the main graph and every If/Loop/Scan body, on ONNX protos and on
onnx-graphsurgeon graphs alike, with one walker (`iter_graphs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx

from .errors import OptionError
from .reference import MAX_SAMPLES
from .runtime import DOMAIN, OP_TYPE

PREFIX = "onnx_sap::"
CUSTOM, PORTABLE, ENSEMBLE_IN, ENSEMBLE_OUT = "sap", "portable", "ensemble-in", "ensemble-out"
REGIONS = (CUSTOM, PORTABLE, ENSEMBLE_IN, ENSEMBLE_OUT)
# The r that makes a node keep everything at scale ~1: the custom op's largest samples (q = 1
# wherever p > 2e-8; smaller elements move by at most S / r), and a far larger float for the
# portable form, which has no such bound (q = 1 wherever p > 1e-17).
DETERMINISTIC_SAMPLES = MAX_SAMPLES
DETERMINISTIC_PORTABLE_R = 2.0**62


# ---------------------------------------------------------------------------------------------
# Naming.


def region_name(region: str, index: int) -> str:
    """``onnx_sap::<region>/<index>``: the name shared by the nodes of one SAP region."""
    if region not in REGIONS:
        raise ValueError(f"unknown SAP region {region!r}; one of {', '.join(REGIONS)}")
    return f"{PREFIX}{region}/{index}"


def node_name(region: str, role: str) -> str:
    """The name of one node of a region: ``<region name>#<role>``."""
    return f"{region}#{role}"


@dataclass(frozen=True)
class SapName:
    """A parsed SAP node name: ``onnx_sap::<region>/<index>#<role>`` (role may be empty)."""

    region: str
    index: str
    role: str

    @property
    def key(self) -> str:
        """The region's full name, shared by all its nodes."""
        return f"{PREFIX}{self.region}/{self.index}"


def parse_name(name: str) -> SapName | None:
    """The parts of a SAP node's name, or None for any other name."""
    if not name.startswith(PREFIX):
        return None
    head, _, role = name[len(PREFIX):].partition("#")
    region, sep, index = head.partition("/")
    if not sep or region not in REGIONS:
        return None
    return SapName(region, index, role)


# ---------------------------------------------------------------------------------------------
# Walking graphs and their subgraphs: onnx.GraphProto or onnx_graphsurgeon.Graph.


def _nodes_of(graph: Any) -> list:
    return list(graph.node) if isinstance(graph, onnx.GraphProto) else list(graph.nodes)


def _subgraphs(node: Any) -> Iterator[tuple[str, Any]]:
    """(attribute name, body) for each If/Loop/Scan body of a node."""
    if isinstance(node, onnx.NodeProto):
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.name, a.g
            for g in a.graphs:
                yield a.name, g
        return
    for name, value in node.attrs.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(v, "nodes") and hasattr(v, "tensors"):  # an onnx_graphsurgeon Graph
                yield name, v


def op_type(node: Any) -> str:
    return node.op_type if isinstance(node, onnx.NodeProto) else node.op


def iter_graphs(graph: Any, path: str = "main") -> Iterator[tuple[str, Any]]:
    """The graph and every body under it (depth first), each with a readable path."""
    yield path, graph
    for node in _nodes_of(graph):
        for attr, body in _subgraphs(node):
            yield from iter_graphs(body, f"{path}/{node.name or op_type(node)}.{attr}")


def iter_nodes(graph: Any) -> Iterator[tuple[str, Any]]:
    """(graph path, node) for every node of graph and of its bodies."""
    for path, g in iter_graphs(graph):
        for node in _nodes_of(g):
            yield path, node


# ---------------------------------------------------------------------------------------------
# Detection.


def is_custom(node: Any) -> bool:
    """An ``onnx_sap::StochasticActivationPruning`` node."""
    return op_type(node) == OP_TYPE and node.domain == DOMAIN


def region_of(node: Any) -> str | None:
    """The region key a node belongs to (custom nodes without a SAP name get one of their own), or None."""
    parsed = parse_name(node.name)
    if parsed is not None:
        return parsed.key
    return f"{PREFIX}{CUSTOM}/#{id(node)}" if is_custom(node) else None


def form_of(node: Any) -> str | None:
    """"custom", "portable" or "ensemble" for the node that completes a SAP region, else None.
    (A portable or ensemble region is many nodes; its ``#out`` node stands for it.)"""
    if is_custom(node):
        return "custom"
    parsed = parse_name(node.name)
    if parsed is None or parsed.role != "out":
        return None
    return {PORTABLE: "portable", ENSEMBLE_OUT: "ensemble"}.get(parsed.region)


def node_attributes(node: Any) -> dict:
    """A node's attributes as Python values (strings decoded)."""
    if isinstance(node, onnx.NodeProto):
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    else:
        values = dict(node.attrs)
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items()}


@dataclass
class SapNode:
    """One SAP region found in a model, by the node that completes it."""

    graph: str
    node: str
    form: str
    attributes: dict

    def to_dict(self) -> dict:
        return {"graph": self.graph, "node": self.node, "form": self.form, "attributes": self.attributes}


def find_sap_nodes(graph: Any) -> list[SapNode]:
    """SAP regions of graph and its bodies (custom op, portable form, ensemble reduction)."""
    found = []
    for path, node in iter_nodes(graph):
        form = form_of(node)
        if form is not None:
            found.append(SapNode(path, node.name, form, node_attributes(node) if form == "custom" else {}))
    return found


def has_sap(model: onnx.ModelProto) -> bool:
    """Whether any node of the model (bodies included) belongs to a SAP region."""
    return any(region_of(n) is not None for _, n in iter_nodes(model.graph))


# ---------------------------------------------------------------------------------------------
# Attribute edits (always on a copy).


def set_attributes(node: onnx.NodeProto, **values) -> None:
    """Give node these attribute values, keeping its other attributes."""
    kept = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(k, v) for k, v in values.items()])


def with_deterministic_sap(model: onnx.ModelProto, seed: int = 1) -> onnx.ModelProto:
    """A copy of a hardened model whose SAP nodes keep everything at scale ~1 (bernoulli with a
    huge r: DETERMINISTIC_SAMPLES): it should compute what the original model does."""
    out = copy.deepcopy(model)
    for _, node in iter_nodes(out.graph):
        parsed = parse_name(node.name)
        if is_custom(node):
            set_attributes(node, mode="bernoulli", samples=DETERMINISTIC_SAMPLES, seed=seed)
        elif parsed is not None and parsed.region == PORTABLE and parsed.role == "r":
            value = onnx.numpy_helper.from_array(np.array(DETERMINISTIC_PORTABLE_R), name="value")
            set_attributes(node, value=value)
    return out


# Seeds of verify and evaluate: node seeds are seed * 1000 + node index, which must stay an int64
# attribute (and exact as the float seed of the portable form's random ops).
MAX_DERIVED_SEED = 2**53


def check_derived_seed(seed: int) -> None:
    """Raise OptionError unless seed is one with_seed can derive node seeds from."""
    if not 0 <= seed < MAX_DERIVED_SEED:
        raise OptionError("seed", f"must be in [0, 2^53), got {seed}")


def with_seed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy whose SAP nodes draw reproducible streams, derived from seed (evaluation and
    verification only: a fixed seed is predictable)."""
    check_derived_seed(seed)
    out = copy.deepcopy(model)
    for i, (_, node) in enumerate(iter_nodes(out.graph)):
        parsed = parse_name(node.name)
        if is_custom(node):
            set_attributes(node, seed=seed * 1000 + i + 1)
        elif parsed is not None and op_type(node) in ("RandomUniformLike", "Multinomial"):
            set_attributes(node, seed=float(seed * 1000 + i + 1))
    return out


__all__ = ["PREFIX", "REGIONS", "SapName", "SapNode", "check_derived_seed", "find_sap_nodes", "form_of", "has_sap", "is_custom",
           "iter_graphs", "iter_nodes", "node_attributes", "node_name", "parse_name", "region_name", "region_of",
           "set_attributes", "with_deterministic_sap", "with_seed"]
