"""The NumPy reference as an operator of onnx's own reference runtime (onnx.reference).

`reference_session(model)` is an ``onnx.reference.ReferenceEvaluator`` that runs a whole hardened model,
If/Loop/Scan bodies included, with every ``onnx_sap::StochasticActivationPruning`` node computed by
reference.sap: with the same seeds and the same per-node call indices (0, 1, ... for each node, as
the operator counts its calls in a session) it gives what ONNX Runtime with the op library gives,
up to keep decisions inside SPEC.md's margin band. verify uses it to compare end-to-end outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from . import reference
from .runtime import DOMAIN

_D = reference.ATTRIBUTE_DEFAULTS


class StochasticActivationPruning(OpRun):
    """onnx_sap::StochasticActivationPruning, opset 1 (SPEC.md), by the NumPy reference."""

    op_domain = DOMAIN

    def __init__(self, onnx_node: onnx.NodeProto, run_params: dict, schema=None):
        super().__init__(onnx_node, run_params, schema)
        self.calls = 0  # the node's call counter: one per run, as in the operator

    def _run(self, x, mode=_D["mode"], ratio=_D["ratio"], samples=_D["samples"], axis=_D["axis"],
             seed=_D["seed"], stream=_D["stream"]):
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if not seed:
            raise ValueError(f"node {self.onnx_node.name!r} has seed 0 (OS entropy), which no reference can "
                             "reproduce; run a copy from sap_nodes.with_seed")
        call, self.calls = self.calls, self.calls + 1
        y = reference.sap(np.asarray(x), ratio=float(ratio), samples=int(samples), mode=mode, axis=int(axis),
                          seed=int(seed), stream=int(stream), call=call)
        return (y,)


def reference_session(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's ReferenceEvaluator for a hardened model, SAP nodes by the NumPy reference. Each session
    counts calls from 0, like a new ONNX Runtime session."""
    return ReferenceEvaluator(model, new_ops=[StochasticActivationPruning])


__all__ = ["StochasticActivationPruning", "reference_session"]
