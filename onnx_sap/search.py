"""Choosing SAP's settings on the user's own data: `sweep` (evaluate a grid of configurations) and
`tune` (a ratio per SAP site within a clean-accuracy budget).

sweep hardens each configuration and evaluates it with evaluate's shards and streams (so a
configuration's figures equal those evaluate reports for the same model, seed and shard size), one
configuration per task, in process or on Dask. tune searches coordinate-wise: the sites with the
most activations first, each by bisection (in log space) between --min-ratio and its current ratio,
under a fixed number of clean-accuracy evaluations; every evaluation uses the same SAP seeds, so the
search is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import OptionError
from .distributed import InProcess, open_executor, parse_scheduler
from .evaluate import (EvaluateOptions, EvaluateProgress, ModelRef, Shard, accuracy_axes, make_shards, prepare,
                       run_shards, save_accuracy_plot, shard_sap_seed, summarize)
from .metrics import Classifier, expected_calibration_error, score
from .reference import sample_count
from .rewrite import MODES, HardenOptions, harden_model
from .sap_nodes import is_custom, iter_nodes, set_attributes


def _positive_finite(name: str, values: list[float]) -> None:
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise OptionError(name, f"must be a non-empty list of finite values > 0, got {values}")


# ---------------------------------------------------------------------------------------------
# sweep


@dataclass
class SweepOptions:
    """The grid of sweep: every combination of ratio, mode and ensemble size is one configuration."""

    ratios: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.5, 1.0])
    modes: list[str] = field(default_factory=lambda: ["multinomial", "bernoulli"])
    ensembles: list[int] = field(default_factory=lambda: [1])
    latency_batch: int = 32  # batch of the latency measurement (hardened / original, interleaved rounds)
    latency_rounds: int = 20

    def validate(self) -> None:
        """Raise OptionError naming the first bad parameter."""
        _positive_finite("ratios", self.ratios)
        if not self.modes or any(m not in MODES for m in self.modes):
            raise OptionError("modes", f"must be among {', '.join(MODES)}, got {self.modes}")
        if not self.ensembles or any(k < 1 for k in self.ensembles):
            raise OptionError("ensembles", f"must be a non-empty list of sizes >= 1, got {self.ensembles}")
        for name in ("latency_batch", "latency_rounds"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be >= 1, got {getattr(self, name)}")

    def configurations(self) -> list[HardenOptions]:
        """HardenOptions of every configuration, in grid order (mode, ensemble, ratio)."""
        return [HardenOptions(ratio=r, mode=m, ensemble=k) for m in self.modes for k in self.ensembles
                for r in self.ratios]


@dataclass
class SweepRow:
    """One configuration's figures (the original's row has mode 'original')."""

    mode: str
    ratio: float | None
    ensemble: int
    clean_single: float
    clean_multi: float
    ece: float
    worst: dict[str, float]  # eps -> worst-case robust accuracy
    accuracy: dict[str, dict[str, float]]  # attack -> eps -> accuracy
    latency_ratio: float  # hardened / original p50 latency, measured side by side

    @property
    def label(self) -> str:
        if self.mode == "original":
            return "original"
        return f"{self.mode} ratio={self.ratio:g}" + (f" ensemble={self.ensemble}" if self.ensemble > 1 else "")


def _latency_ratio(original: onnx.ModelProto, hardened: onnx.ModelProto, opts: SweepOptions,
                   eval_opts: EvaluateOptions, threads: int | None) -> float:
    from .bench import bench

    return bench(original, hardened, provider=eval_opts.provider, batches=(opts.latency_batch,), threads=threads,
                 rounds=opts.latency_rounds, warmup=2)[0].ratio_p50


class _StagesOf(EvaluateProgress):
    """Passes a configuration's stages on to sweep's progress, whose unit is the configuration."""

    def __init__(self, progress: EvaluateProgress | None):
        self.progress = progress or EvaluateProgress()

    def stage(self, label: str, total: int):
        return self.progress.stage(label, total)


def sweep_configuration(original: ModelRef, config: HardenOptions | None, x: np.ndarray, y: np.ndarray,
                        opts: SweepOptions, eval_opts: EvaluateOptions, threads: int | None = None,
                        progress: EvaluateProgress | None = None) -> SweepRow:
    """One task of sweep: harden the original with config (None: the original itself) and evaluate
    it over evaluate's shards, in this process; then measure its latency against the original."""
    proto = onnx.load_from_string(original.data)
    name = "original" if config is None else "hardened"
    ref = original if config is None else ModelRef.of(harden_model(proto, config).model)
    results = run_shards(InProcess(threads), {name: ref}, original, x, y, eval_opts, _StagesOf(progress))
    res = summarize(results, y, eval_opts)[name]
    latency = 1.0 if config is None else _latency_ratio(proto, onnx.load_from_string(ref.data), opts,
                                                        eval_opts, threads)
    return SweepRow("original" if config is None else config.mode, None if config is None else config.ratio,
                    1 if config is None else config.ensemble, res["clean_single"], res["clean_multi"], res["ece"],
                    res["accuracy"]["worst"], res["accuracy"], latency)


@dataclass
class SweepResult:
    """The original's row first, then the configurations from the best worst case down."""

    rows: list[SweepRow]
    examples: int
    options: SweepOptions
    evaluate_options: EvaluateOptions

    def to_dict(self) -> dict:
        return {"examples": self.examples, "sweep": asdict(self.options), "config": asdict(self.evaluate_options),
                "rows": [dict(asdict(r), label=r.label) for r in self.rows]}


def _order(row: SweepRow) -> tuple:
    """Best first: mean worst-case accuracy over the epsilons, then clean majority accuracy."""
    return (-float(np.mean(list(row.worst.values()))), -row.clean_multi, row.mode, row.ensemble, row.ratio or 0)


def sweep(original: onnx.ModelProto, x: np.ndarray, y: np.ndarray, options: SweepOptions | None = None,
          evaluate_options: EvaluateOptions | None = None, progress: EvaluateProgress | None = None, *,
          scheduler: Any = None) -> SweepResult:
    """Harden original with each configuration of options and evaluate it on (x, y) against the
    attacks of evaluate_options (default here: transfer and SPSA at eps 0.1); one configuration per
    task, in process (scheduler None) or on Dask (as for evaluate)."""
    options = options or SweepOptions()
    options.validate()
    eval_opts = prepare(x, evaluate_options or EvaluateOptions(eps=[0.1], attacks=["transfer", "spsa"]))
    if scheduler is not None:
        parse_scheduler(scheduler)
    configs: list[HardenOptions | None] = [None, *options.configurations()]
    for c in configs[1:]:
        c.validate()
    progress = progress or EvaluateProgress()
    progress.begin(len(configs), "configurations")
    with open_executor(scheduler) as executor:
        ref = executor.share(ModelRef.of(original))
        xs, ys = executor.share(x), executor.share(y)
        local = None if executor.remote else progress
        calls = [(ref, c, xs, ys, options, eval_opts, executor.threads, local) for c in configs]
        labels = ["original" if c is None else f"{c.mode} ratio={c.ratio:g} ensemble={c.ensemble}" for c in configs]
        rows = executor.map(sweep_configuration, calls, labels, lambda i, r: progress.done(labels[i], 1))
    return SweepResult([rows[0], *sorted(rows[1:], key=_order)], len(x), options, eval_opts)


def plot_sweep(result: SweepResult, path: Path) -> None:
    """Clean (majority) and worst-case accuracy against ratio, one colour per mode and ensemble size,
    the original as grey lines (needs matplotlib)."""
    fig, ax = accuracy_axes((7, 4.2))
    orig = result.rows[0]
    eps_keys = list(orig.worst)
    ax.axhline(orig.clean_multi, color="grey", linewidth=1.5, label="original: clean")
    for j, e in enumerate(eps_keys):
        ax.axhline(orig.worst[e], color="grey", linestyle=":" if j else "--", linewidth=1.5,
                   label=f"original: worst case, eps {e}")
    groups: dict[tuple[str, int], list[SweepRow]] = {}
    for row in result.rows[1:]:
        groups.setdefault((row.mode, row.ensemble), []).append(row)
    for (mode, k), rows in groups.items():
        rows = sorted(rows, key=lambda r: r.ratio)
        name = mode + (f", ensemble {k}" if k > 1 else "")
        ratios = [r.ratio for r in rows]
        line, = ax.plot(ratios, [r.clean_multi for r in rows], "-o", label=f"{name}: clean")
        for j, e in enumerate(eps_keys):
            ax.plot(ratios, [r.worst[e] for r in rows], ":s" if j else "--s", color=line.get_color(),
                    label=f"{name}: worst case, eps {e}")
    ax.set_xscale("log")
    save_accuracy_plot(fig, ax, path, xlabel="SAP ratio (samples per example / activations; smaller = more pruning)",
                       title=f"sweep: {result.examples} examples; clean = majority of {result.evaluate_options.passes} "
                             "runs", legend_size=7, dpi=100)


# ---------------------------------------------------------------------------------------------
# tune


@dataclass
class TuneOptions:
    """How tune searches: clean majority accuracy may drop at most `budget` points below the original's."""

    budget: float = 1.0  # accuracy points (percent)
    mode: str = "multinomial"
    min_ratio: float = 0.01  # the most pruning tried
    max_ratio: float = 16.0  # the least pruning tried, and where every site starts (ratio 1 can cost points)
    evaluations: int = 24  # clean-accuracy evaluations in all, the first (every site at max_ratio) included
    passes: int = 16
    seed: int = 1  # SAP streams of the search's evaluations (the written model keeps seed 0: OS entropy)
    shard_size: int = 32  # examples per task of each evaluation (SAP seeds per shard, as in evaluate)
    provider: str = "cpu"
    batch_rows: int = 16384

    def validate(self) -> None:
        """Raise OptionError naming the first bad parameter."""
        if not (math.isfinite(self.budget) and 0 <= self.budget <= 100):
            raise OptionError("budget", f"must be between 0 and 100 accuracy points, got {self.budget}")
        if self.mode not in MODES:
            raise OptionError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (math.isfinite(self.min_ratio) and self.min_ratio > 0):
            raise OptionError("min_ratio", f"must be finite and > 0, got {self.min_ratio}")
        if not (math.isfinite(self.max_ratio) and self.max_ratio > self.min_ratio):
            raise OptionError("max_ratio", f"must be finite and above min_ratio ({self.min_ratio}), "
                                           f"got {self.max_ratio}")
        for name in ("evaluations", "passes", "shard_size", "batch_rows"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.seed < 2**53:
            raise OptionError("seed", f"must be in [1, 2^53) (the search must be reproducible), got {self.seed}")


@dataclass
class TuneStep:
    """One evaluation of the search."""

    site: str | None  # the SAP node whose ratio was tried (None: the starting point)
    ratio: float
    accuracy: float  # clean majority accuracy with that ratio
    accepted: bool


@dataclass
class TuneResult:
    """The tuned model (SAP seeds 0), its per-site ratios, the search and the final evaluation."""

    model: onnx.ModelProto
    ratios: dict[str, float]  # SAP node -> ratio, in the order the search took the sites
    activations: dict[str, int | None]  # SAP node -> activations per example
    steps: list[TuneStep]
    original: dict[str, float]  # clean_single, clean_multi, ece of the original on the data
    tuned: dict[str, float]  # the same for the tuned model
    target: float  # the lowest acceptable clean majority accuracy
    output: Path | None = None

    @property
    def samples(self) -> dict[str, int | None]:
        """SAP node -> the samples r its ratio gives per example (None where m is known only at run time),
        as the operator computes it: floor(ratio * m), at least 1."""
        return {name: sample_count(m, ratio) if m else None
                for name, ratio in self.ratios.items() for m in [self.activations[name]]}

    def to_dict(self) -> dict:
        return {"ratios": self.ratios, "activations": self.activations, "samples": self.samples,
                "steps": [asdict(s) for s in self.steps],
                "original": self.original, "tuned": self.tuned, "target": self.target,
                "output": str(self.output) if self.output else None}


def _with_ratios(model: onnx.ModelProto, ratios: dict[str, float]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for _, node in iter_nodes(out.graph):
        if is_custom(node) and node.name in ratios:
            set_attributes(node, ratio=float(ratios[node.name]), samples=0)
    return out


def _stream(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "stream")


def clean_shard(ref: ModelRef, x: np.ndarray, y: np.ndarray, shard: Shard, opts: TuneOptions,
                threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One task of a tune evaluation: score (single pass, majority, mean probabilities) on one shard,
    with a fresh session whose SAP seeds derive from the seed and the shard's index."""
    model = onnx.load_from_string(ref.data)
    clf = Classifier(model, opts.provider, opts.batch_rows, seed=shard_sap_seed(opts.seed, shard), threads=threads)
    return score(clf, x, y, opts.passes)


def _clean(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, opts: TuneOptions, executor) -> dict[str, float]:
    shards = make_shards(len(x), opts.shard_size)
    ref = executor.share(ModelRef.of(model))
    parts = executor.map(clean_shard, [(ref, x[s.start:s.stop], y[s.start:s.stop], s, opts, executor.threads)
                                       for s in shards], [str(s) for s in shards], lambda i, r: None)
    single, multi, probs = (np.concatenate(p) for p in zip(*parts))
    return {"clean_single": float(single.mean()), "clean_multi": float(multi.mean()),
            "ece": expected_calibration_error(probs, y)}


def _allowance(evaluations: int, sites: int) -> list[int]:
    """Evaluations per site after the first one, most expensive sites first, as evenly as possible."""
    spare = max(0, evaluations - 1)
    return [spare // sites + (1 if i < spare % sites else 0) for i in range(sites)]


def tune(original: onnx.ModelProto, x: np.ndarray, y: np.ndarray, options: TuneOptions | None = None,
         progress: EvaluateProgress | None = None, *, scheduler: Any = None) -> TuneResult:
    """Choose a ratio per SAP site (smallest = most pruning) keeping clean majority accuracy on
    (x, y) within options.budget points of the original's; returns the model with those ratios
    (recorded in metadata_props as onnx_sap.site_ratios). (x, y) should be held out from any attack.
    Each evaluation runs one task per shard, in process or on Dask (scheduler as for evaluate), with
    the same result."""
    options = options or TuneOptions()
    options.validate()
    if scheduler is not None:
        parse_scheduler(scheduler)
    with open_executor(scheduler) as executor:
        return _search(original, x, y, options, progress or EvaluateProgress(), executor)


def _search(original: onnx.ModelProto, x: np.ndarray, y: np.ndarray, options: TuneOptions,
            progress: EvaluateProgress, executor) -> TuneResult:
    hardened = harden_model(original, HardenOptions(mode=options.mode))
    # A custom SAP node's stream attribute is its site's index among the plan's selected sites.
    sites = [(n.name, hardened.plan.selected[_stream(n)].m) for _, n in iter_nodes(hardened.model.graph)
             if is_custom(n)]
    order = sorted(range(len(sites)), key=lambda i: (-(sites[i][1] or 0), i))
    base = hardened.model
    progress.begin(options.evaluations, "evaluations")
    reference = _clean(original, x, y, options, executor)
    target = reference["clean_single"] - options.budget / 100  # the original is deterministic: one pass
    ratios = {name: options.max_ratio for name, _ in sites}
    first = _clean(_with_ratios(base, ratios), x, y, options, executor)["clean_multi"]
    steps = [TuneStep(None, options.max_ratio, first, first >= target)]
    progress.done(f"every site at ratio {options.max_ratio:g}: {100 * first:.1f}%", 1)
    for i, allowance in zip(order, _allowance(options.evaluations, len(sites))):
        name = sites[i][0]
        if not steps[0].accepted:
            break  # even the least pruning misses the budget: keep max_ratio everywhere (reported)
        lo, hi = options.min_ratio, ratios[name]
        for step in range(allowance):
            trial = lo if step == 0 else float(f"{math.sqrt(lo * hi):.3g}")  # the most pruning first
            if not lo <= trial < hi:
                break
            acc = _clean(_with_ratios(base, {**ratios, name: trial}), x, y, options, executor)["clean_multi"]
            steps.append(TuneStep(name, trial, acc, acc >= target))
            progress.done(f"{name} ratio {trial:g}: {100 * acc:.1f}% ({'kept' if acc >= target else 'too low'})", 1)
            if acc >= target:
                hi = trial
                if step == 0:
                    break
            else:
                lo = trial
        ratios[name] = hi
    model = _with_ratios(base, ratios)
    chosen = {sites[i][0]: ratios[sites[i][0]] for i in order}
    _set_metadata(model, "onnx_sap.site_ratios", json.dumps(chosen))
    _set_metadata(model, "onnx_sap.tune", json.dumps({"budget": options.budget, "seed": options.seed,
                                                      "evaluations": len(steps), "examples": int(len(x))}))
    return TuneResult(model, chosen, {sites[i][0]: sites[i][1] for i in order}, steps, reference,
                      _clean(model, x, y, options, executor), target)


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
