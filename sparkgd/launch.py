"""Where a fit's coordinator runs, and how its outcome comes back.

* A classic session (a ``SparkContext`` in this process): the coordinator runs here,
  in the driver, over an engine whose serving tasks connect to this process's hub
  (:func:`sparkgd.engine.run`, which builds the blocks again and goes on when a
  serving task is lost).
* A Spark Connect session (no ``SparkContext``, no RDDs, no py4j): the coordinator
  runs inside the cluster, in one task of the fit's own job, and the outcome comes
  back as that job's output rows (:mod:`sparkgd.connect`).

Either way it is :func:`sparkgd.coordinator.train` on a plain
:class:`~sparkgd.coordinator.Plan`; only where it starts differs.
"""
from __future__ import annotations

import logging

from . import coordinator, engine, work

log = logging.getLogger("sparkgd")


def is_connect(session):
    """Whether ``session`` is a Spark Connect session."""
    module = type(session).__module__ or ""
    return module.startswith("pyspark.sql.connect")


def fit(dataset, plan):
    """Run ``plan`` on ``dataset`` -> :class:`~sparkgd.coordinator.Outcome`."""
    if is_connect(dataset.sparkSession):
        from . import connect

        return connect.fit(dataset, plan)
    if plan.mode == "async" and plan.topology != "star":
        log.info("mode async: tasks push to the server on the driver (topology star; "
                 "%s applies to modes sync and local)", plan.topology)
    attempts = coordinator.Attempts()
    outcome = engine.run(dataset, plan.spec,
                         lambda eng: coordinator.train(plan, eng, attempts),
                         source=plan.source, dtype=plan.dtype,
                         aggregation_depth=plan.aggregation_depth,
                         topology=plan.engine_topology, parse_work=work.parse)
    attempts.done()
    return outcome


def fit_many(dataset, plans):
    """Run ``plans`` -- param maps that read ``dataset`` the same way
    (:func:`sparkgd.multi.groups`) -- over one build of its blocks, their passes shared
    (:mod:`sparkgd.multi`) -> their outcomes, in order. A classic session only (a Spark
    Connect session fits each map on its own, :func:`fit`)."""
    plan = plans[0]
    attempts = [coordinator.Attempts() for _ in plans]
    outcomes = engine.run(dataset, plan.spec,
                          lambda eng: coordinator.train_many(plans, eng, attempts),
                          source=plan.source, dtype=plan.dtype,
                          aggregation_depth=plan.aggregation_depth,
                          topology=plan.engine_topology, parse_work=work.parse)
    for a in attempts:
        a.done()
    return outcomes
