"""Reading and writing model files: clear errors for bad input, external data, atomic writes."""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.external_data_helper
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from .errors import OnnxSapError, first_line
from .sap_nodes import iter_graphs

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
    model = _parse(p)
    external = uses_external_data(model)
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise OnnxSapError(f"{p}: its external data could not be read ({first_line(e)}); keep the data files "
                           "beside the model") from None
    check_input_model(model, p)
    return model, external


# Main-graph initializers of at least this size are held as NumPy arrays beside a lean ModelProto
# while harden works: shape inference, onnx-graphsurgeon and the checker then copy only the graph,
# and ONNX Runtime sessions of the check share the arrays.
LEAN_TENSOR_BYTES = 64 << 10
# The location a lean model's held tensors name: never a file (ONNX Runtime gets them through
# add_external_initializers, the writer from the arrays).
IN_MEMORY = "onnx-sap-in-memory.data"
_LEAN_TYPES = {t: np.dtype(d) for t, d in ((onnx.TensorProto.FLOAT, np.float32), (onnx.TensorProto.DOUBLE, np.float64),
                                          (onnx.TensorProto.FLOAT16, np.float16), (onnx.TensorProto.INT64, np.int64),
                                          (onnx.TensorProto.INT32, np.int32), (onnx.TensorProto.INT16, np.int16),
                                          (onnx.TensorProto.INT8, np.int8), (onnx.TensorProto.UINT8, np.uint8),
                                          (onnx.TensorProto.UINT16, np.uint16), (onnx.TensorProto.UINT32, np.uint32),
                                          (onnx.TensorProto.UINT64, np.uint64), (onnx.TensorProto.BOOL, np.bool_))}


@dataclass
class LeanModel:
    """A model read for rewriting: `model` without the bytes of its large main-graph initializers
    (they name IN_MEMORY as external data), `weights` holding them by name, and whether the file
    kept tensors as external data."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]
    external: bool


def read_lean_model(path: str | os.PathLike) -> LeanModel:
    """read_model, holding the large initializers of the main graph outside the ModelProto: the
    file is mapped, not read, and each such tensor's array is a view of its bytes in the file (or in
    its external-data file), which the rewrite, the check and the writer share."""
    p = Path(path)
    _parse(p, header_only=True)
    try:
        file = np.memmap(p, dtype=np.uint8, mode="r")
        lean_bytes, spans = _without_large_raw_data(memoryview(file))
        model = onnx.ModelProto.FromString(lean_bytes)
    except (ValueError, IndexError, DecodeError):  # empty, or not protobuf: onnx.load says what is wrong
        model, spans = _parse(p), {}
    if not model.graph.node and not model.graph.output:
        raise OnnxSapError(f"{p}: not an ONNX model (no graph); re-export it or check the file is complete")
    external = uses_external_data(model)
    weights: dict[str, np.ndarray] = {}
    try:
        for i, t in enumerate(model.graph.initializer):
            values = _lean_values(t, p.parent, file[slice(*spans[i])] if i in spans else None)
            if values is not None:
                weights[t.name] = values
                t.CopyFrom(_held_header(t))
            elif i in spans:
                t.raw_data = bytes(file[slice(*spans[i])])  # not one to hold: back into the proto
        for t in onnx.external_data_helper._get_all_tensors(model):  # the rest, as onnx.load would
            if onnx.external_data_helper.uses_external_data(t) and not _is_held(t):
                onnx.external_data_helper.load_external_data_for_tensor(t, str(p.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise OnnxSapError(f"{p}: its external data could not be read ({first_line(e)}); keep the data files "
                           "beside the model") from None
    check_input_model(model, p)
    return LeanModel(model, weights, external)


def _without_large_raw_data(buf: memoryview) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """A serialized ModelProto without the raw_data of its main graph's large initializers, and where
    each removed raw_data lies in buf, by initializer index (protobuf wire format: ModelProto.graph
    is field 7, GraphProto.initializer field 5, TensorProto.raw_data field 9)."""
    out, spans, index = bytearray(), {}, 0
    for number, start, end, field_start in _fields(buf, 0, len(buf)):
        if number != 7 or start is None:
            out += buf[field_start:end]
            continue
        graph = bytearray()
        for g_number, g_start, g_end, g_field_start in _fields(buf, start, end):
            if g_number != 5 or g_start is None:
                graph += buf[g_field_start:g_end]
                continue
            tensor = bytearray()
            for t_number, t_start, t_end, t_field_start in _fields(buf, g_start, g_end):
                if t_number == 9 and t_start is not None and t_end - t_start >= LEAN_TENSOR_BYTES:
                    spans[index] = (t_start, t_end)
                else:
                    tensor += buf[t_field_start:t_end]
            graph += _field(5, len(tensor)) + tensor
            index += 1
        out += _field(7, len(graph)) + graph
    return bytes(out), spans


def _fields(buf: memoryview, pos: int, end: int):
    """(field number, value start or None if not length-delimited, value end, field start) for each
    field of the message in buf[pos:end]."""
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield key >> 3, None, pos, field_start
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield key >> 3, None, pos, field_start
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated field")
            yield key >> 3, pos, pos + size, field_start
            pos += size
        else:
            raise ValueError(f"wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _lean_values(t: onnx.TensorProto, folder: Path, raw: np.ndarray | None) -> np.ndarray | None:
    """The tensor's values as an array (a view of the file's bytes where possible) if it is to be
    held outside the proto, else None. raw: its raw_data bytes, when they were left in the file."""
    dtype = _LEAN_TYPES.get(t.data_type)
    if dtype is None or t.HasField("segment"):
        return None
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    if count * dtype.itemsize < LEAN_TENSOR_BYTES:
        return None
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        data = Path(folder) / info.get("location", "")
        if not data.resolve().is_relative_to(Path(folder).resolve()) or not data.is_file():
            raise ValueError(f"tensor {t.name!r}: its data file {info.get('location')!r} is missing or outside "
                             "the model's folder")
        offset = int(info.get("offset", 0))
        if int(info.get("length", count * dtype.itemsize)) != count * dtype.itemsize:
            raise ValueError(f"tensor {t.name!r}: its external data length does not fit its dims {list(t.dims)}")
        if data.stat().st_size < offset + count * dtype.itemsize:
            raise ValueError(f"tensor {t.name!r}: {data.name} ends before its data does")
        values = np.memmap(data, dtype=dtype, mode="r", offset=offset, shape=(count,))
    elif raw is not None:
        if raw.size != count * dtype.itemsize:
            return None  # left to the input check, which names the problem
        values = raw.view(dtype)  # possibly unaligned (protobuf does not align): NumPy and ONNX Runtime read it
    else:
        return None
    return values.reshape(tuple(t.dims))


def _held_header(t: onnx.TensorProto) -> onnx.TensorProto:
    """t without its values, naming IN_MEMORY as its external data."""
    header = _values_free(t)
    header.data_location = onnx.TensorProto.EXTERNAL
    header.external_data.add(key="location", value=IN_MEMORY)
    return header


def _values_free(t: onnx.TensorProto) -> onnx.TensorProto:
    """t's name, dims, type and doc string, nothing else."""
    header = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type)
    if t.doc_string:
        header.doc_string = t.doc_string
    return header


def _is_held(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == IN_MEMORY for e in t.external_data)


def _parse(p: Path, header_only: bool = False) -> onnx.ModelProto | None:
    """The model file's ModelProto (external data not loaded), or OnnxSapError (header_only: only
    the checks that the file exists and is a file)."""
    if not p.exists():
        raise OnnxSapError(f"{p}: no such file; give the path of an .onnx model")
    if not p.is_file():
        raise OnnxSapError(f"{p}: not a file; give the path of an .onnx model")
    if header_only:
        return None
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise OnnxSapError(f"{p}: not a readable ONNX model ({type(e).__name__}); re-export it or check the file "
                           "is complete") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxSapError(f"{p}: not an ONNX model (no graph); re-export it or check the file is complete")
    return model


def check_input_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    """Raise OnnxSapError("the input model is invalid: ...") unless model passes onnx.checker's full
    check (strict shape inference included), every name is UTF-8 and every initializer holds the
    data its dims need: what the rewriter may assume, so that a model it writes which fails the
    checker is its own fault. From a path, the checker reads the file (external data stays on disk);
    a lean model is checked without its held weights."""
    check_opset(model, str(path) if path else "the model")
    problem = _bad_string(model) or _bad_initializer(model.graph) or _bad_value_info(model.graph)
    if problem is None:
        try:
            if any(_is_held(t) for t in model.graph.initializer):  # a lean model: check it without the weights
                with tempfile.TemporaryDirectory(prefix="onnx-sap-check-") as tmp:
                    onnx.checker.check_model(str(_checkable(model, Path(tmp))), full_check=True)
            elif path is not None:
                onnx.checker.check_model(os.fspath(path), full_check=True)
            elif model_bytes(model) < EXTERNAL_DATA_THRESHOLD:  # protobuf cannot serialize more for the checker
                onnx.checker.check_model(model, full_check=True)
        except MemoryError:
            raise
        except Exception as e:  # onnx raises ValidationError, InferenceError, SchemaError, ValueError, ...
            problem = first_line(e)
    if problem is not None:
        raise OnnxSapError(f"the input model is invalid: {problem}; fix or re-export it "
                           "(onnx.checker.check_model(model, full_check=True) checks it)")


# No tensor holds this many elements (SPEC.md's sizes are overflow-free below it); shapes declared
# larger make int64 size arithmetic overflow, in shape inference of the rewritten graph among others.
MAX_ELEMENTS = 2**48


def _bad_value_info(graph: onnx.GraphProto) -> str | None:
    """Which tensor of the graph (or its bodies) has an element type ONNX does not define, or which
    graph input or output is declared with more elements than any tensor can hold."""
    known = set(onnx.TensorProto.DataType.values())
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in known:
            return f"{v.name!r} has element type {v.type.tensor_type.elem_type}, which ONNX does not define"
    for node in graph.node:
        for a in node.attribute:
            for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                problem = _bad_value_info(body)
                if problem:
                    return problem
    for v in list(graph.input) + list(graph.output):
        if not v.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in v.type.tensor_type.shape.dim]
        n = 1
        for d in dims:
            n *= d if isinstance(d, int) and d > 0 else 1
        if n >= MAX_ELEMENTS:
            return f"{v.name!r} is declared {dims}: {n:.3g} elements, more than any tensor can hold"
    return None


def _bad_string(message) -> str | None:
    """Where a string field holds bytes that are not UTF-8 (protobuf hands those over as bytes)."""
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_STRING:
            for v in ([value] if isinstance(value, (str, bytes)) else value):
                if isinstance(v, bytes):
                    return f"a {type(message).__name__[:-5]} {fd.name} is not valid UTF-8 ({v[:40]!r})"
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            for v in ([value] if isinstance(value, Message) else value):
                found = _bad_string(v)
                if found:
                    return found
    return None


# Bytes per element of the tensor types whose raw_data size follows from dims (packed 4-bit types,
# strings and unknown types are left to onnx and ONNX Runtime).
_ITEM_BYTES = {TP: n for n, tps in {1: ("UINT8", "INT8", "BOOL", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                       "FLOAT8E5M2FNUZ"),
                                   2: ("UINT16", "INT16", "FLOAT16", "BFLOAT16"),
                                   4: ("FLOAT", "INT32", "UINT32"), 8: ("DOUBLE", "INT64", "UINT64", "COMPLEX64"),
                                   16: ("COMPLEX128",)}.items()
               for TP in (getattr(onnx.TensorProto, t) for t in tps if hasattr(onnx.TensorProto, t))}
_TYPED_FIELD = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
                onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.INT32: "int32_data"}


def _bad_initializer(graph: onnx.GraphProto) -> str | None:
    """Which initializer (of any subgraph) holds fewer or more elements than its dims say."""
    for t in _all_initializers(graph):
        if t.data_location == onnx.TensorProto.EXTERNAL or any(d < 0 for d in t.dims):
            continue  # not loaded (or checked by onnx.checker)
        n = 1
        for d in t.dims:
            n *= d
        item = _ITEM_BYTES.get(t.data_type)
        if t.raw_data and item is not None and len(t.raw_data) != n * item:
            return f"initializer {t.name!r} holds {len(t.raw_data)} bytes where its dims {list(t.dims)} need {n * item}"
        field = _TYPED_FIELD.get(t.data_type)
        if not t.raw_data and field is not None and len(getattr(t, field)) != n:
            return f"initializer {t.name!r} holds {len(getattr(t, field))} values where its dims {list(t.dims)} need {n}"
    return None


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer of the model (as loaded from disk) is stored outside the .onnx file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_initializers(model.graph))


def _all_initializers(graph: onnx.GraphProto):
    for _, g in iter_graphs(graph):
        yield from g.initializer


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
               check: bool = True, before_commit: Callable[[Path], None] | None = None,
               weights: dict[str, np.ndarray] | None = None) -> Path:
    """Write model to output atomically, with its tensors in `<output>.<random>.data` when
    external_data is set or the model is too large for one protobuf file. A lean model (see
    LeanModel) comes with its weights, which are written where its IN_MEMORY tensors stand; its
    tensors then name where they were written (model is updated). With check, the written file must
    pass onnx.checker (full check), and before_commit(staged_path) must return, before anything at
    the output path is replaced. Returns the path written.

    Crash safety: everything is written and fsynced in a staging folder beside the output; the data
    file then moves in under a name no file has (nothing the old model reads changes), the model
    file replaces the output in one rename, and only then is the old model's data file removed. A
    kill at any point leaves the output path holding the old model with its data, or the new one with
    its data. Staging folders of dead processes and data files nothing refers to are removed."""
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    remove_stale_files(out)
    weights = weights or {}
    size = model_bytes(model) + sum(a.nbytes for a in weights.values())
    external = external_data or size > EXTERNAL_DATA_THRESHOLD
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    try:
        staged = stage / out.name
        data_name = f"{out.name}.{secrets.token_hex(4)}.data"
        written: dict[str, tuple[str, int, int]] = {}
        if any(_is_held(t) for t in model.graph.initializer):
            written = write_lean(model, weights, staged, data_name if external else None)
        elif external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        if check:
            try:
                onnx.checker.check_model(str(_checkable(model, stage) if weights else staged), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
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
        _name_written_data(model, written)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def write_lean(model: onnx.ModelProto, weights: dict[str, np.ndarray], path: Path, data_name: str | None
               ) -> dict[str, tuple[str, int, int]]:
    """Write a lean model with its held tensors' values from weights, into data_name beside path
    (external data) or into path itself, never building the whole file in memory. Returns, for each
    held tensor, (file, offset, length) of its values (the file being path's name when inside)."""
    written: dict[str, tuple[str, int, int]] = {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if data_name is not None:
        with open(path.parent / data_name, "wb") as f:
            for t in copy.graph.initializer:
                if _is_held(t):
                    f.write(b"\0" * (-f.tell() % 4096))  # page-aligned, so that a runtime can map it
                    written[t.name] = (data_name, f.tell(), weights[t.name].nbytes)
                    f.write(_bytes_of(weights[t.name]))
                    _set_location(t, *written[t.name])
        onnx.save_model(copy, str(path))
        return written
    # The tensors inside the .onnx: the graph's initializers are written after the rest of the graph,
    # and the graph after the rest of the model (protobuf reads fields in any order), so that each
    # held tensor's bytes stream from its array.
    graph = onnx.GraphProto()
    graph.CopyFrom(copy.graph)
    del graph.initializer[:]
    head = graph.SerializeToString()
    copy.ClearField("graph")
    entries = []
    for t in model.graph.initializer:
        if _is_held(t):
            values = weights[t.name]
            entries.append((t.name, _values_free(t).SerializeToString() + _field(9, values.nbytes), values))
        else:
            entries.append((t.name, t.SerializeToString(), None))
    bodies = [len(b) + (v.nbytes if v is not None else 0) for _, b, v in entries]
    graph_size = len(head) + sum(len(_field(5, n)) + n for n in bodies)
    with open(path, "wb") as f:
        f.write(copy.SerializeToString() + _field(7, graph_size) + head)
        for (name, start, values), n in zip(entries, bodies):
            f.write(_field(5, n) + start)
            if values is not None:
                written[name] = (path.name, f.tell(), values.nbytes)
                f.write(_bytes_of(values))
    return written


def _field(number: int, size: int) -> bytes:
    """A length-delimited protobuf field's key and length (the bytes follow)."""
    out = bytearray([(number << 3) | 2])
    while True:
        out.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            return bytes(out)


def _bytes_of(values: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))


def _set_location(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def _name_written_data(model: onnx.ModelProto, written: dict[str, tuple[str, int, int]]) -> None:
    """Point a lean model's held tensors at where they were written (file names as in the output's folder)."""
    for t in model.graph.initializer:
        if t.name in written:
            _set_location(t, *written[t.name])


def _checkable(model: onnx.ModelProto, stage: Path) -> Path:
    """A copy of a lean model for onnx.checker, its held tensors naming an empty placeholder file
    (the checker wants the file, not its bytes): the check reads kilobytes, not the weights."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    placeholder = stage / ".checker.data"
    placeholder.touch()
    for t in copy.graph.initializer:
        if _is_held(t):
            _set_location(t, placeholder.name, 0, int(np.prod(t.dims, dtype=np.int64)) *
                          _LEAN_TYPES[t.data_type].itemsize)
    path = stage / ".checker.onnx"
    onnx.save_model(copy, str(path))
    return path


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
