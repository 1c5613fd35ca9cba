"""Fuzzing (issue 5.3): mutated real GraphDefs either work or fail with a GraphQuantError.

Hypothesis mutates the real graphs of ../shared/models (MTCNN PNet and
mini-Xception: small, yet every op family the passes care about): bytes
truncated or flipped, a node's input dropped or rewired, its op swapped, an
attribute corrupted (wrong kind, wrong type, odd lists, shapes, tensors) or
deleted.  For every case the public path -- ``load_graph_def`` on the file,
then ``api.optimize`` (the clean-up pipeline), and for a subset ``convert``
with one calibration sample -- must succeed or raise :class:`GraphQuantError`:
never another exception (a TensorFlow traceback), never a hang (an alarm
turns a case running over ``HANG_SECONDS`` into a failure).

Bounded for CI: ``derandomize=True`` (the same cases on every run, so a
failure reproduces), no example database, a fixed number of examples per test
(520 in all, about a minute on one core), no per-example deadline (the machine
is shared and noisy; the alarm catches hangs).  ``GRAPHQUANT_FUZZ_SCALE=N``
runs N times as many fresh random cases, for hunting bugs.
"""

import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import attr_value_pb2, graph_pb2, types_pb2

from graphquant import api
from graphquant.convert import convert
from graphquant.errors import GraphQuantError
from graphquant.graph_io import load_graph_def
from helpers import SHARED_MODELS, real_model

MODELS = ("mtcnn_pnet", "fer_mini_xception")
HANG_SECONDS = 60
pytestmark = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(SHARED_MODELS, m + ".pb")) for m in MODELS),
    reason="shared models not present")

OPS = ["Conv2D", "DepthwiseConv2dNative", "MatMul", "BiasAdd", "Relu", "Relu6", "AddV2", "Add",
       "Mul", "Sub", "Identity", "MaxPool", "AvgPool", "ConcatV2", "Reshape", "Softmax", "Mean",
       "Const", "Placeholder", "Pad", "Transpose", "Erf", "Switch", "Merge", "NoOp", "Shape",
       "Squeeze", "FusedBatchNormV3", "Rsqrt", "QuantizeV2", "Dequantize", "StatelessIf",
       "NextIteration", "VariableV2", "Cast", "Neg", "Maximum", "Sum", "ExpandDims", "Fill",
       "NotAnOp"]
ATTR_KEYS = ["T", "dtype", "value", "strides", "padding", "data_format", "dilations", "ksize",
             "N", "Tidx", "shape", "transpose_a", "transpose_b", "epsilon", "Tshape",
             "explicit_paddings", "keep_dims", "SrcT", "DstT", "Tpaddings", "Tperm"]
STRINGS = [b"SAME", b"VALID", b"EXPLICIT", b"NHWC", b"NCHW", b"", b"garbage", b"\xff\xfe"]
DTYPES = [types_pb2.DT_FLOAT, types_pb2.DT_INT32, types_pb2.DT_STRING, types_pb2.DT_BOOL,
          types_pb2.DT_QINT8, types_pb2.DT_QUINT8, types_pb2.DT_HALF, types_pb2.DT_INT64,
          types_pb2.DT_RESOURCE, types_pb2.DT_INVALID, types_pb2.DT_FLOAT_REF]
# GRAPHQUANT_FUZZ_SCALE=20 runs 20x the cases with fresh random ones (for hunting bugs)
SCALE = int(os.environ.get("GRAPHQUANT_FUZZ_SCALE", "1"))


def _settings(examples):
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, database=None,
                    deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_BASE = {}


def _base(name):
    """(serialized GraphDef, one calibration sample) of a shared model, read once."""
    if name not in _BASE:
        pb, _, samples = real_model(name)
        with open(pb, "rb") as f:
            _BASE[name] = (f.read(), samples[:1])
    return _BASE[name]


# --------------------------------------------------------------------------- strategies
def _attr_values():
    ints = st.integers(-2 ** 40, 2 ** 40) | st.sampled_from([-1, 0, 1, 2, 3, 4])
    dims = st.lists(st.sampled_from([-1, 0, 1, 3, 7, 2 ** 31]), max_size=5)

    def shape(d):
        a = attr_value_pb2.AttrValue()
        for size in d:
            a.shape.dim.add().size = size
        return a

    def tensor(args):
        dtype, d, payload = args
        a = attr_value_pb2.AttrValue()
        a.tensor.dtype = dtype
        for size in d:
            a.tensor.tensor_shape.dim.add().size = size
        a.tensor.tensor_content = payload
        return a

    return st.one_of(
        ints.map(lambda v: attr_value_pb2.AttrValue(i=v)),
        st.floats(allow_nan=True).map(lambda v: attr_value_pb2.AttrValue(f=v)),
        st.booleans().map(lambda v: attr_value_pb2.AttrValue(b=v)),
        st.sampled_from(STRINGS).map(lambda v: attr_value_pb2.AttrValue(s=v)),
        (st.sampled_from(DTYPES) | st.integers(0, 400)).map(
            lambda v: attr_value_pb2.AttrValue(type=v)),
        st.lists(ints, max_size=6).map(
            lambda v: attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=v))),
        st.lists(st.sampled_from(DTYPES), max_size=3).map(
            lambda v: attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=v))),
        dims.map(shape),
        st.tuples(st.sampled_from(DTYPES), dims.filter(lambda d: len(d) < 4),
                  st.binary(max_size=64)).map(tensor),
        st.just(attr_value_pb2.AttrValue()),            # an empty AttrValue (no field set)
    )


class Case:
    """A mutated model; printed (by Hypothesis, on failure) as what was done, not its bytes."""

    def __init__(self, name, data, description):
        self.name, self.data, self.description = name, data, description

    def __repr__(self):
        return f"Case({self.name}: {self.description})"


@st.composite
def structural_mutations(draw, models=MODELS):
    """A :class:`Case` with 1-3 structural mutations of a model's GraphDef."""
    name = draw(st.sampled_from(models))
    graph_def = graph_pb2.GraphDef.FromString(_base(name)[0])
    done = []
    for _ in range(draw(st.integers(1, 3))):
        node = graph_def.node[draw(st.integers(0, len(graph_def.node) - 1))]
        kind = draw(st.sampled_from(["drop_input", "rewire_input", "swap_op", "corrupt_attr",
                                     "delete_attr", "remove_node"]))
        detail = ""
        if kind == "drop_input" and node.input:
            i = draw(st.integers(0, len(node.input) - 1))
            detail = f" #{i} {node.input[i]}"
            del node.input[i]
        elif kind == "rewire_input":
            other = graph_def.node[draw(st.integers(0, len(graph_def.node) - 1))].name
            source = draw(st.sampled_from([other, f"{other}:{draw(st.integers(0, 9))}",
                                           f"^{other}", "nowhere:0", ""]))
            if node.input:
                node.input[draw(st.integers(0, len(node.input) - 1))] = source
            else:
                node.input.append(source)
            detail = f" <- {source!r}"
        elif kind == "swap_op":
            old, node.op = node.op, draw(st.sampled_from(OPS + sorted({n.op for n in
                                                                      graph_def.node})))
            detail = f" {old} -> {node.op}"
        elif kind == "corrupt_attr":
            key = draw(st.sampled_from(sorted(node.attr) + ATTR_KEYS))
            node.attr[key].CopyFrom(draw(_attr_values()))
            detail = f" {key}={str(node.attr[key]).strip()[:80]!r}"
        elif kind == "delete_attr" and node.attr:
            key = draw(st.sampled_from(sorted(node.attr)))
            del node.attr[key]
            detail = f" {key}"
        elif kind == "remove_node":
            graph_def.node.remove(node)
        done.append(f"{kind} {node.name} ({node.op}){detail}")
    return Case(name, graph_def.SerializeToString(), "; ".join(done))


@st.composite
def byte_mutations(draw, models=MODELS):
    """A :class:`Case` of a model's bytes truncated, with bytes changed, or a slice cut out."""
    name = draw(st.sampled_from(models))
    data = bytearray(_base(name)[0])
    kind = draw(st.sampled_from(["truncate", "flip", "cut"]))
    if kind == "truncate":
        at = draw(st.integers(0, len(data) - 1))
        data, detail = data[:at], f"at {at}"
    elif kind == "flip":
        changes = []
        for _ in range(draw(st.integers(1, 8))):
            at, value = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 255))
            data[at] = value
            changes.append(f"[{at}]={value}")
        detail = " ".join(changes)
    else:
        start, length = draw(st.integers(0, len(data) - 1)), draw(st.integers(1, 64))
        del data[start:start + length]
        detail = f"{length} bytes at {start}"
    return Case(name, bytes(data), f"{kind} {detail}")


# --------------------------------------------------------------------------- the property
class Hang(Exception):
    pass


class _Alarm:
    """Turn a case that runs over ``seconds`` into a :class:`Hang` (SIGALRM, main thread)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        def raise_hang(*_):
            raise Hang(f"no answer within {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, raise_hang)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def _load_optimize_convert(path, sample=None):
    """The public path; returns how far it got.  Only GraphQuantError may escape it."""
    with _Alarm(HANG_SECONDS):
        try:
            graph_def = load_graph_def(path)
            api.optimize(graph_def)
            if sample is not None:
                convert(graph_def, [sample], max_layer_error=None)
                return "converted"
            return "optimized"
        except GraphQuantError as err:
            assert err.problem and isinstance(err.problem, str)
            return "clear error"


def _write(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "mutated.pb"
    path.write_bytes(data)
    return str(path)


@_settings(150)
@given(case=byte_mutations())
def test_mutated_bytes(tmp_path_factory, case):
    _load_optimize_convert(_write(tmp_path_factory, case.data))


@_settings(330)
@given(case=structural_mutations())
def test_mutated_graphs_load_and_optimize(tmp_path_factory, case):
    _load_optimize_convert(_write(tmp_path_factory, case.data))


@_settings(40)
@given(case=structural_mutations(models=("mtcnn_pnet",)))
def test_mutated_graphs_convert(tmp_path_factory, case):
    _load_optimize_convert(_write(tmp_path_factory, case.data), sample=_base(case.name)[1])


def test_unmutated_models_convert(tmp_path):
    """The property is not vacuous: the originals go all the way through."""
    for name in MODELS:
        path = tmp_path / f"{name}.pb"
        path.write_bytes(_base(name)[0])
        assert _load_optimize_convert(str(path), sample=_base(name)[1]) == "converted"
