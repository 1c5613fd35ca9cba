"""Which int8 op family should graphquant emit? Measure both on this CPU.

    python tools/compare_op_families.py                     # all settings, conv + matmul
    python tools/compare_op_families.py --settings=1,unset --rounds=9 --json_out=f.json
    python tools/compare_op_families.py --from_json=f.json   # the report again

Two workloads, each built three ways from the same weights and ranges:

* ``conv``: four chained 3x3 convs (+bias, +Relu), batch 8, 56x56x64 -> 64;
* ``matmul``: four chained 1024x1024 matmuls (+bias, +Relu), 128 rows
  (per-tensor weights: the legacy matmul has no per-channel kernel);
* ``depthwise``: four chained 3x3 depthwise convs, batch 8, 56x56x128;
* single ops (``dequantize``, ``maxpool``, ``avgpool``, ``concat``): the fp32
  op against QuantizeV2 + its int8 counterpart + Dequantize (one family only;
  small, so mostly useful to see which ops run where);

as ``fp32`` (Conv2D/MatMul + BiasAdd + Relu), ``attr`` (QuantizeV2,
``_FusedQuantizedConv2D`` / ``_QuantizedMatMul`` with fused Requantize,
Dequantize) and ``legacy`` (QuantizeV2,
``QuantizedConv2DWithBiasAndReluAndRequantize`` /
``QuantizedMatMulWithBiasAndReluAndRequantize``, Dequantize).  The int8
weights use the ``avx2`` format (|w| <= 63: exact on every CPU); ranges come
from a min-max calibration on the measured input itself.

``TF_ENABLE_ONEDNN_OPTS`` is read once when TensorFlow loads, so each setting
(``1``, ``0``, ``unset`` = TensorFlow's default, what a fresh ``python`` gets)
runs in its own child process.  Inside a child the graphs of a workload are
timed in interleaved rounds (fp32, attr, legacy, fp32, ...; ``--iters`` runs
per round, after ``--warmup`` runs) and the median round is reported, with
the speed-up against the fp32 graph of the same child ("vs own fp32", the
reliable ratio) and against fp32 with oneDNN on ("vs fp32(=1)", across
children: not interleaved, compare with care on a busy machine).
Correctness is the relative L2 error and max abs error of each graph's output
against the fp32 graph of the same child.  A graph that cannot run in a
setting (the legacy family without oneDNN) is reported with its error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_list("settings", ["1", "0", "unset"],
                  "TF_ENABLE_ONEDNN_OPTS values to measure (unset = TensorFlow's default)")
flags.DEFINE_list("workloads", ["conv", "matmul", "depthwise"],
                  "conv, matmul, depthwise, and single ops: dequantize (= QuantizeV2 + "
                  "Dequantize), maxpool, avgpool, concat")
flags.DEFINE_integer("rounds", 7, "interleaved timing rounds")
flags.DEFINE_integer("iters", 5, "runs per round")
flags.DEFINE_integer("warmup", 3, "untimed runs per graph first")
flags.DEFINE_integer("threads", 0, "intra-op threads (0 = TensorFlow's default)")
flags.DEFINE_integer("batch", 8, "conv batch size")
flags.DEFINE_integer("rows", 128, "matmul rows")
flags.DEFINE_string("json_out", "", "also write all results as JSON here")
flags.DEFINE_string("from_json", "", "print the report of an earlier --json_out file")
flags.DEFINE_string("worker", "", "internal: run one setting in this process")
flags.DEFINE_string("worker_out", "", "internal: where the worker writes its JSON")

VARIANTS = ("fp32", "attr", "legacy")


# --------------------------------------------------------------------------- graphs (worker)
def _graphs(workload, rng):
    """{variant: (GraphDef, output tensor)}, the input array and its feed name."""
    import numpy as np

    from graphquant import int8_ops as ops
    from graphquant import quant_math as qm
    from graphquant import target
    from graphquant.graph import make_const, make_node
    from graphquant.execute import run_graph
    from tensorflow.core.framework import graph_pb2

    f32 = lambda name, v: make_const(name, np.asarray(v, np.float32))  # noqa: E731
    float_t = ops.dtype("float")
    layers = 4
    if workload in SINGLE_OPS:
        return _single_op_graphs(workload, rng)
    if workload == "depthwise":
        x = rng.uniform(0.0, 1.0, (FLAGS.batch, 56, 56, 128)).astype(np.float32)
        ws = [rng.normal(0, (2.0 / 9) ** 0.5, (3, 3, 128, 1)).astype(np.float32)
              for _ in range(layers)]
        kind = "depthwise"
    elif workload == "conv":
        x = rng.uniform(0.0, 1.0, (FLAGS.batch, 56, 56, 64)).astype(np.float32)
        ws = [rng.normal(0, (2.0 / (9 * 64)) ** 0.5, (3, 3, 64, 64)).astype(np.float32)
              for _ in range(layers)]
        kind = "conv"
    else:
        x = rng.uniform(0.0, 1.0, (FLAGS.rows, 1024)).astype(np.float32)
        ws = [rng.normal(0, (2.0 / 1024) ** 0.5, (1024, 1024)).astype(np.float32)
              for _ in range(layers)]
        kind = "matmul"
    channels = [w.shape[2] * w.shape[3] if kind == "depthwise" else w.shape[-1] for w in ws]
    bs = [rng.normal(0, 0.05, c).astype(np.float32) for c in channels]

    # fp32 graph, also used for calibration
    nodes = [make_node("Placeholder", "x", dtype=float_t)]
    prev = "x"
    for i, (w, b) in enumerate(zip(ws, bs)):
        nodes.append(f32(f"w{i}", w))
        nodes.append(f32(f"b{i}", b))
        if kind == "conv":
            nodes.append(make_node("Conv2D", f"conv{i}", [prev, f"w{i}"], T=float_t,
                                   strides=[1, 1, 1, 1], padding="SAME"))
        elif kind == "depthwise":
            nodes.append(make_node("DepthwiseConv2dNative", f"conv{i}", [prev, f"w{i}"],
                                   T=float_t, strides=[1, 1, 1, 1], padding="SAME"))
        else:
            nodes.append(make_node("MatMul", f"conv{i}", [prev, f"w{i}"], T=float_t))
        nodes.append(make_node("BiasAdd", f"bias{i}", [f"conv{i}", f"b{i}"], T=float_t))
        nodes.append(make_node("Relu", f"relu{i}", [f"bias{i}"], T=float_t))
        prev = f"relu{i}"
    fp32 = graph_pb2.GraphDef()
    fp32.node.extend(nodes)
    acts = run_graph(fp32, {"x:0": x}, [f"relu{i}:0" for i in range(layers)])
    ranges = [qm.activation_range(0.0, float(a.max()), False)[1] for a in acts]
    in_range = qm.activation_range(0.0, float(x.max()), False)[1]

    level, multiple = target.weight_format("avx2", kind, signed_input=False)
    graphs = {"fp32": (fp32, prev + ":0")}
    for variant in ("attr", "legacy"):
        nodes = [make_node("Placeholder", "x", dtype=float_t), f32("zero", 0.0),
                 f32("in_max", in_range),
                 ops.quantize_v2("xq", "x", "zero", "in_max", False)]
        prev, r_prev = "xq", in_range
        for i, (w, b) in enumerate(zip(ws, bs)):
            qw = qm.quantize_weights(w, kind, per_channel=(kind != "matmul"),
                                     max_level=level, multiple=multiple)
            nodes += [ops.quantized_const(f"w{i}", qw.values, "qint8"),
                      f32(f"wmin{i}", qw.min_range), f32(f"wmax{i}", qw.max_range),
                      f32(f"b{i}", b), f32(f"omax{i}", ranges[i])]
            args = (f"{prev}:0", f"w{i}", f"b{i}", f"{prev}:1", f"{prev}:2", f"wmin{i}",
                    f"wmax{i}")
            if variant == "attr" and kind != "matmul":
                nodes.append(ops.fused_quantized_conv(
                    f"q{i}", args[0], args[1], args[3], args[4], args[5], args[6], bias=args[2],
                    min_freezed_output="zero", max_freezed_output=f"omax{i}",
                    depthwise=(kind == "depthwise")))
            elif variant == "attr":
                nodes.append(ops.quantized_matmul(
                    f"q{i}", *args, tout="quint8", fused_ops=["BiasAdd", "Relu", "Requantize"],
                    min_freezed_output="zero", max_freezed_output=f"omax{i}"))
            elif kind in ("conv", "depthwise"):
                op = ("QuantizedConv2DWithBiasAndReluAndRequantize" if kind == "conv" else
                      "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize")
                nodes.append(ops.legacy_quantized_conv(op, f"q{i}", *args, "zero", f"omax{i}"))
            else:
                nodes.append(ops.legacy_quantized_matmul(
                    "QuantizedMatMulWithBiasAndReluAndRequantize", f"q{i}", *args, "zero",
                    f"omax{i}"))
            prev, r_prev = f"q{i}", ranges[i]
        nodes.append(ops.dequantize("out", f"{prev}:0", f"{prev}:1", f"{prev}:2", False))
        gd = graph_pb2.GraphDef()
        gd.node.extend(nodes)
        graphs[variant] = (gd, "out:0")
    return graphs, x


SINGLE_OPS = ("dequantize", "maxpool", "avgpool", "concat")


def _single_op_graphs(workload, rng):
    """One op on a batch x 56x56x64 tensor: the fp32 op ('fp32') against its int8
    counterpart ('attr'; these ops have a single family, so no 'legacy')."""
    import numpy as np

    from graphquant import int8_ops as ops
    from graphquant.graph import make_const, make_node
    from tensorflow.core.framework import graph_pb2

    float_t = ops.dtype("float")
    x = rng.uniform(0.0, 1.0, (FLAGS.batch, 56, 56, 64)).astype(np.float32)
    base = [make_node("Placeholder", "x", dtype=float_t),
            make_const("zero", np.float32(0.0)), make_const("one", np.float32(1.0)),
            make_const("axis", np.int32(3))]
    pool = dict(ksize=[1, 3, 3, 1], strides=[1, 2, 2, 1], padding="SAME")
    if workload == "dequantize":  # fp32 side: the cheapest elementwise op of the same size
        fp32 = [make_node("Relu", "out", ["x"], T=float_t)]
        int8 = [ops.quantize_v2("q", "x", "zero", "one", False),
                ops.dequantize("out", "q:0", "q:1", "q:2", False)]
    elif workload in ("maxpool", "avgpool"):
        fp32 = [make_node("MaxPool" if workload == "maxpool" else "AvgPool", "out", ["x"],
                          T=float_t, **pool)]
        build = ops.quantized_max_pool if workload == "maxpool" else ops.quantized_avg_pool
        int8 = [ops.quantize_v2("q", "x", "zero", "one", False),
                build("p", "q:0", "q:1", "q:2", t="quint8", **pool),
                ops.dequantize("out", "p:0", "p:1", "p:2", False)]
    else:
        fp32 = [make_node("ConcatV2", "out", ["x", "x", "axis"], N=2, T=float_t,
                          Tidx=ops.dtype("int32"))]
        int8 = [ops.quantize_v2("q", "x", "zero", "one", False),
                ops.quantized_concat("c", ["q:0", "q:0"], "axis", ["q:1", "q:1"],
                                     ["q:2", "q:2"], t="quint8"),
                ops.dequantize("out", "c:0", "c:1", "c:2", False)]
    graphs = {}
    for variant, nodes in (("fp32", fp32), ("attr", int8)):
        gd = graph_pb2.GraphDef()
        gd.node.extend(base + nodes)
        graphs[variant] = (gd, "out:0")
    return graphs, x


def _error_line(message):
    """The informative line of a TensorFlow error (not the 'Graph execution error:' header)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith(("Graph execution error", "Detected at node", "Node:", "[[", "File ")):
            return ln[:200]
    return (lines[0] if lines else "unknown error")[:200]


def _worker(setting):
    """Measure every workload in this process (TensorFlow loads with ``setting``)."""
    if setting == "unset":
        import tensorflow  # noqa: F401  (before graphquant, which would set the variable)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    sys.path.insert(0, _REPO)
    import numpy as np

    import graphquant  # noqa: F401
    from graphquant.runtime import onednn_enabled, tf

    t = tf()
    rng = np.random.default_rng(0)
    result = {"setting": setting, "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
              "onednn_enabled": onednn_enabled(), "tensorflow": t.__version__, "workloads": {}}
    for workload in FLAGS.workloads:
        graphs, x = _graphs(workload, rng)
        sessions, outputs, rows = {}, {}, {}
        config = t.compat.v1.ConfigProto()
        if FLAGS.threads:
            config.intra_op_parallelism_threads = FLAGS.threads
            config.inter_op_parallelism_threads = 1
        for variant in [v for v in VARIANTS if v in graphs]:
            gd, out = graphs[variant]
            g = t.Graph()
            with g.as_default():
                t.graph_util.import_graph_def(gd, name="")
            sess = t.compat.v1.Session(graph=g, config=config)
            fetch, feed = g.get_tensor_by_name(out), {g.get_tensor_by_name("x:0"): x}
            try:
                outputs[variant] = sess.run(fetch, feed)
                for _ in range(FLAGS.warmup - 1):
                    sess.run(fetch, feed)
                sessions[variant] = (sess, fetch, feed)
                rows[variant] = {"times_ms": []}
            except t.errors.OpError as exc:
                rows[variant] = {"error": _error_line(exc.message)}
                sess.close()
        for _ in range(FLAGS.rounds):
            for variant, (sess, fetch, feed) in sessions.items():
                start = time.perf_counter()
                for _ in range(FLAGS.iters):
                    sess.run(fetch, feed)
                rows[variant]["times_ms"].append((time.perf_counter() - start) * 1e3
                                                 / FLAGS.iters)
        ref = outputs["fp32"].astype(np.float64)
        for variant, row in rows.items():
            if "times_ms" in row:
                row["median_ms"] = float(np.median(row["times_ms"]))
                out = outputs[variant].astype(np.float64)
                row["rel_l2_vs_fp32"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                row["max_abs_vs_fp32"] = float(np.abs(out - ref).max())
        for sess, _, _ in sessions.values():
            sess.close()
        result["workloads"][workload] = rows
    return result


# --------------------------------------------------------------------------- driver
def _run_setting(setting):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if setting != "unset":
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        argv = [sys.executable, os.path.abspath(__file__), f"--worker={setting}",
                f"--worker_out={out}", f"--workloads={','.join(FLAGS.workloads)}",
                f"--rounds={FLAGS.rounds}", f"--iters={FLAGS.iters}", f"--warmup={FLAGS.warmup}",
                f"--threads={FLAGS.threads}", f"--batch={FLAGS.batch}", f"--rows={FLAGS.rows}"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"setting": setting, "error": f"child exited with {proc.returncode}: "
                    + proc.stderr.strip()[-500:]}
        with open(out) as f:
            return json.load(f)


def _describe(workload):
    size = f"{FLAGS.batch}x56x56x64"
    if workload == "dequantize":
        return f"QuantizeV2 + Dequantize vs an fp32 Relu, {size}"
    if workload in SINGLE_OPS:
        return f"fp32 {workload} vs QuantizeV2 + quantized {workload} + Dequantize, {size}"
    if workload == "depthwise":
        return f"4 chained 3x3 depthwise convs, batch {FLAGS.batch}, 56x56x128"
    if workload == "conv":
        return f"4 chained 3x3 convs, batch {FLAGS.batch}, 56x56x64"
    return f"4 chained matmuls {FLAGS.rows}x1024 @ 1024x1024"


def _report(results):
    lines = []
    for workload in FLAGS.workloads:
        lines.append(f"\n{workload}: {_describe(workload)} "
                     f"(median of {FLAGS.rounds} interleaved rounds x {FLAGS.iters} runs)")
        lines.append(f"  {'TF_ENABLE_ONEDNN_OPTS':>22} {'graph':>7} {'median ms':>10} "
                     f"{'vs own fp32':>11} {'vs fp32(=1)':>11} {'rel L2 vs fp32':>15} "
                     f"{'max abs':>9}")
        base = None
        for res in results:
            if res.get("setting") == "1" and "workloads" in res:
                base = res["workloads"][workload].get("fp32", {}).get("median_ms")
        for res in results:
            setting = res["setting"]
            if "error" in res:
                lines.append(f"  {setting:>22}   child failed: {res['error']}")
                continue
            own = res["workloads"][workload].get("fp32", {}).get("median_ms")
            for variant in VARIANTS:
                row = res["workloads"][workload].get(variant)
                if row is None:
                    continue
                if "error" in row:
                    lines.append(f"  {setting:>22} {variant:>7}   fails: {row['error']}")
                    continue
                speed = f"{base / row['median_ms']:.2f}x" if base else "-"
                mine = f"{own / row['median_ms']:.2f}x" if own else "-"
                lines.append(f"  {setting:>22} {variant:>7} {row['median_ms']:10.2f} {mine:>11} "
                             f"{speed:>11} {row['rel_l2_vs_fp32']:15.5f} "
                             f"{row['max_abs_vs_fp32']:9.4f}")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.worker:
        result = _worker(FLAGS.worker)
        with open(FLAGS.worker_out, "w") as f:
            json.dump(result, f)
        return 0
    if FLAGS.from_json:
        with open(FLAGS.from_json) as f:
            saved = json.load(f)
        for key in ("workloads", "rounds", "iters", "batch", "rows"):
            FLAGS[key].value = saved["flags"][key]
        print(_report(saved["results"]))
        return 0
    print("Each TF_ENABLE_ONEDNN_OPTS setting runs in its own child process (TensorFlow reads "
          "the variable once, at import); 'unset' is what a fresh python gets.", flush=True)
    results = []
    for setting in FLAGS.settings:
        print(f"measuring TF_ENABLE_ONEDNN_OPTS={setting} ...", flush=True)
        results.append(_run_setting(setting))
    print(_report(results))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in ("settings", "workloads", "rounds",
                                                              "iters", "threads", "batch",
                                                              "rows")},
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    app.run(main)
