"""mode=sync: bulk-synchronous distributed gradient descent.

One evaluation of the objective, top to bottom:

    broadcast theta -> kernel on every partition's blocks -> aggregate (tree)
        -> driver: divide by W, add the L2 penalty -> (F, grad) -> optimizer step
        -> release the broadcast

The optimizer (``sparkgd.optim``) decides where to evaluate next; this module
only turns cached blocks into ``fun(theta) -> (F, grad)``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import kernels, optim, penalties
from ..comm import Aggregator

log = logging.getLogger("sparkgd")


def _kernel_task(blocks, bc, loss, layout):
    """Executor side: one partition's ``[loss_sum, weight_sum, grad...]``.

    Captures only the broadcast and small plain objects (never an estimator).
    """
    yield kernels.partition_sums(blocks, bc.value, loss, layout)


class DistributedObjective:
    """``F(theta)`` and its gradient over cached blocks, one Spark job a call."""

    def __init__(self, blocks, loss, layout, reg_param=0.0, elastic_net_param=0.0,
                 aggregator=None):
        self.blocks = blocks
        self.loss = loss
        self.layout = layout
        self.l2 = penalties.l2_strength(reg_param, elastic_net_param)
        self.aggregator = aggregator or Aggregator()
        self.evaluations = 0

    def smooth(self, theta):
        """(1/W) sum_i w_i loss_i + L2 term, and its gradient."""
        rdd = self.blocks.rdd
        bc = rdd.context.broadcast(np.asarray(theta, dtype=np.float64))
        loss, layout = self.loss, self.layout
        try:
            partials = rdd.mapPartitions(lambda it: _kernel_task(it, bc, loss, layout))
            total = self.aggregator.sum(partials, 2 + layout.size)
        finally:
            bc.destroy()
        self.evaluations += 1
        weight = total[1]
        f = float(total[0] / weight)
        grad = total[2:] / weight
        return penalties.add_l2(f, grad, theta, layout.n_coef, self.l2)

    __call__ = smooth


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
        precondition=None):
    """Minimize a :class:`DistributedObjective` from ``x0``.

    ``precondition`` (a :class:`~sparkgd.stats.Preconditioner`, optional): the
    optimizer works on ``u`` with ``theta = T u``, where every feature looks
    centred and unit-variance. The objective is the same function; only its
    conditioning changes (Spark ML trains in a scaled space too).
    """
    start = time.perf_counter()
    fun = objective
    pre = precondition
    if pre is not None:
        x0 = pre.from_theta(np.asarray(x0, dtype=np.float64))

        def fun(u):
            f, g = objective(pre.to_theta(u))
            return f, pre.grad_to_u(g)

    last = [start]

    def progress(it, f, gnorm, step):
        now = time.perf_counter()
        log.info("iter %4d  objective %.12g  |grad| %.3e  step %.3e  %.2fs",
                 it, f, gnorm, step, now - last[0])
        last[0] = now

    res = optim.minimize(optimizer, fun, x0, max_iter=max_iter, tol=tol,
                         step_size=step_size, callback=progress)
    return FitResult(
        theta=res.x if pre is None else pre.to_theta(res.x), objective_history=[float(v) for v in res.history],
        iterations=res.iterations, seconds=time.perf_counter() - start,
        bytes_communicated=objective.aggregator.bytes_communicated,
        evaluations=objective.evaluations, converged=res.converged, message=res.message)
