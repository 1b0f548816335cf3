"""mode=sync: bulk-synchronous distributed gradient descent.

One evaluation of the objective, top to bottom:

    engine.evaluate(theta): theta out -> kernel on every task's blocks -> sums back
        -> driver: divide by W, add the L2 penalty -> (F, grad) -> optimizer step

The engine (:mod:`sparkgd.engine`) decides where the blocks live and how a pass
reaches them; this module turns its passes into ``fun(theta) -> (F, grad)`` (and its
mini-batch estimate for ``sgd``), and maps the optimizer's variables to ``theta``.
The optimizer (:mod:`sparkgd.optim`) decides where to evaluate next.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import codecs, optim
from ..checkpoint import Replay, ReplayMismatch
from ..errors import SparkgdError

log = logging.getLogger("sparkgd")


class DistributedObjective:
    """The smooth part of F (loss + L2) and its gradient, one pass of ``engine`` each.

    ``penalty`` is a :class:`~sparkgd.penalties.Penalty`; ``codec`` (a
    :class:`~sparkgd.codecs.Codec`) how the tasks encode their partial gradients, and
    ``theta_codec`` how theta goes to them: lossy only for optimizers that take fixed
    steps (:func:`theta_codec_for`), since a line search must see F at the exact
    points it asks for.
    """

    def __init__(self, engine, loss, layout, penalty, codec=codecs.NONE,
                 theta_codec=codecs.NONE):
        self.engine = engine
        self.loss = loss
        self.layout = layout
        self.penalty = penalty
        self.codec = codec
        self.theta_codec = theta_codec
        self.evaluations = 0

    def smooth(self, theta, sample=None, exact=False):
        """``sample = (fraction, seed, iteration)``: a mini-batch estimate instead.
        ``exact``: theta goes to the tasks exactly whatever ``theta_codec`` (with a lossy
        one they compute at what they hold, theta up to its last encoded change)."""
        theta = np.asarray(theta, dtype=np.float64)
        total = self.engine.evaluate(theta, self.loss, self.layout, sample, self.codec,
                                     codecs.NONE if exact else self.theta_codec)
        self.evaluations += 1
        weight = total[1]
        if weight <= 0:  # an empty mini-batch: no loss information, only the penalty
            return self.penalty.add_l2(0.0, np.zeros(self.layout.size), theta)
        f = float(total[0] / weight)
        grad = total[2:] / weight
        return self.penalty.add_l2(f, grad, theta)

    __call__ = smooth

    def exact(self, theta):
        """The smooth part and its gradient with every sum sent exactly, whatever
        ``codec`` (gd's line search where a compressed gradient does not go downhill)."""
        theta = np.asarray(theta, dtype=np.float64)
        total = self.engine.evaluate(theta, self.loss, self.layout, None, codecs.NONE,
                                     codecs.NONE)
        self.evaluations += 1
        weight = total[1]
        if weight <= 0:
            return self.penalty.add_l2(0.0, np.zeros(self.layout.size), theta)
        return self.penalty.add_l2(float(total[0] / weight), total[2:] / weight, theta)


def theta_codec_for(codec, optimizer, step_size):
    """The codec theta travels with: ``codec`` when the optimizer takes fixed steps
    (gd with a stepSize, sgd, momentum, nesterov, adam) -- the tasks then compute at
    what they hold, theta up to the encoding of its last change, and what the encoding
    left out goes with the next change (error feedback on the driver) -- else exact
    (lbfgs and backtracking gd compare F at the points they ask for)."""
    fixed = optimizer in optim.STOCHASTIC or (optimizer == "gd" and step_size is not None)
    return codec if fixed else codecs.NONE


@dataclass
class FitResult:
    theta: np.ndarray
    objective_history: list
    iterations: int
    seconds: float
    bytes_communicated: int
    driver_bytes: int
    evaluations: int
    converged: bool
    message: str
    #: seconds from the fit's start at which each objectiveHistory entry was known
    objective_times: list = None
    #: bytes communicated (cumulative) when each entry was known
    bytes_history: list = None
    #: DP-SGD: what the steps taken spent (:meth:`sparkgd.modes.dp.Privacy.summary`)
    privacy: dict = None


class Diverged(SparkgdError):
    """The objective or its gradient stopped being finite: the fit cannot go on."""


def diverged(f, iteration, checkpoint=None, what="objective"):
    """-> the error for a non-finite ``what`` at ``iteration``."""
    kept = "" if checkpoint is None or not checkpoint.iteration else \
        f"; the checkpoint of iteration {checkpoint.iteration} in {checkpoint.dir} stays"
    return Diverged(f"the {what} is {f} at iteration {iteration}: the fit diverged (a step "
                    f"too large for this data? lower stepSize){kept}")


def fit(engine, problem, plan, keep):
    """mode=sync: the optimizer over one pass of ``engine`` per evaluation (see the
    package for the signature). A log kept in memory that does not replay (a lost
    task's blocks were built again from other data) starts the fit over; a user's
    checkpoint that does not is refused."""
    objective = DistributedObjective(
        engine, problem.loss, problem.layout, problem.penalty, codec=problem.codec,
        theta_codec=theta_codec_for(problem.codec, plan.optimizer, plan.step_size))

    def go():
        return run(objective, problem.x0, optimizer=plan.optimizer, max_iter=plan.max_iter,
                   tol=plan.tol, step_size=plan.step_size, precondition=problem.pre,
                   mini_batch_fraction=plan.mini_batch_fraction, seed=plan.seed,
                   **keep.saving())

    try:
        return go()
    except ReplayMismatch as e:
        if keep.resumed is not None or keep.recovery is None:
            raise               # the user's checkpoint: say so, change nothing
        log.warning("%s; the fit starts over", e)
        keep.recovery.replay = None
        keep.recovery.iteration, keep.recovery.times = 0, []
        return go()


def run(objective, x0, optimizer="lbfgs", max_iter=100, tol=1e-6, step_size=None,
        precondition=None, mini_batch_fraction=1.0, seed=0, checkpoint=None, resumed=None,
        recovery=None):
    """Minimize F = smooth + L1 from ``x0`` (in theta space) with ``objective``'s
    passes.

    ``precondition`` (a :class:`~sparkgd.stats.Preconditioner`, optional): the
    optimizer works on ``u`` with ``theta = T u``, where every feature looks
    standardized (and, for line-search methods, centred). The objective is the
    same function; only the space the optimizer steps in changes (Spark ML
    trains in a scaled space too).

    ``checkpoint`` (a :class:`~sparkgd.checkpoint.Checkpointer`): every evaluation is
    logged and saved every ``checkpointInterval`` iterations; ``resumed`` (its loaded
    meta): the logged evaluations answer the optimizer's first requests, so it reaches
    the checkpoint's iteration in the lost driver's exact state (:mod:`sparkgd.checkpoint`).
    A non-finite objective or gradient raises :class:`Diverged`, naming the iteration.
    ``recovery`` (a :class:`~sparkgd.checkpoint.Recovery`): the log is kept in memory
    too, and a later attempt of the same fit (a serving task was lost) replays it and
    goes on from the iteration the lost attempt had reached.
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
    private = getattr(objective, "plan", None) is not None   # DP-SGD: every step noised
    if optimizer in optim.STOCHASTIC and (mini_batch_fraction < 1.0 or private):
        to_theta = (lambda u: u) if pre is None else pre.to_theta

        def batch_fun(u, iteration):
            f, g = objective.smooth(to_theta(u), sample=(mini_batch_fraction, seed, iteration))
            return f, (g if pre is None else pre.grad_to_u(g))

    at = {"iteration": 0}

    def guarded(f_and_g):
        f, g = f_and_g
        if np.isfinite(f) and not np.all(np.isfinite(g)):
            raise diverged("not finite", at["iteration"] + 1, checkpoint, "gradient")
        return f, g

    exact_fun = None
    if objective.codec.lossy and hasattr(objective, "exact"):
        def exact_plain(u):
            f, g = objective.exact(u if pre is None else pre.to_theta(u))
            return f, (g if pre is None else pre.grad_to_u(g))

        exact_fun = (lambda u: guarded(exact_plain(u)))
    plain_fun, plain_batch = fun, batch_fun
    fun = (lambda u: guarded(plain_fun(u)))
    if plain_batch is not None:
        batch_fun = (lambda u, it: guarded(plain_batch(u, it)))
    replay = None
    done_before = int(resumed["iteration"]) if resumed else 0
    saved_times = list(resumed.get("objectiveTimes", [])) if resumed else []
    limit = None if recovery is None else recovery.MAX_MEMORY_BYTES
    if recovery is not None and recovery.replay is not None and recovery.replay.complete:
        replay = recovery.replay          # a later attempt: the whole log is in memory
        replay.rewind()
        done_before, saved_times = recovery.iteration, list(recovery.times)
        log.info("continuing from iteration %d after a lost serving task (replaying %d "
                 "evaluations)", done_before, len(replay.hashes))
    elif checkpoint is not None:
        replay = Replay(checkpoint.evaluations() if resumed else None, limit)
        if resumed:
            log.info("resumed from iteration %d (replaying %d evaluations from %s)",
                     done_before, len(replay.hashes), checkpoint.dir)
    elif recovery is not None:
        replay = Replay(None, limit)
    if recovery is not None:
        recovery.replay = replay
    if replay is not None:
        fun = replay.wrap(fun)
        if batch_fun is not None:
            batch_fun = replay.wrap(batch_fun, batch=True)
        if exact_fun is not None:
            exact_fun = replay.wrap(exact_fun)
    last = [start, objective.engine.bytes_communicated]
    times, hist, sent_hist = [], [], []
    origin = {"t": start, "base": 0.0}

    def progress(it, f, gnorm, step):
        now, sent = time.perf_counter(), objective.engine.bytes_communicated
        at["iteration"] = it
        if not np.isfinite(f):
            raise diverged(f, it, checkpoint)
        hist.append(float(f))
        sent_hist.append(int(sent))
        if it <= done_before and it <= len(saved_times):
            # replayed: when the lost driver had it; this run's time counts from here
            times.append(saved_times[it - 1])
            origin["t"], origin["base"] = now, saved_times[it - 1]
            last[0] = now
            return
        times.append(origin["base"] + now - origin["t"])
        if recovery is not None:   # the list itself: it only grows (a copy would be O(T^2))
            recovery.iteration, recovery.times = it, times
        log.info("iter %4d  objective %.12g  |grad| %.3e  step %.3e  %.2fs  %d bytes",
                 it, f, gnorm, step, now - last[0], sent - last[1])
        last[0], last[1] = now, sent
        if checkpoint is not None and checkpoint.due(it):
            checkpoint.save(it, hist, times, evaluations=replay.pending())

    res = optim.minimize(optimizer, fun, u0, max_iter=max_iter, tol=tol, step_size=step_size,
                         l1=l1_u, callback=progress, batch_fun=batch_fun,
                         inexact=objective.codec.lossy, exact_fun=exact_fun)
    theta = res.x if pre is None else pre.to_theta(res.x)
    history = [float(v) for v in res.history]
    if history and not np.isfinite(history[-1]):
        raise diverged(history[-1], res.iterations, checkpoint)
    if objective.theta_codec.lossy and history:
        # the tasks computed at what they held, not at theta: the last entry is F at
        # the returned coefficients, from one pass with theta sent exactly
        f, _ = objective.smooth(theta, exact=True)
        history[-1] = float(f) + optim.l1_value(l1, theta)
    seconds = origin["base"] + time.perf_counter() - origin["t"]
    times = (times + [seconds] * len(res.history))[:len(res.history)]
    sent = objective.engine.bytes_communicated
    sent_hist = (sent_hist + [sent] * len(res.history))[:len(res.history)]
    return FitResult(
        theta=theta, objective_history=history,
        iterations=res.iterations, seconds=seconds,
        bytes_communicated=objective.engine.bytes_communicated,
        driver_bytes=objective.engine.driver_bytes,
        evaluations=objective.evaluations, converged=res.converged, message=res.message,
        objective_times=[round(t, 6) for t in times], bytes_history=sent_hist)
