"""Reading and writing model files: clear errors for bad input, external data, atomic writes."""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxSapError, first_line

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of that with some margin.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MIN_OPSET = 7


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise OnnxSapError saying what is wrong."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """load_model, also saying whether the file kept tensors outside the .onnx (once loaded, the
    tensors no longer show it), so that a rewritten copy can be stored the same way."""
    p = Path(path)
    if not p.exists():
        raise OnnxSapError(f"{p}: no such file; give the path of an .onnx model")
    if not p.is_file():
        raise OnnxSapError(f"{p}: not a file; give the path of an .onnx model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise OnnxSapError(f"{p}: not a readable ONNX model ({type(e).__name__}); re-export it or check the file "
                           "is complete") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxSapError(f"{p}: not an ONNX model (no graph); re-export it or check the file is complete")
    external = uses_external_data(model)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as e:
        raise OnnxSapError(f"{p}: its external data could not be read ({e}); keep the data files beside the model")
    check_opset(model, str(p))
    return model, external


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of the model (as loaded from disk) is stored outside the .onnx file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_initializers(model.graph))


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def model_bytes(model: onnx.ModelProto) -> int:
    """Approximate serialized size, safe for models over 2 GiB (where ByteSize() may fail)."""
    return sum(len(t.raw_data) + 8 * len(t.float_data) + 8 * len(t.int64_data) + 8 * len(t.double_data)
               for t in _all_initializers(model.graph)) + 1_000_000


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise OnnxSapError("the model imports no default-domain opset; re-export it with a standard opset")


def check_opset(model: onnx.ModelProto, where: str) -> None:
    """Refuse opsets outside what onnx and ONNX Runtime here understand."""
    version = default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= version <= newest:
        raise OnnxSapError(f"{where}: opset {version} is not supported (supported: {MIN_OPSET}..{newest}); "
                           "convert it with onnx.version_converter first")


def check_output_path(output: Path, input_path: Path | None, overwrite: bool) -> None:
    """Fail before any work if the output cannot be written (or would replace the input unasked)."""
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxSapError(f"output folder {parent} does not exist; create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise OnnxSapError(f"output folder {parent} is not writable; choose another -o path")
    if output.is_dir():
        raise OnnxSapError(f"output {output} is a folder; give a file path with -o")
    if input_path is not None and output.resolve() == input_path.resolve() and not overwrite:
        raise OnnxSapError(f"output {output} is the input model; choose another -o path or pass --overwrite")


# Staging folders are named .onnx-sap-<pid>-<random>, so that a later save can tell those of dead
# processes (killed mid-save) from those still in use.
STAGING_PREFIX = ".onnx-sap-"
# An unreferenced data file (a save killed between its data and its model) is removed once older than
# this; a save renames its data and its model moments apart.
ORPHAN_AGE_S = 60.0
LEGACY_STAGING_AGE_S = 3600.0


def save_model(model: onnx.ModelProto, output: str | os.PathLike, *, external_data: bool = False,
               check: bool = True, before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write model to output atomically, with its tensors in `<output>.<random>.data` when
    external_data is set or the model is too large for one protobuf file. With check, the written
    file must pass onnx.checker (full check), and before_commit(staged_path) must return, before
    anything at the output path is replaced. Returns the path written.

    Crash safety: everything is written and fsynced in a staging folder beside the output; the data
    file then moves in under a name no file has (nothing the old model reads changes), the model
    file replaces the output in one rename, and only then is the old model's data file removed. A
    kill at any point leaves the output path holding the old model with its data, or the new one with
    its data. Staging folders of dead processes and data files nothing refers to are removed."""
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    remove_stale_files(out)
    external = external_data or model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    try:
        staged = stage / out.name
        data_name = f"{out.name}.{secrets.token_hex(4)}.data"
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        if check:
            try:
                onnx.checker.check_model(str(staged), full_check=True)
            except onnx.checker.ValidationError as e:
                raise OnnxSapError(f"the rewritten model fails onnx.checker ({first_line(e)}); please report "
                                   "this with the model") from None
        if before_commit is not None:
            before_commit(staged)
        old_data = _data_files_of(out)
        if (stage / data_name).exists():
            _fsync(stage / data_name)
            os.replace(stage / data_name, folder / data_name)
            _fsync(folder)  # the data is in place, durably, before a model names it
        _fsync(staged)
        os.replace(staged, out)
        _fsync(folder)
        for name in old_data - {data_name}:
            (folder / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _our_data_file(out: Path, name: str) -> bool:
    """Whether name is a data file save_model writes (or wrote, as OUT.data) for out."""
    return name == out.name + ".data" or re.fullmatch(re.escape(out.name) + r"\.[0-9a-f]{8}\.data", name) is not None


def _data_files_of(out: Path) -> set[str]:
    """The data files beside out, named as save_model names them, that the model at out refers to."""
    folder = out.parent if str(out.parent) else Path(".")
    if not out.is_file() or not any(_our_data_file(out, f.name) for f in folder.glob(glob.escape(out.name) + ".*")):
        return set()
    try:
        model = onnx.load(str(out), load_external_data=False)
    except Exception:  # not a model (any more): it refers to nothing
        return set()
    return {e.value for t in _all_initializers(model.graph) for e in t.external_data
            if e.key == "location" and _our_data_file(out, e.value)}


def remove_stale_files(out: Path) -> None:
    """Remove, beside out, staging folders of processes that no longer run (and, from versions that
    did not name the process, any older than an hour) and data files for out that the model at out
    does not refer to, once older than a minute: what a killed save leaves behind."""
    folder = out.parent if str(out.parent) else Path(".")
    now = time.time()
    for entry in folder.glob(STAGING_PREFIX + "*"):
        pid = re.match(r"(\d+)-", entry.name[len(STAGING_PREFIX):])
        stale = not _process_alive(int(pid.group(1))) if pid else now - entry.stat().st_ctime > LEGACY_STAGING_AGE_S
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    referenced = _data_files_of(out)
    for f in folder.glob(glob.escape(out.name) + ".*.data"):
        if _our_data_file(out, f.name) and f.name != out.name + ".data" and f.name not in referenced:
            try:
                if now - f.stat().st_ctime > ORPHAN_AGE_S:
                    f.unlink()
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
