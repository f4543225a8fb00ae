"""`bench`: latency and throughput of the original and the hardened model, side by side.

Rounds are interleaved (original, hardened, then the other order), and each hardened time is divided
by the same round's original time, so that load from elsewhere on a shared machine hits both.
Idle ONNX Runtime pool threads are told not to spin, or one session's spinning threads would steal
the cores of the session being timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from .check import random_feeds
from .errors import OptionError
from .rewrite import HardenOptions, harden_model
from .runtime import make_session, provider_name, score_output


@dataclass
class BenchOptions:
    """How bench times the two models; the CLI's options, one for one (harden: for in-memory hardening)."""

    provider: str = "cpu"
    batches: tuple[int, ...] = (1,)
    threads: int | None = None
    rounds: int = 30
    warmup: int = 3
    seed: int = 0
    output: str | None = None  # the output each run computes (default: runtime.score_output's choice)
    harden: HardenOptions = field(default_factory=HardenOptions)

    def validate(self) -> None:
        """Raise OptionError naming the first bad option."""
        provider_name(self.provider)
        if not self.batches or any(b < 1 for b in self.batches):
            raise OptionError("batches", f"must be one or more batch sizes >= 1, got {list(self.batches)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError("threads", f"must be >= 1 (or None: all cores), got {self.threads}")
        if self.rounds < 1:
            raise OptionError("rounds", f"must be >= 1, got {self.rounds}")
        if self.warmup < 0:
            raise OptionError("warmup", f"must be >= 0, got {self.warmup}")
        self.harden.validate()


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


def bench(model: onnx.ModelProto | str, hardened: onnx.ModelProto | str | None = None,
          options: BenchOptions | None = None, *, progress: Callable[[str], None] = lambda message: None,
          **option_values) -> list[BenchResult]:
    """Time model and its hardened version (hardened in memory with options.harden when not given),
    each run computing its score output (runtime.score_output; options.output names another).

    Options come as a BenchOptions or as keywords (batches=, rounds=, ...); progress is told what
    each stage did as it finishes."""
    o = options or BenchOptions(**option_values)
    o.validate()
    if hardened is None:
        base = model if isinstance(model, onnx.ModelProto) else onnx.load(model)
        hardened = harden_model(base, o.harden).model
        progress("hardened the model in memory")
    orig = make_session(model, o.provider, threads=o.threads, spin=False)
    hard = make_session(hardened, o.provider, threads=o.threads, spin=False)
    fetch = [score_output(orig, o.output)]
    results = []
    for batch in o.batches:
        feeds = random_feeds(orig, batch=batch, seed=o.seed, user="bench",
                             fix="pass a smaller --batch if the model leaves its batch dim open")
        for _ in range(o.warmup):
            orig.run(fetch, feeds)
            hard.run(fetch, feeds)
        t_orig, t_hard = [], []
        for r in range(o.rounds):
            pair = [(orig, t_orig), (hard, t_hard)]
            for sess, times in (pair if r % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter()
                sess.run(fetch, feeds)
                times.append(time.perf_counter() - t0)
        ratios = np.array(t_hard) / np.array(t_orig)
        results.append(BenchResult(batch, _timing(t_orig, batch), _timing(t_hard, batch),
                                   float(np.median(ratios)), float(np.percentile(ratios, 90)), o.rounds))
        progress(f"batch {batch}: {o.rounds} rounds, hardened / original {results[-1].ratio_p50:.2f}")
    return results
