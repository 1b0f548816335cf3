"""Communication: per-partition partial results -> the driver's total.

One place owns how partial results travel and how many bytes they cost.
``bytesCommunicated`` counts every vector sent: theta out to each task, the
per-partition results, and the intermediate sums of a tree; ``driverBytes`` those
into and out of the driver alone.
"""
from __future__ import annotations

import math

import numpy as np

TOPOLOGIES = ("tree",)


def _add(a, b):
    a += b
    return a


def tree_levels(num_partitions, depth):
    """Partition counts at each level of ``RDD.treeAggregate``, leaves first.

    Mirrors Spark's rule: with ``scale = max(ceil(P ** (1/depth)), 2)``, another
    level is added while ``P > scale + P / scale``. Each partition at each
    level sends one vector (the last level sends to the driver).
    """
    levels = [num_partitions]
    p = float(num_partitions)
    scale = max(int(math.ceil(p ** (1.0 / depth))), 2)
    while p > scale + p / scale:
        p /= scale
        levels.append(int(p))
    return levels


class Aggregator:
    """Sums one flat float64 vector per partition into the driver's total."""

    def __init__(self, topology="tree", depth=2):
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; expected one of {TOPOLOGIES}")
        self.topology = topology
        self.depth = int(depth)
        self.bytes_communicated = 0     # every link
        self.driver_bytes = 0           # the driver's links alone (in and out)

    def sum(self, partials, size):
        """``partials``: an RDD with one float64 vector of ``size`` per partition."""
        zero = np.zeros(size)
        total = partials.treeAggregate(zero, _add, _add, depth=self.depth)
        levels = tree_levels(partials.getNumPartitions(), self.depth)
        self.bytes_communicated += 8 * size * sum(levels)
        self.driver_bytes += 8 * size * levels[-1]     # the last level reaches the driver
        return total

    def count_out(self, size, receivers):
        """Theta (``size`` float64) sent from the driver to ``receivers`` tasks."""
        self.count_driver(8 * int(size) * int(receivers))

    def count_driver(self, nbytes):
        """Bytes on a link of the driver's (they count on both tallies)."""
        self.bytes_communicated += int(nbytes)
        self.driver_bytes += int(nbytes)

    def sum_parts(self, parts, nbytes=None):
        """Partial results that reached the driver directly (one per serving task,
        :mod:`sparkgd.workers`), added in task order."""
        total = np.zeros_like(parts[0])
        for part in parts:
            total += part
        self.count_driver(sum(8 * p.size for p in parts) if nbytes is None
                          else int(nbytes) * len(parts))   # what each took on the wire
        return total
