"""The Spark jobs an engine runs.

* :class:`ServingJob`: one job whose long-lived tasks serve every pass of a fit; it
  runs in a driver thread under its own job group while :class:`~sparkgd.engine.hub.Hub`
  talks to its tasks (the stores subclass it: :mod:`~sparkgd.engine.files`,
  :mod:`~sparkgd.engine.served`);
* :func:`pass_sums`: one Spark job per pass -- broadcast theta, the kernel on every
  partition, ``treeAggregate`` (:class:`~sparkgd.comm.Aggregator`), destroy the
  broadcast. Used when the cluster cannot run every serving task at once;
* :func:`moment_parts`: one job for the feature moments, when the blocks' facts do not
  carry them.
"""
from __future__ import annotations

import threading
import uuid

import numpy as np

from .. import kernels
from ..stats import block_moments, merge_moments
from .hub import WorkersFailed


class ServingJob:
    """A Spark job that runs in a driver thread for the length of a fit, under its own
    job group, while :class:`Hub` talks to its tasks."""

    def __init__(self, sc, kind):
        self._sc = sc
        self._group = f"sparkgd-{kind}-{uuid.uuid4().hex[:12]}"
        self._error = None
        self._done = threading.Event()
        self._thread = None
        self.hub = None
        self.config = None

    def _start(self, action, description):
        def run():
            try:
                self._sc.setJobGroup(self._group, description, interruptOnCancel=True)
                action()
            except BaseException as e:  # reported by the hub's next wait
                self._error = e
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, name=self._group, daemon=True)
        self._thread.start()

    def _stage_sum(self, field):
        st = self._sc.statusTracker()
        total = 0
        for job_id in st.getJobIdsForGroup(self._group):
            job = st.getJobInfo(job_id)
            for stage_id in (job.stageIds if job else []):
                stage = st.getStageInfo(stage_id)
                total += getattr(stage, field) if stage else 0
        return total

    def _running_tasks(self):
        return self._stage_sum("numActiveTasks")

    def _failed_tasks(self):
        return self._stage_sum("numFailedTasks")

    def _raise_if_ended(self):
        if not self._done.is_set():
            return
        e = self._error
        if e is None:
            raise WorkersFailed("the serving tasks ended before the fit did")
        raise WorkersFailed(str(e).strip() or type(e).__name__) from None

    def configure(self, loss, layout):
        """Tell the tasks what to compute (again only when it changed)."""
        config = {"loss": loss.name, "params": loss.params(),
                  "layout": [layout.d, layout.k, layout.fit_intercept]}
        if config == self.config:
            return
        self.hub.size = 2 + layout.size
        self.hub.configure(config)
        self.config = config

    def evaluate(self, theta, sample=None):
        """Every task's sums for ``theta``, in task order."""
        return self.hub.evaluate(theta, sample)

    def close(self):
        """Stop every task, wait for the job (cancel it if it does not end)."""
        if self.hub is not None:
            self.hub.close()
        if self._thread is None:
            return
        if self.hub is None or not self.hub.short:
            self._thread.join(timeout=30)
        if self._thread.is_alive():   # tasks that never got a slot, or hung ones
            self._sc.cancelJobGroup(self._group)
            self._thread.join(timeout=30)


def _kernel_task(index, blocks, bc, loss, layout, sample, threads):
    """Executor side: one partition's ``[loss_sum, weight_sum, grad...]``.

    Captures only the broadcast and small plain values (never an estimator).
    """
    if sample is not None:
        sample = sample + (index,)
    yield kernels.partition_sums(blocks, bc.value, loss, layout, sample=sample,
                                 threads=threads)


def pass_sums(store, theta, loss, layout, sample, aggregator):
    """One pass as one Spark job over ``store``'s blocks -> the summed vector."""
    bc = store.context.broadcast(theta)
    threads = store.threads_per_task

    def job(rdd):
        partials = rdd.mapPartitionsWithIndex(
            lambda i, it: _kernel_task(i, it, bc, loss, layout, sample, threads))
        return aggregator.sum(partials, 2 + layout.size)

    try:
        return store.run(job)
    finally:
        bc.destroy()


def _moments_task(blocks, d):
    total = np.zeros(2 + 2 * d)
    for X, _y, w in blocks:
        total = merge_moments(total, block_moments(X, w, d))
    yield total


def moment_parts(store, d):
    """Each task's merged :func:`~sparkgd.stats.block_moments` over ``store``'s blocks."""
    return store.run(lambda rdd: rdd.mapPartitions(lambda it: _moments_task(it, d)).collect())
