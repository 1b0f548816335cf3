"""mode=async: a parameter server on the driver, with stale synchronous parallel (SSP).

    task i: pull theta -> kernel on its blocks (or a mini-batch) -> push its sums
    server: apply each push as it arrives: u -= lr_c * (its share of the gradient)
    a task more than ``staleness`` clocks ahead of the slowest waits for it

The hub runs the protocol (:meth:`sparkgd.engine.hub.Hub.run_async`: who is asked
when, which pushes count); :class:`Server` is the arithmetic, and knows nothing of
sockets. A task's clock is the number of its pushes applied.

**The update.** A push from task i at clock c, computed at the theta it pulled, over
the rows it drew, carries ``[loss_sum, weight_sum, grad_sum]``. The server steps
``u -= lr_c T^T g`` with sgd's ``lr_c = stepSize / sqrt(c)`` and g the push's share of
the full gradient: ``(W_i / W) (grad_sum / weight_sum + l2 theta)`` -- the task's mean
over what it drew, weighed by its share of the rows' weight (W_i from the blocks'
facts; where that is not known per task, the Horvitz-Thompson ``grad_sum / (q_i W)``).
When every task has pushed c times the L1 proximal step of clock c is taken once.

**Staleness 0 is sync.** Every task computes clock c at the same theta, so the server
keeps a clock's pushes until it is whole and then steps once, exactly as sync sgd does
(the summed gradient over the summed weight of the rows drawn, the penalty's gradient
added; a task retried mid-clock is asked at that same theta). Same model, to rounding,
for full batches and mini-batches alike.

Why on the driver, not sharded across the tasks: a linear model's theta is one
vector of d values that every push touches whole (the gradient of a dense block is
dense), so a sharded server would split each push into P pieces and gain nothing
but messages; the hub already authenticates every task and counts every byte. A push
costs the driver ``8 (d + 2)`` bytes in and ``8 d`` out, as a star pass does.

**Slow tasks.** SSP alone does not help a task that is always slower: the others
wait for it ``staleness`` clocks later instead of at once, and the fit goes at its
pace. With ``staleness >= 1`` the server also balances the work: it measures each
task's seconds per unit of work, and asks one slower than ``SLOW`` times the median
(by ``MIN_GAIN`` seconds at least) for a lighter push: the share ``median / own`` of
its row chunks (at least ``MIN_FRACTION``; :func:`sparkgd.kernels.keep_chunks`, views,
nothing copied). Such a push is divided by its rows' probability (Horvitz-Thompson), so
it stays unbiased. Every task then pushes at about the same rate and nobody waits.
With ``staleness = 0`` (bulk-synchronous, sync's result) every task computes its full
share.

**Redone clocks.** A run cut short (a fallback to one Spark job per pass, the file
store rebuilding its blocks) starts again from the last clock every task completed:
what later pushes moved is undone first (:meth:`Server.abandon_partial`).

**objectiveHistory.** Entry k (k >= 1) is the sum of what the pushes of clock k + 1
report: each task's loss on its rows, at the theta it pulled, plus its share of the
penalty. With staleness 0 that is F at the model after clock k, as sync records; the
last entry is F on all the data at the returned coefficients (one more pass).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..optim.base import converged
from ..penalties import soft_threshold
from .sync import FitResult, diverged

log = logging.getLogger("sparkgd")

#: The smallest mini-batch fraction the balancing gives a slow task.
MIN_FRACTION = 0.05
#: A task this many times slower than the median is given less work (below it, the
#: differences are noise: a lighter push would not come back sooner).
SLOW = 1.25
#: ... and by this many seconds a push at least (below, a push's time is mostly its
#: round trip and timing noise, not work a lighter push would save).
MIN_GAIN = 0.005
#: Weight of the newest measurement in a task's running seconds-per-work estimate.
SPEED_WEIGHT = 0.3


class Server:
    """The parameter server's state and arithmetic (pure NumPy; no Spark, no sockets).

    ``u0``: the optimizer's variables (theta, or the standardized space's ``u`` when
    ``pre`` is given); ``weight``: W, the total weight of the rows; ``penalty``: L2
    and L1 weights on theta; ``step_size``, ``fraction``, ``seed``: sgd's."""

    def __init__(self, u0, weight, penalty, pre=None, step_size=1.0, fraction=1.0, seed=0,
                 tol=1e-6, staleness=2, task_weights=None):
        self.u = np.array(u0, dtype=np.float64)
        self.weight = float(weight)
        self.penalty, self.pre = penalty, pre
        l1 = penalty.l1_weights if penalty.has_l1 else None
        self.l1 = None if l1 is None else (l1 if pre is None else pre.l1_to_u(l1))
        self.step_size, self.fraction, self.seed = float(step_size), float(fraction), int(seed)
        self.tol = float(tol)
        # staleness 0 is bulk-synchronous: a clock's pushes are applied together, once
        # whole (nobody reads mid-clock), as sync's step; otherwise each as it arrives,
        # and slow tasks get less work (see the module)
        self.bulk = staleness == 0
        self.balance = not self.bulk
        self.task_weights = None if task_weights is None else \
            [float(v) for v in task_weights]
        self.buffered = {}            # bulk: clock -> the sum of its pushes so far
        self.applied = {}             # clock -> what its pushes moved u by (undone if redone)
        self.clock = 0                # every task has pushed this many times
        self.reported = {}            # clock -> F's share reported by its pushes so far
        self.history = []             # entry k: F after clock k (see the module)
        self.times = []               # when each entry was known (perf_counter)
        self.snapshots = {0: self.theta()}   # clock -> theta once every task pushed it
        self.stopped_at = None        # the clock whose model the fit returns, on tol
        self.pushes = 0
        self.speed = {}               # task -> seconds per unit of work (running)
        self.checkpoint = None        # a Checkpointer: the model every interval clocks
        self.recovery = None          # a Recovery: the model at every clock, in memory
        self.started = time.perf_counter()
        self.asked = {}               # task -> the fraction it was last asked for

    def lr(self, clock):
        return self.step_size / np.sqrt(clock)

    def theta(self):
        return self.u.copy() if self.pre is None else self.pre.to_theta(self.u)

    def sample(self, i, clock):
        """(fraction, seed, iteration) for task ``i``'s push ``clock``: sync's mini-batch
        of iteration ``clock - 1``; when balancing, a task slower than ``SLOW`` times the
        median is asked for the share ``median / own`` of its row chunks as well (the
        fraction sent is the product; the task knows the user's part)."""
        q = self.fraction
        if self.balance and i is not None and i in self.speed and len(self.speed) > 1:
            typical = float(np.median(list(self.speed.values())))
            if self.speed[i] > SLOW * typical and self.speed[i] - typical > MIN_GAIN:
                q *= float(np.clip(typical / self.speed[i], MIN_FRACTION, 1.0))
        self.asked[i] = q
        return q, self.seed, clock - 1

    def push(self, i, clock, sums, theta_read, seconds):
        """Apply one task's push for ``clock``, computed at ``theta_read`` (bulk: keep
        it until the clock is whole)."""
        self.pushes += 1
        if self.bulk:
            held = self.buffered.get(clock)
            self.buffered[clock] = sums.copy() if held is None else held + sums
            return
        q = self.asked.get(i, self.fraction)
        if self.task_weights is not None and i is not None and q == self.fraction:
            share = self.task_weights[i] / self.weight        # W_i / W
            # the task's mean over the rows it drew, weighed by its share of W
            scale = share / sums[1] if sums[1] > 0 else 0.0
        else:
            # a lighter push (some of its row chunks: possibly none), or the task's weight
            # unknown: the Horvitz-Thompson estimate of its sums, unbiased either way
            scale = 1.0 / (q * self.weight)
            share = sums[1] * scale if self.task_weights is None or i is None else \
                self.task_weights[i] / self.weight
        g = sums[2:] * scale + share * (self.penalty.l2_weights * theta_read)
        if self.pre is not None:
            g = self.pre.grad_to_u(g)
        step = self.lr(clock) * g
        self.u -= step
        done = self.applied.get(clock)
        self.applied[clock] = step if done is None else done + step
        f = sums[0] * scale + share * self._penalty_value(theta_read)
        self.reported[clock] = self.reported.get(clock, 0.0) + float(f)
        if seconds is not None and i is not None and q > 0 and np.isfinite(seconds):
            per_work = max(float(seconds), 1e-9) / q
            old = self.speed.get(i)
            self.speed[i] = per_work if old is None else \
                (1 - SPEED_WEIGHT) * old + SPEED_WEIGHT * per_work

    def clock_done(self, c):
        """Every task has pushed ``c`` times: clock c's proximal step; F after clock
        c - 1 is complete. -> True when the fit should stop (tol)."""
        if self.bulk:
            self._bulk_step(c)
        self.applied.pop(c, None)
        if self.l1 is not None:
            self.u = soft_threshold(self.u, self.lr(c) * self.l1)
        self.clock = c
        self.snapshots[c] = self.theta()
        for old in [k for k in self.snapshots if k < c - 1]:
            del self.snapshots[old]
        if c < 2:
            return self._checkpoint(c)
        f_prev, f = self.reported.pop(c - 1, np.nan), self.reported.get(c, np.nan)
        self.history.append(f)
        self.times.append(time.perf_counter())
        log.info("clock %4d  objective %.12g  (pushes at clock %d)", c - 1, f, c)
        if not np.isfinite(f):
            self.stopped_at = c - 1
            return True
        if converged(f_prev, f, self.tol):
            self.stopped_at = c - 1
            return True
        return self._checkpoint(c)

    def _checkpoint(self, c):
        saving = self.checkpoint is not None and self.checkpoint.due(c)
        if not saving and self.recovery is None:
            return False
        u = self.u.copy()
        for k, moved in self.applied.items():    # later clocks' pushes, undone
            if k > c:
                u += moved
        snapshot = _Snapshot(c, self.history, self.times, self.started,
                             self.reported.get(c), u)
        if saving:
            meta, state = snapshot.taken()
            self.checkpoint.save(c, meta["objectiveHistory"], meta["objectiveTimes"],
                                 state=state, extra={"f_prev": meta["f_prev"]})
        if self.recovery is not None:
            self.recovery.snapshot = snapshot
        return False

    def restore(self, meta, state, started):
        """Go on from a checkpoint of clock K (its model; the pushes of clock K + 1
        start afresh)."""
        k = int(meta["iteration"])
        self.u = np.array(state["u"], dtype=np.float64)
        self.clock = k
        self.history = list(meta["objectiveHistory"])
        saved = list(meta["objectiveTimes"])
        self.started = started - (saved[-1] if saved else 0.0)
        self.times = [self.started + t for t in saved]
        self.reported = {} if meta.get("f_prev") is None else {k: float(meta["f_prev"])}
        self.snapshots = {k: self.theta()}

    def _bulk_step(self, c):
        """Staleness 0: clock c's pushes, all computed at theta_{c-1}, as sync's step:
        the summed gradient over the summed weight of the rows drawn, plus L2."""
        theta = self.theta()
        total = self.buffered.pop(c)
        f = self._penalty_value(theta)
        g = self.penalty.l2_weights * theta
        if total[1] > 0:      # (an empty mini-batch: the penalty alone, as sync)
            f += float(total[0] / total[1])
            g = g + total[2:] / total[1]
        self.u -= self.lr(c) * (g if self.pre is None else self.pre.grad_to_u(g))
        self.reported[c] = f

    def abandon_partial(self):
        """Undo what pushes beyond the last whole clock did (a fallback, or a rebuild of
        the blocks, redoes those clocks from the model after the last whole one)."""
        for k in [k for k in self.applied if k > self.clock]:
            self.u += self.applied.pop(k)
        for k in [k for k in self.reported if k > self.clock]:
            del self.reported[k]
        self.buffered.clear()

    def _penalty_value(self, theta):
        f = 0.5 * float((self.penalty.l2_weights * theta) @ theta)
        if self.penalty.has_l1:
            f += float(self.penalty.l1_weights @ np.abs(theta))
        return f


class _Snapshot:
    """The server at a whole clock, for a checkpoint or a later attempt: the model
    copied (it moves in place), the history by reference (its first entries never
    change), sliced only in ``taken()`` -> (meta, state)."""

    def __init__(self, c, history, times, started, f_prev, u):
        self.c, self.history, self.times, self.started = c, history, times, started
        self.f_prev, self.u = f_prev, u

    def taken(self):
        n = len(self.history) if self.c >= 2 else 0
        n = min(n, self.c - 1)
        return ({"iteration": self.c, "objectiveHistory": list(self.history[:n]),
                 "objectiveTimes": [t - self.started for t in self.times[:n]],
                 "f_prev": self.f_prev}, {"u": self.u})


def fit(engine, problem, plan, keep):
    """``plan.max_iter`` clocks of asynchronous sgd from ``problem.x0`` (theta space;
    see the package for the signature). ``keep.checkpoint``: the server's model at
    every ``checkpointInterval``-th clock (later clocks' pushes undone);
    ``keep.resumed``: go on from it."""
    from .. import codecs
    from ..optim.first_order import DEFAULT_STEP

    loss, layout, penalty, pre = problem.loss, problem.layout, problem.penalty, problem.pre
    codec, weight = problem.codec, problem.weight
    step_size, fraction, seed = plan.step_size, plan.mini_batch_fraction, plan.seed
    staleness, max_iter, tol = plan.staleness, plan.max_iter, plan.tol
    checkpoint, resumed, recovery = keep.checkpoint, keep.resumed, keep.recovery
    start = time.perf_counter()
    x0 = np.asarray(problem.x0, dtype=np.float64)
    server = Server(x0 if pre is None else pre.from_theta(x0), weight, penalty, pre,
                    DEFAULT_STEP["sgd"] if step_size is None else step_size, fraction, seed,
                    tol, staleness=staleness, task_weights=engine.task_weights())
    server.started = start
    server.checkpoint, server.recovery = checkpoint, recovery
    if recovery is not None and recovery.snapshot is not None:
        server.restore(*recovery.snapshot.taken(), start)
        start = server.started
        log.info("continuing from iteration %d after a lost serving task", server.clock)
    elif resumed:
        server.restore(resumed, checkpoint.state(), start)
        start = server.started
        log.info("resumed from iteration %d (%s)", server.clock, checkpoint.dir)
    done = engine.run_async(loss, layout, codec, server, staleness, int(max_iter),
                            work={"mode": "async", "fraction": float(fraction)})
    if server.stopped_at is not None and not np.isfinite(server.history[-1]):
        raise diverged(server.history[-1], server.stopped_at, checkpoint)
    if server.stopped_at is not None:
        theta, iterations = server.snapshots[server.stopped_at], server.stopped_at
        message = "relative change of the objective <= tol"
    else:
        theta, iterations, message = server.theta(), done, "maxIter reached"
    history = server.history[:iterations]
    times = [t - start for t in server.times[:iterations]]
    total = engine.evaluate(theta, loss, layout, None, codecs.NONE)
    f = float(total[0] / total[1]) + server._penalty_value(theta)
    if not np.isfinite(f):
        raise diverged(f, iterations, checkpoint)
    if server.stopped_at is None and iterations > 0:
        # the last clock's change is checked too, as sync checks its last iteration
        prev = server.history[iterations - 2] if iterations >= 2 else \
            server.reported.get(1, np.nan)
        if converged(prev, f, tol):
            message = "relative change of the objective <= tol"
            server.stopped_at = iterations
    seconds = time.perf_counter() - start
    if iterations > 0:
        history, times = history[:iterations - 1] + [f], times[:iterations - 1] + [seconds]
    else:
        history, times = [f], [seconds]
    return FitResult(
        theta=theta, objective_history=[float(v) for v in history], iterations=iterations,
        seconds=seconds, bytes_communicated=engine.bytes_communicated,
        driver_bytes=engine.driver_bytes, evaluations=server.pushes + 1,
        converged=server.stopped_at is not None and message.startswith("relative"),
        message=message, objective_times=[round(t, 6) for t in times])
