"""A seeded mutation fuzzer for `onnx-sap harden` (read_model, the input check, the rewriter, the check).

Each case takes a small valid model, applies one to three mutations (byte flips, truncation and
protobuf field edits: wrong dims, dangling inputs, unknown ops, duplicate names, huge dims, opset 1
or 99, bfloat16, names that are not UTF-8, external data that is missing, truncated initializers,
wrong input counts, ...), and runs the CLI's harden in a forked child (so that a crash in native code
is seen as a crash, not the end of the run) with a random set of options. Every case must end in:

- success: exit 0, the output passes onnx.checker (full check) and runs in ONNX Runtime; or
- a user error: exit 2, one line on stderr starting with "error:", and nothing written.

Anything else (an internal error, an error blaming the rewriter, a signal, a hang, a traceback, a
partial output, a changed input) is a failure. The same seed gives the same cases:

    .venv/bin/python tests/fuzzing.py --cases 3000 --seed 1            # prints counts per outcome
    .venv/bin/python tests/fuzzing.py --cases 200 --seed 7 --save-failures tests/fuzz_corpus
    .venv/bin/python tests/fuzzing.py --atheris -runs=500 -seed=1   # coverage-guided, with atheris
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402  (the test models, built in code)

# Outcomes; only the first two are acceptable.
OK, USER_ERROR = "ok", "user-error"
FAILURES = ("internal-error", "rewriter-error", "crash", "timeout", "partial-output", "bad-error", "bad-output",
            "input-changed")
# One-line errors that blame onnx-sap's own output, not the input: failures too.
REWRITER_BLAME = ("please report", "the hardened model does not load", "hardened (deterministic)")

OPTION_SETS = [
    [], ["--mode", "bernoulli"], ["--portable"], ["--portable", "--mode", "bernoulli"], ["--ensemble", "2"],
    ["--ensemble", "3", "--ensemble-reduce", "logits"], ["--samples", "5"], ["--ratio", "0.5"], ["--no-check"],
    ["--force"], ["--axis", "2"], ["--seed", "3"], ["--portable", "--ensemble", "2"],
]

NON_UTF8 = b"\xff\xfe\xc3\x28"  # invalid UTF-8 wherever protobuf expects a string


def seed_models() -> list[bytes]:
    """Small valid models the mutations start from (serialized)."""
    seeds = [models.cnn(), models.cnn(batch=2), models.residual(), models.activation_as_output(), models.with_if(),
             models.with_loop(), models.legacy_ir3(), models.dense_with(models.silu()),
             models.dense_with(models.gelu_erf("torch")), models.dense_with(models.hardswish("mul_div")),
             models.dense_with(models.gelu_tanh("pow")), models.dense_with(models.clip(0.0, 6.0))]
    return [m.SerializeToString() for m in seeds]


# ---------------------------------------------------------------------------------------------
# Mutations. Each takes (ModelProto, rng) and edits the model in place; byte-level ones work on bytes.


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def _pick_graph(m, rng) -> onnx.GraphProto:
    return rng.choice(list(_graphs(m.graph)))


def _value_infos(g):
    return list(g.input) + list(g.output) + list(g.value_info)


def _tensor_names(g) -> list[str]:
    names = [v.name for v in _value_infos(g)] + [t.name for t in g.initializer]
    for n in g.node:
        names += list(n.input) + list(n.output)
    return [n for n in names if n] or ["x"]


def mut_wrong_dims(m, rng):
    vis = [v for v in _value_infos(_pick_graph(m, rng)) if v.type.HasField("tensor_type")]
    if not vis:
        return
    v = rng.choice(vis)
    dims = v.type.tensor_type.shape.dim
    if not dims:
        v.type.tensor_type.shape.dim.add().dim_value = rng.choice([1, 3, 7])
        return
    d = rng.choice(list(dims))
    choice = rng.random()
    if choice < 0.2:
        d.dim_param = rng.choice(["M", "batch", ""])
    elif choice < 0.3:
        del dims[rng.randrange(len(dims))]
    else:
        d.dim_value = rng.choice([0, 1, 2, 5, 13, 64])


def mut_huge_dims(m, rng):
    vis = [v for v in list(m.graph.input) + list(m.graph.output) if v.type.HasField("tensor_type")]
    if vis:
        dims = rng.choice(vis).type.tensor_type.shape.dim
        if dims:
            rng.choice(list(dims)).dim_value = rng.choice([2**31, 2**40, 2**62, 100_000])


def mut_dangling_input(m, rng):
    g = _pick_graph(m, rng)
    nodes = [n for n in g.node if n.input]
    if nodes:
        n = rng.choice(nodes)
        n.input[rng.randrange(len(n.input))] = rng.choice(["ghost", "", "x_missing"])


def mut_unknown_op(m, rng):
    g = _pick_graph(m, rng)
    if g.node:
        n = rng.choice(list(g.node))
        r = rng.random()
        if r < 0.4:
            n.op_type = rng.choice(["FooBar", "Reluu", "Erf", "Div", "Mul", "Sigmoid", "Clip", "Relu", "Tanh"])
        elif r < 0.7:
            n.domain = rng.choice(["com.example", "com.microsoft", "onnx_sap", "ai.onnx.ml"])
        else:
            n.op_type, n.domain = rng.choice([("Erf", "custom"), ("Mul", "custom"), ("Sigmoid", "custom"),
                                              ("Div", "custom"), ("Add", "custom"), ("Gelu", "com.microsoft"),
                                              ("FusedConv", "com.microsoft")])
            m.opset_import.add(domain=n.domain, version=1)


def mut_duplicate_names(m, rng):
    g = _pick_graph(m, rng)
    r = rng.random()
    if r < 0.4 and len(g.node) > 1:
        a, b = rng.sample(list(g.node), 2)
        if a.output and b.output:
            b.output[0] = a.output[0]
    elif r < 0.6 and len(g.node) > 1:
        a, b = rng.sample(list(g.node), 2)
        b.name = a.name
    elif r < 0.8 and g.initializer:
        g.initializer.add().CopyFrom(rng.choice(list(g.initializer)))
    elif g.input:
        g.input.add().CopyFrom(rng.choice(list(g.input)))


def mut_opset(m, rng):
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = rng.choice([1, 6, 7, 9, 11, 13, 20, 99])
            return


def mut_ir_version(m, rng):
    m.ir_version = rng.choice([1, 2, 3, 4, 7, 10, 11, 99])


def mut_bfloat16(m, rng):
    g = _pick_graph(m, rng)
    r = rng.random()
    if r < 0.5:
        vis = [v for v in _value_infos(g) if v.type.HasField("tensor_type")]
        if vis:
            rng.choice(vis).type.tensor_type.elem_type = TensorProto.BFLOAT16
    elif r < 0.8:
        floats = [t for t in g.initializer if t.data_type == TensorProto.FLOAT]
        if floats:
            t = rng.choice(floats)
            arr = onnx.numpy_helper.to_array(t)
            new = helper.make_tensor(t.name, TensorProto.BFLOAT16, arr.shape, arr.flatten().tolist())
            t.CopyFrom(new)
    else:  # a whole bfloat16 model: inputs, outputs and float initializers
        for v in list(m.graph.input) + list(m.graph.output):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                v.type.tensor_type.elem_type = TensorProto.BFLOAT16
        for t in m.graph.initializer:
            if t.data_type == TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(t)
                t.CopyFrom(helper.make_tensor(t.name, TensorProto.BFLOAT16, arr.shape, arr.flatten().tolist()))
        del m.graph.value_info[:]


def mut_non_utf8(m, rng):
    """Mark a name with a placeholder; to_bytes swaps it for invalid UTF-8 of the same length."""
    g = _pick_graph(m, rng)
    r = rng.random()
    if r < 0.4 and g.node:
        rng.choice(list(g.node)).name = "@@NU@@"
    elif r < 0.8:
        old = rng.choice(_tensor_names(g))
        for v in _value_infos(g):
            if v.name == old:
                v.name = "@@NU@@"
        for t in g.initializer:
            if t.name == old:
                t.name = "@@NU@@"
        for n in g.node:
            for i, s in enumerate(n.input):
                if s == old:
                    n.input[i] = "@@NU@@"
            for i, s in enumerate(n.output):
                if s == old:
                    n.output[i] = "@@NU@@"
    else:
        m.doc_string = "@@NU@@"
        m.metadata_props.add(key="@@NU@@", value="v")


def mut_external_missing(m, rng):
    inits = [t for g in _graphs(m.graph) for t in g.initializer]
    if inits:
        t = rng.choice(inits)
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("int64_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.add(key="location", value=rng.choice(["missing.bin", "../outside.bin", "/etc/hostname",
                                                              "sub/none.bin", ""]))
        if rng.random() < 0.5:
            t.external_data.add(key="length", value=str(rng.choice([4, 10**12])))


def mut_truncate_initializer(m, rng):
    inits = [t for g in _graphs(m.graph) for t in g.initializer]
    if inits:
        t = rng.choice(inits)
        arr = onnx.numpy_helper.to_array(t)
        raw = arr.tobytes()
        t.ClearField("float_data")
        t.ClearField("int64_data")
        t.ClearField("int32_data")
        t.ClearField("double_data")
        t.raw_data = raw[: rng.randrange(max(1, len(raw)))]


def mut_input_count(m, rng):
    g = _pick_graph(m, rng)
    if g.node:
        n = rng.choice(list(g.node))
        if n.input and rng.random() < 0.5:
            del n.input[rng.randrange(len(n.input))]
        else:
            n.input.append(rng.choice(_tensor_names(g)))
        if rng.random() < 0.2 and n.output:
            del n.output[:]


def mut_attribute(m, rng):
    g = _pick_graph(m, rng)
    nodes = [n for n in g.node if n.attribute]
    if nodes:
        n = rng.choice(nodes)
        a = rng.choice(list(n.attribute))
        if a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints.append(rng.choice([-1, 0, 99]))
        elif a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([-5, 0, 2**40])
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([float("nan"), float("inf"), -1.0])
        else:
            n.attribute.remove(a)
    elif g.node:
        rng.choice(list(g.node)).attribute.append(helper.make_attribute("bogus", 1))


def mut_remove_or_swap_node(m, rng):
    g = _pick_graph(m, rng)
    if len(g.node) > 1:
        if rng.random() < 0.5:
            del g.node[rng.randrange(len(g.node))]
        else:
            i, j = rng.sample(range(len(g.node)), 2)
            a, b = onnx.NodeProto(), onnx.NodeProto()
            a.CopyFrom(g.node[i])
            b.CopyFrom(g.node[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)


def mut_unused_initializer_input(m, rng):
    t = helper.make_tensor("unused_w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    m.graph.initializer.append(t)
    m.graph.input.append(helper.make_tensor_value_info("unused_w", TensorProto.FLOAT, [3]))
    if rng.random() < 0.7:
        m.ir_version = 3


def mut_output_type(m, rng):
    outs = [v for v in m.graph.output if v.type.HasField("tensor_type")]
    if outs:
        rng.choice(outs).type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.FLOAT16,
                                                                  TensorProto.DOUBLE, TensorProto.STRING, 0, 99])


STRUCTURED = [mut_wrong_dims, mut_huge_dims, mut_dangling_input, mut_unknown_op, mut_duplicate_names, mut_opset,
              mut_ir_version, mut_bfloat16, mut_non_utf8, mut_external_missing, mut_truncate_initializer,
              mut_input_count, mut_attribute, mut_remove_or_swap_node, mut_unused_initializer_input,
              mut_output_type]


def to_bytes(m: onnx.ModelProto) -> bytes:
    data = m.SerializeToString()
    return data.replace(b"@@NU@@", NON_UTF8 + b"@@")


def byte_flips(data: bytes, rng) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def truncate(data: bytes, rng) -> bytes:
    return data[: rng.randrange(1, len(data))]


def make_case(seeds: list[bytes], rng: random.Random) -> tuple[bytes, list[str], list[str]]:
    """(model bytes, harden options, names of the mutations applied)."""
    m = onnx.ModelProto()
    m.ParseFromString(rng.choice(seeds))
    applied = []
    for _ in range(rng.choice([0, 1, 1, 1, 1, 1, 2, 2, 3])):  # 0: the rewriter on a valid model
        mut = rng.choice(STRUCTURED)
        try:
            mut(m, rng)
        except Exception:  # noqa: BLE001 - a mutation that does not apply to this model (external tensor, ...)
            continue
        applied.append(mut.__name__[4:])
    data = to_bytes(m)
    r = rng.random()
    if r < 0.12:
        data, applied = byte_flips(data, rng), applied + ["byte_flips"]
    elif r < 0.17:
        data, applied = truncate(data, rng), applied + ["truncate"]
    return data, rng.choice(OPTION_SETS), applied


# ---------------------------------------------------------------------------------------------
# Running one case and classifying it.


def _limit_memory() -> None:
    limit = int(os.environ.get("ONNX_SAP_FUZZ_MEMORY", str(6 << 30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _check_output(out: Path) -> str | None:
    """None if out is a checker-valid model that runs in ONNX Runtime, else what is wrong."""
    from onnx_sap.check import random_feeds
    from onnx_sap.runtime import make_session

    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as e:  # noqa: BLE001 - any failure of the output is the finding
        return f"output fails onnx.checker: {type(e).__name__}: {str(e)[:200]}"
    try:
        sess = make_session(str(out))
        sess.run(None, random_feeds(sess))
    except Exception as e:  # noqa: BLE001
        return f"output does not run: {type(e).__name__}: {str(e)[:200]}"
    return None


def _child(model_path: Path, out: Path, options: list[str], result: Path, in_process: bool = False) -> None:
    """Runs in the child: harden through the CLI's entry point, then check what it wrote."""
    import onnxruntime

    from onnx_sap import cli

    onnxruntime.set_default_logger_severity(4)  # its errors about the mutated models are expected noise
    if not in_process:  # in process (atheris), libFuzzer's -rss_limit_mb bounds memory
        _limit_memory()
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["onnx-sap", "harden", str(model_path), "-o", str(out), *options]
    sys.argv = argv
    code = None
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - escaping main() at all is the finding
            stderr.write(f"escaped main(): {type(e).__name__}: {e}\n")
            code = -1
    doc = {"code": code, "stderr": stderr.getvalue()[-2000:]}
    if code == 0 and out.exists():
        doc["output_problem"] = _check_output(out)
        if doc["output_problem"] and "--no-check" in options and "does not run" in doc["output_problem"] \
                and "does not run" in (_check_output(model_path) or ""):
            doc["output_problem"] = None  # asked not to check a model ONNX Runtime cannot run to begin with
    result.write_text(json.dumps(doc))


_CONTEXT = None


def _context():
    """Children are forked from a fork server that imported onnx-sap but never ran ONNX Runtime: a
    fork of a process whose ORT thread pools exist (a pytest run) can deadlock in the child."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["fuzzing", "onnx_sap.cli", "onnx_sap.api", "onnxruntime"])
    return _CONTEXT


def run_case(data: bytes, options: list[str], timeout: float = 120.0, in_process: bool = False) -> tuple[str, str]:
    """Harden `data` with `options` in a child process (or in this one: a crash then ends the run);
    returns (outcome, detail)."""
    with tempfile.TemporaryDirectory(prefix="onnx-sap-fuzz-") as tmp:
        work = Path(tmp)
        model_path, out, result = work / "in.onnx", work / "out.onnx", work / "result.json"
        model_path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        if in_process:
            _child(model_path, out, options, result, in_process=True)
        else:
            child = _context().Process(target=_child, args=(model_path, out, options, result))
            child.start()
            child.join(timeout)
            if child.exitcode is None:
                child.kill()
                child.join()
                return "timeout", f"no result after {timeout:.0f} s"
            if child.exitcode < 0:
                return "crash", f"signal {-child.exitcode}"
            if not result.exists():
                return "crash", f"child exited {child.exitcode} without a result"
        try:
            doc = json.loads(result.read_text())
        except (OSError, ValueError):
            return "crash", "the child's result is missing or cut short"
        code, err = doc["code"], doc["stderr"]
        if hashlib.sha256(model_path.read_bytes()).hexdigest() != digest:
            return "input-changed", "the input file was modified"
        leftovers = sorted(p.name for p in work.iterdir() if p.name not in ("in.onnx", "result.json", "out.onnx"))
        lines = [line for line in err.strip().splitlines() if line.strip()]
        if code == 0:
            if not out.exists():
                return "bad-output", "exit 0 but no output"
            if doc.get("output_problem"):
                return "bad-output", doc["output_problem"]
            if leftovers:
                return "partial-output", f"exit 0 but left {leftovers}"
            return OK, ""
        if code == 2:
            if out.exists() or leftovers:
                return "partial-output", f"exit 2 but wrote {['out.onnx'] if out.exists() else []}{leftovers}"
            if len(lines) != 1 or not lines[0].startswith("error:") or "Traceback" in err:
                return "bad-error", err.strip()[:500]
            if any(b in lines[0] for b in REWRITER_BLAME):
                return "rewriter-error", lines[0]
            return USER_ERROR, lines[0]
        if "internal error" in err:
            return "internal-error", err.strip()[:500]
        return "bad-error", f"exit {code}: {err.strip()[:500]}"


def fuzz(cases: int, seed: int, save_failures: Path | None = None, verbose: bool = False,
         first: int = 0) -> collections.Counter:
    """Run seeded cases first..cases-1 (the earlier ones are drawn, not run: several processes can
    share a run); prints each failure and returns the counts per outcome."""
    rng = random.Random(seed)
    seeds = seed_models()
    counts: collections.Counter = collections.Counter()
    for i in range(cases):
        data, options, applied = make_case(seeds, rng)
        if i < first:
            continue
        outcome, detail = run_case(data, options)
        counts[outcome] += 1
        if outcome not in (OK, USER_ERROR) or verbose:
            print(f"case {i} [{'+'.join(applied)}] {' '.join(options)}: {outcome}: {detail}", flush=True)
        if outcome not in (OK, USER_ERROR) and save_failures is not None:
            save_failures.mkdir(parents=True, exist_ok=True)
            name = f"seed{seed}-case{i}"
            (save_failures / f"{name}.onnx").write_bytes(data)
            (save_failures / f"{name}.json").write_text(json.dumps({"options": options, "mutations": applied,
                                                                     "outcome": outcome}) + "\n")
    return counts


def atheris_main(argv: list[str]) -> None:
    """Coverage-guided fuzzing with atheris (pip install atheris), in this process: libFuzzer picks
    the inputs, mutated by make_case's mutations (custom_mutator), and onnx_sap is instrumented.
    libFuzzer's own flags follow --atheris (-runs=N, -seed=S, -rss_limit_mb=..., a corpus folder);
    a failing case raises, and libFuzzer saves it as crash-*."""
    import zlib

    import atheris

    with atheris.instrument_imports(include=["onnx_sap"]):
        import onnx_sap.cli  # noqa: F401

    seeds = seed_models()

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        return make_case([data] if _parses(data) else seeds, rng)[0][:max_size]

    def test_one(data: bytes) -> None:
        options = OPTION_SETS[zlib.crc32(data) % len(OPTION_SETS)]
        outcome, detail = run_case(data, options, in_process=True)
        if outcome not in (OK, USER_ERROR):
            raise RuntimeError(f"{outcome} with {' '.join(options)}: {detail}")

    atheris.Setup(argv, test_one, custom_mutator=mutate)
    atheris.Fuzz()


def _parses(data: bytes) -> bool:
    """Whether data is a model with a graph to mutate further (else a seed model is taken)."""
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        return False
    return len(m.graph.node) > 0


def main() -> int:
    if "--atheris" in sys.argv:
        atheris_main([a for a in sys.argv if a != "--atheris"])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save-failures", type=Path, default=None, help="write failing cases (model + options) here")
    ap.add_argument("--verbose", action="store_true", help="print every case")
    ap.add_argument("--first", type=int, default=0, help="run only cases FIRST.. (to split a run over processes)")
    args = ap.parse_args()
    start = time.monotonic()
    counts = fuzz(args.cases, args.seed, args.save_failures, args.verbose, args.first)
    failures = sum(counts[f] for f in FAILURES)
    print(f"fuzz: cases {args.first}..{args.cases - 1}, seed {args.seed}, {time.monotonic() - start:.0f} s: "
          + ", ".join(f"{k} {counts[k]}" for k in (OK, USER_ERROR) + FAILURES))
    return 1 if failures else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
