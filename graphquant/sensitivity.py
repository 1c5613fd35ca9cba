"""How much error each int8 island adds: its own, and all of it up to there.

Measured on real data in one session run per feed, with a *shadow graph*: the
clean fp32 graph plus a copy of every int8 island (prefixed ``shadow/``) whose
inputs are the fp32 tensors.  For an island ending at tensor ``y``:

* own error: ``shadow/y`` (int8 op fed exact fp32 inputs) against ``y``;
* accumulated error: ``y`` in the island graph, where int8 feeds int8 as in the
  converted model, against ``y`` in the fp32 graph.

Both as relative L2 (``||int8 - fp32|| / ||fp32||``) and SQNR in dB, summed over
all feeds.  The island graph is the output of the quantize passes before the
islands are joined (:data:`ISLAND_PASSES`); the joins are exact, so its values
are the converted model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping

import numpy as np
from tensorflow.core.framework import graph_pb2

from graphquant.execute import GraphRunner
from graphquant.graph import canonical_tensor, parse_tensor_name

PREFIX = "shadow/"


@dataclass
class IslandError:
    own: float          # relative L2 with fp32 inputs
    accumulated: float  # relative L2 with int8 upstream

    @staticmethod
    def sqnr_db(rel_l2: float) -> float:
        return math.inf if rel_l2 <= 0 else -20.0 * math.log10(rel_l2)

    def to_dict(self) -> Dict[str, float]:
        return {"own_rel_l2": self.own, "accumulated_rel_l2": self.accumulated,
                "own_sqnr_db": self.sqnr_db(self.own),
                "accumulated_sqnr_db": self.sqnr_db(self.accumulated)}


def shadow_graph(fp32: graph_pb2.GraphDef, islands: graph_pb2.GraphDef):
    """(merged GraphDef, island roots): fp32 + shadow islands reading fp32 tensors."""
    fp32_ops = {n.name: n.op for n in fp32.node}
    island_nodes = {n.name: n for n in islands.node
                    if fp32_ops.get(n.name) not in (None, n.op) or n.name not in fp32_ops}
    roots = sorted(name for name in island_nodes if name in fp32_ops)
    inner = set(island_nodes) - set(roots)
    merged = graph_pb2.GraphDef()
    merged.CopyFrom(fp32)
    for node in islands.node:
        if node.name not in island_nodes:
            continue
        copy = merged.node.add()
        copy.CopyFrom(node)
        copy.name = PREFIX + node.name
        for i, inp in enumerate(copy.input):
            t = parse_tensor_name(inp)
            if t.node in inner:
                copy.input[i] = str(type(t)(PREFIX + t.node, t.port, t.control))
    return merged, roots


def island_errors(fp32: graph_pb2.GraphDef, islands: graph_pb2.GraphDef,
                  feeds: Iterable[Mapping[str, np.ndarray]]) -> Dict[str, IslandError]:
    """Own and accumulated error of every island (by root tensor node name)."""
    merged, roots = shadow_graph(fp32, islands)
    if not roots:
        return {}
    # Grappler off: it would merge a shadow island's summand QuantizeV2 with
    # another island's identical one, and the Sum conv would overwrite it in
    # place before that reader ran (intermittent segfaults, ResNet50 and tests)
    own = GraphRunner(merged, [canonical_tensor(r) for r in roots]
                      + [canonical_tensor(PREFIX + r) for r in roots], grappler=False)
    # the island graph as written too: Grappler took 8 s on ResNet50's before
    # the first run (0.5 s without), and fetching every island root leaves it
    # nothing to fuse there (values identical)
    acc = GraphRunner(islands, [canonical_tensor(r) for r in roots], grappler=False)
    n = len(roots)
    sums = np.zeros((3, n))  # ||fp32||^2, ||own diff||^2, ||acc diff||^2
    for feed in feeds:
        values = own(feed)
        upstream = acc(feed)
        for i in range(n):
            ref = values[i].astype(np.float64)
            sums[0, i] += np.sum(ref ** 2)
            sums[1, i] += np.sum((values[n + i].astype(np.float64) - ref) ** 2)
            sums[2, i] += np.sum((upstream[i].astype(np.float64) - ref) ** 2)
    own.close()
    acc.close()
    norm = np.sqrt(np.maximum(sums[0], 1e-30))
    return {r: IslandError(float(np.sqrt(sums[1, i]) / norm[i]),
                           float(np.sqrt(sums[2, i]) / norm[i])) for i, r in enumerate(roots)}


def worst_first(errors: Mapping[str, IslandError]) -> List[str]:
    """Island roots by decreasing own error (ties by name: deterministic)."""
    return sorted(errors, key=lambda r: (-errors[r].own, r))
