"""The CUDA kernel against the NumPy reference, through the library's C entry point.

Runs wherever the library has CUDA kernels and a GPU is visible; skips (saying why) elsewhere.
onnxruntime-gpu is not needed: the entry point runs the same kernels ONNX Runtime would launch.
"""

import numpy as np
import pytest
from helpers import assert_matches_reference

from onnx_sap import cuda_device_count, has_cuda_kernels, reference, run_cuda_kernel

pytestmark = pytest.mark.skipif(
    cuda_device_count() == 0,
    reason="needs a CUDA GPU and a library built with CUDA kernels "
    f"(CUDA kernels built: {has_cuda_kernels()}, GPUs visible: {cuda_device_count()})",
)

CASES = [
    ((2, 5), 1, np.float32),
    ((3, 4, 6, 6), 1, np.float32),
    ((3, 4, 6, 6), 2, np.float64),
    ((2, 70000), 1, np.float32),
    ((1, 64, 56, 56), 1, np.float32),
    ((4, 16, 10), 1, np.float16),
    ((4, 16, 10), 0, np.float64),
]


@pytest.mark.parametrize("shape, axis, dtype", CASES)
@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
@pytest.mark.parametrize("r_attrs", [{}, {"ratio": 0.3}, {"samples": 17}])
def test_cuda_kernel_matches_reference(shape, axis, dtype, mode, r_attrs):
    rng = np.random.default_rng(len(shape) * 31 + axis)
    x = rng.standard_normal(shape) * 3
    x[rng.random(shape) < 0.4] = 0
    x = x.astype(dtype)
    seed, stream = 1234 + len(shape), 3
    key = reference.derive_key(seed, stream)
    for call in (0, 5):
        y = run_cuda_kernel(x, key=key, call=call, mode=mode, axis=axis, **r_attrs)
        assert_matches_reference(y, x, call=call, mode=mode, axis=axis, seed=seed, stream=stream, **r_attrs)


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_cuda_edge_cases_pass_through(mode):
    x = np.abs(np.random.default_rng(0).standard_normal((5, 300))).astype(np.float32)
    x[0, 1] = np.nan
    x[1, 2] = np.inf
    x[2] = 0
    y = run_cuda_kernel(x, key=reference.derive_key(9, 0), mode=mode)
    np.testing.assert_array_equal(y[:3], x[:3])
    assert_matches_reference(y, x, call=0, mode=mode, seed=9)
    assert run_cuda_kernel(np.zeros((0, 4), np.float32), key=1).shape == (0, 4)
