"""A converted GraphDef as a SavedModel with a serving signature (``convert --saved_model DIR``).

    from graphquant.saved_model import write_saved_model
    write_saved_model(int8_graph_def, "model_int8", inputs=["input"], outputs=["Identity:0"])

    # anywhere, with default TensorFlow settings:
    fn = tf.saved_model.load("model_int8").signatures["serving_default"]
    fn(input=x)["Identity"]

The GraphDef is imported as it is into a graph and saved with the TF1
``SavedModelBuilder`` (a frozen graph has no variables, so that is the whole
model) under the ``serve`` tag with one ``serving_default`` signature.  Keys
are the graph's names: an input is keyed by its node name, an output by its
tensor name (``logits:0`` -> ``logits``, ``split:1`` -> ``split_1``); characters
that are not letters, digits or ``_`` become ``_`` (``model/input`` ->
``model_input``), as signature keys become keyword arguments.

The directory is built next to ``DIR`` and renamed into place at the end: a
failed run leaves nothing.  ``DIR`` must not exist, or be an empty directory.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Dict, Optional, Sequence

from tensorflow.core.framework import graph_pb2

from graphquant.errors import OutputPathError
from graphquant.graph import canonical_tensor, parse_tensor_name

SIGNATURE = "serving_default"


def signature_key(name: str, is_output: bool) -> str:
    """The signature key of a graph input (node name) or output (tensor name)."""
    t = parse_tensor_name(name)
    base = t.node if (not is_output or t.port == 0) else f"{t.node}_{t.port}"
    key = re.sub(r"[^A-Za-z0-9_]", "_", base)
    return key if key and not key[0].isdigit() else "t_" + key


def signature_keys(inputs: Sequence[str], outputs: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """{"inputs": {key: tensor}, "outputs": {key: tensor}}; keys made unique with a suffix."""
    result: Dict[str, Dict[str, str]] = {"inputs": {}, "outputs": {}}
    used = set()
    for kind, names in (("inputs", inputs), ("outputs", outputs)):
        for name in names:
            key = signature_key(name, kind == "outputs")
            base, n = key, 1
            while key in used:
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            result[kind][key] = canonical_tensor(name)
    return result


def check_saved_model_path(path: str, *others: Optional[str]) -> None:
    """Fail before any work when ``path`` cannot become the SavedModel directory."""
    if not path:
        raise OutputPathError("no SavedModel directory given", "pass --saved_model DIR")
    absolute = os.path.abspath(path)
    for other in others:
        if other and os.path.abspath(other) == absolute:
            raise OutputPathError(f"--saved_model '{path}' is the same path as '{other}'",
                                  "give the SavedModel its own directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"--saved_model '{path}' exists and is a file",
                              "give the path of a new directory")
    if os.path.isdir(path) and os.listdir(path):
        raise OutputPathError(f"--saved_model '{path}' exists and is not empty; refusing to "
                              "overwrite it", "remove it first or give a new directory")
    parent = os.path.dirname(absolute)
    if not os.path.isdir(parent):
        raise OutputPathError(f"the parent directory of --saved_model '{path}' does not exist",
                              "create it first or choose another path")
    _probe_writable(parent)


def _probe_writable(directory: str) -> None:
    try:
        probe = tempfile.mkdtemp(prefix=".graphquant-probe-", dir=directory)
    except OSError as exc:
        raise OutputPathError(f"cannot write in '{directory}': {exc.strerror or exc}",
                              "choose a directory you can write to") from None
    os.rmdir(probe)


def write_saved_model(graph_def: graph_pb2.GraphDef, path: str, inputs: Sequence[str],
                      outputs: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """Write ``graph_def`` as a SavedModel at ``path``; return the signature keys used."""
    from graphquant.execute import import_graph
    from graphquant.runtime import tf

    check_saved_model_path(path)
    t = tf()
    keys = signature_keys(inputs, outputs)
    parent = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=".graphquant-saved-model-", dir=parent)
    logger = t.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the TF1 builder's deprecation warnings say nothing to our users
    try:
        graph = import_graph(graph_def)
        with graph.as_default(), t.compat.v1.Session(graph=graph) as session:
            info = t.compat.v1.saved_model.utils.build_tensor_info
            signature = t.compat.v1.saved_model.signature_def_utils.build_signature_def(
                inputs={k: info(graph.get_tensor_by_name(v)) for k, v in keys["inputs"].items()},
                outputs={k: info(graph.get_tensor_by_name(v))
                         for k, v in keys["outputs"].items()},
                method_name=t.compat.v1.saved_model.signature_constants.PREDICT_METHOD_NAME)
            builder = t.compat.v1.saved_model.Builder(os.path.join(staging, "model"))
            builder.add_meta_graph_and_variables(
                session, [t.compat.v1.saved_model.tag_constants.SERVING],
                signature_def_map={SIGNATURE: signature}, strip_default_attrs=False)
            builder.save()
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked): replaced by the finished directory
        os.rename(os.path.join(staging, "model"), path)
    except OSError as exc:
        raise OutputPathError(f"writing the SavedModel '{path}' failed: {exc.strerror or exc}",
                              "check the free disk space and permissions") from None
    finally:
        logger.setLevel(level)
        shutil.rmtree(staging, ignore_errors=True)
    return keys
