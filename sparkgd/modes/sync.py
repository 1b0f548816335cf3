"""mode=sync: bulk-synchronous distributed gradient descent.

One evaluation of the objective, top to bottom:

    send theta -> kernel on every partition's blocks -> aggregate
        -> driver: divide by W, add the L2 penalty -> (F, grad) -> optimizer step

Two engines carry theta out and the sums back:

* ``workers`` (default): long-lived serving tasks, one per partition of the
  block RDD, started once per fit (:mod:`sparkgd.workers`); theta goes out and
  each task's sums come back over a socket, the driver adds them in task order.
  No Spark job per pass.
* ``jobs``: one Spark job per pass -- broadcast theta, kernel per partition,
  ``treeAggregate`` (:class:`~sparkgd.comm.Aggregator`), destroy the broadcast.
  Used when the cluster cannot run every serving task at once.

Blocks of the ``served`` store (:class:`~sparkgd.blockstore.ServedBlocks`) are
held by the tasks that built them, which serve the passes the same way as
``workers``; the objective just talks to them.

The optimizer (``sparkgd.optim``) decides where to evaluate next; this module
turns cached blocks into ``fun(theta) -> (F, grad)`` (and its mini-batch
estimate for ``sgd``), and maps the optimizer's variables to ``theta``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import kernels, optim
from ..blockstore import local_cores
from ..comm import Aggregator
from ..workers import WorkersFailed, WorkerSession, WorkersUnavailable

ENGINES = ("workers", "jobs")  # (blocks of the served store bring their own: "served")

log = logging.getLogger("sparkgd")


def _kernel_task(index, blocks, bc, loss, layout, sample, threads):
    """Executor side: one partition's ``[loss_sum, weight_sum, grad...]``.

    Captures only the broadcast and small plain values (never an estimator).
    """
    if sample is not None:
        sample = sample + (index,)
    yield kernels.partition_sums(blocks, bc.value, loss, layout, sample=sample,
                                 threads=threads)


class DistributedObjective:
    """The smooth part of F (loss + L2) and its gradient over cached blocks.

    ``penalty`` is a :class:`~sparkgd.penalties.Penalty`; ``engine`` one of
    :data:`ENGINES`. Serving tasks are stopped by :meth:`close`, which the blocks
    also call when they are released.
    """

    def __init__(self, blocks, loss, layout, penalty, aggregator=None, engine="workers",
                 wait_seconds=30.0):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
        self.blocks = blocks
        self.loss = loss
        self.layout = layout
        self.penalty = penalty
        self.aggregator = aggregator or Aggregator()
        self.engine = engine
        self.wait_seconds = wait_seconds
        self.evaluations = 0
        self._session = None
        if blocks.store.kind == "served":
            self.engine = "served"   # the tasks that built the blocks serve them
            return
        slots = local_cores(blocks.rdd.context.master)
        if engine == "workers" and slots is not None and blocks.num_tasks > slots:
            # every serving task needs a slot at once; local mode says up front it has not
            self.engine = "jobs"
        blocks.on_release(self.close)

    def smooth(self, theta, sample=None):
        """``sample = (fraction, seed, iteration)``: a mini-batch estimate instead."""
        theta = np.asarray(theta, dtype=np.float64)
        total = None
        if self.engine == "served":
            job = self.blocks.store.job
            job.configure(self.loss, self.layout)   # sent once (again if another
            total = self.aggregator.sum_parts(job.evaluate(theta, sample))  # objective changed it)
        elif self.engine == "workers":
            try:
                total = self.blocks.run(lambda rdd: self._served(rdd, theta, sample),
                                        serving=True)
            except WorkersUnavailable as e:
                log.warning("sparkgd: %s; falling back to one Spark job per pass", e)
                self.close()
                self.engine = "jobs"
        if total is None:
            total = self._one_job(theta, sample)
        self.evaluations += 1
        weight = total[1]
        if weight <= 0:  # an empty mini-batch: no loss information, only the penalty
            return self.penalty.add_l2(0.0, np.zeros(self.layout.size), theta)
        f = float(total[0] / weight)
        grad = total[2:] / weight
        return self.penalty.add_l2(f, grad, theta)

    __call__ = smooth

    def _served(self, rdd, theta, sample):
        """One pass through the serving tasks over ``rdd`` (started on first use,
        restarted when the store hands over a rebuilt RDD)."""
        session = self._session
        if session is None or session.rdd is not rdd:
            self.close()
            session = self._session = WorkerSession(
                rdd, self.loss, self.layout, self.blocks.threads_per_task, self.wait_seconds,
                expected=self.blocks.task_keys)
        try:
            parts = session.evaluate(theta, sample)
        except WorkersFailed:
            self.close()
            raise
        return self.aggregator.sum_parts(parts)

    def close(self):
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def _one_job(self, theta, sample):
        bc = self.blocks.rdd.context.broadcast(theta)
        loss, layout, aggregator = self.loss, self.layout, self.aggregator
        threads = self.blocks.threads_per_task

        def job(rdd):
            partials = rdd.mapPartitionsWithIndex(
                lambda i, it: _kernel_task(i, it, bc, loss, layout, sample, threads))
            return aggregator.sum(partials, 2 + layout.size)

        try:
            return self.blocks.run(job)
        finally:
            bc.destroy()


@dataclass
class FitResult:
    theta: np.ndarray
    objective_history: list
    iterations: int
    seconds: float
    bytes_communicated: int
    evaluations: int
    converged: bool
    message: str


def fit(objective, x0, optimizer="lbfgs", max_iter=100, tol=1e-6, step_size=None,
        precondition=None, mini_batch_fraction=1.0, seed=0):
    """Minimize F = smooth + L1 from ``x0`` (in theta space).

    ``precondition`` (a :class:`~sparkgd.stats.Preconditioner`, optional): the
    optimizer works on ``u`` with ``theta = T u``, where every feature looks
    standardized (and, for line-search methods, centred). The objective is the
    same function; only the space the optimizer steps in changes (Spark ML
    trains in a scaled space too).
    """
    start = time.perf_counter()
    pre = precondition
    l1 = objective.penalty.l1_weights if objective.penalty.has_l1 else None
    if pre is None:
        fun, u0, l1_u = objective, np.asarray(x0, dtype=np.float64), l1
    else:
        u0 = pre.from_theta(np.asarray(x0, dtype=np.float64))
        l1_u = None if l1 is None else pre.l1_to_u(l1)

        def fun(u):
            f, g = objective(pre.to_theta(u))
            return f, pre.grad_to_u(g)

    batch_fun = None
    if optimizer in optim.STOCHASTIC and mini_batch_fraction < 1.0:
        to_theta = (lambda u: u) if pre is None else pre.to_theta

        def batch_fun(u, iteration):
            f, g = objective.smooth(to_theta(u), sample=(mini_batch_fraction, seed, iteration))
            return f, (g if pre is None else pre.grad_to_u(g))

    last = [start]

    def progress(it, f, gnorm, step):
        now = time.perf_counter()
        log.info("iter %4d  objective %.12g  |grad| %.3e  step %.3e  %.2fs",
                 it, f, gnorm, step, now - last[0])
        last[0] = now

    res = optim.minimize(optimizer, fun, u0, max_iter=max_iter, tol=tol, step_size=step_size,
                         l1=l1_u, callback=progress, batch_fun=batch_fun)
    theta = res.x if pre is None else pre.to_theta(res.x)
    return FitResult(
        theta=theta, objective_history=[float(v) for v in res.history],
        iterations=res.iterations, seconds=time.perf_counter() - start,
        bytes_communicated=objective.aggregator.bytes_communicated,
        evaluations=objective.evaluations, converged=res.converged, message=res.message)
