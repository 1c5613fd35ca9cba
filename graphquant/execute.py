"""Run a GraphDef in a TensorFlow session: the one place graphs are executed.

Used by constant folding, calibration, evaluation, benchmarks and tests.
TensorFlow errors from running are turned into graphquant errors naming the
node, never a traceback from deep inside TensorFlow.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.errors import GraphQuantError, NodeNotFoundError
from graphquant.graph import GraphIndex, canonical_tensor, suggest_names
from graphquant.runtime import tf


def import_graph(graph_def: graph_pb2.GraphDef):
    """A new ``tf.Graph`` holding ``graph_def``.

    Imports a copy: ``tf.graph_util.import_graph_def`` adds default attributes
    to the GraphDef it is given, which would make a converted graph's bytes
    depend on whether it was ever run.
    """
    t = tf()
    copy = graph_pb2.GraphDef()
    copy.CopyFrom(graph_def)
    graph = t.Graph()
    with graph.as_default():
        t.graph_util.import_graph_def(copy, name="")
    return graph


class GraphRunner:
    """A loaded graph and session; call it with feeds to get the fetched arrays."""

    def __init__(self, graph_def: graph_pb2.GraphDef, fetches: Sequence[str],
                 threads: Optional[int] = None, grappler: bool = True):
        t = tf()
        self.fetches = [canonical_tensor(f) for f in fetches]
        try:
            self.graph = import_graph(graph_def)
        except (ValueError, TypeError, t.errors.OpError) as exc:
            raise GraphQuantError(f"TensorFlow cannot load the graph: {_first_line(exc)}",
                                  "check the graph with `graphquant inspect`") from None
        index = GraphIndex(graph_def)
        for name in self.fetches:
            if name.split(":")[0] not in index:
                raise NodeNotFoundError(f"no tensor '{name}' in the graph",
                                        suggest_names(name.split(":")[0], index.nodes))
        config = t.compat.v1.ConfigProto()
        if threads:
            config.intra_op_parallelism_threads = threads
            config.inter_op_parallelism_threads = 1
        if not grappler:
            # Run the graph as written.  Grappler merges identical nodes (two
            # QuantizeV2 of one tensor) and fuses fp32 Conv+BiasAdd+Add; both can
            # hand a buffer that a fused kernel writes in place to a reader that
            # has not run yet -- fine in a converted graph, a crash in
            # sensitivity's shadow graph, whose islands read fp32 tensors.
            config.graph_options.rewrite_options.disable_meta_optimizer = True
        self.session = t.compat.v1.Session(graph=self.graph, config=config)
        self._fetch_tensors = [self.graph.get_tensor_by_name(f) for f in self.fetches]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        return self.fetch(feeds, self._fetch_tensors)

    def fetch(self, feeds: Mapping[str, np.ndarray], fetches: Sequence) -> List[np.ndarray]:
        """Run once fetching ``fetches`` (tensor names or tensors of :attr:`graph`) instead
        of the runner's own; ``feeds`` may name any tensor of the graph."""
        t = tf()
        feed_dict = {self.graph.get_tensor_by_name(canonical_tensor(k)): v
                     for k, v in feeds.items()}
        fetches = [self.graph.get_tensor_by_name(canonical_tensor(f)) if isinstance(f, str)
                   else f for f in fetches]
        try:
            return self.session.run(fetches, feed_dict)
        except (ValueError, TypeError) as exc:  # feed shape / dtype refused before running
            raise GraphQuantError(f"cannot feed the graph: {_first_line(exc)}",
                                  "check input shapes and dtypes against `graphquant inspect`"
                                  ) from None
        except t.errors.OpError as exc:
            node = getattr(getattr(exc, "op", None), "name", None)
            where = f" at node '{node}'" if node else ""
            raise GraphQuantError(f"running the graph failed{where}: {_op_error_text(exc)}",
                                  "check input shapes and dtypes against `graphquant inspect`"
                                  ) from None

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_graph(graph_def: graph_pb2.GraphDef, feeds: Mapping[str, np.ndarray],
              fetches: Sequence[str]) -> List[np.ndarray]:
    """Run ``graph_def`` once: ``feeds`` maps tensor names to arrays."""
    with GraphRunner(graph_def, fetches) as runner:
        return runner(feeds)


def tensor_shapes(graph_def: graph_pb2.GraphDef) -> Dict[str, Optional[List[Optional[int]]]]:
    """Static shape of each node's first output as TensorFlow infers it (None if unknown).

    Inferred on a light copy (weights replaced by a zero of their shape,
    :func:`graphquant.graph_io.light_copy`): passes ask this of the whole graph
    several times per conversion."""
    from graphquant.graph_io import light_copy

    graph = import_graph(light_copy(graph_def))
    shapes = {}
    for op in graph.get_operations():
        if op.outputs:
            shape = op.outputs[0].shape
            shapes[op.name] = None if shape.rank is None else shape.as_list()
    return shapes


def _op_error_text(exc) -> str:
    """The informative line of a TensorFlow run error (not "Graph execution error:")."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(("Graph execution error",
                                                               "Detected at node", "Node:",
                                                               "[[", "Traceback", "File "))]
    return useful[0] if useful else (lines[0] if lines else type(exc).__name__)


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
