"""What a model is, in the figures a user checks first: inputs, outputs, opsets, nodes, weights, SAP.

Counted from the proto without copying tensors: a weight's size comes from its dims and type, so a
model whose tensors stay on disk (external data) is summarised as cheaply as a small one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .sap_nodes import find_sap_nodes, iter_graphs


@dataclass
class TensorInfo:
    """A graph input or output: name, element type, shape (symbolic dims as names, unknown as '?')."""

    name: str
    dtype: str
    shape: list[int | str] | None

    def __str__(self) -> str:
        dims = "?" if self.shape is None else ", ".join(map(str, self.shape))
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass
class ModelSummary:
    """Counts of a model, main graph and If/Loop/Scan bodies together."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opsets: dict[str, int]
    nodes: int
    op_types: dict[str, int]  # most frequent first
    weights: int  # initializers and Constant nodes
    parameters: int  # their elements
    weight_bytes: int
    sap_sites: int
    graphs: int  # 1 + the number of If/Loop/Scan bodies

    def to_dict(self) -> dict:
        return asdict(self)


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    t = vi.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
    shape = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return TensorInfo(vi.name, dtype, shape)


def _size(t: onnx.TensorProto) -> tuple[int, int]:
    """(elements, bytes) of a tensor from its dims and type."""
    n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 0
    return n, n * itemsize


def summarize(model: onnx.ModelProto) -> ModelSummary:
    """The summary `inspect` prints and `harden` compares before and after."""
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    ops: Counter[str] = Counter()
    tensors: list[onnx.TensorProto] = []
    graphs = 0
    for _, g in iter_graphs(graph):
        graphs += 1
        tensors += list(g.initializer)
        for node in g.node:
            ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            tensors += [a.t for a in node.attribute if node.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR]
    sizes = [_size(t) for t in tensors]
    return ModelSummary(
        inputs=[_tensor_info(vi) for vi in graph.input if vi.name not in init_names],  # IR < 4 lists weights too
        outputs=[_tensor_info(vi) for vi in graph.output],
        opsets={imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        nodes=sum(ops.values()),
        op_types=dict(ops.most_common()),
        weights=len(tensors),
        parameters=sum(n for n, _ in sizes),
        weight_bytes=sum(b for _, b in sizes),
        sap_sites=len(find_sap_nodes(graph)),
        graphs=graphs,
    )
