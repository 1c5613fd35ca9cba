"""models/zoo.py end to end on the smallest zoo network: MobileNet v1, width 0.25, 128 px.

Builds it in both export styles into a temporary cache, checks the frozen graphs
against the Keras model on real images, and that the batch-norm statistics are
those of the calibration images.
"""

import json
import os

import numpy as np
import pytest

from graphquant.errors import GraphQuantError
from graphquant.execute import GraphRunner
from graphquant.graph import VARIABLE_OPS
from graphquant.graph_io import load_graph_def
from helpers import rel_l2
from models import zoo

pytestmark = pytest.mark.skipif(not os.path.isdir(zoo.IMAGENET_DIR),
                                reason=f"{zoo.IMAGENET_DIR} not present")

SMALL = dict(model="mobilenet_v1", alpha=0.25, size=128, batch=1, bn_images=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("zoo_cache"))


@pytest.fixture(scope="module")
def built(cache):
    """(options, pb, meta) for both styles, built once for the module."""
    out = {}
    for style in zoo.STYLES:
        opts = zoo.ZooOptions(style=style, **SMALL)
        pb, meta_path = zoo.build(opts, cache, log=lambda s: None)
        with open(meta_path) as f:
            out[style] = (opts, pb, json.load(f))
    return out


@pytest.fixture(scope="module")
def eval_images(built):
    _, _, meta = built["keras3"]
    return zoo.load_images(zoo.imagenet_files("eval")[:3], meta["preprocessing"])


def _run(pb, meta, images):
    graph_def = load_graph_def(pb)
    (name, _), = meta["inputs"]
    with GraphRunner(graph_def, [meta["outputs"][0][0]]) as runner:
        return np.concatenate([runner({name: x[None]})[0] for x in images])


def test_sidecar_json_describes_the_graph(built):
    for style, (opts, pb, meta) in built.items():
        assert os.path.basename(pb) == meta["pb"] == opts.key() + ".pb"
        assert meta["options"] == opts.as_dict()
        assert meta["inputs"] == [["input:0", [1, 128, 128, 3]]]
        assert meta["outputs"][0][1] == [1, 1000]
        assert meta["preprocessing"]["mode"] == "tf"
        assert "shorter=146" in meta["preprocessing"]["image_spec"]
        assert meta["frozen_vs_keras"]["rel_l2"] < 1e-4


def test_export_styles_differ_in_batchnorm_form(built):
    keras3 = load_graph_def(built["keras3"][1])
    tfkeras = load_graph_def(built["tfkeras"][1])
    ops3 = {n.op for n in keras3.node}
    ops2 = {n.op for n in tfkeras.node}
    assert "Rsqrt" in ops3 and not any(op.startswith("FusedBatchNorm") for op in ops3)
    assert "FusedBatchNormV3" in ops2 and "Rsqrt" not in ops2
    assert not (ops3 | ops2) & VARIABLE_OPS
    assert {"Conv2D", "DepthwiseConv2dNative"} <= ops3 & ops2


def test_frozen_graphs_match_the_keras_model(built, cache, eval_images):
    opts, _, _ = built["keras3"]
    model = zoo.keras_model(opts, cache, log=lambda s: None)
    expected = np.asarray(model(eval_images, training=False))
    for style, (_, pb, meta) in built.items():
        got = _run(pb, meta, eval_images)
        assert got.shape == (3, 1000)
        assert rel_l2(got, expected) < 1e-4, style
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-4)  # softmax


def test_batchnorm_statistics_are_those_of_the_calibration_images(built, cache):
    import keras

    opts, _, meta = built["keras3"]
    model = zoo.keras_model(opts, cache, log=lambda s: None)
    images = zoo.load_images(zoo.imagenet_files("calib")[:opts.bn_images], meta["preprocessing"])
    bn = zoo._batchnorm_layers(model)[0]
    before_bn = keras.Model(model.inputs[0], bn.input)(images)
    x = np.asarray(before_bn, np.float64).reshape(-1, before_bn.shape[-1])
    np.testing.assert_allclose(np.asarray(bn.moving_mean), x.mean(axis=0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), x.var(axis=0), rtol=1e-3,
                               atol=1e-6)
    # and they are far from the initial (0, 1)
    assert np.abs(np.asarray(bn.moving_variance) - 1).max() > 0.1


def test_weights_are_deterministic_and_cached(built, cache, tmp_path):
    opts, pb, _ = built["keras3"]
    mtime = os.path.getmtime(pb)
    assert zoo.build(opts, cache, log=lambda s: None)[0] == pb
    assert os.path.getmtime(pb) == mtime  # served from the cache
    again = zoo.build_weights(opts, str(tmp_path), log=lambda s: None)
    with np.load(zoo.weights_path(opts, cache)) as a, np.load(again) as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_keys_name_every_option_and_bad_options_fail():
    base = zoo.ZooOptions(**SMALL)
    variants = [dict(style="tfkeras"), dict(alpha=0.5), dict(size=160), dict(batch=None),
                dict(batch=16), dict(seed=1), dict(bn_images=50)]
    keys = {base.key()} | {zoo.ZooOptions(**{**SMALL, **v}).key() for v in variants}
    assert len(keys) == len(variants) + 1
    with pytest.raises(GraphQuantError, match="width multiplier"):
        zoo.ZooOptions(model="resnet50", alpha=0.5)
    with pytest.raises(GraphQuantError, match="unknown zoo model"):
        zoo.ZooOptions(model="vgg16")
    with pytest.raises(GraphQuantError, match="calibration split"):
        zoo.ZooOptions(model="resnet50", bn_images=101)


def test_imagenet_splits_and_labels():
    calib, evals = zoo.imagenet_files("calib"), zoo.imagenet_files("eval")
    assert len(calib) == 100 and len(evals) == 900
    assert calib == sorted(calib) and calib[-1] < evals[0]
    labels = zoo.synset_labels(calib[:3] + evals[-1:])
    np.testing.assert_array_equal(labels, [0, 1, 2, 999])
    np.testing.assert_array_equal(zoo.synset_labels(calib[:1], label_offset=1), [1])
