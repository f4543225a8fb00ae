"""`evaluate`: what a hardened model costs (clean accuracy, calibration) and buys (robust accuracy).

Forward passes only, since an ONNX deployment has no gradients. The attacks (onnx_sap.attacks) run
on the original and on the hardened model; an example counts as robust at an epsilon only if it
survives every attack (the headline is the per-example worst case). The transfer attack runs on the
deterministic original (or strip(HARDENED)): since E[SAP(h)] = h, the original is the natural
surrogate of the hardened model (what EOT estimates).

A stochastic model's prediction on an example is scored over `passes` runs: it survives when the
majority of runs classify it correctly. All repeated queries go through batched session runs.
Data, forward passes and metrics live in onnx_sap.metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import attacks as attack_fns
from .errors import OnnxSapError
from .metrics import Classifier, expected_calibration_error, score
from .rewrite import strip_model

ATTACKS = ("transfer", "spsa", "square")


@dataclass
class EvaluateOptions:
    """Budgets and settings of evaluate; every field is a CLI option."""

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
    clip_min: float | None = None
    clip_max: float | None = None
    limit: int | None = None
    seed: int = 0
    provider: str = "cpu"
    batch_rows: int = 16384

    def validate(self) -> None:
        """Raise OnnxSapError naming the first bad option."""
        if not self.eps or any(not (e >= 0) for e in self.eps):
            raise OnnxSapError(f"--eps must be a list of epsilons >= 0, got {self.eps}")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad or not self.attacks:
            raise OnnxSapError(f"--attacks must be among {', '.join(ATTACKS)}, got {self.attacks}")
        for name in ("passes", "transfer_steps", "spsa_steps", "spsa_pairs", "spsa_passes", "square_iters",
                     "square_passes", "batch_rows"):
            if getattr(self, name) < 1:
                raise OnnxSapError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.spsa_delta <= 1 or not 0 < self.square_p <= 1:
            raise OnnxSapError("--spsa-delta and --square-p must be in (0, 1]")

    def progress_steps(self, attack: str) -> int:
        """How many ticks one run of the attack gives."""
        return {"transfer": self.transfer_steps, "spsa": self.spsa_steps,
                "square": self.square_iters // attack_fns.SQUARE_TICK}[attack]


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


@dataclass
class ModelResult:
    clean_single: float
    clean_multi: float
    ece: float
    accuracy: dict[str, dict[str, float]]  # attack (and "worst") -> eps -> accuracy
    ece_under_attack: dict[str, float]  # eps -> ECE on the transfer attack's examples
    queries: int = 0


def evaluate(original: onnx.ModelProto | None, hardened: onnx.ModelProto, x: np.ndarray, y: np.ndarray,
             opts: EvaluateOptions, progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict:
    """Evaluate both models on (x, y); returns a JSON-ready dict (see ModelResult)."""
    opts.validate()
    if opts.clip_min is None:
        opts.clip_min = float(x.min())
    if opts.clip_max is None:
        opts.clip_max = float(x.max())
    if original is None:
        original, _ = strip_model(hardened)
    surrogate = Classifier(original, opts.provider, opts.batch_rows)
    targets = {"original": surrogate, "hardened": Classifier(hardened, opts.provider, opts.batch_rows,
                                                             seed=opts.seed or None)}
    if not targets["hardened"].stochastic:
        raise OnnxSapError("HARDENED has no SAP nodes; harden it first (onnx-sap harden)")
    progress = progress or (lambda label, total: (lambda: None))
    results = {}
    transfer_cache: dict[float, np.ndarray] = {}  # the surrogate is the same for both targets
    for name, clf in targets.items():
        rng = np.random.default_rng(opts.seed)
        single, multi, probs = score(clf, x, y, opts.passes)
        acc: dict[str, dict[str, float]] = {a: {} for a in opts.attacks}
        acc["worst"] = {}
        ece_adv = {}
        for eps in opts.eps:
            alive = np.ones(len(x), dtype=bool)
            for attack in opts.attacks:
                tick = progress(f"{name}: {attack} eps={eps:g}", opts.progress_steps(attack))
                if attack == "transfer":
                    if eps not in transfer_cache:
                        transfer_cache[eps] = run_attack(attack, surrogate, x, y, eps, opts, rng, tick)
                    x_adv = transfer_cache[eps]
                else:
                    x_adv = run_attack(attack, clf, x, y, eps, opts, rng, tick)
                _, survived, adv_probs = score(clf, x_adv, y, opts.passes)
                acc[attack][f"{eps:g}"] = float(survived.mean())
                alive &= survived
                if attack == "transfer":
                    ece_adv[f"{eps:g}"] = expected_calibration_error(adv_probs, y)
            acc["worst"][f"{eps:g}"] = float(alive.mean())
        results[name] = asdict(ModelResult(float(single.mean()), float(multi.mean()),
                                           expected_calibration_error(probs, y), acc, ece_adv, clf.queries))
    return {"examples": int(len(x)), "config": asdict(opts), "models": results}


def plot(result: dict, path: Path) -> None:
    """Accuracy vs epsilon, per attack and worst case, both models (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnnxSapError("--plot needs matplotlib: pip install matplotlib (or onnx-sap[plot])") from None
    eps = result["config"]["eps"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("original", "--"), ("hardened", "-")):
        for attack, values in result["models"][name]["accuracy"].items():
            ax.plot(eps, [values[f"{e:g}"] for e in eps], style, marker="o",
                    linewidth=3 if attack == "worst" else 1.2, label=f"{name}: {attack}")
    ax.set_xlabel("L-inf epsilon")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"Robust accuracy ({result['examples']} examples; worst = survives every attack)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
