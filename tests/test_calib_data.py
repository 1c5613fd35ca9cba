"""Calibration data: .npy/.npz/image folders/iterables -> feed dicts; each bad input's error."""

import os

import numpy as np
import pytest

from graphquant import calib_data
from graphquant.calib_data import (ImageSpec, InputSpec, graph_input_specs, list_images,
                                   load_image, open_data)
from graphquant.errors import CalibrationDataError, NodeNotFoundError
from graphquant.runtime import tf
from helpers import SHARED, build_graph

IMAGENET = os.path.join(SHARED, "data", "imagenet-samples")
F32 = np.dtype(np.float32)


def spec(name="x:0", shape=(1, 4, 4, 3), dtype=F32):
    return [InputSpec(name, shape, np.dtype(dtype))]


def two_inputs(batch=None):
    return [InputSpec("a:0", (batch, 3), F32), InputSpec("b:0", (batch, 2, 2), F32)]


def feeds(data):
    return list(data)


def raises(match, fn, *args, **kwargs):
    with pytest.raises(CalibrationDataError, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.fix, "every calibration-data error carries a fix"
    return info.value


def save(tmp_path, name, array):
    path = str(tmp_path / name)
    np.save(path, array)
    return path


# --------------------------------------------------------------------------- graph inputs
def test_graph_input_specs_read_placeholders_and_other_tensors():
    t = tf()
    gd, _ = build_graph(lambda a, b: t.identity(a * 2.0, name="mid") + t.reduce_sum(b),
                        a=[1, 24, 24, 3], b=[None, 5])
    specs = graph_input_specs(gd)
    assert specs == [InputSpec("a:0", (1, 24, 24, 3), F32), InputSpec("b:0", (None, 5), F32)]
    assert specs[0].fixed_batch == 1 and specs[1].fixed_batch is None
    assert specs[1].sample_shape == (5,)
    assert graph_input_specs(gd, ["mid"]) == [InputSpec("mid:0", (1, 24, 24, 3), F32)]
    with pytest.raises(NodeNotFoundError, match="did you mean 'mid'"):
        graph_input_specs(gd, ["mdi"])


# --------------------------------------------------------------------------- .npy happy paths
def test_npy_fixed_batch_of_one_feeds_one_sample_at_a_time(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 3)).astype(np.float32)
    data = open_data(save(tmp_path, "x.npy", x), specs=spec())
    got = feeds(data)
    assert len(data) == 5 and data.num_samples == 5 and data.dropped == 0
    assert all(list(f) == ["x:0"] and f["x:0"].shape == (1, 4, 4, 3) for f in got)
    np.testing.assert_array_equal(np.concatenate([f["x:0"] for f in got]), x)
    assert [f["x:0"].tobytes() for f in data] == [f["x:0"].tobytes() for f in got]  # re-iterable


def test_npy_dynamic_batch_is_fed_in_batches_and_float64_is_cast(tmp_path):
    x = np.random.default_rng(1).normal(size=(10, 3))
    data = open_data(save(tmp_path, "x.npy", x), specs=spec(shape=(None, 3)), batch_size=4)
    got = feeds(data)
    assert [f["x:0"].shape[0] for f in got] == [4, 4, 2]
    assert all(f["x:0"].dtype == np.float32 for f in got)
    np.testing.assert_array_equal(np.concatenate([f["x:0"] for f in got]), x.astype(np.float32))


def test_npy_with_batch_axis_per_sample_skip_limit_and_fixed_batch_remainder(tmp_path):
    x = np.arange(7 * 1 * 2, dtype=np.float32).reshape(7, 1, 2)   # (N, B=1, 2)
    data = open_data(save(tmp_path, "x.npy", x), specs=spec(shape=(2, 2)), skip=1, limit=5)
    got = feeds(data)
    assert len(got) == 2 and data.num_samples == 4 and data.dropped == 1
    np.testing.assert_array_equal(np.concatenate([f["x:0"] for f in got]), x[1:5, 0])
    assert "samples 1..5 of 7" in data.source and "1 dropped" in data.source


def test_npy_real_model_inputs(tmp_path):
    from helpers import real_model
    from graphquant.graph_io import load_graph_def

    pb, meta, samples = real_model("mtcnn_rnet")
    data = open_data(os.path.join(SHARED, "models", "mtcnn_rnet_inputs.npy"),
                     load_graph_def(pb), limit=3)
    got = feeds(data)
    assert [f["input:0"].shape for f in got] == [tuple(meta["inputs"][0][1])] * 3
    np.testing.assert_array_equal(got[2]["input:0"][0], samples[2])


# --------------------------------------------------------------------------- .npz
def test_npz_keys_with_or_without_port(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(3, 2, 2)).astype(np.float32)
    path = str(tmp_path / "d.npz")
    np.savez(path, **{"a": a, "b:0": b})
    got = feeds(open_data(path, specs=two_inputs(1)))
    assert len(got) == 3 and sorted(got[0]) == ["a:0", "b:0"]
    np.testing.assert_array_equal(got[1]["a:0"], a[1:2])
    np.testing.assert_array_equal(got[2]["b:0"], b[2:3])


def test_npz_key_with_a_scope(tmp_path):
    path = str(tmp_path / "scoped.npz")
    np.savez(path, **{"model/input": np.ones((2, 3), "f4")})
    got = feeds(open_data(path, specs=[InputSpec("model/input:0", (1, 3), F32)]))
    assert len(got) == 2 and list(got[0]) == ["model/input:0"]


def test_npz_errors(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=(3, 2, 2)).astype(np.float32)
    unknown = str(tmp_path / "unknown.npz")
    np.savez(unknown, a=a, bb=b)
    err = raises("'bb', which is not an input", open_data, unknown, specs=two_inputs())
    assert "did you mean 'b" in err.fix
    missing = str(tmp_path / "missing.npz")
    np.savez(missing, a=a)
    raises(r"no array for input\(s\) b:0", open_data, missing, specs=two_inputs())
    counts = str(tmp_path / "counts.npz")
    np.savez(counts, a=a, b=b[:2])
    raises("different numbers of samples: a:0: 3, b:0: 2", open_data, counts, specs=two_inputs())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    raises("cannot read .* as a .npz", open_data, str(bad), specs=two_inputs())


# --------------------------------------------------------------------------- array errors
def test_missing_unreadable_and_unknown_files(tmp_path):
    raises("does not exist", open_data, str(tmp_path / "nope.npy"), specs=spec())
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x00" * 64)
    raises("cannot read .* as a .npy", open_data, str(garbage), specs=spec())
    pickled = tmp_path / "objects.npy"
    np.save(str(pickled), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raises("cannot read .* as a .npy", open_data, str(pickled), specs=spec())
    archive = str(tmp_path / "archive.npy")
    with open(archive, "wb") as f:
        np.savez(f, x=np.zeros((2, 4, 4, 3), "f4"))
    raises("cannot read .* as a .npy array: it is a .npz archive", open_data, archive, specs=spec())
    other = tmp_path / "x.csv"
    other.write_text("1,2,3")
    raises("neither .npy, .npz nor a folder", open_data, str(other), specs=spec())


def test_zero_samples_and_skip_past_the_end(tmp_path):
    raises("holds no samples", open_data, save(tmp_path, "e.npy", np.zeros((0, 4, 4, 3), "f4")),
           specs=spec())
    path = save(tmp_path, "x.npy", np.zeros((3, 4, 4, 3), "f4"))
    raises("skip=3 leaves none", open_data, path, specs=spec(), skip=3)
    raises("fixed batch of 4", open_data, path, specs=spec(shape=(4, 4, 4, 3)))


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_name_the_input_and_sample(tmp_path, value, kind):
    x = np.zeros((300, 4, 4, 3), np.float32)
    x[263, 1, 2, 0] = value
    x[290, 0, 0, 0] = value
    err = raises(f"input 'x:0' sample 263 .* contains {kind}; 2 samples are affected",
                 open_data, save(tmp_path, "x.npy", x), specs=spec())
    assert "remove or repair" in err.fix


def test_float64_too_large_for_float32(tmp_path):
    x = np.zeros((2, 3))
    x[1, 0] = 1e300
    raises("sample 1 .* too large for float32", open_data, save(tmp_path, "x.npy", x),
           specs=spec(shape=(None, 3)))


def test_wrong_rank_and_shape_say_expected_and_got(tmp_path):
    err = raises(r"expects samples of shape \(4, 4, 3\) .* shape \(N, 4, 4, 3\); "
                 r"got shape \(4, 4, 3\)", open_data,
                 save(tmp_path, "r.npy", np.zeros((4, 4, 3), "f4")), specs=spec())
    assert "(N, 4, 4, 3)" in err.fix
    raises(r"got shape \(2, 3, 4, 4\)", open_data,
           save(tmp_path, "s.npy", np.zeros((2, 3, 4, 4), "f4")), specs=spec())
    raises(r"expects samples of shape \(\?, 3\)", open_data,
           save(tmp_path, "d.npy", np.zeros((2, 5, 4), "f4")), specs=spec(shape=(None, None, 3)))


def test_dtype_policy(tmp_path):
    ints = np.zeros((2, 4, 4, 3), np.uint8)
    err = raises("expects float32 but the data is uint8", open_data,
                 save(tmp_path, "u8.npy", ints), specs=spec())
    assert "preprocess" in err.fix
    raises("expects int32 but the data is float32", open_data,
           save(tmp_path, "f.npy", np.zeros((2, 3), "f4")), specs=spec(shape=(None, 3), dtype="i4"))
    big = np.array([[1, 2, 3], [4, 5, 2 ** 40]], np.int64)
    raises("holds values 1..1099511627776, outside", open_data, save(tmp_path, "big.npy", big),
           specs=spec(shape=(None, 3), dtype="i4"))
    fits = feeds(open_data(save(tmp_path, "fits.npy", big[:1]),
                           specs=spec(shape=(None, 3), dtype="i4")))
    assert fits[0]["x:0"].dtype == np.int32 and fits[0]["x:0"].tolist() == [[1, 2, 3]]
    raises("expects bool", open_data, save(tmp_path, "b.npy", np.zeros((2, 3), "i4")),
           specs=spec(shape=(None, 3), dtype=bool))


def test_npy_for_a_multi_input_graph(tmp_path):
    err = raises("is a .npy .* but the graph has 2 inputs: a:0, b:0", open_data,
                 save(tmp_path, "x.npy", np.zeros((2, 3), "f4")), specs=two_inputs())
    assert "np.savez(path, a=..., b=...)" in err.fix


# --------------------------------------------------------------------------- iterables
def test_iterable_of_arrays_dicts_and_lists():
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(2, 3)) for _ in range(3)]
    data = open_data(iter(xs), specs=spec(shape=(None, 3)))
    assert len(data) == 3 and data.num_samples == 6
    for got, x in zip(data, xs):
        np.testing.assert_array_equal(got["x:0"], x.astype(np.float32))
    items = [{"a:0": rng.normal(size=(1, 3)), "b": rng.normal(size=(2, 2))},  # b lacks batch
             [rng.normal(size=(1, 3)), rng.normal(size=(1, 2, 2))]]
    got = feeds(open_data(items, specs=two_inputs(1)))
    assert [f["b:0"].shape for f in got] == [(1, 2, 2)] * 2
    np.testing.assert_array_equal(got[1]["a:0"], items[1][0].astype(np.float32))
    limited = open_data((np.full((1, 3), i, "f4") for i in range(10)), specs=spec(shape=(1, 3)),
                        skip=2, limit=3)
    assert [f["x:0"][0, 0] for f in limited] == [2, 3, 4]


def test_iterable_errors():
    s = spec(shape=(1, 3))
    raises("iterable holds no samples", open_data, [], specs=s)
    raises(r"item 1: input 'x:0' expects a feed of shape \(1, 3\) .* got shape \(1, 4\)",
           open_data, [np.zeros((1, 3), "f4"), np.zeros((1, 4), "f4")], specs=s)
    raises("item 0: input 'x:0' sample 0 .* contains NaN", open_data,
           [np.full((1, 3), np.nan, "f4")], specs=s)
    raises("'y', which is not an input", open_data, [{"y": np.zeros((1, 3))}], specs=s)
    raises(r"no value for input\(s\) b:0", open_data, [{"a": np.zeros((1, 3))}],
           specs=two_inputs(1))
    raises("is one array but the graph has 2 inputs", open_data, [np.zeros((1, 3))],
           specs=two_inputs(1))
    raises("single ndarray", open_data, np.zeros((2, 3)), specs=s)
    raises("not a path or an iterable", open_data, 3.0, specs=s)


# --------------------------------------------------------------------------- images
def _write_png(path, pixels):
    t = tf()
    with open(path, "wb") as f:
        f.write(t.io.encode_png(pixels).numpy())


def test_image_spec_string_round_trip_and_errors():
    s = ImageSpec.parse("size=224,224;mean=127.5;scale=1/127.5;order=rgb;resize=bilinear")
    assert s.size == (224, 224) and s.mean == (127.5,) and s.scale == 1 / 127.5
    assert ImageSpec.parse(str(s)) == s
    caffe = ImageSpec.parse("preset=caffe;size=224")
    assert caffe.order == "bgr" and caffe.mean == (103.939, 116.779, 123.68)
    assert caffe.size == (224, 224) and ImageSpec.parse(str(caffe)) == caffe
    assert ImageSpec.parse("preset=tf;mean=0").mean == (0.0,)   # later keys override
    for bad, why in [("size=a", "not a number"), ("foo=1", "unknown key 'foo'"),
                     ("crop=0.8;shorter=256", "give one of them"), ("mean=1,2", "three"),
                     ("size", "not key=value"), ("resize=fancy", "unknown resize"),
                     ("crop=1.5", "fraction"), ("std=0", "not be 0"), ("preset=x", "preset")]:
        err = raises(why, ImageSpec.parse, bad)
        assert "example:" in err.fix


def test_images_exact_pixels_order_and_normalisation(tmp_path):
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8) for _ in range(3)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, p in zip(["b.png", "a.png", "c.png"], pixels):
        _write_png(str(folder / name), p)
    (folder / "notes.txt").write_text("ignored")
    assert [os.path.basename(p) for p in list_images(str(folder))] == ["a.png", "b.png", "c.png"]
    data = open_data(str(folder), specs=spec(shape=(None, 4, 5, 3)), batch_size=2,
                     image_spec="resize=nearest;mean=10,20,30;std=2;scale=0.5;order=bgr")
    got = np.concatenate([f["x:0"] for f in data])
    expected = np.stack([pixels[1], pixels[0], pixels[2]]).astype(np.float32)[..., ::-1]
    expected = (expected - np.float32([10, 20, 30])) / np.float32(2) * np.float32(0.5)
    np.testing.assert_array_equal(got, expected)
    nchw = feeds(open_data(str(folder), specs=spec(shape=(1, 3, 4, 5)), image_spec="resize=nearest",
                           limit=1))
    np.testing.assert_array_equal(nchw[0]["x:0"][0], pixels[1].transpose(2, 0, 1))
    gray = feeds(open_data(str(folder), specs=spec(shape=(1, 4, 5, 1), dtype=np.uint8),
                           image_spec="resize=nearest", skip=2))
    assert gray[0]["x:0"].shape == (1, 4, 5, 1) and gray[0]["x:0"].dtype == np.uint8


def test_images_are_decoded_once_per_data_object(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _write_png(str(folder / f"{i}.png"), np.full((4, 4, 3), 40 * i, np.uint8))
    data = open_data(str(folder), specs=spec(shape=(1, 4, 4, 3)), image_spec="resize=nearest")
    first = feeds(data)
    decoded = []
    real = calib_data.load_image

    def counted(*args, **kwargs):
        decoded.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(calib_data, "load_image", counted)
    again = feeds(data)
    assert decoded == [] and len(again) == 3
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["x:0"], b["x:0"])
        assert not b["x:0"].flags.writeable            # shared: nobody may change it
    monkeypatch.setattr(calib_data, "IMAGE_CACHE_BYTES", 0)     # no room: decoded each time
    feeds(open_data(str(folder), specs=spec(shape=(1, 4, 4, 3)), image_spec="resize=nearest"))
    assert len(decoded) == 3


def test_imagenet_calibration_split_first_four_images():
    if not os.path.isdir(IMAGENET):
        pytest.skip(f"{IMAGENET} not present")
    gd, _ = build_graph(lambda x: x * 2.0, x=[1, 224, 224, 3])
    data = open_data(IMAGENET, gd, image_spec="size=224,224;mean=127.5;scale=1/127.5", limit=4)
    got = feeds(data)
    assert len(got) == 4 and data.num_samples == 4
    names = sorted(os.listdir(IMAGENET))[:4]
    assert names[0] == "n01440764_tench.JPEG"
    for f, name in zip(got, names):
        x = f["x:0"]
        assert x.shape == (1, 224, 224, 3) and x.dtype == np.float32
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
        direct = load_image(os.path.join(IMAGENET, name), ImageSpec.parse(
            "mean=127.5;scale=1/127.5"), 224, 224)
        np.testing.assert_array_equal(x[0], direct)
    everything = np.concatenate([f["x:0"] for f in got])
    assert everything.min() < -0.99 and everything.max() > 0.99
    shorter = feeds(open_data(IMAGENET, gd, image_spec="preset=torch;shorter=256", limit=1))
    cropped = feeds(open_data(IMAGENET, gd, image_spec="preset=caffe;crop=0.875", limit=1))
    assert shorter[0]["x:0"].shape == cropped[0]["x:0"].shape == (1, 224, 224, 3)
    assert not np.array_equal(shorter[0]["x:0"], got[0]["x:0"])


def test_image_folder_errors(tmp_path):
    s = spec(shape=(1, 4, 4, 3))
    empty = tmp_path / "empty"
    empty.mkdir()
    raises("holds no image files .* empty", open_data, str(empty), specs=s, image_spec="")
    (empty / "a.txt").write_text("x")
    raises("holds extensions .txt", open_data, str(empty), specs=s, image_spec="")
    folder = tmp_path / "imgs"
    folder.mkdir()
    _write_png(str(folder / "a.png"), np.zeros((4, 4, 3), np.uint8))
    raises("needs a preprocessing spec", open_data, str(folder), specs=s)
    raises("can feed one input, but the graph has 2", open_data, str(folder),
           specs=two_inputs(), image_spec="")
    raises(r"spec size=8,8 but input 'x:0' takes 4x4", open_data, str(folder), specs=s,
           image_spec="size=8,8")
    raises("images need a 4-D input", open_data, str(folder), specs=spec(shape=(1, 3)),
           image_spec="")
    raises("no fixed height/width", open_data, str(folder), specs=spec(shape=(1, None, None, 3)),
           image_spec="")
    raises("cannot hold the normalised", open_data, str(folder), specs=spec(dtype=np.uint8),
           image_spec="mean=127.5")
    (folder / "b.jpg").write_bytes(b"not a jpeg at all")
    raises("b.jpg' is not a JPEG", open_data, str(folder), specs=s, image_spec="")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = open_data(str(folder), specs=s, image_spec="")      # signature passes the check
    with pytest.raises(CalibrationDataError, match="cannot read image .*b.jpg"):
        feeds(data)
