"""Writing models: the output path holds the old model with its data, or the new one with its data,
whatever happens during the write (an exception, or SIGKILL at any point)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import ACTIVATIONS, dense_with

from onnx_sap import make_session, modelio
from onnx_sap.modelio import save_model

X = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)


def model_with_weights(seed: int) -> onnx.ModelProto:
    return dense_with(ACTIVATIONS["relu"][1], width=64, seed=seed)  # W1 is 4 KiB: external when asked


def weights(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))  # with its external data
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("external", [True, False])
def test_a_failed_write_leaves_the_old_model_with_its_own_data(tmp_path, monkeypatch, external):
    out = tmp_path / "out.onnx"
    save_model(model_with_weights(0), out, external_data=external)
    old = weights(out)
    real_replace = os.replace

    def crash_before_the_model_is_replaced(src, dst):
        if Path(dst) == out:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_the_model_is_replaced)
    with pytest.raises(OSError, match="simulated"):
        save_model(model_with_weights(1), out, external_data=True)
    monkeypatch.undo()
    for name, value in weights(out).items():  # the old graph still reads the old weights
        np.testing.assert_array_equal(value, old[name])
    assert not list(tmp_path.glob(".onnx-sap-*"))


def test_the_old_data_file_goes_once_the_new_model_is_in_place(tmp_path):
    out = tmp_path / "out.onnx"
    save_model(model_with_weights(0), out, external_data=True)
    first = set(tmp_path.glob("out.onnx.*.data"))
    save_model(model_with_weights(1), out, external_data=True)
    second = set(tmp_path.glob("out.onnx.*.data"))
    assert len(first) == len(second) == 1 and first != second
    save_model(model_with_weights(2), out)  # now without external data: no data file is left
    assert not list(tmp_path.glob("out.onnx.*data"))
    np.testing.assert_array_equal(weights(out)["W1"], onnx.numpy_helper.to_array(model_with_weights(2).graph.initializer[0]))


def test_stale_staging_folders_and_orphan_data_are_removed(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".onnx-sap-{int(dead.stdout)}-abcd"
    alive = tmp_path / f".onnx-sap-{os.getpid()}-efgh"
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "out.onnx").write_bytes(b"partial")
    orphan = tmp_path / "out.onnx.0123abcd.data"
    orphan.write_bytes(b"left by a killed save")
    other = tmp_path / "notes.0123abcd.data"
    other.write_bytes(b"not ours")
    save_model(model_with_weights(0), out, external_data=True)
    assert not stale.exists() and alive.exists() and orphan.exists()  # the orphan is too young to be sure
    monkeypatch.setattr(modelio, "ORPHAN_AGE_S", 0.0)
    save_model(model_with_weights(1), out, external_data=True)
    assert not orphan.exists() and other.exists() and len(list(tmp_path.glob("out.onnx.*.data"))) == 1


def _harden_cmd(src: Path, out: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "onnx_sap", "harden", str(src), "-o", str(out), "--mode", "bernoulli",
            "--seed", str(seed)]


def _assert_old_new_or_nothing(out: Path, old: dict | None) -> str:
    if not out.exists():
        assert old is None, "the old model is gone"
        return "nothing"
    got = weights(out)  # raises if the model or the data it names is incomplete or missing
    if old is not None and got.keys() == old.keys() and all(np.array_equal(got[k], old[k]) for k in got):
        return "old"
    onnx.checker.check_model(str(out), full_check=True)
    assert make_session(str(out)).run(None, {"x": X})[0].shape == (3, 10)
    return "new"


@pytest.mark.parametrize("external", [True, False])
def test_harden_killed_at_random_points_leaves_old_new_or_nothing(tmp_path, external):
    src = tmp_path / "in.onnx"
    m = model_with_weights(3)
    if external:
        onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="in.onnx.data",
                  size_threshold=0)
    else:
        onnx.save(m, src)
    out = tmp_path / "out.onnx"
    t0 = time.monotonic()
    subprocess.run(_harden_cmd(src, tmp_path / "timing.onnx", 1), check=True, capture_output=True)
    duration = time.monotonic() - t0
    rng = random.Random(7)
    outcomes = []
    for kill in range(8):
        old = weights(out) if out.exists() else None
        proc = subprocess.Popen(_harden_cmd(src, out, 100 + kill), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Half the kills land late in the run, where the files are written.
        time.sleep(rng.uniform(0, duration) if kill % 2 else rng.uniform(0.6 * duration, 1.1 * duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(_assert_old_new_or_nothing(out, old))
    subprocess.run(_harden_cmd(src, out, 999), check=True, capture_output=True)
    assert _assert_old_new_or_nothing(out, None) == "new"
    # Whatever the kills left, the last run cleaned (staging folders of dead processes) or will
    # clean (data files nothing refers to, once a minute old); the input is untouched.
    assert not list(tmp_path.glob(".onnx-sap-*"))
    referenced = modelio._data_files_of(out)
    leftovers = {f.name for f in tmp_path.glob("out.onnx.*.data")} - referenced
    assert all(modelio._our_data_file(out, name) for name in leftovers)
    assert weights(src).keys() == {"W1", "W2"}


@pytest.fixture
def every_tensor_held(monkeypatch):
    """Read files as big models are read: the weight matrices held beside a lean ModelProto."""
    monkeypatch.setattr(modelio, "LEAN_TENSOR_BYTES", 1024)  # the weights, not scalar constants


@pytest.mark.parametrize("external", [True, False])
def test_a_lean_read_writes_what_an_in_memory_harden_writes(tmp_path, every_tensor_held, external):
    from onnx_sap.api import harden, strip

    m = model_with_weights(4)
    src = tmp_path / "in.onnx"
    if external:
        onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="in.onnx.data",
                  size_threshold=0)
    else:
        onnx.save(m, src)
    lean = modelio.read_lean_model(src)
    assert set(lean.weights) == {"W1", "W2"} and lean.model.ByteSize() < 1000 and lean.external == external
    report = harden(src, tmp_path / "out.onnx", mode="bernoulli", seed=5)
    expected = harden(model_with_weights(4), mode="bernoulli", seed=5).model  # onnx.save moved m's tensors out
    written = onnx.load(str(report.output))
    if external:
        onnx.external_data_helper.convert_model_from_external_data(written)
        for t in written.graph.initializer:
            t.ClearField("data_location")  # left set to DEFAULT
    assert written == expected  # the streamed file parses to the very message onnx would have written
    for t in report.model.graph.initializer:  # the report's model names where its tensors were written
        location = {e.key: e.value for e in t.external_data}["location"]
        assert location == ("out.onnx" if not external else location) and (tmp_path / location).is_file()
    onnx.load_external_data_for_model(report.model, str(tmp_path))
    for t in report.model.graph.initializer:
        t.ClearField("data_location")
    assert report.model == written
    np.testing.assert_array_equal(make_session(str(report.output)).run(None, {"x": X})[0],
                                  make_session(expected).run(None, {"x": X})[0])
    _, _, back = strip(report.output, tmp_path / "back.onnx")
    for name, value in weights(back).items():
        np.testing.assert_array_equal(value, weights(src)[name])


def test_the_check_runs_on_held_weights(tmp_path, every_tensor_held):
    from onnx_sap.api import harden

    src = tmp_path / "in.onnx"
    onnx.save(model_with_weights(5), src)
    report = harden(src, tmp_path / "out.onnx", mode="bernoulli")
    assert report.check is not None and report.check.equivalence_checked and report.check.max_abs_diff < 1e-4
