"""mode=local: local SGD (model averaging).

One round, top to bottom:

    theta out -> every task: ``localSteps`` steps of the optimizer on mini-batches of
        its own blocks, from theta -> [loss_sum at theta, W_i, W_i (theta_i - theta)]
        -> the topology's all-reduce (the same pass as sync's) -> driver:
        theta + sum_i W_i (theta_i - theta) / W

so the models are averaged weighted by rows, and the first two sums give F at the
round's starting point, the previous round's average, for free. What travels up is
the weighted change, not the model, so a lossy codec compresses something that
shrinks as the fit converges (with error feedback on every task).

Each round starts the optimizer afresh from the average, with one exception: sgd's
step ``stepSize / sqrt(t)`` counts ``t`` over every local step of the fit, so its
schedule is the one ``localSteps`` times as many sync iterations would take.
Momentum and Adam restart their moments each round (a task keeps nothing between
rounds, so a retried task needs nothing back). L2 is in every local gradient; L1 is a
proximal step after every local step.

:class:`Work` is what the driver tells the tasks (JSON, the feature scale as raw
float64 in base64: nothing to unpickle); :func:`round_sums` is what a task (or one
Spark job per pass) computes. :func:`fit` is the driver's loop.
"""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import kernels, optim
from ..optim import first_order
from ..optim.base import converged
from ..penalties import Penalty, soft_threshold
from ..stats import Preconditioner
from .sync import FitResult, diverged

log = logging.getLogger("sparkgd")


@dataclass(frozen=True)
class Work:
    """What a local round computes: the optimizer, its step, the steps per round, the
    mini-batch fraction and seed, and the penalty (with ``std`` the scale of
    ``standardization``: the penalty applies to scaled coefficients and the steps are
    taken in the standardized space, as a sync fit with a fixed step does)."""

    optimizer: str
    step_size: float | None
    local_steps: int
    fraction: float
    seed: int
    reg_param: float = 0.0
    elastic_net_param: float = 0.0
    std: np.ndarray | None = None

    def to_config(self):
        std = None if self.std is None else base64.b64encode(
            np.ascontiguousarray(self.std, dtype="<f8").tobytes()).decode("ascii")
        return {"mode": "local", "optimizer": self.optimizer, "step_size": self.step_size,
                "local_steps": int(self.local_steps), "fraction": float(self.fraction),
                "seed": int(self.seed), "reg_param": float(self.reg_param),
                "elastic_net_param": float(self.elastic_net_param), "std": std}

    @classmethod
    def from_config(cls, c, d):
        """``d``: the number of features (the scale must have exactly that many)."""
        if c.get("mode") != "local" or c.get("optimizer") not in optim.STOCHASTIC:
            raise ValueError(f"not a local round: {c.get('mode')!r}, {c.get('optimizer')!r}")
        std = c.get("std")
        if std is not None:
            std = np.frombuffer(base64.b64decode(std, validate=True), dtype="<f8")
            if std.size != d:
                raise ValueError(f"a feature scale of {std.size} values for {d} features")
        step = c.get("step_size")
        return cls(c["optimizer"], None if step is None else float(step),
                   int(c["local_steps"]), float(c["fraction"]), int(c["seed"]),
                   float(c["reg_param"]), float(c["elastic_net_param"]), std)

    def space(self, layout):
        """-> (penalty, preconditioner or None): as the sync fit builds them."""
        penalty = Penalty(layout, self.reg_param, self.elastic_net_param,
                          feature_scale=self.std)
        pre = None if self.std is None else Preconditioner(
            np.zeros(layout.d), self.std, layout, center=False, constant_scale=0.0)
        return penalty, pre


def round_sums(blocks, theta, loss, layout, work, round_no, index, threads=1):
    """One task's part of local round ``round_no`` (from 1):
    ``[loss_sum at theta (all its rows), W_i, W_i (theta_i - theta)]``.

    Local step ``s`` is step ``t = (round_no - 1) localSteps + s`` of the fit: it draws
    the mini-batch ``(seed, t, index)`` (as sync's iteration ``t`` would) and, for sgd,
    takes the step ``stepSize / sqrt(t + 1)``."""
    theta = np.asarray(theta, dtype=np.float64)
    penalty, pre = work.space(layout)
    opt = first_order.make(work.optimizer, work.step_size)
    u = theta.copy() if pre is None else pre.from_theta(theta)
    l1 = penalty.l1_weights if penalty.has_l1 else None
    if l1 is not None and pre is not None:
        l1 = pre.l1_to_u(l1)
    first = (round_no - 1) * work.local_steps
    state = opt.init(u)
    if work.optimizer == "sgd":
        state = first_order.SgdState(first)
    start = None
    for s in range(work.local_steps):
        t = first + s
        sample = None if work.fraction >= 1.0 else (work.fraction, work.seed, t, index)
        x = u if pre is None else pre.to_theta(u)
        sums = kernels.partition_sums(blocks, x, loss, layout, sample=sample,
                                      threads=threads)
        if s == 0 and sample is None:
            start = sums[:2].copy()
        # an empty mini-batch: the penalty's gradient alone, as sync steps then
        g = sums[2:] / sums[1] if sums[1] > 0 else np.zeros(layout.size)
        g += penalty.l2_weights * x
        delta, state, step = opt.update(g if pre is None else pre.grad_to_u(g), state)
        u = u + delta
        if l1 is not None:
            u = soft_threshold(u, step * l1)
    if start is None:
        start = kernels.partition_loss(blocks, theta, loss, layout)
    end = u if pre is None else pre.to_theta(u)
    out = np.empty(2 + layout.size)
    out[:2] = start
    out[2:] = start[1] * (end - theta)
    return out


def fit(engine, problem, plan, keep):
    """``plan.max_iter`` rounds of local SGD from ``problem.x0`` (theta space; see the
    package for the signature); stops early when F at two successive averages changes
    by at most ``plan.tol`` (relatively).

    ``objectiveHistory``: F at each round's average (entry r is F after round r; the
    last one comes from one more pass at the returned coefficients)."""
    from .. import codecs

    work = Work(plan.optimizer, plan.step_size, plan.local_steps, plan.mini_batch_fraction,
                plan.seed, plan.reg_param, plan.elastic_net_param, problem.scale)
    loss, layout, penalty, codec = problem.loss, problem.layout, problem.penalty, problem.codec
    max_iter, tol = plan.max_iter, plan.tol
    checkpoint, resumed, recovery = keep.checkpoint, keep.resumed, keep.recovery
    start = time.perf_counter()
    theta = np.asarray(problem.x0, dtype=np.float64).copy()
    l1 = penalty.l1_weights if penalty.has_l1 else None
    config = work.to_config()
    history, times, evaluations, sent_hist = [], [], 0, []
    message, done, rounds = "maxIter reached", False, 0
    last = [start, engine.bytes_communicated]
    f_prev, first, base = None, 1, 0.0
    state = None
    if recovery is not None and recovery.snapshot is not None:
        resumed, state = recovery.snapshot.taken()
        log.info("continuing from iteration %d after a lost serving task",
                 int(resumed["iteration"]))
    elif resumed:
        state = checkpoint.state()
    if resumed:
        rounds = first = int(resumed["iteration"])
        first += 1
        theta = np.array(state["theta"], dtype=np.float64)
        history = list(resumed["objectiveHistory"]) + [float("nan")]
        times = list(resumed["objectiveTimes"]) + [0.0]
        f_prev = resumed.get("f_prev")
        base = times[-2] if len(times) > 1 else 0.0
        if recovery is None or recovery.snapshot is None:
            log.info("resumed from iteration %d (%s)", rounds, checkpoint.dir)
    for r in range(first, int(max_iter) + 1):
        total = engine.evaluate(theta, loss, layout, (1.0, work.seed, r), codec, work=config)
        evaluations += 1
        weight = total[1]
        if weight <= 0:
            raise RuntimeError("a local round over no rows")   # pragma: no cover
        f_start = _objective(total, penalty, l1, theta)  # F at the last average
        if not np.isfinite(f_start):
            raise diverged(f_start, r - 1, checkpoint)
        if history:
            history[-1] = f_start   # (the entry for round r - 1 was a placeholder)
            times[-1] = base + time.perf_counter() - start
        theta = theta + total[2:] / weight
        rounds = r
        now, sent = time.perf_counter(), engine.bytes_communicated
        sent_hist.append(int(sent))
        log.info("round %4d  objective %.12g (at its start)  %.2fs  %d bytes",
                 r, f_start, now - last[0], sent - last[1])
        last[0], last[1] = now, sent
        if f_prev is not None and converged(f_prev, f_start, tol):
            # F stopped changing between the averages of rounds r - 2 and r - 1: the
            # round just taken is kept (it can only be as good), and F there is known
            # after one more pass
            message, done = "relative change of the objective <= tol", True
            history.append(float("nan"))
            times.append(0.0)
            break
        f_prev = f_start
        history.append(float("nan"))
        times.append(0.0)
        if checkpoint is not None and checkpoint.due(r):
            # after round r: its model; F there comes with round r + 1's pass
            checkpoint.save(r, history[:-1], times[:-1], state={"theta": theta},
                            extra={"f_prev": f_prev})
        if recovery is not None:
            # references, not copies (theta is a new array each round; entries before
            # r never change again): sliced only if a later attempt needs them
            recovery.snapshot = _Lazy(r, history, times, f_prev, theta)
    final = engine.evaluate(theta, loss, layout, None, codecs.NONE)
    evaluations += 1
    f = _objective(final, penalty, l1, theta)
    if not np.isfinite(f):
        raise diverged(f, rounds, checkpoint)
    seconds = base + time.perf_counter() - start
    if history:
        history[-1], times[-1] = f, seconds
    else:
        history.append(f)
        times.append(seconds)
    return FitResult(
        theta=theta, objective_history=[float(v) for v in history], iterations=rounds,
        seconds=seconds, bytes_communicated=engine.bytes_communicated,
        driver_bytes=engine.driver_bytes, evaluations=evaluations, converged=done,
        message=message, objective_times=[round(t, 6) for t in times],
        bytes_history=(sent_hist + [engine.bytes_communicated] * len(history))[:len(history)])


class _Lazy:
    """A round's model for :class:`~sparkgd.checkpoint.Recovery`, kept by reference:
    ``taken()`` -> (meta, state) as a checkpoint would hold them."""

    def __init__(self, r, history, times, f_prev, theta):
        self.r, self.history, self.times = r, history, times
        self.f_prev, self.theta = f_prev, theta

    def taken(self):
        n = self.r - 1
        return ({"iteration": self.r, "objectiveHistory": self.history[:n],
                 "objectiveTimes": self.times[:n], "f_prev": self.f_prev},
                {"theta": self.theta})


def _objective(total, penalty, l1, theta):
    """F from a pass's first two sums: loss / W + L2 + L1."""
    f = float(total[0] / total[1]) if total[1] > 0 else 0.0
    f += 0.5 * float((penalty.l2_weights * theta) @ theta)
    if l1 is not None:
        f += float(l1 @ np.abs(theta))
    return f
