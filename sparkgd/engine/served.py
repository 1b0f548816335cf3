"""The served store: the tasks that read the input keep its blocks and serve the passes.

The fast path, for dense and sparse data alike. One task per task slot reads its
share of the DataFrame (a ``coalesce``, no shuffle) and keeps X in its Python
worker's memory (dense: a NumPy view of each Arrow batch; sparse: CSR blocks);
then, without ending, it connects to the driver's hub and answers every pass of
the fit. Nothing is written to disk, and there is no second job to start::

    driver --theta--> task i: kernels.partition_sums(blocks_i, theta) --sums--> driver

Every task must run at once, so the job uses at most one task per slot; when that
many cannot start, :meth:`ServedStore.materialize` raises
:class:`~sparkgd.engine.hub.WorkersUnavailable` and the engine uses the file store.

Only Spark's verdict on a finished task says its input was complete, and that comes
at the end of the fit. So a lost task (or a second attempt of one) raises
:class:`~sparkgd.engine.hub.TaskLost`, and a fit whose job did not end cleanly is
not :attr:`certified`: the engine starts it over.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import scipy.sparse as sp

from .. import codecs
from ..data import direct
from ..data.arrow import BadInput, localize, stack_csr, stored_dense, xyw_batches
from ..data.facts import block_info, merge_infos
from ..stats import (block_moments, column_moments, distinct, local_columns, merge_moments,
                     spread_moments)
from . import jobs, keys, task, wire
from .hub import TaskLost, WorkersFailed, WorkersUnavailable
from .slots import coalesced_input_partitions

log = logging.getLogger("sparkgd")


def serve_arrow_partition(batches, spec, dtype, address, secret, threads=1, timeout=60.0,
                          parse_work=task.gradient_work):
    """mapInArrow body of a task that builds its blocks and then serves them.

    X of each Arrow batch is kept in this worker's memory for the whole fit: dense X
    as a NumPy view of the batch (a float32 ``dtype`` keeps a rounded copy instead),
    sparse X as CSR, the batches stacked into a few large blocks (:func:`stack_csr`);
    labels and weights are copied. No files, no second job. Their facts (those of
    :func:`sparkgd.data.block_info`, merged) go to the driver in the hello as JSON, and
    the feature moments, at any width, as raw float64; or ``{"error": ...}`` for bad
    input. The task then answers requests until the driver says stop, and only then
    ends -- so Spark marks it successful (which also vouches that its input was
    complete) only at the end of the fit; see :class:`ServedJob`. Captures plain values
    only."""
    import pyarrow as pa
    from pyspark import TaskContext

    ctx = TaskContext.get()
    index = ctx.partitionId() if ctx is not None else 0
    attempt = ctx.attemptNumber() if ctx is not None else 0
    secret = keys.for_task(secret)       # the fit's key, from what the closure carried
    blocks, facts, moments, cols = build_blocks(batches, spec, dtype, index)
    serve_blocks(address, secret, index, attempt, blocks, facts, moments, threads, timeout,
                 parse_work, cols)
    yield pa.RecordBatch.from_pydict({"rows": [facts.get("n", 0)]})


def build_blocks(batches, spec, dtype, index=0):
    """A task's Arrow batches -> ``(blocks, facts, moments, columns)``: the (X, y, w)
    blocks it keeps, their merged facts (a dict; ``{"error": ...}`` for bad input), the
    feature moments (or None) and, for sparse (CSR) blocks, the sorted columns their
    rows touch -- the moments are then at those columns alone, and nothing as wide as
    the data's space is made (see :mod:`sparkgd.stats`). See
    :func:`serve_arrow_partition`."""
    blocks, info = [], None
    moments = cols = None
    try:
        for X, y, w in xyw_batches(batches, spec):
            if not sp.issparse(X):
                X = stored_dense(X, spec, dtype)
            # y and w are views of the batch's one Arrow body: kept as views they would
            # keep the whole float64 body alive next to a float32 (or stacked) copy of X
            y, w = y.copy(), None if w is None else w.copy()
            part = block_info(X, y, w, moments=False)
            if info is not None and part["d"] != info["d"] and spec.kind != "libsvm":
                raise BadInput(f"{spec.feature_desc}: rows have different lengths "
                               f"({info['d']}, {part['d']})")
            info = part if info is None else merge_infos(info, part)
            if not sp.issparse(X):
                m = block_moments(X, w, X.shape[1])
                moments = m if moments is None else merge_moments(moments, m)
            blocks.append((X, y, w))
        blocks = stack_csr(blocks)
        if blocks and all(sp.issparse(b[0]) for b in blocks):
            cols = local_columns(blocks)
            blocks = localize(blocks, cols)      # the columns they touch, as their own
            moments = column_moments(blocks, cols.size)
        facts = {} if info is None else dict(info, part=index, seq=0, pid=os.getpid())
    except BadInput as e:
        blocks, facts, moments, cols = [], {"error": str(e)}, None, None
    return blocks, facts, moments, cols


def serve_blocks(address, secret, index, attempt, blocks, facts, moments, threads=1,
                 timeout=60.0, parse_work=task.gradient_work, columns=None):
    """Meet the hub at ``address`` (the facts, moments and columns in the hello), then
    answer its passes until it says stop."""
    chan = wire.connect(address, secret, index, attempt, facts=json.dumps(facts).encode(),
                        floats=moments, timeout=timeout, columns=columns)
    if chan is None:
        raise TaskLost(f"sparkgd: serving task {index} (attempt {attempt}) was refused")
    try:
        # with bad input too: stay until the driver has everyone's facts and says stop
        # (leaving early would look like a lost task)
        task.serve(chan, blocks, index, threads, secret, parse_work, columns)
    finally:
        chan.close()


def compact(hub, facts):
    """Sparse data (every task with rows reported the columns they touch): the fit's
    columns are the sorted union of those -- a hashed space of 2^24 that the rows touch
    at 10^6 places is fitted at 10^6 -- and each task is told where its own sit
    (OP_COLUMNS; it re-indexes its blocks). ``facts`` are changed in place: width ``d``
    the fit's, the data's own as ``width``, moments at the fit's columns.
    -> (the fit's columns, the data's width), or (None, None) for dense data."""
    reported = {i: hub.columns.get(i) for i in range(hub.num_tasks)}
    with_rows = [i for i, f in enumerate(facts) if f and "error" not in f and f.get("n")]
    if not with_rows or any(reported[i] is None for i in with_rows):
        return None, None
    columns = distinct(np.concatenate([reported[i] for i in with_rows]))
    if columns.size == 0:          # no row touches any column: one, so the fit has a width
        columns = np.zeros(1, dtype=np.int64)
    width = max(int(facts[i]["d"]) for i in with_rows)
    positions = {i: np.searchsorted(columns, reported[i]) if reported[i] is not None else
                 np.zeros(0, dtype=np.int64) for i in range(hub.num_tasks)}
    hub.set_columns(positions, columns.size)
    for i, f in enumerate(facts):
        if f and "error" not in f:
            f["width"], f["d"] = int(f["d"]), int(columns.size)
            if f.get("moments") is not None and reported[i] is not None:
                f["moments"] = spread_moments(f["moments"], positions[i], columns.size)
    return columns, width


def hub_facts(hub):
    """Per task, the facts of its hello (with its moments), or {} for none yet."""
    out = []
    for i in range(hub.num_tasks):
        facts = json.loads(hub.facts.get(i) or b"{}")
        if facts and "error" not in facts:
            facts["moments"] = hub.floats[i]
        out.append(facts)
    return out


class ServedJob(jobs.ServingJob):
    """One Spark job whose tasks build their blocks from ``frame`` (one task per
    partition of it; :func:`serve_arrow_partition`) and then serve passes over them.

    ``facts``: per task, the merged facts of its blocks (or ``{"error": ...}``).
    ``configure(loss, layout)``, then ``evaluate(theta, sample)``; ``close()`` stops
    the tasks and waits for the job.

    Only Spark's verdict on a finished task says its input was complete. When a task's
    input fails upstream (say a shuffle fetch after a lost executor), Spark fails the
    task at once, but its Python side just sees the input end and carries on -- it
    would connect and serve what it got. So the hub is strict (a lost task, or a
    second attempt of one, raises :class:`TaskLost`: the first was a zombie or is
    gone), and the passes are vouched for by :attr:`certified`, known after
    ``close()``: the job succeeded, i.e. every task that served ended successfully,
    and none was lost on the way. Otherwise the caller starts over.
    """

    def __init__(self, frame, spec, dtype="float64", wait_seconds=30.0, threads=1,
                 parse_work=task.gradient_work):
        sc = frame.sparkSession.sparkContext
        super().__init__(sc, "served", 0, 0, wait_seconds, strict=True,
                         parse_work=parse_work)
        self.certified = False
        self.lost = False
        hub = self.hub
        address, secret, timeout = self.address, self.task_key, self.connect_seconds
        fails = self.fail_first

        shares = frame.parts if isinstance(frame, direct.Shares) else None

        def body(it, _spec=spec, _dtype=dtype, _threads=threads, _work=parse_work,
                 _shares=shares):
            jobs.failing_first(fails)
            if _shares is not None:      # the task reads its share of the Parquet files
                from pyspark import TaskContext

                for _ in it:
                    pass
                it = direct.part_batches(_shares[TaskContext.get().partitionId()], _spec)
            return serve_arrow_partition(it, _spec, _dtype, address, secret, _threads, timeout,
                                         _work)

        try:
            if shares is not None:
                frame = frame.frame()
            # One RDD, counted and run: with adaptive execution, planning the query
            # (``.rdd``) runs its upstream stages, so a second query would run them again.
            self.rdd = frame.mapInArrow(body, "rows long").rdd
            self.num_tasks = hub.num_tasks = self.rdd.getNumPartitions()
            log.info("%d task(s) build and serve the blocks", self.num_tasks)
            self._start(self.rdd.collect, "sparkgd: build blocks and serve passes")
            hub.wait_for_tasks()
        except BaseException:
            self.lost = True
            self.close()
            raise
        self.facts = hub_facts(hub)
        self.columns, self.width = compact(hub, self.facts)

    def configure(self, loss, layout, codec, topology="star", depth=2, theta_codec=None,
                  work=None):
        try:
            super().configure(loss, layout, codec, topology, depth,
                              theta_codec or codecs.NONE, work)
        except TaskLost:
            self.lost = True
            raise

    def evaluate(self, theta, sample=None):
        return self._guarded(self.hub.evaluate, theta, sample)

    def run_async(self, server, staleness, max_clock):
        return self._guarded(self.hub.run_async, server, staleness, max_clock)

    def _guarded(self, run, *args):
        try:
            return run(*args)
        except WorkersUnavailable as e:   # a lost task's next attempt could not run
            self.lost = True
            raise TaskLost(f"a serving task was lost and could not run again: "
                           f"{str(e).splitlines()[0]}") from None
        except TaskLost:
            self.lost = True
            self.raise_if_cancelled()
            raise
        except WorkersFailed as e:  # the job ended under the fit: its blocks are gone
            self.lost = True
            log.info("the serving job failed: %s", e)
            raise TaskLost(f"the serving job failed: {str(e).splitlines()[0]}") from None

    def close(self):
        if self.lost and self._thread is not None and self._thread.is_alive():
            # its passes are void: do not wait for Spark's retries of a lost task
            self.hub.close()
            self.cancel()
        super().close()
        self.certified = not self.lost and self._done.is_set() and self._error is None


#: How long the served store waits for all its tasks to run before using files instead.
SERVED_WAIT_SECONDS = 30.0


class ServedStore:
    """Blocks built and served by the same tasks (:class:`ServedJob`), as a store:
    :meth:`materialize` starts the job and returns the tasks' facts, :meth:`serve`
    runs a pass, :meth:`release` stops the tasks; :attr:`certified` after that."""

    kind = "served"

    def __init__(self, frame, spec, dtype, num_partitions, wait_seconds=None, threads=1,
                 parse_work=task.gradient_work):
        self._frame, self._spec, self._dtype = frame, spec, dtype
        self.parse_work = parse_work
        self.num_partitions = num_partitions
        self.wait_seconds = SERVED_WAIT_SECONDS if wait_seconds is None else wait_seconds
        self.threads_per_task = max(1, int(threads))   # spark.task.cpus
        self.rebuilds = 0
        self.job = None

    @property
    def num_tasks(self):
        return self.job.num_tasks if self.job is not None else None

    def materialize(self):
        try:
            self.job = ServedJob(self._frame, self._spec, self._dtype, self.wait_seconds,
                                 self.threads_per_task, self.parse_work)
        except WorkersFailed as e:
            # e.g. a Python worker out of memory: the file store may well manage (and
            # reports the input's own errors as well as this store would)
            raise WorkersUnavailable(f"the served build failed ({str(e).splitlines()[0]})") \
                from None
        if self.num_partitions is None:
            self.num_partitions = coalesced_input_partitions(self.job.rdd) or self.num_tasks
        return [f for f in self.job.facts if f]

    def serve(self, theta, loss, layout, sample, codec, topology="star", depth=2,
              theta_codec=None, work=None):
        """One pass -> the sums (see :meth:`~sparkgd.engine.hub.Hub.evaluate`)."""
        self.job.configure(loss, layout, codec, topology, depth,  # sent when it changed
                           theta_codec or codecs.NONE, work)
        return self.job.evaluate(theta, sample)

    def run_async(self, loss, layout, codec, server, staleness, max_clock, work=None):
        """mode=async over the serving tasks (:meth:`~sparkgd.engine.hub.Hub.run_async`)."""
        self.job.configure(loss, layout, codec, "star", work=work)
        return self.job.run_async(server, staleness, max_clock)

    @property
    def hub(self):
        return self.job.hub if self.job is not None else None

    @property
    def columns(self):
        """The fit's columns (sparse data: those some row touches), or None."""
        return None if self.job is None else self.job.columns

    @property
    def width(self):
        return None if self.job is None else self.job.width

    def rows_per_task(self):
        return [] if self.job is None else [int(f.get("n", 0)) for f in self.job.facts]

    def task_weights(self):
        return None if self.job is None else [float(f.get("wsum", 0.0))
                                              for f in self.job.facts]

    @property
    def last_bytes(self):
        return self.job.hub.last_bytes

    @property
    def rejected(self):
        return self.job.rejected if self.job is not None else 0

    @property
    def certified(self):
        """After release: every pass came from tasks that Spark then saw succeed."""
        return self.job is not None and self.job.certified

    def release(self):
        if self.job is not None:
            self.job.close()


class InTaskJob(jobs.HubSession):
    """The serving tasks of a fit whose coordinator runs inside the fit's own job
    (:mod:`sparkgd.connect`): the hub is in this process, and the job is the one this
    task belongs to -- Spark's barrier mode runs every task at once, and a lost one
    ends them all (the client then runs the job again). So a lost task is
    :class:`TaskLost` at once, and the passes stand when the hub closes without one."""

    def __init__(self, hub, parse_work=task.gradient_work, slow=None):
        super().__init__(hub, parse_work, slow)
        self.num_tasks = hub.num_tasks
        self.lost = False
        self._guarded(hub.wait_for_tasks)
        self.facts = hub_facts(hub)
        self.columns, self.width = compact(hub, self.facts)

    def configure(self, *args, **kwargs):
        return self._guarded(super().configure, *args, **kwargs)

    def evaluate(self, theta, sample=None):
        return self._guarded(self.hub.evaluate, theta, sample)

    def run_async(self, server, staleness, max_clock):
        return self._guarded(self.hub.run_async, server, staleness, max_clock)

    def _guarded(self, run, *args, **kwargs):
        try:
            return run(*args, **kwargs)
        except (TaskLost, WorkersUnavailable, WorkersFailed) as e:
            self.lost = True
            raise TaskLost(f"a serving task was lost: {str(e).splitlines()[0]}") from None

    @property
    def certified(self):
        return not self.lost

    def close(self):
        self.hub.close()


class InTaskStore(ServedStore):
    """:class:`ServedStore` over an :class:`InTaskJob` (the hub of this process)."""

    def __init__(self, hub, num_partitions, threads=1, parse_work=task.gradient_work,
                 slow=None):
        super().__init__(None, None, None, num_partitions, threads=threads,
                         parse_work=parse_work)
        self._hub, self._slow = hub, slow

    def materialize(self):
        self.job = InTaskJob(self._hub, self.parse_work, self._slow)
        return [f for f in self.job.facts if f]
