"""evaluate on Dask: the same JSON as in process, whatever the workers do; clear errors before any work.

Dask runs on a LocalCluster bound to 127.0.0.1 (no network beyond loopback).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_sap.api import harden
from onnx_sap.distributed import DaskExecutor
from onnx_sap.errors import OnnxSapError, OptionError
from onnx_sap.evaluate import (EvaluateOptions, EvaluateProgress, ModelRef, evaluate, evaluate_shard, make_shards,
                               prepare)
from onnx_sap.metrics import load_data
from onnx_sap.runtime import example_file

distributed = pytest.importorskip("distributed")

# transfer + spsa, one eps, few steps: 24 digits in 4 shards.
SMALL = ["--limit", "24", "--eps", "0.2", "--attacks", "transfer,spsa", "--transfer-steps", "3", "--spsa-steps", "4",
         "--spsa-pairs", "4", "--passes", "3", "--seed", "1", "--shard-size", "6", "--json"]
SMALL_OPTS = dict(eps=[0.2], attacks=["transfer", "spsa"], transfer_steps=3, spsa_steps=4, spsa_pairs=4, passes=3,
                  seed=1, shard_size=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    original = onnx.load(example_file("digits_cnn.onnx"))
    hardened = harden(original).model
    onnx.save(hardened, folder / "h.onnx")
    return original, hardened, folder / "h.onnx"


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_sap", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_local_cluster_gives_exactly_the_in_process_json(models):
    original_path = str(example_file("digits_cnn.onnx"))
    in_process = _cli("evaluate", original_path, str(models[2]), *SMALL)
    on_dask = _cli("evaluate", original_path, str(models[2]), *SMALL, "--scheduler", "local:2")
    assert in_process.returncode == 0, in_process.stderr
    assert on_dask.returncode == 0, on_dask.stderr
    assert on_dask.stdout == in_process.stdout
    # Not a terminal: one plain line per finished shard, no blank line.
    lines = on_dask.stderr.splitlines()
    assert len(lines) == 4 and all(line.startswith("evaluate: ") for line in lines), on_dask.stderr


def test_a_shard_does_not_depend_on_what_ran_before_it_in_the_process(models):
    """Workers keep sessions between tasks: a shard's result must be the same run first or after others."""
    original, hardened, _ = models
    x, y = load_data("digits", limit=12)
    opts = prepare(x, EvaluateOptions(**SMALL_OPTS))
    targets = {"original": ModelRef.of(original), "hardened": ModelRef.of(hardened)}
    first, second = make_shards(len(x), 6)
    alone = evaluate_shard(targets, targets["original"], x[6:], y[6:], second, opts)
    evaluate_shard(targets, targets["original"], x[:6], y[:6], first, opts)
    after = evaluate_shard(targets, targets["original"], x[6:], y[6:], second, opts)
    for name in targets:
        assert np.array_equal(alone.multi[name], after.multi[name])
        assert np.array_equal(alone.probs[name], after.probs[name])
        assert alone.survived[name]["spsa"][0.2].tolist() == after.survived[name]["spsa"][0.2].tolist()


class KillABusyWorker(EvaluateProgress):
    """When the first shard finishes, SIGKILL a worker that is running another one."""

    def __init__(self, client):
        self.client = client
        self.pids = client.run(os.getpid)
        self.killed = None

    def done(self, label: str, units: int) -> None:
        if self.killed is None:
            busy = [w for w, keys in self.client.processing().items() if keys]
            self.killed = busy[0] if busy else ""
            if busy:
                os.kill(self.pids[busy[0]], signal.SIGKILL)


def test_a_killed_worker_mid_run_still_gives_the_in_process_result_and_a_twice_failed_task_is_named(models):
    original, hardened, _ = models
    x, y = load_data("digits", limit=24)
    opts = EvaluateOptions(**dict(SMALL_OPTS, shard_size=4))
    expected = evaluate(original, hardened, x, y, opts)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        killer = KillABusyWorker(client)
        result = evaluate(original, hardened, x, y, opts, killer, scheduler=client)
        # A task that fails on every try is named in the error (here: a stand-in for a shard's label).
        with pytest.raises(OnnxSapError, match=r"^shard 7 \(examples 3-5\) failed twice .*ZeroDivisionError"):
            DaskExecutor(client, None).map(lambda v: 1 // v, [(0,)], ["shard 7 (examples 3-5)"], lambda i, r: None)
    assert killer.killed, "no worker was busy when the first shard finished"
    assert result == expected


def test_an_unreachable_scheduler_fails_with_one_line_naming_it(models):
    with socket.socket() as s:  # a free port on loopback, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    res = _cli("evaluate", str(models[2]), "--limit", "4", "--scheduler", address, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and address in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_scheduler_and_option_errors_name_the_parameter_in_python_and_the_flag_in_the_cli(models):
    _, hardened, path = models
    x, y = load_data("digits", limit=4)
    with pytest.raises(OptionError, match=r"^scheduler must be local"):
        evaluate(None, hardened, x, y, scheduler="locl:2")
    with pytest.raises(OptionError, match=r"^shard_size must be >= 1"):
        EvaluateOptions(shard_size=0).validate()
    res = _cli("evaluate", str(path), "--shard-size", "0")
    assert res.returncode == 2 and "--shard-size must be >= 1" in res.stderr, res.stderr
    res = _cli("evaluate", str(path), "--scheduler", "locl:2")
    assert res.returncode == 2 and "--scheduler must be local" in res.stderr, res.stderr


def test_missing_dask_is_one_clear_line(models):
    code = ("import sys; sys.modules['distributed'] = None; sys.argv = ['onnx-sap', 'evaluate', sys.argv[1], "
            "'--limit', '4', '--scheduler', 'local:2']; from onnx_sap.cli import main; main()")
    res = subprocess.run([sys.executable, "-c", code, str(models[2])], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "pip install 'onnx-sap[dask]'" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
