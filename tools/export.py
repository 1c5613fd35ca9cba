"""Freeze a Keras model (.keras, .h5) or a SavedModel directory into a frozen GraphDef.

    python tools/export.py model.keras -o model.pb            # batch 1 (default)
    python tools/export.py saved_model_dir -o model.pb --batch=dynamic
    python tools/export.py model.h5 -o model.pb --keras=tf_keras --json

The model is traced with ``tf.function`` and its variables are turned into
constants with ``convert_variables_to_constants_v2``; the input and output
tensor names of the frozen graph are printed (and written to ``OUT.json`` with
``--json``), because every later command needs them.

Which Keras loads the file: ``.keras`` files are Keras 3; ``.h5`` files go to
the Keras that saved them (the file's ``keras_version``: 2.x is ``tf_keras``,
the legacy tf.keras that ``TF_USE_LEGACY_KERAS=1`` selects), the other one
being tried if that fails; ``--keras`` forces one.  A model
from Keras 3 freezes with batch-norm decomposed into Mul/Add/Rsqrt/Sub, one
from tf_keras with ``FusedBatchNormV3``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphquant  # noqa: E402,F401  (TensorFlow settings before TensorFlow loads)
from graphquant.errors import GraphQuantError  # noqa: E402
from graphquant.graph import op_histogram  # noqa: E402
from graphquant.graph_io import check_output_path, save_graph_def  # noqa: E402
from graphquant.runtime import tf  # noqa: E402

KERAS_CHOICES = ("auto", "keras3", "tf_keras")


# --------------------------------------------------------------------------- batch
def parse_batch(text) -> Optional[int]:
    """``"1"`` -> 1; ``"dynamic"``, ``"none"``, ``"0"``, None -> None (any batch)."""
    if text is None:
        return None
    value = str(text).strip().lower()
    if value in ("dynamic", "none", "0", "", "?"):
        return None
    if not value.isdigit():
        raise GraphQuantError(f"batch '{text}' is not a positive integer or 'dynamic'",
                              "pass --batch=1, --batch=16 or --batch=dynamic")
    return int(value)


def _with_batch(shape: Sequence[Optional[int]], batch: Optional[int]) -> List[Optional[int]]:
    dims = [None if d is None else int(d) for d in shape]
    if not dims:
        return dims
    return [batch] + dims[1:]


# --------------------------------------------------------------------------- freezing
def freeze_concrete_function(concrete_fn) -> Tuple[object, List[str], List[str]]:
    """(graph_def, input tensor names, output tensor names) of a concrete function, frozen."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(concrete_fn)
    graph_def = frozen.graph.as_graph_def()
    inputs = [t.name for t in frozen.inputs]
    outputs = [t.name for t in frozen.outputs]
    return graph_def, inputs, outputs


def _input_name(keras_input, i: int, count: int) -> str:
    if count == 1:
        return "input"
    name = getattr(keras_input, "name", "") or f"input_{i}"
    return name.split(":")[0].replace("/", "_")


def freeze_keras_model(model, batch: Optional[int] = 1):
    """Freeze a Keras 3 or tf_keras model; (graph_def, input names, output names).

    Inputs get the names ``input`` (one input) or the Keras input names; the
    batch dimension is ``batch`` (None = dynamic).  The model runs in inference
    mode (``training=False``).
    """
    t = tf()
    keras_inputs = list(model.inputs)
    specs = []
    for i, x in enumerate(keras_inputs):
        dtype = getattr(x, "dtype", "float32")
        dtype = getattr(dtype, "name", dtype)
        specs.append(t.TensorSpec(_with_batch(tuple(x.shape), batch), t.as_dtype(dtype),
                                  name=_input_name(x, i, len(keras_inputs))))

    if len(specs) == 1:
        fn = t.function(lambda x: model(x, training=False))
    else:
        fn = t.function(lambda *xs: model(list(xs), training=False))
    return freeze_concrete_function(fn.get_concrete_function(*specs))


def freeze_saved_model(path: str, batch: Optional[int] = 1,
                       signature: str = "serving_default"):
    """Freeze one signature of a SavedModel; (graph_def, input names, output names)."""
    t = tf()
    loaded = t.saved_model.load(path)
    signatures = dict(loaded.signatures)
    if signature not in signatures:
        raise GraphQuantError(
            f"SavedModel '{path}' has no signature '{signature}' "
            f"(it has: {', '.join(sorted(signatures)) or 'none'})",
            "pass --signature=NAME with one of those names")
    sig = signatures[signature]
    _, kw_specs = sig.structured_input_signature
    names = sorted(kw_specs)
    specs = []
    for name in names:
        spec = kw_specs[name]
        shape = spec.shape.as_list() if spec.shape.rank is not None else None
        if shape is None:
            raise GraphQuantError(f"input '{name}' of signature '{signature}' has unknown rank",
                                  "re-save the model with a fixed-rank input signature")
        if batch is not None and shape and shape[0] not in (None, batch):
            raise GraphQuantError(
                f"input '{name}' has a fixed batch of {shape[0]}; cannot export batch {batch}",
                f"pass --batch={shape[0]} or re-save the model with a dynamic batch")
        new_shape = shape if batch is None else _with_batch(shape, batch)
        specs.append(t.TensorSpec(new_shape, spec.dtype, name=name))

    def call(*args):
        out = sig(**dict(zip(names, args)))
        return [out[k] for k in sorted(out)] if isinstance(out, dict) else out

    fn = t.function(call)
    return freeze_concrete_function(fn.get_concrete_function(*specs))


def load_keras_model(path: str, keras: str = "auto"):
    """Load a .keras / .h5 file with Keras 3 or tf_keras (see the module docstring)."""
    if keras not in KERAS_CHOICES:
        raise GraphQuantError(f"--keras={keras} is not one of {', '.join(KERAS_CHOICES)}",
                              "pass --keras=auto, keras3 or tf_keras")
    tf()  # TensorFlow settings first
    order = {"auto": ["keras3", "tf_keras"], "keras3": ["keras3"], "tf_keras": ["tf_keras"]}[keras]
    if path.endswith(".keras"):
        order = [k for k in order if k == "keras3"] or order
    elif keras == "auto" and _h5_keras_version(path).startswith("2."):
        order = ["tf_keras", "keras3"]  # saved by tf.keras: keep its FusedBatchNormV3 form
    errors = []
    for which in order:
        try:
            if which == "keras3":
                import keras as module  # noqa: PLC0415
            else:
                import tf_keras as module  # noqa: PLC0415
            return module.models.load_model(path, compile=False)
        except ImportError as exc:
            errors.append(f"{which}: not installed ({exc})")
        except Exception as exc:  # noqa: BLE001 - every Keras loader error means "try the next"
            text = str(exc).strip()
            errors.append(f"{which}: {text.splitlines()[0] if text else type(exc).__name__}")
    raise GraphQuantError(f"cannot load Keras model '{path}': " + "; ".join(errors),
                          "check the file; for a legacy tf.keras .h5 install tf-keras and pass "
                          "--keras=tf_keras")


def _h5_keras_version(path: str) -> str:
    """The ``keras_version`` an .h5 file was saved with ('' if unknown)."""
    try:
        import h5py  # noqa: PLC0415

        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version", "")
    except (ImportError, OSError):
        return ""
    return version.decode() if isinstance(version, bytes) else str(version)


def export(model_path: str, output: str, batch: Optional[int] = 1, keras: str = "auto",
           signature: str = "serving_default", write_json: bool = False) -> Dict:
    """Freeze ``model_path`` into ``output``; returns the interface description."""
    model_path = os.fspath(model_path)
    check_output_path(output, model_path if os.path.isfile(model_path) else None)
    if os.path.isdir(model_path):
        if not os.path.exists(os.path.join(model_path, "saved_model.pb")):
            raise GraphQuantError(f"'{model_path}' is a directory without saved_model.pb",
                                  "pass a SavedModel directory, a .keras or an .h5 file")
        graph_def, inputs, outputs = freeze_saved_model(model_path, batch, signature)
        source = "saved_model"
    elif os.path.isfile(model_path) and model_path.endswith((".keras", ".h5", ".hdf5")):
        model = load_keras_model(model_path, keras)
        graph_def, inputs, outputs = freeze_keras_model(model, batch)
        source = "tf_keras" if type(model).__module__.startswith("tf_keras") else "keras3"
    elif not os.path.exists(model_path):
        raise GraphQuantError(f"'{model_path}' does not exist", "check the path")
    else:
        raise GraphQuantError(f"'{model_path}' is not a .keras/.h5 file or a SavedModel directory",
                              "pass a Keras model file or a SavedModel directory")
    save_graph_def(graph_def, output, input_path=None)
    info = describe(graph_def, inputs, outputs)
    info.update({"source": source, "model": os.path.abspath(model_path),
                 "pb": os.path.basename(output)})
    if write_json:
        with open(os.path.splitext(output)[0] + ".json", "w") as f:
            json.dump(info, f, indent=1)
    return info


def describe(graph_def, inputs: Sequence[str], outputs: Sequence[str]) -> Dict:
    """Inputs and outputs as ``[[name, shape], ...]`` (None = unknown dim) and the op histogram."""
    from graphquant.execute import tensor_shapes

    shapes = tensor_shapes(graph_def)
    dtypes = {n.name: n.attr["dtype"].type for n in graph_def.node if n.op == "Placeholder"}

    def shape_of(name):
        node, _, port = name.partition(":")
        return shapes.get(node) if port in ("", "0") else None

    t = tf()
    return {
        "inputs": [[n, shape_of(n)] for n in inputs],
        "input_dtypes": [t.as_dtype(dtypes[n.split(":")[0]]).name for n in inputs
                         if n.split(":")[0] in dtypes],
        "outputs": [[n, shape_of(n)] for n in outputs],
        "n_nodes": len(graph_def.node),
        "op_histogram": op_histogram(graph_def),
    }


def _print_interface(info: Dict, output: str) -> None:
    print(f"wrote {output} ({info['n_nodes']} nodes, from {info['source']})")
    for name, shape in info["inputs"]:
        print(f"  input   {name:<30} {shape}")
    for name, shape in info["outputs"]:
        print(f"  output  {name:<30} {shape}")


def main(argv):
    from absl import flags

    f = flags.FLAGS
    if len(argv) != 2:
        raise GraphQuantError("expected one model path", "python tools/export.py MODEL -o OUT.pb")
    info = export(argv[1], f.output, parse_batch(f.batch), f.keras, f.signature, f.json)
    _print_interface(info, f.output)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("output", None, "frozen GraphDef to write (.pb or .pbtxt)", short_name="o")
    flags.DEFINE_string("batch", "1", "batch dimension: an integer or 'dynamic'")
    flags.DEFINE_enum("keras", "auto", list(KERAS_CHOICES),
                      "which Keras loads .keras/.h5 files (auto: Keras 3, then tf_keras)")
    flags.DEFINE_string("signature", "serving_default", "SavedModel signature to freeze")
    flags.DEFINE_bool("json", False, "also write OUT.json with the inputs, outputs and shapes")
    flags.mark_flag_as_required("output")


def run():
    from tools import common

    common.run_app(main, _define_flags)


if __name__ == "__main__":
    run()
