"""Load, validate and save frozen GraphDefs: every bad file gets one clear error.

``load_graph_def`` reads binary ``.pb`` or text ``.pbtxt`` (chosen by content,
not only by extension), then :func:`validate_graph_def` checks what would
otherwise fail deep inside TensorFlow.  ``save_graph_def`` writes through a
temporary file and a rename, so a failed run never leaves half a file, and
refuses to overwrite the input.
"""

from __future__ import annotations

import collections
import os
import tempfile
from typing import Optional

from google.protobuf import message, text_format
from tensorflow.core.framework import graph_pb2, types_pb2

from graphquant.errors import InvalidGraphError, NotFrozenError, OutputPathError
from graphquant.graph import VARIABLE_OPS, GraphIndex, node_name, suggest_names

_TEXT_EXTENSIONS = (".pbtxt", ".txt", ".prototxt")
_FREEZE_HOWTO = (
    "freeze it first: for a Keras model or SavedModel run "
    "`python tools/export.py MODEL -o frozen.pb` "
    "(it calls tf.function + convert_variables_to_constants_v2); for a TF1 checkpoint use "
    "tf.compat.v1.graph_util.convert_variables_to_constants"
)


def load_graph_def(path: str, validate: bool = True) -> graph_pb2.GraphDef:
    """Read a frozen GraphDef from ``path`` (binary or text protobuf)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            raise InvalidGraphError(f"'{path}' is a SavedModel directory, not a frozen graph",
                                    _FREEZE_HOWTO)
        raise InvalidGraphError(f"'{path}' is a directory, not a GraphDef file",
                                "pass the path of a frozen .pb or .pbtxt file")
    if not os.path.exists(path):
        raise InvalidGraphError(f"'{path}' does not exist", "check the path")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidGraphError(f"cannot read '{path}': {exc.strerror or exc}",
                                "check the file's permissions") from None
    if not data:
        raise InvalidGraphError(f"'{path}' is empty", "re-export the frozen graph")
    graph_def = _parse(path, data)
    if validate:
        validate_graph_def(graph_def, source=path)
    return graph_def


def _looks_like_text(data: bytes) -> bool:
    """UTF-8 without control characters other than tab/newline.

    A binary GraphDef with a node always holds the byte 0x12 (the tag of
    NodeDef.op), so it is never taken for text, whatever its extension.
    """
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the 4096-byte mark
            return False
        text = head[:exc.start].decode("utf-8")
    return not any(ord(c) < 32 and c not in "\t\n\r\f\v" for c in text)


def _parse(path: str, data: bytes) -> graph_pb2.GraphDef:
    graph_def = graph_pb2.GraphDef()
    if _looks_like_text(data):  # by content: a text GraphDef named .pb loads too
        try:
            text_format.Parse(data.decode("utf-8"), graph_def)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise InvalidGraphError(
                f"'{path}' is a text file but not a text GraphDef: {_first_line(exc)}",
                "pass a frozen GraphDef in text (.pbtxt) or binary (.pb) form",
            ) from None
        return _require_nodes(path, graph_def)
    try:
        graph_def.ParseFromString(data)
    except (message.DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidGraphError(
            f"'{path}' is not a GraphDef or is truncated/corrupt ({_first_line(exc)}; "
            f"{len(data)} bytes)",
            "re-export the frozen graph; a SavedModel or Keras file must be frozen first: "
            "python tools/export.py MODEL -o frozen.pb",
        ) from None
    return _require_nodes(path, graph_def)


def _require_nodes(path: str, graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    if not graph_def.node:
        raise InvalidGraphError(f"'{path}' parsed as a GraphDef with no nodes (not a GraphDef?)",
                                "pass a frozen GraphDef (.pb or .pbtxt)")
    return graph_def


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def validate_graph_def(graph_def: graph_pb2.GraphDef, source: str = "graph") -> None:
    """Raise one clear error for the first thing that makes the graph unusable."""
    from tensorflow.python.framework import op_def_registry

    names = collections.Counter(n.name for n in graph_def.node)
    for node in graph_def.node:
        if not node.name or not node.op:
            raise InvalidGraphError(
                f"{source}: a node has an empty {'name' if not node.name else 'op'} "
                f"(node '{node.name}', op '{node.op}') - the file is corrupt",
                "re-export the frozen graph")
    dups = sorted(n for n, c in names.items() if c > 1)
    if dups:
        raise InvalidGraphError(f"{source}: duplicate node names: {', '.join(dups[:5])}",
                                "node names must be unique; re-export the graph")
    variables = [n for n in graph_def.node if n.op in VARIABLE_OPS]
    if variables:
        shown = ", ".join(f"{n.name} ({n.op})" for n in variables[:3])
        raise NotFrozenError(
            f"{source}: the graph is not frozen - {len(variables)} variable node(s) left: {shown}",
            _FREEZE_HOWTO)
    functions = {f.signature.name for f in graph_def.library.function}
    for node in graph_def.node:
        for inp in node.input:
            if node_name(inp) not in names:
                raise InvalidGraphError(
                    f"{source}: node '{node.name}' ({node.op}) reads '{inp}', which no node "
                    f"produces; {suggest_names(node_name(inp), names)}",
                    "the graph is incomplete or corrupt; re-export it")
        if op_def_registry.get(node.op) is None and node.op not in functions:
            raise InvalidGraphError(
                f"{source}: node '{node.name}' has op '{node.op}', which this TensorFlow does "
                "not know (a custom op, or an op from a newer TensorFlow)",
                "load the library that registers it, or export the model without it")
    try:   # a cycle not closed by a TF1 loop's NextIteration
        GraphIndex(graph_def).topological_order()
    except InvalidGraphError as exc:
        raise InvalidGraphError(f"{source}: {exc.problem}", exc.fix) from None
    _check_constants(graph_def, source)
    _check_with_tensorflow(graph_def, source)


def _dtype_name(value: int) -> str:
    try:
        return types_pb2.DataType.Name(value)
    except ValueError:
        return f"invalid dtype {value}"


_MAX_EXPANDED_ELEMENTS = 1 << 28   # a Const written as one repeated value, expanded


def _check_constants(graph_def: graph_pb2.GraphDef, source: str) -> None:
    """Every tensor, shape and type held in an attribute must be well-formed, a Const's
    value of the node's dtype.  TensorFlow's importer does not look inside tensors, nor at
    attributes its op does not declare (it ignores them), yet running such a graph aborts
    the process on a failed check (a tensor attribute with a negative or 2**31 dimension)."""
    valid_types = set(types_pb2.DataType.values())
    for node in graph_def.node:
        for key in sorted(node.attr):
            attr = node.attr[key]
            problem = None
            tensors = list(attr.list.tensor) + ([attr.tensor] if attr.HasField("tensor") else [])
            shapes = list(attr.list.shape) + ([attr.shape] if attr.HasField("shape") else [])
            types = list(attr.list.type) + ([attr.type] if attr.HasField("type") else [])
            for tensor in tensors:
                problem = problem or _tensor_problem(tensor)
            for shape in shapes:
                if any(d.size < -1 for d in shape.dim) or len(shape.dim) > 254:
                    problem = problem or f"shape {[d.size for d in shape.dim]} is invalid"
            for value in types:
                if value not in valid_types:
                    problem = problem or f"{_dtype_name(value)} is not a data type"
            if (not problem and node.op == "Const" and key == "value" and "dtype" in node.attr
                    and node.attr["dtype"].type != attr.tensor.dtype):
                problem = (f"its dtype is {_dtype_name(attr.tensor.dtype)} but the node says "
                           f"{_dtype_name(node.attr['dtype'].type)}")
            if problem:
                raise InvalidGraphError(
                    f"{source}: node '{node.name}' ({node.op}) has a corrupt attribute "
                    f"'{key}': {problem}", "re-export the frozen graph")


def _tensor_problem(tensor) -> Optional[str]:
    """Why a TensorProto cannot be read, or None."""
    from tensorflow.python.framework import dtypes, tensor_util

    dims = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype not in set(types_pb2.DataType.values()) or tensor.dtype == 0:
        return f"its tensor has {_dtype_name(tensor.dtype)}"
    if tensor.tensor_shape.unknown_rank or any(d < 0 for d in dims) or len(dims) > 254:
        return f"its tensor has an invalid shape {dims}"
    count = 1
    for d in dims:
        count *= d
    string_like = tensor.dtype in (types_pb2.DT_STRING, types_pb2.DT_VARIANT,
                                   types_pb2.DT_RESOURCE)
    try:
        itemsize = None if string_like else dtypes.as_dtype(tensor.dtype).size
    except (TypeError, ValueError):
        itemsize = None
    if tensor.tensor_content and not string_like:
        if itemsize is None or len(tensor.tensor_content) != count * itemsize:
            return (f"its tensor holds {len(tensor.tensor_content)} bytes, but shape {dims} "
                    f"of {_dtype_name(tensor.dtype)} needs {count} elements")
        return None
    if count > _MAX_EXPANDED_ELEMENTS:
        return f"its tensor would expand to {count} elements"
    try:
        tensor_util.MakeNdarray(tensor)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        return f"its tensor cannot be read ({_first_line(exc)})"
    return None


def _check_with_tensorflow(graph_def: graph_pb2.GraphDef, source: str) -> None:
    """Import the graph with TensorFlow's own importer, which checks every node against its
    op: input count and types, attribute presence, kinds and values, shapes (inference).
    A graph it refuses would fail deep inside a pass; here it is one clear error."""
    from graphquant.runtime import tf

    t = tf()
    try:
        with t.Graph().as_default():
            t.graph_util.import_graph_def(light_copy(graph_def), name="")
    except MemoryError:
        raise
    except Exception as exc:  # ValueError, TypeError, OpError...: all mean "not importable"
        raise InvalidGraphError(
            f"{source}: TensorFlow cannot import the graph: {_tf_error_text(exc)}",
            "the graph is corrupt or not a valid frozen graph for this TensorFlow; re-export "
            "it") from None


_LIGHT_CONST_BYTES = 1024


def light_copy(graph_def: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """A copy for the import check and for shape inference whose large constants hold one
    repeated zero (same dtype and shape): importing a 170 MB ResNet-101 takes ~2 s, its light
    copy a fraction.  Large constants are weights; no shape function reads their values."""
    from tensorflow.python.framework import tensor_util

    light = graph_pb2.GraphDef()
    light.versions.CopyFrom(graph_def.versions)
    light.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        copy = light.node.add()
        value = node.attr["value"].tensor if node.op == "Const" and "value" in node.attr else None
        if value is None or len(value.tensor_content) <= _LIGHT_CONST_BYTES:
            copy.CopyFrom(node)
            continue
        copy.name, copy.op, copy.device = node.name, node.op, node.device
        copy.input.extend(node.input)
        for key, attr in node.attr.items():
            if key != "value":
                copy.attr[key].CopyFrom(attr)
        try:
            zero = tensor_util.make_tensor_proto(0, dtype=value.dtype, shape=[])
        except (TypeError, ValueError):
            copy.attr["value"].CopyFrom(node.attr["value"])
            continue
        zero.tensor_shape.CopyFrom(value.tensor_shape)
        copy.attr["value"].tensor.CopyFrom(zero)
    return light


def _tf_error_text(exc: Exception) -> str:
    """The first line of a TensorFlow import error, without the repeated NodeDef dump."""
    text = _first_line(exc)
    for marker in ("; NodeDef: {{", " NodeDef: {{"):
        if marker in text:
            head, _, tail = text.partition(marker)
            node = tail.split("}}", 1)[0]
            text = f"{head} (at {node.strip()})"
    return text if len(text) <= 400 else text[:400] + "..."


def save_graph_def(graph_def: graph_pb2.GraphDef, path: str,
                   input_path: Optional[str] = None) -> None:
    """Write ``graph_def`` to ``path`` atomically (text if it ends in .pbtxt)."""
    path = os.fspath(path)
    check_output_path(path, input_path)
    if path.endswith(_TEXT_EXTENSIONS):
        data = text_format.MessageToString(graph_def).encode("utf-8")
    else:
        data = graph_def.SerializeToString(deterministic=True)
    write_file_atomic(path, data)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a
    rename: readers see the old file or the whole new one, a failure leaves no file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".graphquant-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputPathError(f"cannot write in '{directory}': {exc.strerror or exc}",
                              "choose a path you can write to") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a new file gets 0644-ish
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputPathError(f"writing '{path}' failed: {exc.strerror or exc}",
                                  "check the free disk space and permissions") from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(path: str, input_path: Optional[str] = None) -> None:
    """Fail before any work when ``path`` cannot be the output."""
    if not path:
        raise OutputPathError("no output path given", "pass -o OUT.pb")
    if os.path.isdir(path):
        raise OutputPathError(f"output path '{path}' is a directory",
                              "give a file name, e.g. -o model_int8.pb")
    if input_path is not None and os.path.abspath(path) == os.path.abspath(input_path) or (
        input_path is not None and os.path.exists(path) and os.path.exists(input_path)
        and os.path.samefile(path, input_path)
    ):
        raise OutputPathError(f"output path '{path}' is the input file; refusing to overwrite it",
                              "write to a new file, e.g. -o model_int8.pb")
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputPathError(f"output directory '{directory}' is a file, not a directory",
                              "choose another path")
    if not os.path.isdir(directory):
        raise OutputPathError(f"output directory '{directory}' does not exist",
                              "create it first or choose another path")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OutputPathError(f"cannot write '{path}' (permission denied)",
                              "choose a path you can write to")
    try:  # what os.access cannot see: read-only file systems, /proc, root's "permission"
        fd, probe = tempfile.mkstemp(prefix=".graphquant-probe-", dir=directory)
    except OSError as exc:
        raise OutputPathError(f"cannot write in '{directory}': {exc.strerror or exc}",
                              "choose a path you can write to") from None
    os.close(fd)
    os.unlink(probe)
