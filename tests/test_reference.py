"""The NumPy reference against SPEC.md: Philox known answers and the statistics SAP must have."""

import numpy as np
import pytest

from onnx_sap import reference


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = reference.philox4x32_10(np.array(counter, dtype=np.uint32), key)
    assert tuple(int(w) for w in out) == expected


def test_uniforms_are_open_interval_and_position_indexed():
    u = reference.uniforms(reference.derive_key(5, 2), example=3, call=1, count=10)
    assert np.all((u > 0) & (u < 1))
    # position i is word i mod 4 of block i div 4: a longer draw extends, never reshuffles
    np.testing.assert_array_equal(reference.uniforms(reference.derive_key(5, 2), 3, 1, 6), u[:6])


def test_key_depends_on_seed_and_stream():
    keys = {reference.derive_key(s, t) for s in (1, 2) for t in (0, 1)}
    assert len(keys) == 4


X = np.array([[3.0, -1.0, 0.0, 0.5, 2.0, -0.25, 1.5, 0.0]])


def _many(mode, n, **attrs):
    return np.stack([reference.sap(X, mode=mode, seed=s + 1, call=s % 3, **attrs)[0] for s in range(n)])


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
@pytest.mark.parametrize("samples", [2, 8])
def test_unbiased_and_keep_frequency_is_q(mode, samples):
    n = 4000
    ys = _many(mode, n, samples=samples)
    a = np.abs(X[0])
    q = reference.keep_probability(a / a.sum(), samples)
    freq = (ys != 0).mean(axis=0)
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / n) + 1e-12)
    mean, sem = ys.mean(axis=0), ys.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(mean - X[0]) <= 5 * sem + 1e-12)
    assert np.all(ys[:, a == 0] == 0)


def test_multinomial_keeps_at_most_r_distinct():
    ys = _many("multinomial", 500, samples=3)
    assert np.max((ys != 0).sum(axis=1)) <= 3


def test_ratio_sets_r_from_float32_attribute():
    assert reference.sample_count(10, ratio=0.3) == 3
    assert reference.sample_count(10, ratio=0.01) == 1
    assert reference.sample_count(10, ratio=5.0, samples=4) == 4


def test_r_is_clamped_before_becoming_an_integer():
    assert reference.sample_count(10, ratio=1e30) == reference.MAX_SAMPLES
    assert reference.sample_count(2**47, ratio=float(np.finfo(np.float32).max)) == reference.MAX_SAMPLES
    assert reference.sample_count(10, samples=2**40) == reference.MAX_SAMPLES


@pytest.mark.parametrize("dtype", [np.float16, np.float32])  # a float64 S cannot exceed float64's range
def test_kept_values_saturate_at_the_largest_finite_value(dtype):
    top = np.finfo(dtype).max
    x = np.full((1, 64), top / 4, dtype)
    x[0, 1::2] *= -1
    y = reference.sap(x, samples=1, seed=3)  # the one survivor is S = 16 top
    assert np.all(np.isfinite(y)) and np.sum(y != 0) == 1
    assert np.abs(y[y != 0]) == top and np.sign(y[y != 0]) == np.sign(x[y != 0])


@pytest.mark.parametrize("attrs, message", [({"samples": 2**31}, "samples"), ({"ratio": 1e39}, "ratio"),
                                            ({"ratio": 0.0}, "ratio")])
def test_reference_refuses_what_the_op_refuses(attrs, message):
    with pytest.raises(ValueError, match=message):
        reference.sap(X, seed=1, **attrs)


def test_margins_are_reported_and_zero_elements_never_kept():
    res = reference.sap(X, mode="multinomial", seed=9, return_details=True)
    assert res.margin.shape == X.shape and np.all(res.margin >= 0)
    assert not res.keep[X == 0].any()
    res = reference.sap(X, mode="bernoulli", seed=9, return_details=True)
    assert np.all(np.isinf(res.margin[X == 0]))


def test_reference_needs_a_seed_or_key():
    with pytest.raises(ValueError, match="non-zero seed"):
        reference.sap(X, seed=0)
