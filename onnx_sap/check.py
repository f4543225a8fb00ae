"""The check after rewriting: the hardened model runs, keeps the original's outputs (names, dtypes,
shapes), and with every SAP node made deterministic (everything kept at scale 1) it computes what
the original computes: a cheap proof that nothing else in the graph changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxSapError, first_line
from .rewrite import HardenOptions
from .sap_nodes import with_deterministic_sap
from .runtime import NUMPY_TYPES, as_scores, make_session

@dataclass
class CheckReport:
    """What the check compared."""

    outputs: list[str]
    max_abs_diff: float
    equivalence_checked: bool
    note: str = ""


# The largest random input the check makes (a declared 2^31 x 8 input would otherwise exhaust memory).
MAX_FEED_BYTES = 256 << 20


def random_feeds(session, batch: int = 2, seed: int = 0, *, user: str = "the check",
                 fix: str = "pass --no-check to skip the check") -> dict[str, np.ndarray]:
    """Random inputs for a session: dynamic dims become `batch` (first) or 8 (others); an input over
    MAX_FEED_BYTES, or of a type with no random data, is refused in one line naming `user` (the
    command feeding it) and `fix` (what its caller can do instead)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else (batch if i == 0 else 8) for i, d in enumerate(inp.shape)]
        dtype = NUMPY_TYPES.get(inp.type)
        if dtype is None:
            raise OnnxSapError(f"input {inp.name!r} has type {inp.type}, which {user} cannot feed; {fix}")
        size = np.dtype(dtype).itemsize * float(np.prod(shape, dtype=np.float64))
        if size > MAX_FEED_BYTES:
            raise OnnxSapError(f"input {inp.name!r} has shape {shape}: {size / 2**20:,.0f} MiB of random data, over "
                               f"the {MAX_FEED_BYTES >> 20} MiB {user} feeds at most; {fix}")
        if np.dtype(dtype).kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _session(model: onnx.ModelProto | str, what: str, weights: dict[str, np.ndarray] | None = None):
    try:
        return make_session(model, initializers=weights)
    except OnnxSapError:
        raise
    except Exception as e:  # ONNX Runtime's own errors are long: keep the first line
        raise OnnxSapError(f"the {what} model does not load in ONNX Runtime ({first_line(e)}); pass --no-check "
                           "to skip this check") from None


def _run(sess, feeds, what: str) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as e:
        raise OnnxSapError(f"the {what} model fails to run on a random input ({first_line(e)}); pass --no-check "
                           "to skip this check") from None


def _deterministic_session(hardened: onnx.ModelProto | str, weights: dict[str, np.ndarray] | None = None):
    """A session of the hardened model with SAP made deterministic. From a file, the copy is written
    beside it without loading its tensors, so that external data (models over 2 GiB) still resolves
    and nothing large is copied in memory."""
    what = "hardened (deterministic)"
    if isinstance(hardened, onnx.ModelProto):
        return _session(with_deterministic_sap(hardened), what, weights)
    path = Path(hardened)
    det_path = path.with_name(path.name + ".deterministic.onnx")
    onnx.save(with_deterministic_sap(onnx.load(str(path), load_external_data=False)), str(det_path))
    try:
        return _session(str(det_path), what)  # ONNX Runtime has read the file once the session exists
    finally:
        det_path.unlink(missing_ok=True)


def _as_array(value) -> np.ndarray:
    """An output as an array: a ZipMap's sequence of maps (a list in ONNX Runtime) as its scores."""
    return as_scores(value).astype(np.float32) if isinstance(value, list) else value


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def check_hardened(original: onnx.ModelProto | str, hardened: onnx.ModelProto | str, options: HardenOptions,
                   portable_multinomial: bool = False, weights: dict[str, np.ndarray] | None = None) -> CheckReport:
    """Run both models on one random input; raise OnnxSapError on any mismatch. Lean models (the
    rewrite of a file) come with their weights, which all sessions share."""
    orig_sess = _session(original, "original", weights)
    feeds = random_feeds(orig_sess)
    expected = _run(orig_sess, feeds, "original")
    hard_sess = _session(hardened, "hardened", weights)
    got = _run(hard_sess, feeds, "hardened")
    names0 = [o.name for o in orig_sess.get_outputs()]
    names1 = [o.name for o in hard_sess.get_outputs()]
    if names0 != names1:
        raise OnnxSapError(f"hardened outputs {names1} differ from the original's {names0}; please report this")
    expected, got = [_as_array(v) for v in expected], [_as_array(v) for v in got]
    for name, e, g in zip(names0, expected, got):
        if e.dtype != g.dtype or e.shape != g.shape:
            raise OnnxSapError(f"output {name!r}: hardened gives {g.dtype}{list(g.shape)}, original "
                               f"{e.dtype}{list(e.shape)}; please report this")
    if portable_multinomial:
        return CheckReport(names0, float("nan"), False,
                           "portable multinomial: r is fixed in the graph, so only names, dtypes and shapes "
                           "were compared")
    det = [_as_array(v) for v in _run(_deterministic_session(hardened, weights), feeds, "hardened (deterministic)")]
    worst = 0.0
    for name, e, g, out in zip(names0, expected, det, orig_sess.get_outputs()):
        ref = e.astype(np.float64)
        if options.ensemble > 1 and options.ensemble_reduce == "probs" and not _ends_in_softmax(original, name):
            ref = _log_softmax(e)
        diff = np.abs(g.astype(np.float64) - ref)
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        bad = ~np.isclose(g.astype(np.float64), ref, rtol=1e-3, atol=1e-4 * scale)
        if bad.any():
            raise OnnxSapError(f"output {name!r}: with SAP made deterministic the hardened model differs from the "
                               f"original by up to {float(np.max(diff)):.3g}; please report this")
        worst = max(worst, float(np.max(diff)) if diff.size else 0.0)
    return CheckReport(names0, worst, True)


def _ends_in_softmax(model: onnx.ModelProto | str, output: str) -> bool:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
    return any(n.op_type == "Softmax" and output in n.output for n in m.graph.node)
