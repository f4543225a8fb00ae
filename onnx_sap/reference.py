"""NumPy reference of the ``onnx_sap::StochasticActivationPruning`` operator.

Follows ``SPEC.md`` line by line, in float64: Philox4x32-10 keyed by splitmix64, one function per mode.
The C++ and CUDA kernels are checked against this module; where they disagree outside the margin
band that SPEC.md defines, one of them has a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("multinomial", "bernoulli")
# The node's attributes when absent (SPEC.md, "Attributes").
ATTRIBUTE_DEFAULTS = {"mode": "multinomial", "ratio": 1.0, "samples": 0, "axis": 1, "seed": 0, "stream": 0}
MAX_SAMPLES = 2**31 - 1  # SPEC.md: the largest r, and the largest valid ``samples``
BAND = 1e-5  # SPEC.md: keep decisions must agree wherever the margin exceeds this
MAX_ULPS = 4  # SPEC.md: kept values agree to 4 units in the last place of the output type
_MASK64 = (1 << 64) - 1
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def splitmix64(z: int) -> int:
    """One step of splitmix64 on an unsigned 64-bit integer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_key(seed: int, stream: int) -> int:
    """The 64-bit Philox key of a node: splitmix64(seed XOR splitmix64(stream))."""
    return splitmix64((seed & _MASK64) ^ splitmix64(stream & _MASK64))


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on an array of counters of shape (..., 4) (uint32); returns the same shape."""
    c = np.asarray(counter, dtype=np.uint32).astype(np.uint64)
    c0, c1, c2, c3 = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    lo32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & lo32, (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & lo32
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def uniforms(key64: int, example: int, call: int, count: int) -> np.ndarray:
    """Uniforms u_i, i = 0..count-1, of stream positions of one example in one call (float64, in (0, 1))."""
    blocks = np.arange((count + 3) // 4, dtype=np.uint64)
    counter = np.empty((blocks.size, 4), dtype=np.uint32)
    counter[:, 0] = (blocks & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    counter[:, 1] = (blocks >> np.uint64(32)).astype(np.uint32)
    counter[:, 2] = example & 0xFFFFFFFF
    counter[:, 3] = call & 0xFFFFFFFF
    words = philox4x32_10(counter, (key64 & 0xFFFFFFFF, key64 >> 32)).reshape(-1)[:count]
    return (words.astype(np.float64) + 0.5) / 2.0**32


def sample_count(m: int, ratio: float = 1.0, samples: int = 0) -> int:
    """r: ``samples`` when > 0, else max(1, floor(ratio * m)) with ratio as the float32 attribute holds
    it; clamped to [1, MAX_SAMPLES] in float64 before becoming an integer (SPEC.md, "Sample count")."""
    if samples > 0:
        return min(int(samples), MAX_SAMPLES)
    with np.errstate(over="ignore"):
        r = np.floor(np.float64(np.float32(ratio)) * np.float64(m))
    return int(np.clip(r, 1.0, float(MAX_SAMPLES)))


def keep_probability(p: np.ndarray, r: int) -> np.ndarray:
    """q = 1 - (1 - p)^r, as -expm1(r * log1p(-p)) (p = 1 gives q = 1)."""
    with np.errstate(divide="ignore"):
        return -np.expm1(float(r) * np.log1p(-p))


@dataclass
class SapResult:
    """Output of :func:`sap` with details: Y, the keep mask and each element's decision margin."""

    y: np.ndarray
    keep: np.ndarray
    margin: np.ndarray


def _bernoulli(a: np.ndarray, s: float, r: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = keep_probability(a / s, r)
    keep = u < q
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.where(q > 0, np.abs(u - q) / q, np.inf)
    return q, keep, margin


def _multinomial(a: np.ndarray, s: float, r: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = a.size
    e = -np.log(u)  # r + 1 exponential variates
    g = np.cumsum(e)
    pos = g[:r] / g[r] * s  # T_k * S, sorted
    c = np.cumsum(a)
    landed = np.searchsorted(c, pos, side="right")  # smallest j with C_j > T_k * S
    past = landed >= m
    if past.any():  # rounding only: land on the last element with a_j > 0
        landed[past] = np.flatnonzero(a > 0)[-1]
    keep = np.zeros(m, dtype=bool)
    keep[landed] = True
    # Element j keeps or loses samples when one crosses C_{j-1} or C_j: its margin is the distance of
    # the nearest sample to either boundary, relative to S.
    bounds = np.concatenate([[0.0], c])
    at = np.clip(np.searchsorted(pos, bounds), 1, r) if r > 1 else np.ones(bounds.size, dtype=np.int64)
    dist = np.minimum(np.abs(pos[at - 1] - bounds), np.abs(pos[np.minimum(at, r - 1)] - bounds)) / s
    margin = np.minimum(dist[:-1], dist[1:])
    q = keep_probability(a / s, r)
    return q, keep, margin


def sap(
    x: np.ndarray,
    *,
    ratio: float = 1.0,
    samples: int = 0,
    mode: str = "multinomial",
    axis: int = 1,
    seed: int | None = None,
    stream: int = 0,
    call: int = 0,
    key: int | None = None,
    return_details: bool = False,
) -> np.ndarray | SapResult:
    """Apply SAP to ``x`` exactly as the operator does for call index ``call`` of a node.

    The stream is fixed by ``seed`` and ``stream`` (the node's attributes; seed must be non-zero, since
    0 means OS entropy in the operator) or directly by the 64-bit Philox ``key``. Returns Y in x's
    dtype, or with ``return_details`` a :class:`SapResult` holding Y, the keep mask and the margins.
    """
    x = np.asarray(x)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be in [0, {MAX_SAMPLES}], got {samples}")
    with np.errstate(over="ignore"):
        ratio32 = np.float32(ratio)
    if not (np.isfinite(ratio32) and ratio32 > 0):
        raise ValueError(f"ratio must be finite and > 0 as a float32, got {ratio}")
    if x.ndim < 1 or not 0 <= axis < x.ndim:
        raise ValueError(f"axis must satisfy 0 <= axis < rank ({x.ndim}), got {axis}")
    if key is None:
        if not seed:
            raise ValueError("the reference needs a non-zero seed (seed 0 means OS entropy) or an explicit key")
        key = derive_key(seed, stream)
    n_examples = int(np.prod(x.shape[:axis], dtype=np.int64))
    m = int(np.prod(x.shape[axis:], dtype=np.int64))
    flat = x.reshape(n_examples, m).astype(np.float64)
    y = flat.copy()
    keep = np.zeros(flat.shape, dtype=bool)
    margin = np.full(flat.shape, np.inf)
    r = sample_count(m, ratio, samples)
    top = float(np.finfo(x.dtype).max) if np.issubdtype(x.dtype, np.floating) else np.inf
    for n in range(n_examples):
        a = np.abs(flat[n])
        # SPEC.md allows any summation order; long double makes S correctly rounded in practice,
        # the target every kernel approximates to about an ulp.
        s = float(np.sum(a, dtype=np.longdouble))
        if m == 0 or s == 0.0 or not np.isfinite(s):
            continue  # pass-through: y = x
        if mode == "bernoulli":
            q, keep[n], margin[n] = _bernoulli(a, s, r, uniforms(key, n, call, m))
        else:
            q, keep[n], margin[n] = _multinomial(a, s, r, uniforms(key, n, call, r + 1))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y[n] = np.where(keep[n], flat[n] / q, 0.0)
        y[n] = np.clip(y[n], -top, top)  # SPEC.md, "Saturation": kept values stay finite in T
    y_out = y.astype(x.dtype).reshape(x.shape)
    if not return_details:
        return y_out
    return SapResult(y_out, keep.reshape(x.shape), margin.reshape(x.shape))


def compare_with_reference(x: np.ndarray, y: np.ndarray, attrs: dict, call: int) -> tuple[int, float]:
    """Compare an op's output y for input x (node attributes attrs, call index call) with this
    reference per SPEC.md: returns (keep decisions that differ where the margin exceeds the band,
    plus pass-through elements that changed; the worst kept-value error in ulps of y's type)."""
    ref = sap(x, call=call, mode=attrs["mode"], ratio=attrs["ratio"], samples=attrs["samples"], axis=attrs["axis"],
              seed=attrs["seed"], stream=attrs["stream"], return_details=True)
    kept = y != 0
    flat = np.abs(x.astype(np.float64)).reshape(int(np.prod(x.shape[:attrs["axis"]], dtype=np.int64)), -1)
    with np.errstate(invalid="ignore", over="ignore"):
        s = flat.sum(axis=1)
    passthrough = np.broadcast_to(((s == 0) | ~np.isfinite(s))[:, None], flat.shape).reshape(x.shape)
    disagree = int(np.sum((ref.margin > BAND) & ~passthrough & (kept != ref.keep)))
    # Examples whose |x| sums to 0 or a non-finite value are copied (SPEC.md): every element must match.
    disagree += int(np.sum(~((y == x) | (np.isnan(y) & np.isnan(x)))[passthrough]))
    both = kept & ref.keep & ~passthrough
    if not both.any():
        return disagree, 0.0
    # The ulp below the value: at the largest finite value np.spacing would be Inf (saturation).
    top = np.finfo(y.dtype).max
    ulp = np.spacing(np.minimum(np.abs(ref.y[both]).astype(y.dtype), np.nextafter(top, -top))).astype(np.float64)
    err = np.abs(y[both].astype(np.float64) - ref.y[both].astype(np.float64)) / ulp
    return disagree, float(err.max())
