"""`evaluate`: what a hardened model costs (clean accuracy, calibration) and buys (robust accuracy).

Forward passes only, since an ONNX deployment has no gradients. The attacks (onnx_sap.attacks) run
on the original and on the hardened model; an example counts as robust at an epsilon only if it
survives every attack (the headline is the per-example worst case). The transfer attack runs on the
deterministic original (or strip(HARDENED)): since E[SAP(h)] = h, the original is the natural
surrogate of the hardened model (what EOT estimates).

A stochastic model's prediction on an example is scored over `passes` runs: it survives when the
majority of runs classify it correctly. All repeated queries go through batched session runs.
Data, forward passes and metrics live in onnx_sap.metrics.

The examples are cut into shards of `shard_size`, evaluated one by one in this process or as tasks
on a Dask cluster (onnx_sap.distributed). Every random stream of a shard derives from the seed and
the shard's index alone: the attacks' generators, and the hardened model's SAP nodes, which get
per-shard seeds and a fresh session (their Philox call counters count a session's runs). So the
results are the same in process and on any number of workers, for the same seed and shard size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import attacks as attack_fns
from .distributed import open_executor, parse_scheduler
from .errors import OnnxSapError, OptionError
from .metrics import Classifier, check_data_fits, expected_calibration_error, score
from .rewrite import strip_model
from .runtime import make_session, provider_name, score_output
from .sap_nodes import has_sap

ATTACKS = ("transfer", "spsa", "square")
MODELS = ("original", "hardened")
_SURROGATE = len(MODELS)  # stream tag of the transfer attack, which runs on the surrogate


@dataclass
class EvaluateOptions:
    """Budgets and settings of evaluate; every field is a CLI option (its flag: --field-name)."""

    eps: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    passes: int = 16  # stochastic runs per example when scoring (and for the K-pass clean accuracy)
    transfer_steps: int = 40
    spsa_steps: int = 40
    spsa_pairs: int = 32
    spsa_passes: int = 2
    spsa_delta: float = 1.0  # relative to eps; SAP's noise drowns small perturbations (README: tuning)
    square_iters: int = 300
    square_passes: int = 4
    square_p: float = 0.3
    clip_min: float | None = None  # default: the data's minimum
    clip_max: float | None = None  # default: the data's maximum
    limit: int | None = None
    seed: int = 0  # non-zero: SAP's streams are reproducible too (the attacks' always are)
    shard_size: int = 32  # examples per shard: the unit of work, of progress and of the random streams
    provider: str = "cpu"
    batch_rows: int = 16384
    output: str | None = None  # the score output; default: runtime.score_output's choice

    def validate(self) -> None:
        """Raise OptionError naming the first bad parameter."""
        if not self.eps or any(not (math.isfinite(e) and e >= 0) for e in self.eps):
            raise OptionError("eps", f"must be a non-empty list of finite epsilons >= 0, got {self.eps}")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks:
            raise OptionError("attacks", f"must be among {', '.join(ATTACKS)}, got {self.attacks}")
        if len(set(self.attacks)) != len(self.attacks) or len(set(self.eps)) != len(self.eps):
            raise OptionError("attacks" if len(set(self.attacks)) != len(self.attacks) else "eps",
                              "must not repeat a value")
        for name in ("passes", "transfer_steps", "spsa_steps", "spsa_pairs", "spsa_passes", "square_iters",
                     "square_passes", "shard_size", "batch_rows"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("spsa_delta", "square_p"):
            if not 0 < getattr(self, name) <= 1:
                raise OptionError(name, f"must be in (0, 1], got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise OptionError("limit", f"must be >= 1 (or None for all examples), got {self.limit}")
        if not 0 <= self.seed < 2**63:
            raise OptionError("seed", f"must be in [0, 2^63), got {self.seed}")
        if (self.clip_min is not None and self.clip_max is not None) and not self.clip_min < self.clip_max:
            raise OptionError("clip_min", f"must be below clip_max, got {self.clip_min} and {self.clip_max}")
        try:
            provider_name(self.provider)
        except OnnxSapError:
            raise OptionError("provider", f"must be cpu or cuda, got {self.provider!r}") from None

    def progress_steps(self, attack: str) -> int:
        """How many ticks one run of the attack gives."""
        return {"transfer": self.transfer_steps, "spsa": self.spsa_steps,
                "square": self.square_iters // attack_fns.SQUARE_TICK}[attack]


class EvaluateProgress:
    """What evaluate (and sweep) report as they go; this base class reports nothing.

    begin(total, unit) once; stage(label, total) when a stage of a task starts in this process (it
    returns the stage's tick, called total times); done(label, units) as each task (a shard, a
    configuration) finishes, wherever it ran.
    """

    def begin(self, total: int, unit: str) -> None:
        pass

    def stage(self, label: str, total: int) -> Callable[[], None]:
        return lambda: None

    def done(self, label: str, units: int) -> None:
        pass


def run_attack(attack: str, clf: Classifier, x: np.ndarray, y: np.ndarray, eps: float, opts: EvaluateOptions,
               rng: np.random.Generator, tick: Callable[[], None]) -> np.ndarray:
    """Run one attack with the budgets of opts (transfer: clf is the surrogate)."""
    lo, hi = opts.clip_min, opts.clip_max
    if attack == "transfer":
        return attack_fns.transfer(clf, x, y, eps, rng, steps=opts.transfer_steps, lo=lo, hi=hi, tick=tick)
    if attack == "spsa":
        return attack_fns.spsa(clf, x, y, eps, rng, steps=opts.spsa_steps, pairs=opts.spsa_pairs,
                               passes=opts.spsa_passes, delta=opts.spsa_delta, lo=lo, hi=hi, tick=tick)
    return attack_fns.square(clf, x, y, eps, rng, iters=opts.square_iters, passes=opts.square_passes,
                             p=opts.square_p, lo=lo, hi=hi, tick=tick)


# ---------------------------------------------------------------------------------------------
# Shards and their random streams.


@dataclass(frozen=True)
class Shard:
    """Examples start..stop-1, the index-th shard."""

    index: int
    start: int
    stop: int

    def __str__(self) -> str:
        return f"shard {self.index} (examples {self.start}-{self.stop - 1})"


def make_shards(n: int, size: int) -> list[Shard]:
    """Consecutive shards of `size` examples (the last may be shorter)."""
    return [Shard(i, start, min(start + size, n)) for i, start in enumerate(range(0, n, size))]


def attack_rng(seed: int, shard: Shard, model: int, attack: str, eps: float) -> np.random.Generator:
    """The generator of one attack on one model at one epsilon in one shard: a function of these
    alone, so adding an attack or an epsilon changes no other number."""
    eps_bits = int(np.float64(eps).view(np.uint64))
    return np.random.default_rng([seed, shard.index, model, ATTACKS.index(attack), eps_bits])


def shard_sap_seed(seed: int, shard: Shard) -> int:
    """The seed the SAP nodes get in this shard (0 stays 0: fresh entropy on every run)."""
    if seed == 0:
        return 0
    return int(np.random.SeedSequence([seed, shard.index, 0x5A9]).generate_state(1)[0]) + 1


# ---------------------------------------------------------------------------------------------
# Models as tasks see them, and the sessions a worker keeps.


@dataclass(frozen=True)
class ModelRef:
    """A model's bytes, named by their hash: what a task receives (sent once to each worker)."""

    data: bytes
    digest: str
    stochastic: bool

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "ModelRef":
        data = model.SerializeToString()
        return cls(data, hashlib.sha256(data).hexdigest(), has_sap(model))


_CACHE_SIZE = 4
_protos: "OrderedDict[str, onnx.ModelProto]" = OrderedDict()
_sessions: "OrderedDict[tuple, Any]" = OrderedDict()


def _remember(cache: OrderedDict, key: Any, make: Callable[[], Any]) -> Any:
    if key not in cache:
        cache[key] = make()
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def classifier(ref: ModelRef, opts: EvaluateOptions, threads: int | None, sap_seed: int = 0) -> Classifier:
    """A Classifier of the model in this process (a Dask worker keeps them between tasks).

    A deterministic model's session is kept (keyed by the model's hash) and shared. A stochastic
    model gets a fresh session from its per-shard seeded copy, since its SAP nodes' call counters
    count the session's runs: a kept session would make a shard's streams depend on earlier tasks.
    """
    proto = _remember(_protos, ref.digest, lambda: onnx.load_from_string(ref.data))
    if ref.stochastic:
        return Classifier(proto, opts.provider, opts.batch_rows, seed=sap_seed, threads=threads, output=opts.output)
    session = _remember(_sessions, (ref.digest, opts.provider, threads),
                        lambda: Classifier(proto, opts.provider, opts.batch_rows, threads=threads,
                                           output=opts.output).session)
    return Classifier(proto, opts.provider, opts.batch_rows, session=session, output=opts.output)


# ---------------------------------------------------------------------------------------------
# One shard, and the evaluation.


@dataclass
class ShardResult:
    """Per-example outcomes of one shard, for each target model."""

    shard: Shard
    single: dict[str, np.ndarray]  # model -> correct in one pass
    multi: dict[str, np.ndarray]  # model -> correct in the majority of passes
    probs: dict[str, np.ndarray]  # model -> mean probabilities over passes
    survived: dict[str, dict[str, dict[float, np.ndarray]]]  # model -> attack -> eps -> survived
    transfer_probs: dict[str, dict[float, np.ndarray]]  # model -> eps -> probabilities on transfer examples
    queries: dict[str, int]


def evaluate_shard(targets: dict[str, ModelRef], surrogate: ModelRef, x: np.ndarray, y: np.ndarray,
                   shard: Shard, opts: EvaluateOptions, threads: int | None = None,
                   progress: EvaluateProgress | None = None) -> ShardResult:
    """Clean scores and every attack on one shard (x, y are the shard's examples), for each target.

    The transfer attack runs once per epsilon on the surrogate; a target that is the surrogate
    itself (the original) shares its Classifier, so its queries include the transfer attack's.
    """
    progress = progress or EvaluateProgress()
    sap_seed = shard_sap_seed(opts.seed, shard)
    surrogate_clf = classifier(surrogate, opts, threads)
    res = ShardResult(shard, {}, {}, {}, {}, {}, {})
    transfer_cache: dict[float, np.ndarray] = {}
    for name, ref in targets.items():
        clf = surrogate_clf if ref.digest == surrogate.digest else classifier(ref, opts, threads, sap_seed)
        queries_before = clf.queries
        res.single[name], res.multi[name], res.probs[name] = score(clf, x, y, opts.passes)
        res.survived[name] = {a: {} for a in opts.attacks}
        res.transfer_probs[name] = {}
        for eps in opts.eps:
            for attack in opts.attacks:
                if attack == "transfer":
                    if eps not in transfer_cache:
                        tick = progress.stage(f"{shard}: transfer eps={eps:g} (PGD on the original)",
                                              opts.progress_steps(attack))
                        rng = attack_rng(opts.seed, shard, _SURROGATE, attack, eps)
                        transfer_cache[eps] = run_attack(attack, surrogate_clf, x, y, eps, opts, rng, tick)
                    x_adv = transfer_cache[eps]
                else:
                    tick = progress.stage(f"{shard}: {name}: {attack} eps={eps:g}", opts.progress_steps(attack))
                    rng = attack_rng(opts.seed, shard, MODELS.index(name), attack, eps)
                    x_adv = run_attack(attack, clf, x, y, eps, opts, rng, tick)
                _, res.survived[name][attack][eps], adv_probs = score(clf, x_adv, y, opts.passes)
                if attack == "transfer":
                    res.transfer_probs[name][eps] = adv_probs
        res.queries[name] = clf.queries - queries_before
    return res


@dataclass
class ModelResult:
    clean_single: float
    clean_multi: float
    ece: float
    accuracy: dict[str, dict[str, float]]  # attack (and "worst") -> eps -> accuracy
    ece_under_attack: dict[str, float]  # eps -> ECE on the transfer attack's examples
    queries: int = 0


def summarize(results: list[ShardResult], y: np.ndarray, opts: EvaluateOptions) -> dict[str, dict]:
    """Per model, the ModelResult (as a dict) of the shards put back together in order."""
    results = sorted(results, key=lambda r: r.shard.index)
    out = {}
    for name in results[0].single:
        cat = lambda part: np.concatenate([getattr(r, part)[name] for r in results])  # noqa: E731
        acc: dict[str, dict[str, float]] = {a: {} for a in opts.attacks}
        acc["worst"] = {}
        ece_adv = {}
        for eps in opts.eps:
            alive = np.ones(len(y), dtype=bool)
            for attack in opts.attacks:
                survived = np.concatenate([r.survived[name][attack][eps] for r in results])
                acc[attack][f"{eps:g}"] = float(survived.mean())
                alive &= survived
                if attack == "transfer":
                    probs = np.concatenate([r.transfer_probs[name][eps] for r in results])
                    ece_adv[f"{eps:g}"] = expected_calibration_error(probs, y)
            acc["worst"][f"{eps:g}"] = float(alive.mean())
        out[name] = asdict(ModelResult(float(cat("single").mean()), float(cat("multi").mean()),
                                       expected_calibration_error(cat("probs"), y), acc, ece_adv,
                                       sum(r.queries[name] for r in results)))
    return out


def prepare(x: np.ndarray, opts: EvaluateOptions) -> EvaluateOptions:
    """Validated options with the clip range filled in from the data (the caller's object untouched)."""
    opts.validate()
    return dataclasses.replace(opts, eps=list(opts.eps), attacks=list(opts.attacks),
                               clip_min=float(x.min()) if opts.clip_min is None else opts.clip_min,
                               clip_max=float(x.max()) if opts.clip_max is None else opts.clip_max)


def run_shards(executor, targets: dict[str, ModelRef], surrogate: ModelRef, x: np.ndarray, y: np.ndarray,
               opts: EvaluateOptions, progress: EvaluateProgress) -> list[ShardResult]:
    """evaluate_shard over every shard, in this process or as one task per shard."""
    shards = make_shards(len(x), opts.shard_size)
    targets_h = {k: executor.share(v) for k, v in targets.items()}
    surrogate_h = targets_h["original"] if targets.get("original") is surrogate else executor.share(surrogate)
    local = None if executor.remote else progress
    calls = [(targets_h, surrogate_h, x[s.start:s.stop], y[s.start:s.stop], s, opts, executor.threads, local)
             for s in shards]
    return executor.map(evaluate_shard, calls, [str(s) for s in shards],
                        lambda i, r: progress.done(str(shards[i]), shards[i].stop - shards[i].start))


def evaluate(original: onnx.ModelProto | None, hardened: onnx.ModelProto, x: np.ndarray, y: np.ndarray,
             opts: EvaluateOptions | None = None, progress: EvaluateProgress | None = None, *,
             scheduler: Any = None) -> dict:
    """Evaluate both models on (x, y); returns a JSON-ready dict (see ModelResult).

    original None: strip(hardened) stands for it. scheduler: None runs in this process; "local",
    "local:N", a Dask scheduler address (tcp://HOST:8786) or a distributed.Client runs one task
    per shard on Dask, with the same result.
    """
    opts = prepare(x, opts or EvaluateOptions())
    if scheduler is not None:
        parse_scheduler(scheduler)
    if not has_sap(hardened):
        raise OnnxSapError("the hardened model has no SAP nodes; harden it first (onnx-sap harden)")
    if original is None:
        original, _ = strip_model(hardened)
    score_output(make_session(original, opts.provider), opts.output)  # a bad output fails here, before any shard
    for model in (original, hardened):  # data that does not fit: one clear error before any shard
        check_data_fits(Classifier(model, opts.provider, opts.batch_rows, output=opts.output), x, y)
    targets = {"original": ModelRef.of(original), "hardened": ModelRef.of(hardened)}
    progress = progress or EvaluateProgress()
    progress.begin(len(x), "examples")
    with open_executor(scheduler) as executor:
        results = run_shards(executor, targets, targets["original"], x, y, opts, progress)
    return {"examples": int(len(x)), "config": asdict(opts), "models": summarize(results, y, opts)}


def accuracy_axes(figsize: tuple[float, float]):
    """A figure and axes for an accuracy plot (matplotlib's Agg backend), or the one-line error that
    names the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxSapError("--plot needs matplotlib: pip install matplotlib (or onnx-sap[plot])") from None
    return plt.subplots(figsize=figsize)


def save_accuracy_plot(fig, ax, path: Path, *, xlabel: str, title: str, legend_size: int, dpi: int) -> None:
    """What evaluate's and sweep's plots share: accuracy on [0, 1.02], grid, legend, title, the file."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot(result: dict, path: Path) -> None:
    """Accuracy vs epsilon, per attack and worst case, both models (needs matplotlib)."""
    eps = result["config"]["eps"]
    fig, ax = accuracy_axes((7, 4.5))
    for name, style in (("original", "--"), ("hardened", "-")):
        for attack, values in result["models"][name]["accuracy"].items():
            ax.plot(eps, [values[f"{e:g}"] for e in eps], style, marker="o",
                    linewidth=3 if attack == "worst" else 1.2, label=f"{name}: {attack}")
    save_accuracy_plot(fig, ax, path, xlabel="L-inf epsilon", legend_size=8, dpi=120,
                       title=f"Robust accuracy ({result['examples']} examples; worst = survives every attack)")
