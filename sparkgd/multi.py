"""Several fits over one engine: ``fitMultiple``'s param maps in shared passes.

pyspark.ml.tuning (``CrossValidator``, ``TrainValidationSplit``) asks an estimator for
one model per param map of a grid, on the same data. Fitted one by one, each map
builds its blocks again and makes its own passes. Here the maps that read the data the
same way (:func:`group_key`) are fitted together over one engine:

    one engine (the blocks, built once)
      <- K fits, each :func:`sparkgd.coordinator.train` in its own thread, with its own
         optimizer, start and penalty, seeing a :class:`SharedEngine` view
      <- every pass: the theta each live fit asks for, evaluated in one read of the
         blocks (work ``models``: :func:`sparkgd.kernels.models_sums`), each fit given
         its own ``[loss, W, grad...]``
      -> a fit that converged leaves; the passes go on with the others

Each fit is the computation it would be alone (the same objective, start, optimizer
and stopping rule); only the sums of a pass are products of a K-column matrix instead of
a vector, so they round differently (~1e-16 relative). Passes a fit asks for that are
not a plain gradient (the moments, a mini-batch, coefficient statistics) go to the
engine as they are, one fit at a time.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import fields

import numpy as np

from . import codecs, kernels

log = logging.getLogger("sparkgd")

#: Plan fields in which param maps fitted together may differ: what the driver's
#: optimizer and penalty use, never how the blocks are read or what a pass computes.
MAY_DIFFER = frozenset({"params", "reg_param", "elastic_net_param", "standardization",
                        "optimizer", "step_size", "max_iter", "tol", "threshold",
                        "thresholds"})


def shareable(plan):
    """Whether ``plan``'s passes can be evaluated beside others': full-batch, exact,
    bulk-synchronous, from its own start (a checkpointed fit keeps its own passes)."""
    return (plan.mode == "sync" and plan.dp is None and plan.optimizer in ("lbfgs", "gd")
            and plan.mini_batch_fraction >= 1.0 and plan.compression == "none"
            and not plan.checkpoint_dir and not plan.resume and plan.initial is None)


def group_key(plan):
    """What fits trained together must share (None: ``plan`` is fitted alone)."""
    if not shareable(plan):
        return None
    return tuple((f.name, repr(getattr(plan, f.name))) for f in fields(plan)
                 if f.name not in MAY_DIFFER)


def groups(plans):
    """-> lists of indexes into ``plans``: the groups fitted together (two or more), in
    order of their first map, then each map fitted alone."""
    together, alone = {}, []
    for i, plan in enumerate(plans):
        key = group_key(plan)
        if key is None:
            alone.append([i])
        else:
            together.setdefault(key, []).append(i)
    shared = [g for g in together.values() if len(g) > 1]
    alone += [g for g in together.values() if len(g) == 1]
    return sorted(shared) + sorted(alone)


class SharedEngine:
    """``engine`` shared by ``n`` fits, each in its own thread with its own view
    (:meth:`view`). A plain gradient pass waits until every fit still running has asked
    for one, then all go in one pass; anything else goes to the engine alone. A fit
    that ends calls :meth:`leave` (the others then stop waiting for it)."""

    def __init__(self, engine, n):
        self.engine = engine
        self.fits = self.live = int(n)
        self.pending = {}           # fit -> (theta, loss, layout)
        self.answers = {}           # fit -> its vector, or the exception of its pass
        self.passes = 0             # shared passes made
        self.models_evaluated = 0   # models in them
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock()
        self._moments = {}

    def view(self, i):
        return _View(self, i)

    def leave(self, i):
        with self._cond:
            self.live -= 1
            self._pending_pass()

    def evaluate(self, i, theta, loss, layout, sample=None, codec=codecs.NONE,
                 theta_codec=codecs.NONE, work=None):
        if work is not None or sample is not None or codec.lossy or theta_codec.lossy or \
                layout.k != 1:
            with self._engine_lock:
                return self.engine.evaluate(theta, loss, layout, sample, codec, theta_codec,
                                            work)
        with self._cond:
            self.pending[i] = (np.asarray(theta, dtype=np.float64), loss, layout)
            self._pending_pass()
            while i not in self.answers:
                self._cond.wait()
            answer = self.answers.pop(i)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def moments(self, d):
        with self._engine_lock:
            if d not in self._moments:
                self._moments[d] = self.engine.moments(d)
            mean, std = self._moments[d]
            return mean.copy(), std.copy()

    def _pending_pass(self):
        """With the condition held: one pass for every fit still running, once each has
        asked (the others are running their optimizer's step meanwhile)."""
        if not self.pending or len(self.pending) < self.live:
            return
        asked = sorted(self.pending)
        items = [self.pending.pop(i) for i in asked]
        try:
            with self._engine_lock:
                vectors = self._one_pass(items)
        except BaseException as e:          # every fit in it sees the pass's failure
            vectors = [e] * len(asked)
        self.answers.update(zip(asked, vectors))
        self._cond.notify_all()

    def _one_pass(self, items):
        _, loss, layout = items[0]
        if len(items) == 1:
            return [self.engine.evaluate(items[0][0], loss, layout)]
        k = len(items)
        stacked = kernels.Layout(layout.d, k, layout.fit_intercept)
        coef = np.stack([layout.split(theta)[0][0] for theta, _, _ in items])
        intercept = np.array([layout.split(theta)[1][0] for theta, _, _ in items])
        total = self.engine.evaluate(stacked.join(coef, intercept), loss, stacked,
                                     work={"mode": "models"})
        self.passes += 1
        self.models_evaluated += k
        return kernels.split_models(total, layout.d, k, layout.fit_intercept)


class _View:
    """What one fit sees of the shared engine: the engine, with its plain gradient passes
    and its moments going through :class:`SharedEngine`."""

    def __init__(self, shared, i):
        self._shared, self._i = shared, i

    def evaluate(self, theta, loss, layout, sample=None, codec=codecs.NONE,
                 theta_codec=codecs.NONE, work=None):
        return self._shared.evaluate(self._i, theta, loss, layout, sample, codec,
                                     theta_codec, work)

    def moments(self, d):
        return self._shared.moments(d)

    @property
    def description(self):
        """``summary.engine``: the engine's, and how many fits shared its passes."""
        return f"{self._shared.engine.description}, passes shared by {self._shared.fits} fits"

    def __getattr__(self, name):
        return getattr(self._shared.engine, name)


def _thread(target, i):
    """A fit's thread: pyspark's InheritableThread where there is a SparkContext here (the
    jobs it starts keep the caller's job group, tags and scheduler pool), else a plain
    one."""
    try:
        from pyspark import InheritableThread, SparkContext

        if SparkContext._active_spark_context is not None:
            return InheritableThread(target, args=(i,), name=f"sparkgd-fit-{i}", daemon=True)
    except ImportError:                      # pragma: no cover - pyspark is a dependency
        pass
    return threading.Thread(target=target, args=(i,), name=f"sparkgd-fit-{i}", daemon=True)


def train_many(plans, engine, attempts, train):
    """``train(plan, view, attempts)`` of every plan, each in its own thread over one
    :class:`SharedEngine` -> their outcomes, in order. The first error of any fit is
    raised once all have ended (a lost task: every fit goes on from its own log on the
    blocks built again, :func:`sparkgd.engine.run`)."""
    shared = SharedEngine(engine, len(plans))
    outcomes, errors = [None] * len(plans), [None] * len(plans)

    def one(i):
        try:
            outcomes[i] = train(plans[i], shared.view(i), attempts[i])
        except BaseException as e:          # noqa: BLE001 - raised below, in this thread
            errors[i] = e
        finally:
            shared.leave(i)

    threads = [_thread(one, i) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.info("%d fits in %d shared passes (%d model evaluations; one read of the blocks "
             "each)", len(plans), shared.passes, shared.models_evaluated)
    for e in errors:
        if e is not None:
            raise e
    return outcomes
