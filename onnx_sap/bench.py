"""`bench`: latency and throughput of the original and the hardened model, side by side.

Rounds are interleaved (original, hardened, then the other order), and each hardened time is divided
by the same round's original time, so that load from elsewhere on a shared machine hits both.
Idle ONNX Runtime pool threads are told not to spin, or one session's spinning threads would steal
the cores of the session being timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .check import random_feeds
from .errors import OnnxSapError
from .rewrite import HardenOptions, harden_model
from .runtime import make_session, score_output


@dataclass
class Timing:
    p50_ms: float
    p90_ms: float
    throughput: float  # examples per second at p50


@dataclass
class BenchResult:
    """One batch size: both models' timings and the per-round ratio hardened / original."""

    batch: int
    original: Timing
    hardened: Timing
    ratio_p50: float
    ratio_p90: float
    rounds: int

    def to_dict(self) -> dict:
        return asdict(self)


def _timing(times: list[float], batch: int) -> Timing:
    p50 = float(np.percentile(times, 50))
    return Timing(p50 * 1e3, float(np.percentile(times, 90)) * 1e3, batch / p50)


def bench(model: onnx.ModelProto | str, hardened: onnx.ModelProto | str | None = None, *, provider: str = "cpu",
          batches: tuple[int, ...] = (1,), threads: int | None = None, rounds: int = 30, warmup: int = 3,
          options: HardenOptions | None = None, seed: int = 0, output: str | None = None) -> list[BenchResult]:
    """Time model and its hardened version (hardened in memory with `options` when not given), each
    run computing its score output (runtime.score_output; `output` names another)."""
    if rounds < 1 or warmup < 0 or not batches or any(b < 1 for b in batches):
        raise OnnxSapError(f"rounds and batch sizes must be >= 1 (and warmup >= 0), got rounds={rounds}, "
                           f"batches={list(batches)}, warmup={warmup}")
    if hardened is None:
        base = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
        hardened = harden_model(base, options or HardenOptions()).model
    orig = make_session(model, provider, threads=threads, spin=False)
    hard = make_session(hardened, provider, threads=threads, spin=False)
    fetch = [score_output(orig, output)]
    results = []
    for batch in batches:
        feeds = random_feeds(orig, batch=batch, seed=seed)
        for _ in range(warmup):
            orig.run(fetch, feeds)
            hard.run(fetch, feeds)
        t_orig, t_hard = [], []
        for r in range(rounds):
            pair = [(orig, t_orig), (hard, t_hard)]
            for sess, times in (pair if r % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter()
                sess.run(fetch, feeds)
                times.append(time.perf_counter() - t0)
        ratios = np.array(t_hard) / np.array(t_orig)
        results.append(BenchResult(batch, _timing(t_orig, batch), _timing(t_hard, batch),
                                   float(np.median(ratios)), float(np.percentile(ratios, 90)), rounds))
    return results
