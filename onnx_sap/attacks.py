"""Forward-only L-inf attacks, one function each.

Each returns adversarial inputs within eps (L-inf) of x and inside [lo, hi], draws all its
randomness from the generator it is given, and calls tick() once per progress step.

- transfer: PGD on a deterministic surrogate with a finite-difference gradient, the whole budget,
  no early stop; the caller evaluates the result on the target.
- spsa: SPSA (Uesato et al. 2018) on the target itself, each loss averaged over several stochastic
  passes (EOT), with a perturbation size large enough to see through SAP's noise.
- square: Square Attack (Andriushchenko et al. 2020), each candidate's loss averaged over passes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .metrics import Classifier, margin, mean_margin

SQUARE_TICK = 10  # Square Attack iterations per progress step


def _no_tick() -> None:
    pass


def _project(x_adv: np.ndarray, x: np.ndarray, eps: float, lo: float | None, hi: float | None) -> np.ndarray:
    return np.clip(np.clip(x_adv, x - eps, x + eps), lo, hi).astype(x.dtype)


def transfer(surrogate: Classifier, x: np.ndarray, y: np.ndarray, eps: float, rng: np.random.Generator, *,
             steps: int, lo: float | None, hi: float | None, tick: Callable[[], None] = _no_tick) -> np.ndarray:
    """PGD on a deterministic surrogate with central finite differences (per coordinate up to 1024
    dims, else 256 random directions), random start, all steps, keeping each example's best iterate."""
    if eps == 0:
        return x.copy()
    d = int(np.prod(x.shape[1:]))
    h = 1e-3 * max(1.0, float(np.abs(x).max()))
    alpha = 2.5 * eps / steps
    x_adv = _project(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), x, eps, lo, hi)
    best, best_m = x_adv.copy(), margin(surrogate.logits(x_adv), y)
    if d <= 1024:
        dirs = np.eye(d, dtype=np.float32)
    else:
        dirs = rng.choice([-1.0, 1.0], size=(256, d)).astype(np.float32)
    for _ in range(steps):
        grad = np.zeros((len(x), d))
        for i in range(0, len(dirs), 128):
            block = dirs[i:i + 128]
            plus = (x_adv.reshape(len(x), 1, d) + h * block[None]).reshape(-1, *x.shape[1:])
            minus = (x_adv.reshape(len(x), 1, d) - h * block[None]).reshape(-1, *x.shape[1:])
            yy = np.repeat(y, len(block))
            diff = (margin(surrogate.logits(plus), yy) - margin(surrogate.logits(minus), yy)).reshape(len(x), -1)
            grad += diff @ block / (2 * h)
        x_adv = _project(x_adv - alpha * np.sign(grad).reshape(x.shape), x, eps, lo, hi)
        m = margin(surrogate.logits(x_adv), y)
        better = m < best_m
        best[better], best_m[better] = x_adv[better], m[better]
        tick()
    return best


def spsa(target: Classifier, x: np.ndarray, y: np.ndarray, eps: float, rng: np.random.Generator, *, steps: int,
         pairs: int, passes: int, delta: float, lo: float | None, hi: float | None,
         tick: Callable[[], None] = _no_tick) -> np.ndarray:
    """SPSA with EOT: Rademacher directions at size delta*eps, each loss averaged over passes; sign
    steps; keeps each example's iterate with the lowest averaged margin."""
    if eps == 0:
        return x.copy()
    d = int(np.prod(x.shape[1:]))
    size = delta * eps
    alpha = 2.5 * eps / steps
    k, n = pairs, len(x)
    x_adv = _project(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), x, eps, lo, hi)
    best, best_m = x_adv.copy(), mean_margin(target, x_adv, y, passes)
    for _ in range(steps):
        v = rng.choice([-1.0, 1.0], size=(n, k, d)).astype(np.float32)
        base = x_adv.reshape(n, 1, d)
        rows = np.concatenate([(base + size * v), (base - size * v)], axis=1).reshape(-1, *x.shape[1:])
        m = mean_margin(target, rows, np.repeat(y, 2 * k), passes).reshape(n, 2 * k)
        grad = ((m[:, :k] - m[:, k:])[:, :, None] * v).mean(axis=1) / (2 * size)
        x_adv = _project(x_adv - alpha * np.sign(grad).reshape(x.shape), x, eps, lo, hi)
        cur = mean_margin(target, x_adv, y, passes)
        better = cur < best_m
        best[better], best_m[better] = x_adv[better], cur[better]
        tick()
    return best


def square(target: Classifier, x: np.ndarray, y: np.ndarray, eps: float, rng: np.random.Generator, *, iters: int,
           passes: int, p: float, lo: float | None, hi: float | None,
           tick: Callable[[], None] = _no_tick) -> np.ndarray:
    """Square Attack (L-inf): random +-eps squares, a candidate kept when its pass-averaged margin is
    lower; square size from the paper's schedule over the query budget. One tick per SQUARE_TICK
    iterations."""
    if eps == 0:
        return x.copy()
    n = len(x)
    shape = x.shape[1:]
    c, hgt, wid = (shape if len(shape) == 3 else (1, 1, int(np.prod(shape))))
    xs = x.reshape(n, c, hgt, wid)
    stripes = rng.choice([-eps, eps], size=(n, c, 1, wid)).astype(np.float32)
    cur = _project(xs + stripes, xs, eps, lo, hi)
    cur_m = mean_margin(target, cur.reshape(x.shape), y, passes)
    for it in range(iters):
        s = max(1, min(hgt, wid, int(round(np.sqrt(_square_p(p, it, iters) * hgt * wid)))))
        cand = cur.copy()
        r0 = rng.integers(0, hgt - s + 1, size=n)
        c0 = rng.integers(0, wid - s + 1, size=n)
        signs = rng.choice([-eps, eps], size=(n, c)).astype(np.float32)
        for i in range(n):
            cand[i, :, r0[i]:r0[i] + s, c0[i]:c0[i] + s] = xs[i, :, r0[i]:r0[i] + s, c0[i]:c0[i] + s] \
                + signs[i][:, None, None]
        cand = _project(cand, xs, eps, lo, hi)
        m = mean_margin(target, cand.reshape(x.shape), y, passes)
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
