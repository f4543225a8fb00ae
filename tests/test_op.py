"""The C++ CPU kernel, through ONNX Runtime, against the NumPy reference and SPEC.md's edge cases."""

import threading

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from helpers import assert_matches_reference, sap_model

from onnx_sap import make_session, reference
from onnx_sap.runtime import CPU_ISA_LEVELS, cpu_isa_levels, last_cpu_in_place, last_cpu_isa

CASES = [
    # shape, axis, dtype, mode, seed, stream
    ((2, 5), 1, np.float32, "bernoulli", 1, 0),
    ((2, 5), 1, np.float32, "multinomial", 1, 0),
    ((3, 4, 6, 6), 1, np.float32, "multinomial", 11, 2),
    ((3, 4, 6, 6), 2, np.float32, "bernoulli", 12, 7),
    ((3, 4, 6, 6), 0, np.float32, "multinomial", 13, 1),
    ((2, 70000), 1, np.float32, "multinomial", 3, 5),   # many chunks per example
    ((2, 70000), 1, np.float32, "bernoulli", 4, 5),
    ((1, 3, 50000), 2, np.float32, "multinomial", 2**40 + 3, 2**33),
    ((4, 16, 10), 1, np.float16, "multinomial", 5, 0),
    ((4, 16, 10), 1, np.float16, "bernoulli", 6, 0),
    ((4, 16, 10), 1, np.float64, "multinomial", 7, 3),
    ((4, 16, 10), 1, np.float64, "bernoulli", 8, 3),
    ((7,), 0, np.float32, "multinomial", 9, 0),
    ((5, 1), 1, np.float32, "bernoulli", 10, 0),
    # From 8 examples on, one task per example (sum, prefix and apply back to back): one chunk, many
    # chunks, and many chunks at a deeper axis.
    ((9, 300), 1, np.float32, "bernoulli", 14, 1),
    ((8, 40000), 1, np.float32, "bernoulli", 15, 1),
    ((8, 40000), 1, np.float32, "multinomial", 16, 1),
    ((2, 5, 3, 20000), 2, np.float16, "bernoulli", 17, 4),
]


def _input(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10)
    x[rng.random(shape) < 0.4] = 0  # activations are sparse after a ReLU
    return x.astype(dtype)


@pytest.fixture(params=CPU_ISA_LEVELS)
def isa(request, monkeypatch):
    """Each CPU instruction-set level this machine runs, forced with ONNX_SAP_ISA (read when a
    session creates its kernels); _run checks that the forced level is the one that ran."""
    if request.param not in cpu_isa_levels():
        pytest.skip(f"this CPU (or build) lacks the {request.param} level")
    monkeypatch.setenv("ONNX_SAP_ISA", request.param)
    return request.param


def _run(sess, x, isa):
    y = sess.run(None, {"x": x})[0]
    assert last_cpu_isa() == isa
    return y


@pytest.mark.parametrize("shape, axis, dtype, mode, seed, stream", CASES)
@pytest.mark.parametrize("r_attrs", [{}, {"ratio": 0.3}, {"samples": 17}])
def test_op_matches_reference(shape, axis, dtype, mode, seed, stream, r_attrs, isa):
    attrs = dict(mode=mode, axis=axis, seed=seed, stream=stream, **r_attrs)
    sess = make_session(sap_model(dtype, **attrs))
    x = _input(shape, dtype, seed)
    for call in range(3):  # the n-th run of a session is the reference's call n
        y = _run(sess, x, isa)
        assert_matches_reference(y, x, call=call, **attrs)


def _edge_input(kind, dtype):
    rng = np.random.default_rng(len(kind))
    if kind == "tails":  # lengths that are no multiple of any vector width or chunk
        x = rng.standard_normal((3, 2 * 16384 + 67))
    elif kind == "zero rows":
        x = rng.standard_normal((4, 1000))
        x[1] = 0
        x[3] = -0.0
    elif kind == "mostly zeros":  # whole runs of zeros as well as scattered ones
        x = rng.standard_normal((2, 20000))
        x[rng.random(x.shape) < 0.95] = 0
        x[:, 640:5000] = 0
    elif kind == "tiny p":  # one element dominates: the others' p is ~1e-30, and one is near underflow
        x = np.abs(rng.standard_normal((2, 3000)))
        x[:, 100] = 1e30 if dtype == np.float32 else 6e4
        x[:, 200] = 1e-35 if dtype == np.float32 else 1e-7
    else:
        raise ValueError(kind)
    return np.maximum(x, 0).astype(dtype) if kind != "tails" else x.astype(dtype)


@pytest.mark.parametrize("kind", ["tails", "zero rows", "mostly zeros", "tiny p"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_edge_cases_match_reference_at_every_level(kind, dtype, mode, isa):
    attrs = dict(mode=mode, seed=31, stream=2)
    x = _edge_input(kind, dtype)
    y = _run(make_session(sap_model(dtype, **attrs)), x, isa)
    assert_matches_reference(y, x, call=0, **attrs)


@pytest.mark.parametrize("r_attrs", [{"samples": 2**31 - 1}, {"ratio": 5000.0}, {"samples": 1}])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_huge_and_tiny_r_match_reference_at_every_level(r_attrs, dtype, isa):
    attrs = dict(mode="bernoulli", seed=32, **r_attrs)
    x = _input((3, 4000), dtype, 3)
    y = _run(make_session(sap_model(dtype, **attrs)), x, isa)
    assert_matches_reference(y, x, call=0, **attrs)


@pytest.mark.parametrize("r_attrs", [{"samples": 1}, {"samples": 3}, {"ratio": 0.001}, {"ratio": 20.0}])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_multinomial_few_and_many_samples_match_reference_at_every_level(r_attrs, dtype, isa):
    # Three element chunks per example: with r << m most chunks and runs own no sample; with r = 20 m
    # each run of elements takes several blocks of sample positions.
    attrs = dict(mode="multinomial", seed=33, stream=4, **r_attrs)
    x = _input((2, 2 * 16384 + 1000), dtype, 4)
    sess = make_session(sap_model(dtype, **attrs))
    for call in range(2):
        y = _run(sess, x, isa)
        assert_matches_reference(y, x, call=call, **attrs)


def test_multinomial_variates_generated_twice_match_reference_at_every_level(isa):
    # Past 2^24 variates in a call the SIMD levels generate them again in phase 3 instead of keeping
    # them from phase 1: both ways must place the samples the same.
    attrs = dict(mode="multinomial", samples=2**24 // 3 + 7, seed=35)
    x = _input((3, 5000), np.float32, 7)
    y = _run(make_session(sap_model(**attrs)), x, isa)
    assert_matches_reference(y, x, call=0, **attrs)


def test_multinomial_variates_kept_per_example_task_match_reference_at_every_level(isa):
    # Eight examples run one task per example, and at the SIMD levels each task keeps its example's
    # variates in a store of its own; together they are more than one store may hold (2^24).
    attrs = dict(mode="multinomial", samples=2**21 + 7, seed=36)
    x = _input((8, 700), np.float32, 8)
    y = _run(make_session(sap_model(**attrs)), x, isa)
    assert_matches_reference(y, x, call=0, **attrs)


@pytest.mark.parametrize("scale", [1e-41, 1e-30, 3e35])
def test_multinomial_float32_extreme_sums_match_reference_at_every_level(scale, isa):
    # S subnormal, tiny or huge: 1 / S or r / S leaves float32's range, so the SIMD levels must take
    # their float64 code for such examples (and only for them: row 1 is ordinary).
    x = _input((2, 3000), np.float32, 6)
    x[0] = (np.abs(x[0]) * scale).astype(np.float32)
    attrs = dict(mode="multinomial", seed=34)
    y = _run(make_session(sap_model(**attrs)), x, isa)
    assert (y[0] != 0).any() and np.all(np.isfinite(y))
    assert_matches_reference(y, x, call=0, **attrs)


def _relu_sap_neg_model(dtype, outputs: str, rank: int = 2, **attrs) -> onnx.ModelProto:
    """x -> Relu -> h -> SAP -> y -> Neg -> out, x of symbolic shape (y is no graph output: those get
    buffers of their own). outputs: "out" (h is SAP's alone: ONNX Runtime may reuse its buffer for y,
    whose inferred shape is h's), "h out" (h is also a graph output) or "out z" (h also feeds
    z = h + out, which runs after SAP): then it must not."""
    t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = [f"d{i}" for i in range(rank)]
    nodes = [onnx.helper.make_node("Relu", ["x"], ["h"]),
             onnx.helper.make_node("StochasticActivationPruning", ["h"], ["y"], domain="onnx_sap", **attrs),
             onnx.helper.make_node("Neg", ["y"], ["out"])]
    if "z" in outputs:
        nodes.append(onnx.helper.make_node("Add", ["h", "out"], ["z"]))
    graph = onnx.helper.make_graph(nodes, "relu_sap", [onnx.helper.make_tensor_value_info("x", t, dims)],
                                   [onnx.helper.make_tensor_value_info(n, t, dims) for n in outputs.split()])
    return onnx.helper.make_model(graph, ir_version=9, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                                      onnx.helper.make_opsetid("onnx_sap", 1)])


@pytest.mark.parametrize("shape", [(2, 40000), (9, 3000)])  # chunk tasks; one task per example
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_output_over_the_input_buffer_matches_reference(shape, dtype, mode, isa):
    attrs = dict(mode=mode, seed=41, stream=3)
    x = _input(shape, dtype, 5)
    h = np.maximum(x, 0)
    sess = make_session(_relu_sap_neg_model(dtype, "out", **attrs))
    for call in range(2):
        y = -_run(sess, x, isa)
        assert last_cpu_in_place(), "ONNX Runtime gave the op a buffer of its own: nothing was tested"
        assert_matches_reference(y, h, call=call, **attrs)


@pytest.mark.parametrize("outputs", ["h out", "out z"])
@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_input_with_other_readers_is_left_intact(outputs, mode, isa):
    attrs = dict(mode=mode, seed=42)
    x = _input((9, 3000), np.float32, 6)
    h = np.maximum(x, 0)
    sess = make_session(_relu_sap_neg_model(np.float32, outputs, **attrs))
    results = dict(zip(outputs.split(), sess.run(None, {"x": x})))
    assert last_cpu_isa() == isa and last_cpu_in_place() is False
    assert_matches_reference(-results["out"], h, call=0, **attrs)
    if "h" in results:
        np.testing.assert_array_equal(results["h"], h)
    else:
        np.testing.assert_array_equal(results["z"], h + results["out"])


def test_default_level_is_the_best_this_cpu_has(monkeypatch):
    monkeypatch.delenv("ONNX_SAP_ISA", raising=False)
    make_session(sap_model(seed=1)).run(None, {"x": np.ones((1, 8), np.float32)})
    assert last_cpu_isa() == cpu_isa_levels()[-1]


def test_unknown_or_missing_level_fails_at_session_creation(monkeypatch):
    monkeypatch.setenv("ONNX_SAP_ISA", "sse9")
    with pytest.raises(Exception, match="ONNX_SAP_ISA must be scalar, avx2 or avx512"):
        make_session(sap_model(seed=1))
    missing = [level for level in CPU_ISA_LEVELS if level not in cpu_isa_levels()]
    if missing:
        monkeypatch.setenv("ONNX_SAP_ISA", missing[0])
        with pytest.raises(Exception, match=f"ONNX_SAP_ISA={missing[0]}, but this CPU"):
            make_session(sap_model(seed=1))


def test_sessions_restart_the_call_counter_and_streams_differ():
    x = _input((2, 300), np.float32)
    a = make_session(sap_model(seed=5, stream=0)).run(None, {"x": x})[0]
    b = make_session(sap_model(seed=5, stream=0)).run(None, {"x": x})[0]
    c = make_session(sap_model(seed=5, stream=1)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a != 0, c != 0)


def test_seed_zero_draws_fresh_entropy_every_run_and_session():
    x = _input((1, 4000), np.float32)
    masks = []
    for _ in range(2):
        sess = make_session(sap_model(mode="bernoulli", seed=0))
        masks += [sess.run(None, {"x": x})[0] != 0 for _ in range(2)]
    for i in range(len(masks)):
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j])


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_nonfinite_and_zero_examples_pass_through(mode, isa):
    x = _input((5, 64), np.float32)
    x[0, 3] = np.nan
    x[1, 0] = np.inf
    x[2, 7] = -np.inf
    x[3] = 0
    y = _run(make_session(sap_model(mode=mode, seed=3)), x, isa)
    np.testing.assert_array_equal(y[:4], x[:4])  # NaN positions compare equal here
    assert np.all(np.isfinite(y[4]))
    assert_matches_reference(y, x, call=0, mode=mode, seed=3)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_empty_tensors(shape):
    x = np.zeros(shape, np.float32)
    y = make_session(sap_model(seed=1)).run(None, {"x": x})[0]
    assert y.shape == shape


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_huge_magnitudes_sum_in_float64(mode, isa):
    # The float32 sum of |x| would overflow; SPEC.md sums in float64, so SAP still acts.
    x = np.full((2, 100), 1e37, np.float32)
    x[1, ::2] = -3e36
    y = _run(make_session(sap_model(mode=mode, seed=8)), x, isa)
    assert np.all(np.isfinite(y)) and (y == 0).any()
    assert_matches_reference(y, x, call=0, mode=mode, seed=8)


BAD = [
    ({"mode": "gaussian"}, "attribute 'mode' is 'gaussian'"),
    ({"ratio": 0.0}, "attribute 'ratio' is 0"),
    ({"ratio": -1.5}, "attribute 'ratio' is -1.5"),
    ({"ratio": float("inf")}, "attribute 'ratio' is inf"),
    ({"ratio": float("nan")}, "attribute 'ratio' is nan"),
    ({"samples": -2}, "attribute 'samples' is -2"),
    ({"samples": 2**31}, "attribute 'samples' is 2147483648"),
    ({"samples": 2**62}, "attribute 'samples' is 4611686018427387904"),  # used to wrap the scratch size
    ({"axis": -1}, "attribute 'axis' is -1"),
    # Wrong types used to be replaced by the defaults without a word.
    ({"ratio": 2}, "attribute 'ratio' is 2 (an int); it must be a float"),
    ({"samples": 3.0}, "attribute 'samples' is 3 (a float); it must be an int"),
    ({"mode": 1}, "attribute 'mode' is 1 (an int); it must be a string"),
    ({"axis": "1"}, "attribute 'axis' is '1' (a string); it must be an int"),
    ({"seed": 1.5}, "attribute 'seed' is 1.5 (a float); it must be an int"),
    ({"stream": [1, 2]}, "attribute 'stream' is a list of 2 ints; it must be an int"),
    ({"ratio": [0.5]}, "attribute 'ratio' is a list of 1 floats; it must be a float"),
    ({"ratio": onnx.numpy_helper.from_array(np.array(0.5, np.float32))}, "attribute 'ratio' is of another type"),
]


@pytest.mark.parametrize("attrs, message", BAD)
def test_bad_attributes_fail_at_session_creation(attrs, message):
    with pytest.raises(Exception, match="node 'sap_node'") as err:
        make_session(sap_model(**attrs))
    assert message in str(err.value)


def test_axis_past_rank_fails_at_first_run():
    sess = make_session(sap_model(axis=3))
    with pytest.raises(Exception, match="node 'sap_node': attribute 'axis' is 3; .*rank 2"):
        sess.run(None, {"x": np.ones((2, 3), np.float32)})


def test_the_largest_samples_runs(isa):
    # Bernoulli: the multinomial stream of 2^31 variates per example is too slow for a test.
    attrs = dict(mode="bernoulli", samples=reference.MAX_SAMPLES, seed=4)
    x = _input((4096, 1), np.float32)
    y = _run(make_session(sap_model(**attrs)), x, isa)
    assert_matches_reference(y, x, call=0, **attrs)


def test_unallocatable_scratch_is_a_clear_error():
    # 65536 examples x r = 2^31 - 1 variates need about a TiB of multinomial scratch.
    sess = make_session(sap_model(samples=reference.MAX_SAMPLES, seed=4))
    with pytest.raises(Exception, match="node 'sap_node': 65536 examples .* GiB of scratch"):
        sess.run(None, {"x": np.ones((65536, 1), np.float32)})


@pytest.mark.parametrize("ratio", [1e30, float(np.finfo(np.float32).max)])
def test_huge_ratio_clamps_r_instead_of_zeroing(ratio):
    # r = 2^31 - 1: every element carrying more than ~1e-8 of the mass is kept, at scale ~1. (Both
    # modes share the sample count; bernoulli keeps the test fast.)
    attrs = dict(mode="bernoulli", ratio=ratio, seed=6)
    x = _input((3, 200), np.float32)
    y = make_session(sap_model(**attrs)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y != 0, x != 0)
    np.testing.assert_allclose(y, x, rtol=1e-6)
    assert_matches_reference(y, x, call=0, **attrs)


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_survivors_saturate_in_float16(mode, isa):
    # A survivor reaches about x + S / r = 80000 here: beyond float16's 65504.
    attrs = dict(mode=mode, samples=1, seed=12)
    x = np.random.default_rng(3).uniform(0, 40, (2, 4096)).astype(np.float16)
    sess = make_session(sap_model(np.float16, **attrs))
    saturated = 0
    for call in range(20):
        y = _run(sess, x, isa)
        assert np.all(np.isfinite(y))
        saturated += int(np.sum(np.abs(y) == np.finfo(np.float16).max))
        assert_matches_reference(y, x, call=call, **attrs)
    assert saturated > 0


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
def test_survivors_saturate_in_float32_with_their_sign(mode, isa):
    attrs = dict(mode=mode, samples=1, seed=13)
    x = np.full((8, 16), 3e38, np.float32)
    x[:, ::2] *= -1
    y = _run(make_session(sap_model(**attrs)), x, isa)
    top = np.finfo(np.float32).max
    kept = y != 0
    assert kept.any()
    np.testing.assert_array_equal(y[kept], np.sign(x[kept]) * top)
    assert_matches_reference(y, x, call=0, **attrs)


@pytest.mark.parametrize("seed", range(1, 9))
def test_float64_subnormal_examples_match_the_reference(seed):
    # S down to a few units of 2^-1074: positions must be T_k * S (one rounding), not G_k * (S / G_r),
    # whose S / G_r keeps almost no digits there.
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (4, 64)) * 10.0 ** rng.uniform(-323, -308, (4, 1))
    x[rng.random(x.shape) < 0.3] = 0
    attrs = dict(mode="multinomial", seed=seed)
    y = make_session(sap_model(np.float64, **attrs)).run(None, {"x": x})[0]
    assert_matches_reference(y, x, call=0, **attrs)


def _two_node_model(**common):
    """x -> two SAP nodes (multinomial stream 0, bernoulli stream 1) side by side -> y0, y1."""
    nodes = [onnx.helper.make_node("StochasticActivationPruning", ["x"], [f"y{i}"], domain="onnx_sap", name=f"sap{i}",
                                   mode=mode, stream=i, **common)
             for i, mode in enumerate(["multinomial", "bernoulli"])]
    t = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(nodes, "two", [onnx.helper.make_tensor_value_info("x", t, None)],
                                   [onnx.helper.make_tensor_value_info(f"y{i}", t, None) for i in range(2)])
    return onnx.helper.make_model(graph, ir_version=9, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                                      onnx.helper.make_opsetid("onnx_sap", 1)])


@pytest.mark.parametrize("mode", ["bernoulli", "multinomial"])
@pytest.mark.parametrize("shape", [(2, 20000), (3, 50000)], ids=["small_chunks", "large_chunks"])
def test_output_is_the_same_for_every_thread_count(shape, mode):
    # A call of few examples runs its phases in one parallel-for whose invocations wait for each
    # other between phases (sap_kernels.h, PhaseRun): however many threads run them, from one to more
    # than there are cores, the output is the reference's and bit for bit the same.
    attrs = dict(mode=mode, seed=37)
    x = _input(shape, np.float32, 9)
    outs = []
    for threads in (1, 2, 3, 8):
        sess = make_session(sap_model(**attrs), threads=threads)
        outs += [sess.run(None, {"x": x})[0] for _ in range(3)]
    for call in range(3):
        assert_matches_reference(outs[call], x, call=call, **attrs)
    for i, y in enumerate(outs):
        np.testing.assert_array_equal(y, outs[i % 3])  # each session's i % 3-th call


def test_nodes_run_side_by_side_by_the_parallel_executor_match_the_sequential_ones():
    # ONNX Runtime's parallel executor runs the two SAP nodes at once, their parallel-fors sharing one
    # intra-op pool: each call's invocations wait only for their own call's tasks (PhaseRun), so no
    # call waits on the other and every output is the sequential session's.
    x = _input((2, 50000), np.float32, 10)
    model = _two_node_model(seed=38)
    sequential = make_session(model, threads=2)
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    options.inter_op_num_threads = 2
    parallel = make_session(model, threads=2, options=options)
    for _ in range(30):
        for a, b in zip(sequential.run(None, {"x": x}), parallel.run(None, {"x": x})):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, None], ids=["intra1", "intra_default"])
def test_concurrent_runs_use_each_call_index_once(threads):
    # 8 threads x 200 runs of one session: per node, the runs' call indices are exactly 0..1599 (each
    # learnt from the output's keep mask) and every output is the reference's for its index.
    workers, runs, seed = 8, 200, 31
    total = workers * runs
    x = _input((1, 96), np.float32, seed)
    sess = make_session(_two_node_model(seed=seed), threads=threads)
    outs: list[list] = [[] for _ in range(workers)]
    start = threading.Barrier(workers)

    def worker(i):
        start.wait()
        for _ in range(runs):
            outs[i].append(sess.run(None, {"x": x}))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for node, mode in enumerate(["multinomial", "bernoulli"]):
        attrs = dict(mode=mode, seed=seed, stream=node)
        index_of = {(reference.sap(x, call=c, **attrs) != 0).tobytes(): c for c in range(total)}
        assert len(index_of) == total  # each index has its own mask, so a mask names its index
        calls = []
        for y in (run[node] for thread_outs in outs for run in thread_outs):
            call = index_of[(y != 0).tobytes()]
            assert_matches_reference(y, x, call=call, **attrs)
            calls.append(call)
        assert sorted(calls) == list(range(total))
