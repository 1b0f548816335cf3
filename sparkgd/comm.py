"""Communication: per-partition partial results -> the driver's total, and the tally
of what travelled.

``bytesCommunicated`` counts the payload bytes of every link: theta out to the tasks,
their results, and everything between tasks (a tree's intermediate sums, a ring's
chunks); ``driverBytes`` those into and out of the driver alone. Serving tasks report
what they moved (:mod:`sparkgd.engine.collective`); for one Spark job per pass this
module runs the reduction itself: ``tree`` as ``treeAggregate``, ``star`` as a flat
reduce (every partition's vector to the driver, added in partition order). ``ring``
has no Spark-job form: there it is ``tree`` (the engine says so).
"""
from __future__ import annotations

import math

import numpy as np

TOPOLOGIES = ("tree", "star", "ring")


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
        if self.topology == "star":
            parts = partials.collect()
            total = np.zeros(size)
            for part in parts:            # partition order
                total += part
            self.count_driver(8 * size * len(parts))
            return total
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

    def count_links(self, nbytes):
        """Bytes between tasks (they count on ``bytesCommunicated`` only)."""
        self.bytes_communicated += int(nbytes)

    @staticmethod
    def sum_parts(parts):
        """Partial results that reached the driver (one per serving task with
        ``star``, the total with ``tree`` and ``ring``), added in task order."""
        total = np.array(parts[0], dtype=np.float64)
        for part in parts[1:]:
            total += part
        return total
