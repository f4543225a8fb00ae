"""The CLI as a user meets it: exit codes, one-line errors, nothing written on failure."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from models import cnn, dense_with

from onnx_sap.rewrite import KINDS


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnx_sap", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "cnn.onnx"
    onnx.save(cnn(), p)
    return p


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in res.stderr


def test_harden_writes_beside_input_and_reports(model_path):
    res = cli("harden", model_path, "--mode", "bernoulli")
    assert res.returncode == 0, res.stderr
    assert (model_path.parent / "cnn.sap.onnx").exists()
    assert "relu6" in res.stdout and "wrote" in res.stdout and "check:" in res.stdout


def test_seed_warns_and_json_is_machine_readable(model_path, tmp_path):
    res = cli("harden", model_path, "-o", tmp_path / "o.onnx", "--seed", "4", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["plan"]["selected"] == 2 and doc["output_bytes"] > 0 and doc["check"]["equivalence_checked"]
    assert "predictable" in res.stderr


def test_portable_warns_that_sessions_repeat_the_stream(model_path, tmp_path):
    res = cli("harden", model_path, "-o", tmp_path / "p.onnx", "--portable", "--mode", "bernoulli", "--json")
    assert res.returncode == 0, res.stderr
    [warning] = json.loads(res.stdout)["warnings"]
    assert "once per process" in warning and "once per process" in res.stderr
    plain = cli("harden", model_path, "-o", tmp_path / "c.onnx", "--json")
    assert json.loads(plain.stdout)["warnings"] == [] and "warning" not in plain.stderr
    help_text = " ".join(cli("harden", "--help").stdout.replace("│", " ").split())
    assert "--portable uses the runtime's stream, seeded once per process" in help_text
    assert "fresh OS entropy per run (deployment)" not in help_text


def test_dry_run_writes_nothing(model_path, tmp_path):
    res = cli("harden", model_path, "-o", tmp_path / "x.onnx", "--dry-run")
    assert res.returncode == 0 and not (tmp_path / "x.onnx").exists() and "dry run" in res.stdout


def test_inspect_and_strip(model_path, tmp_path):
    assert cli("harden", model_path, "-o", tmp_path / "h.onnx", "--seed", "2").returncode == 0
    res = cli("inspect", tmp_path / "h.onnx", "--json")
    doc = json.loads(res.stdout)
    assert len(doc["existing_sap_nodes"]) == 2 and {s["kind"] for s in doc["sites"]} <= set(KINDS)
    res = cli("strip", tmp_path / "h.onnx", "-o", tmp_path / "s.onnx")
    assert res.returncode == 0 and "removed 2" in res.stdout


@pytest.mark.parametrize("content, fragment", [(b"this is not protobuf", "not a readable ONNX model"),
                                               (None, "truncated")])
def test_bad_files_are_one_line_errors(tmp_path, model_path, content, fragment):
    bad = tmp_path / "bad.onnx"
    if content is None:  # a truncated export
        data = model_path.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        fragment = "not a"
    else:
        bad.write_bytes(content)
    res = cli("harden", bad)
    assert_one_line_error(res, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.onnx", "cnn.onnx"])


def test_user_errors_exit_2_and_write_nothing(tmp_path, model_path):
    plain = tmp_path / "plain.onnx"
    onnx.save(dense_with(lambda x: ([], x, [])), plain)
    assert_one_line_error(cli("harden", plain), "no activations")
    assert_one_line_error(cli("harden", tmp_path / "missing.onnx"), "no such file")
    assert_one_line_error(cli("harden", model_path, "--mode", "gaussian"), "--mode")
    assert_one_line_error(cli("harden", model_path, "--ratio", "-1"), "--ratio")
    assert_one_line_error(cli("harden", model_path, "--ratio", "abc"), "--ratio")
    assert_one_line_error(cli("harden", model_path, "--ratio", "1e39"), "--ratio")  # beyond float32
    assert_one_line_error(cli("harden", model_path, "--samples", 2**63), "--samples")
    assert_one_line_error(cli("harden", model_path, "--samples", 2**31), "--samples")
    assert_one_line_error(cli("harden", model_path, "-o", tmp_path / "nope" / "x.onnx"), "does not exist")
    assert_one_line_error(cli("harden", model_path, "-o", model_path), "--overwrite")
    old = onnx.helper.make_model(cnn().graph, opset_imports=[onnx.helper.make_opsetid("", 5)])
    onnx.save(old, tmp_path / "old.onnx")
    assert_one_line_error(cli("harden", tmp_path / "old.onnx"), "opset 5")
    assert not list(tmp_path.glob("*.sap.onnx")) and not list(tmp_path.glob(".onnx-sap-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(tmp_path, model_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert_one_line_error(cli("harden", model_path, "-o", ro / "x.onnx"), "not writable")


def cli80(*args):
    """The CLI as in an 80-column terminal's log: not a terminal, COLUMNS=80."""
    return subprocess.run([sys.executable, "-m", "onnx_sap", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "80"})


LONG = ["/model/backbone/stage4/block3/conv2/activation/Relu_first", "/model/backbone/stage4/block3/conv2/activation/Relu_second"]


def _long_named(tmp_path):
    m = cnn()
    for node, name in zip((n for n in m.graph.node if n.op_type in ("Relu", "Clip")), LONG):
        node.name = name
    path = tmp_path / "long.onnx"
    onnx.save(m, path)
    return path


def _column(stdout: str, index: int) -> list[str]:
    """The cells of a Rich table column, a folded cell's lines joined (a new row starts with a number)."""
    cells: list[str] = []
    for line in stdout.split("└")[0].splitlines():  # the first table
        parts = line.split("│")
        if len(parts) < index + 2:
            continue
        if parts[1].strip():
            cells.append("")
        if cells:
            cells[-1] += parts[index + 1].strip()
    return cells


def test_tables_fit_80_columns_and_keep_whole_node_names(tmp_path):
    res = cli80("harden", _long_named(tmp_path), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert max(len(line.rstrip()) for line in res.stdout.splitlines()) <= 80
    assert _column(res.stdout, 1) == LONG  # folded, never cut: the distinguishing end stays
    assert "m: activations per example" in res.stdout  # every column explained


def test_inspect_summarises_the_model(model_path):
    res = cli80("inspect", model_path)
    assert res.returncode == 0, res.stderr
    for fragment in ("inputs", "x: float32[N, 1, 8, 8]", "outputs", "logits: float32[N, 10]", "opsets",
                     "ai.onnx 17", "nodes", "Conv 2", "weights", "parameters"):
        assert fragment in res.stdout
    doc = json.loads(cli("inspect", model_path, "--json").stdout)
    assert doc["model"]["nodes"] == len(cnn().graph.node) and doc["model"]["opsets"] == {"ai.onnx": 17}


def test_harden_summary_progress_and_next_step_never_offer_a_hardened_original(model_path, tmp_path):
    first = cli80("harden", model_path, "-o", tmp_path / "h.onnx")
    assert "before -> after: nodes 7 -> 9, SAP sites 0 -> 2" in first.stdout
    assert f"evaluate {model_path} {tmp_path / 'h.onnx'}" in first.stdout
    assert "harden: wrote" in first.stderr and "checked in ONNX Runtime" in first.stderr  # plain lines in logs
    again = cli80("harden", tmp_path / "h.onnx", "-o", tmp_path / "h2.onnx", "--force")
    assert again.returncode == 0, again.stderr
    assert "SAP sites 2 -> 2" in again.stdout
    hint = next(line for line in again.stdout.splitlines() if "onnx-sap evaluate" in line)
    assert str(tmp_path / "h.onnx") not in hint and str(tmp_path / "h2.onnx") in hint


def test_json_errors_on_stdout_with_the_same_exit_code(model_path, tmp_path):
    for args in (["harden", tmp_path / "missing.onnx", "--json"], ["harden", model_path, "--ratio", "-1", "--json"],
                 ["harden", model_path, "--ratio", "abc", "--json"], ["verify", model_path, "--runs", "0", "--json"]):
        res = cli(*args)
        assert res.returncode == 2, res
        assert set(json.loads(res.stdout)) == {"error"}
    assert "--ratio must be > 0" in json.loads(cli("harden", model_path, "--ratio", "-1", "--json").stdout)["error"]


def test_option_errors_name_the_flag(model_path):
    assert_one_line_error(cli("verify", model_path, "--runs", "0"), "--runs must be >= 1")
    assert_one_line_error(cli("bench", model_path, "--batch", "0"), "--batch must be")
    assert_one_line_error(cli("harden", model_path, "--ensemble-reduce", "max"), "--ensemble-reduce must be")


def test_version_flag_and_help_with_examples():
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("onnx-sap ")
    commands = ["harden", "inspect", "strip", "verify", "evaluate", "sweep", "tune", "bench", "version"]
    for command in commands:
        text = cli80(command, "--help").stdout
        assert "Examples:" in text and f"onnx-sap {command}" in text, command
        assert "<list" not in text and "<bool>" not in text, command
        assert max(len(line) for line in text.splitlines()) <= 80, (command, text)
    assert "--dry-run  " in cli80("harden", "--help").stdout
