"""`evaluate`: what a hardened model costs (clean accuracy, calibration) and buys (robust accuracy).

Forward passes only, since an ONNX deployment has no gradients. Three L-inf attacks, each run on
the original and on the hardened model; an example counts as robust at an epsilon only if it
survives every attack (the headline is the per-example worst case):

- transfer: PGD on the deterministic original (or strip(HARDENED)) with a finite-difference gradient,
  the whole budget, no early stop; the result is evaluated on the target. Since E[SAP(h)] = h, the
  original is the natural surrogate of the hardened model (what EOT estimates).
- spsa: SPSA (Uesato et al. 2018) on the target itself, each loss averaged over several stochastic
  passes (EOT), with a perturbation size large enough to see through SAP's noise.
- square: Square Attack (Andriushchenko et al. 2020), each candidate's loss averaged over passes.

A stochastic model's prediction on an example is scored over `passes` runs: it survives when the
majority of runs classify it correctly. All repeated queries go through batched session runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .errors import OnnxSapError
from .rewrite import strip_model
from .runtime import NUMPY_TYPES, example_file, make_session
from .sap_nodes import has_sap, with_seed

ATTACKS = ("transfer", "spsa", "square")
SQUARE_TICK = 10  # Square Attack iterations per progress-bar step


@dataclass
class EvalConfig:
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


# ---------------------------------------------------------------------------------------------
# Data and models.


def load_data(spec: str | Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays x and y, or the bundled test split for 'digits'."""
    path = example_file("digits_test.npz") if str(spec) == "digits" else Path(spec)
    if not path.is_file():
        raise OnnxSapError(f"--data {spec}: no such file; give an .npz with arrays x and y, or 'digits'")
    try:
        with np.load(path) as d:
            x, y = d["x"], d["y"]
    except (KeyError, ValueError, OSError) as e:
        raise OnnxSapError(f"--data {spec}: expected an .npz with arrays 'x' and 'y' ({e})") from None
    if len(x) != len(y) or len(x) == 0:
        raise OnnxSapError(f"--data {spec}: x has {len(x)} rows and y {len(y)}; they must match and be non-empty")
    if limit:
        x, y = x[:limit], y[:limit]
    return x.astype(np.float32), y.astype(np.int64)


class Classifier:
    """Batched forward passes of an ONNX classifier (first output = logits or log-probabilities)."""

    def __init__(self, model: onnx.ModelProto, provider: str, batch_rows: int, seed: int | None = None):
        self.stochastic = has_sap(model)
        if self.stochastic and seed:
            model = with_seed(model, seed)
        self.session = make_session(model, provider)
        inp = self.session.get_inputs()[0]
        self.input = inp.name
        fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.chunk = fixed or batch_rows
        self.dtype = NUMPY_TYPES.get(inp.type, np.float32)
        self.fixed = fixed is not None
        self.queries = 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        outs = []
        x = np.asarray(x, dtype=self.dtype)
        for i in range(0, len(x), self.chunk):
            part = x[i:i + self.chunk]
            n = len(part)
            if self.fixed and n < self.chunk:  # a static batch: pad the last chunk
                part = np.concatenate([part, np.repeat(part[-1:], self.chunk - n, axis=0)])
            outs.append(self.session.run(None, {self.input: part})[0][:n])
        self.queries += len(x)
        return np.concatenate(outs).astype(np.float64)


def margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """z_y - max_{j != y} z_j: negative means misclassified (the attacks minimise it)."""
    true = logits[np.arange(len(y)), y]
    other = logits.copy()
    other[np.arange(len(y)), y] = -np.inf
    return true - other.max(axis=1)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += abs(correct[inside].mean() - conf[inside].mean()) * inside.mean()
    return float(ece)


def score(clf: Classifier, x: np.ndarray, y: np.ndarray, passes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct in a single pass, survives = correct in the majority of passes, mean probabilities)."""
    k = passes if clf.stochastic else 1
    z = clf.logits(np.repeat(x, k, axis=0)).reshape(len(x), k, -1)
    correct = z.argmax(axis=2) == y[:, None]
    return correct[:, 0], correct.mean(axis=1) > 0.5, softmax(z).mean(axis=1)


def mean_margin(clf: Classifier, x: np.ndarray, y: np.ndarray, passes: int) -> np.ndarray:
    """Margin averaged over passes (EOT) for each row of x."""
    k = passes if clf.stochastic else 1
    z = clf.logits(np.repeat(x, k, axis=0))
    return margin(z, np.repeat(y, k)).reshape(len(x), k).mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Attacks. Each returns adversarial inputs within eps (L-inf) of x and inside [lo, hi].


def _project(x_adv, x, eps, lo, hi):
    return np.clip(np.clip(x_adv, x - eps, x + eps), lo, hi).astype(x.dtype)


def attack_transfer(surrogate: Classifier, x, y, eps, cfg: EvalConfig, rng, tick: Callable[[], None]):
    """PGD on a deterministic surrogate with central finite differences (per coordinate up to 1024
    dims, else 256 random directions), random start, all steps, keeping each example's best iterate."""
    if eps == 0:
        return x.copy()
    d = int(np.prod(x.shape[1:]))
    h = 1e-3 * max(1.0, float(np.abs(x).max()))
    alpha = 2.5 * eps / cfg.transfer_steps
    x_adv = _project(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), x, eps, cfg.clip_min, cfg.clip_max)
    best, best_m = x_adv.copy(), margin(surrogate.logits(x_adv), y)
    if d <= 1024:
        dirs = np.eye(d, dtype=np.float32)
    else:
        dirs = rng.choice([-1.0, 1.0], size=(256, d)).astype(np.float32)
    for _ in range(cfg.transfer_steps):
        grad = np.zeros((len(x), d))
        for i in range(0, len(dirs), 128):
            block = dirs[i:i + 128]
            plus = (x_adv.reshape(len(x), 1, d) + h * block[None]).reshape(-1, *x.shape[1:])
            minus = (x_adv.reshape(len(x), 1, d) - h * block[None]).reshape(-1, *x.shape[1:])
            yy = np.repeat(y, len(block))
            diff = (margin(surrogate.logits(plus), yy) - margin(surrogate.logits(minus), yy)).reshape(len(x), -1)
            grad += diff @ block / (2 * h)
        x_adv = _project(x_adv - alpha * np.sign(grad).reshape(x.shape), x, eps, cfg.clip_min, cfg.clip_max)
        m = margin(surrogate.logits(x_adv), y)
        better = m < best_m
        best[better], best_m[better] = x_adv[better], m[better]
        tick()
    return best


def attack_spsa(target: Classifier, x, y, eps, cfg: EvalConfig, rng, tick: Callable[[], None]):
    """SPSA with EOT: Rademacher directions at size delta*eps, each loss averaged over passes; sign
    steps; keeps each example's iterate with the lowest averaged margin."""
    if eps == 0:
        return x.copy()
    d = int(np.prod(x.shape[1:]))
    delta = cfg.spsa_delta * eps
    alpha = 2.5 * eps / cfg.spsa_steps
    k, n = cfg.spsa_pairs, len(x)
    x_adv = _project(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), x, eps, cfg.clip_min, cfg.clip_max)
    best, best_m = x_adv.copy(), mean_margin(target, x_adv, y, cfg.spsa_passes)
    for _ in range(cfg.spsa_steps):
        v = rng.choice([-1.0, 1.0], size=(n, k, d)).astype(np.float32)
        base = x_adv.reshape(n, 1, d)
        rows = np.concatenate([(base + delta * v), (base - delta * v)], axis=1).reshape(-1, *x.shape[1:])
        m = mean_margin(target, rows, np.repeat(y, 2 * k), cfg.spsa_passes).reshape(n, 2 * k)
        grad = ((m[:, :k] - m[:, k:])[:, :, None] * v).mean(axis=1) / (2 * delta)
        x_adv = _project(x_adv - alpha * np.sign(grad).reshape(x.shape), x, eps, cfg.clip_min, cfg.clip_max)
        cur = mean_margin(target, x_adv, y, cfg.spsa_passes)
        better = cur < best_m
        best[better], best_m[better] = x_adv[better], cur[better]
        tick()
    return best


def attack_square(target: Classifier, x, y, eps, cfg: EvalConfig, rng, tick: Callable[[], None]):
    """Square Attack (L-inf): random +-eps squares, a candidate kept when its pass-averaged margin is
    lower; square size from the paper's schedule over the query budget."""
    if eps == 0:
        return x.copy()
    n = len(x)
    shape = x.shape[1:]
    c, hgt, wid = (shape if len(shape) == 3 else (1, 1, int(np.prod(shape))))
    xs = x.reshape(n, c, hgt, wid)
    stripes = rng.choice([-eps, eps], size=(n, c, 1, wid)).astype(np.float32)
    cur = _project(xs + stripes, xs, eps, cfg.clip_min, cfg.clip_max)
    cur_m = mean_margin(target, cur.reshape(x.shape), y, cfg.square_passes)
    for it in range(cfg.square_iters):
        p = _square_p(cfg.square_p, it, cfg.square_iters)
        s = max(1, min(hgt, wid, int(round(np.sqrt(p * hgt * wid)))))
        cand = cur.copy()
        r0 = rng.integers(0, hgt - s + 1, size=n)
        c0 = rng.integers(0, wid - s + 1, size=n)
        signs = rng.choice([-eps, eps], size=(n, c)).astype(np.float32)
        for i in range(n):
            cand[i, :, r0[i]:r0[i] + s, c0[i]:c0[i] + s] = xs[i, :, r0[i]:r0[i] + s, c0[i]:c0[i] + s] \
                + signs[i][:, None, None]
        cand = _project(cand, xs, eps, cfg.clip_min, cfg.clip_max)
        m = mean_margin(target, cand.reshape(x.shape), y, cfg.square_passes)
        better = m < cur_m
        cur[better], cur_m[better] = cand[better], m[better]
        if it % SQUARE_TICK == SQUARE_TICK - 1:
            tick()
    return cur.reshape(x.shape)


def _square_p(p0: float, it: int, total: int) -> float:
    """The paper's piecewise-constant schedule, rescaled to a budget of `total` iterations."""
    frac = it / max(total, 1) * 10000
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if frac <= bound:
            return p0 / div
    return p0 / 512


# ---------------------------------------------------------------------------------------------
# The evaluation.


@dataclass
class ModelResult:
    clean_single: float
    clean_multi: float
    ece: float
    accuracy: dict[str, dict[str, float]]  # attack (and "worst") -> eps -> accuracy
    ece_under_attack: dict[str, float]  # eps -> ECE on the transfer attack's examples
    queries: int = 0


def evaluate(original: onnx.ModelProto | None, hardened: onnx.ModelProto, x: np.ndarray, y: np.ndarray,
             cfg: EvalConfig, progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict:
    """Evaluate both models on (x, y); returns a JSON-ready dict (see ModelResult)."""
    cfg.validate()
    if cfg.clip_min is None:
        cfg.clip_min = float(x.min())
    if cfg.clip_max is None:
        cfg.clip_max = float(x.max())
    if original is None:
        original, _ = strip_model(hardened)
    surrogate = Classifier(original, cfg.provider, cfg.batch_rows)
    targets = {"original": surrogate, "hardened": Classifier(hardened, cfg.provider, cfg.batch_rows,
                                                             seed=cfg.seed or None)}
    if not targets["hardened"].stochastic:
        raise OnnxSapError("HARDENED has no SAP nodes; harden it first (onnx-sap harden)")
    progress = progress or (lambda label, total: (lambda: None))
    results = {}
    transfer_cache: dict[float, np.ndarray] = {}  # the surrogate is the same for both targets
    for name, clf in targets.items():
        rng = np.random.default_rng(cfg.seed)
        single, multi, probs = score(clf, x, y, cfg.passes)
        acc: dict[str, dict[str, float]] = {a: {} for a in cfg.attacks}
        acc["worst"] = {}
        ece_adv = {}
        for eps in cfg.eps:
            alive = np.ones(len(x), dtype=bool)
            for attack in cfg.attacks:
                steps = {"transfer": cfg.transfer_steps, "spsa": cfg.spsa_steps,
                         "square": cfg.square_iters // SQUARE_TICK}[attack]
                tick = progress(f"{name}: {attack} eps={eps:g}", steps)
                if attack == "transfer":
                    if eps not in transfer_cache:
                        transfer_cache[eps] = attack_transfer(surrogate, x, y, eps, cfg, rng, tick)
                    x_adv = transfer_cache[eps]
                elif attack == "spsa":
                    x_adv = attack_spsa(clf, x, y, eps, cfg, rng, tick)
                else:
                    x_adv = attack_square(clf, x, y, eps, cfg, rng, tick)
                _, survived, adv_probs = score(clf, x_adv, y, cfg.passes)
                acc[attack][f"{eps:g}"] = float(survived.mean())
                alive &= survived
                if attack == "transfer":
                    ece_adv[f"{eps:g}"] = expected_calibration_error(adv_probs, y)
            acc["worst"][f"{eps:g}"] = float(alive.mean())
        results[name] = asdict(ModelResult(float(single.mean()), float(multi.mean()),
                                           expected_calibration_error(probs, y), acc, ece_adv, clf.queries))
    return {"examples": int(len(x)), "config": asdict(cfg), "models": results}


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
