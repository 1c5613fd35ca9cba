"""Issue 2's acceptance test: every real model in ../shared/models optimizes cleanly.

For each graph, the whole clean-up pipeline (``api.optimize``, as
``graphquant optimize`` runs it, names inferred) must leave no Identity, no
batch-norm in any form and no Rsqrt, keep the graph's interface, and give the
same outputs as the original on the model's shipped real inputs.
"""

import numpy as np
import pytest

from graphquant import api
from graphquant.execute import GraphRunner
from graphquant.graph import op_histogram
from helpers import REAL_MODELS, real_model, rel_l2

FORBIDDEN_OPS = {"Identity", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
                 "BatchNormWithGlobalNormalization", "Rsqrt"}
SAMPLES = 3          # real inputs per model (fewer when the model ships fewer)
TOLERANCE = 1e-4     # relative L2 error per output


def _run_all(graph_def, input_name, outputs, samples):
    """Stacked outputs (one array per output tensor) over the samples, batch 1 each."""
    with GraphRunner(graph_def, outputs) as run:
        per_sample = [run({input_name: samples[i:i + 1]}) for i in range(len(samples))]
    return [np.concatenate([s[k] for s in per_sample]) for k in range(len(outputs))]


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_optimize_real_model(name, shared_models_dir):
    pb, meta, samples = real_model(name)
    original = api.as_graph_def(pb)
    optimized, ctx = api.optimize(pb)

    # the interface is inferred as the model was exported
    assert ctx.inputs == [n.split(":")[0] for n, _ in meta["inputs"]]
    assert sorted(ctx.outputs) == sorted(n for n, _ in meta["outputs"])

    left = {op: n for op, n in op_histogram(optimized).items() if op in FORBIDDEN_OPS}
    assert not left, f"{name}: still has {left} after optimize"

    (input_name, _), = meta["inputs"]
    outputs = [n for n, _ in meta["outputs"]]
    batch = samples[:SAMPLES]
    expected = _run_all(original, input_name, outputs, batch)
    actual = _run_all(optimized, input_name, outputs, batch)
    for out, want, got in zip(outputs, expected, actual):
        assert got.shape == want.shape, out
        err = rel_l2(got, want)
        assert err <= TOLERANCE, f"{name} {out}: relative L2 error {err:.2e}"
    assert len(optimized.node) < len(original.node)
