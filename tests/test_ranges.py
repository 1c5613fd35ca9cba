"""ranges: which tensors are calibrated, and ranges unified across pools and concats."""

import numpy as np

from graphquant.ranges import calibration_tensors, plan_ranges
from graphquant.runtime import tf
from helpers import build_graph


def _graph():
    t = tf()

    def body(x):
        a = t.nn.relu(t.nn.conv2d(x, t.constant(np.ones([1, 1, 2, 2], np.float32)), 1, "SAME",
                                  name="conv_a"), name="a")
        b = t.nn.max_pool2d(x, 1, 1, "SAME", name="pool")
        c = t.concat([a, b], axis=3, name="cat")
        return t.nn.softmax(c, name="out")

    return build_graph(body, x=[1, 4, 4, 2])


def test_calibration_tensors_are_inputs_and_outputs_of_quantizable_ops():
    gd, _ = _graph()
    tensors = calibration_tensors(gd)
    assert set(tensors) == {"x:0", "conv_a:0", "a:0", "pool:0", "cat:0"}
    assert "out:0" not in tensors  # Softmax is not rewritten


def test_plan_unifies_pool_and_concat_classes():
    gd, _ = _graph()
    calibrated = {"x:0": (-1.0, 2.0), "conv_a:0": (-3.0, 1.0), "a:0": (0.0, 1.0),
                  "pool:0": (-0.5, 1.5), "cat:0": (-0.5, 1.5)}
    planned = plan_ranges(gd, calibrated)
    # x -> pool -> cat <- a : one class, the union of all four
    for t in ("x:0", "pool:0", "cat:0", "a:0"):
        assert planned[t] == (-1.0, 2.0)
    assert planned["conv_a:0"] == (-3.0, 1.0)  # not tied to anything


def test_plan_is_deterministic_and_leaves_untied_ranges():
    gd, _ = _graph()
    calibrated = {"x:0": (0.0, 2.0), "conv_a:0": (-3.0, 1.0)}
    assert plan_ranges(gd, calibrated) == plan_ranges(gd, dict(reversed(calibrated.items())))
    assert plan_ranges(gd, calibrated)["x:0"] == (0.0, 2.0)


def test_concat_of_very_different_ranges_is_not_unified():
    gd, _ = _graph()
    calibrated = {"x:0": (0.0, 100.0), "conv_a:0": (-3.0, 1.0), "a:0": (0.0, 1.0),
                  "pool:0": (0.0, 100.0), "cat:0": (0.0, 100.0)}
    planned = plan_ranges(gd, calibrated)
    assert planned["a:0"] == (0.0, 1.0)  # not widened 100x
    assert planned["pool:0"] == planned["x:0"] == (0.0, 100.0)  # the pool still ties


def test_nodes_inside_tf1_cond_branches_are_not_calibrated():
    t = tf()

    def body(x):
        pred = t.reduce_mean(x) > 0
        w = t.constant(np.ones([1, 1, 2, 2], np.float32))
        y = t.compat.v1.cond(pred, lambda: t.nn.relu(t.nn.conv2d(x, w, 1, "SAME"), name="inner"),
                             lambda: x)
        return t.nn.relu(y, name="after")

    gd, _ = build_graph(body, x=[1, 3, 3, 2])
    tensors = calibration_tensors(gd)
    assert "after:0" in tensors
    assert not any("inner" in name or "Conv2D" in name for name in tensors)
