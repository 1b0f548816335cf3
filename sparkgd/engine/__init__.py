"""The engine: where a fit's blocks live, and how one pass over them is computed.

One object, :class:`Engine`, stands between the training loop and Spark::

    engine = Engine.open(dataset, spec, ...)      # build the blocks once; engine.facts
    engine.evaluate(theta, loss, layout, sample)  # one pass -> [loss_sum, W, grad...]
    engine.moments(d)                             # feature mean and std
    engine.close()                                # engine.certified: vouch for the passes

The choice of store, and every fallback, is made here and nowhere else:

* ``served`` (the default): the tasks that read the input keep its blocks and serve
  the passes over sockets (:mod:`.served`); when the cluster cannot run every such
  task at once, the file store instead;
* ``files`` (with dynamic allocation, or after the above): memory-mapped block files
  on executors (:mod:`.files`), passes through long-lived serving tasks
  (``kind="workers"``) or, when those cannot all run at once, one Spark job per pass
  (``kind="jobs"``, :mod:`.jobs`).

A served task lost mid-fit cannot be vouched for; :func:`run` builds the blocks again
and the fit goes on from where it was (on the file store after repeated losses). Modules: :mod:`.slots` (what the cluster can
run at once), :mod:`.wire` (frames, and the task's end), :mod:`.hub` (the driver's
end), :mod:`.jobs` (the Spark jobs), :mod:`.files` and :mod:`.served` (the stores).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import codecs
from ..comm import Aggregator
from ..data import facts as _facts
from ..data import direct
from ..data.schema import project
from ..errors import SparkgdError, first_line
from ..stats import moments_from_parts
from . import jobs
from .hub import Cancelled, SlotsShrank, TaskLost, WorkersFailed, WorkersUnavailable, skews

from .balance import balanced
from .slots import dynamic_allocation, local_cores, task_cpus, task_slots
from .task import gradient_work

__all__ = ["Engine", "run", "Cancelled", "TaskLost", "WorkersFailed", "WorkersUnavailable", "STORES",
           "PER_PASS", "MAX_SERVED_ATTEMPTS"]

log = logging.getLogger("sparkgd")

#: Where blocks may live (``auto``: served, unless executors come and go).
STORES = ("auto", "served", "files")
#: How passes over the file store run (``auto``: serving tasks when they can all run).
PER_PASS = ("auto", "workers", "jobs")
#: Spark conf (also at run time): where a classic session's fits keep their blocks --
#: ``auto`` (the default: served, unless executors come and go), ``served``, ``files``
#: (block files, passes through serving tasks when they can all run at once, else one
#: Spark job per pass) or ``jobs`` (block files, always one Spark job per pass).
STORE_CONF = "spark.sparkgd.store"
STORE_SETTINGS = ("auto", "served", "files", "jobs")
#: Fits on the served store started over after lost tasks before the file store is used.
MAX_SERVED_ATTEMPTS = 3
#: Served builds started again on fewer slots (the cluster lost executors meanwhile).
MAX_SHRINKS = 2


class Engine:
    """The blocks of one fit and the passes over them. Use as a context manager (or
    call :meth:`close`) so executors free everything, whatever the outcome.

    ``facts``: :class:`~sparkgd.data.facts.Facts` of the input. ``kind``: how a pass
    runs -- ``served``, ``workers`` (file store, serving tasks) or ``jobs`` (file
    store, one Spark job per pass). ``bytes_communicated``: partial results and
    moments that travelled so far (see :class:`~sparkgd.comm.Aggregator`).
    """

    def __init__(self, store, facts, aggregator, kind):
        self._store = store
        self.facts = facts
        self.aggregator = aggregator
        self.kind = kind
        self.topology = aggregator.topology
        self.clock_skews = []
        self._rejected_pushes = 0     # counted by serving sessions since closed

    @classmethod
    def open(cls, dataset, spec, *, source="the DataFrame", store="auto", dtype="float64",
             num_partitions=None, aggregation_depth=2, per_pass="auto", wait_seconds=None,
             topology="tree", parse_work=gradient_work):
        """Build the blocks of ``dataset`` (read as ``spec``, from
        :func:`~sparkgd.data.resolve_input`) and check what executors found.
        ``topology``: how a pass's sums are combined (:mod:`.collective`).
        ``parse_work``: what a pass computes for a ``work`` of :meth:`evaluate`
        (:func:`sparkgd.work.parse`; by default the gradient sums only).

        Raises SparkgdError (after freeing what was built) when the input is bad or
        empty; TaskLost when a served build lost a task (start over)."""
        from .files import FileStore
        from .served import SERVED_WAIT_SECONDS, ServedStore

        try:
            frame, read_spec = project(dataset, spec)
        except Exception as e:
            raise SparkgdError(f"cannot read {source}: {first_line(e)}") from None
        if num_partitions:
            frame = frame.repartition(int(num_partitions))
        sc = frame.sparkSession.sparkContext
        aggregator = Aggregator(topology, aggregation_depth)
        wait = SERVED_WAIT_SECONDS if wait_seconds is None else float(wait_seconds)
        explicit = store != "auto"
        if store == "auto":
            # served needs every task running at once: not with executors coming and going
            store = "files" if dynamic_allocation(sc) else "served"
        paths = None
        if store == "served":
            paths = None if num_partitions else direct_files(dataset, spec)
            if not explicit:
                too_big = _served_too_big(sc, frame, spec, dtype, paths)
                if too_big:
                    log.info("%s: block files instead", too_big)
                    store = "files"
        if store == "served":
            counts = None
            for shrink in range(MAX_SHRINKS + 1):
                # one task per slot, their rows within 20% of one another (balance.py)
                seen, slots = {}, task_slots(sc)
                if paths:
                    # the tasks read the Parquet files themselves (data/direct.py): equal
                    # contiguous shares from the footers, no count job
                    parts, total = direct.row_parts(paths, slots)
                    log.info("%d rows in %d Parquet files -> %d serving tasks (read by the "
                             "tasks)", total, len(paths), len(parts))
                    served = ServedStore(direct.Shares(parts, frame.sparkSession), read_spec,
                                         dtype, len(paths), wait, threads=task_cpus(sc),
                                         parse_work=parse_work)
                else:
                    try:
                        with jobs.described(sc, "sparkgd: count rows"):
                            tasks_frame, how = balanced(frame, slots, counts=counts,
                                                        info=seen)
                    except Exception as e:  # the count job: the input's own errors first
                        raise SparkgdError(f"cannot read {source}: {first_line(e)}") from None
                    counts = seen["counts"]
                    log.info("%d rows in %d partitions -> %d serving tasks (%s)",
                             sum(counts), len(counts), min(slots, max(1, sum(counts))), how)
                    served = ServedStore(tasks_frame, read_spec, dtype,
                                         num_partitions or len(counts), wait,
                                         threads=task_cpus(sc), parse_work=parse_work)
                try:
                    return cls._materialize(served, spec, source, aggregator, "served")
                except WorkersUnavailable as e:
                    if isinstance(e, SlotsShrank) and shrink < MAX_SHRINKS:
                        # executors gone for good: the tasks that can run take their rows
                        log.warning("%s; serving with the slots there are", e)
                        continue
                    if explicit:
                        raise
                    log.warning("%s; building block files instead", e)
                break
        files = FileStore(frame, read_spec, dtype, parse_work)
        files.wait_seconds = wait
        engine = cls._materialize(files, spec, source, aggregator,
                                  "jobs" if per_pass == "jobs" else "workers")
        slots = local_cores(sc.master)
        if engine.kind == "workers" and slots is not None and files.num_tasks > slots:
            # every serving task needs a slot at once; local mode says up front it has not
            engine.kind = "jobs"
        return engine

    @classmethod
    def _materialize(cls, store, spec, source, aggregator, kind):
        started = time.monotonic()
        try:
            try:
                infos = store.materialize()
            except (TaskLost, WorkersUnavailable, Cancelled, SparkgdError):
                raise                 # start over / use files / the caller's own error
            except Exception as e:  # e.g. a corrupt file, or a cast Spark cannot make
                from .files import memory_error

                context = getattr(store, "context", None)
                memory = None if context is None else memory_error(e, context)
                if memory is not None:
                    raise memory from None
                raise SparkgdError(f"cannot read {source}: {first_line(e)}") from None
            _facts.check(infos, spec, source)
        except BaseException:
            store.release()
            raise
        log.info("blocks built by %d tasks in %.2f s (%s)", store.num_tasks,
                 time.monotonic() - started, kind)
        facts = _facts.Facts(infos, spec, store.num_partitions,
                             columns=getattr(store, "columns", None),
                             width=getattr(store, "width", None))
        return cls(store, facts, aggregator, kind)

    @property
    def num_tasks(self):
        """Tasks that compute a pass."""
        return self._store.num_tasks

    #: What carried the passes, by :attr:`kind` (``summary.engine``).
    DESCRIPTIONS = {"served": "served, sealed", "workers": "files, sealed", "jobs": "jobs"}

    @property
    def description(self):
        """``summary.engine``: ``served, sealed`` (tasks that hold the blocks in memory,
        over sparkgd's sealed wire), ``files, sealed`` (block files, serving tasks) or
        ``jobs`` (one Spark job per pass: Spark's own channels); ``files, streamed, sealed``
        and ``jobs, streamed`` when the passes read the block files in windows."""
        text = self.DESCRIPTIONS.get(self.kind, self.kind)
        if getattr(self._store, "stream", False):      # block files read in windows
            head, _, rest = text.partition(",")
            text = f"{head}, streamed" + ("," + rest if rest else "")
        return text

    @property
    def bytes_communicated(self):
        return self.aggregator.bytes_communicated

    @property
    def driver_bytes(self):
        return self.aggregator.driver_bytes

    @property
    def rejected(self):
        """Connections the hubs dropped: strangers, bad frames, stalled tasks."""
        return self._store.rejected

    def evaluate(self, theta, loss, layout, sample=None, codec=codecs.NONE,
                 theta_codec=codecs.NONE, work=None):
        """One pass: ``[loss_sum, weight_sum, grad_sum...]`` over every row for ``theta``
        (``sample = (fraction, seed, iteration)``: over a Bernoulli mini-batch).

        ``codec``: how serving tasks encode their gradient sums (the two leading sums
        always travel as float64); one Spark job per pass sends them unencoded.
        ``work``: what a pass computes instead of the gradient (mode=local: a round of
        local steps, ``sample[2]`` its number; :mod:`sparkgd.modes.local`)."""
        theta = np.asarray(theta, dtype=np.float64)
        if self.kind != "jobs":
            try:
                parts = self._store.serve(theta, loss, layout, sample, codec, self.topology,
                                          self.aggregator.depth, theta_codec, work)
                moved = self._store.last_bytes
                self.aggregator.count_driver(moved["driver_out"] + moved["driver_in"])
                self.aggregator.count_links(moved["peers"])
                return self.aggregator.sum_parts(parts)
            except WorkersUnavailable as e:
                if self.kind == "served":
                    raise
                log.warning("%s; falling back to one Spark job per pass", e)
                self._store.close_session()
                self.kind = "jobs"
        if self.topology == "ring":
            log.warning("one Spark job per pass has no ring: its passes use "
                        "treeAggregate (topology tree)")
            self.topology = self.aggregator.topology = "tree"
        return self._store.pass_sums(theta, loss, layout, sample, self.aggregator, work)

    def run_async(self, loss, layout, codec, server, staleness, max_clock, work=None):
        """mode=async: pushes applied by ``server`` as they arrive, with staleness at
        most ``staleness`` clocks (:meth:`~sparkgd.engine.hub.Hub.run_async`). One Spark
        job per pass has no tasks to run ahead: each clock is then one job over every
        partition, pushed as one (bulk-synchronous, as staleness 0). ``work``: the
        tasks' configuration for it (the user's mini-batch fraction)."""
        if self.kind != "jobs":
            try:
                run = self._store.run_async(loss, layout, codec, server, staleness,
                                            max_clock, work)
                moved = self._store.last_bytes
                self.aggregator.count_driver(moved["driver_out"] + moved["driver_in"])
                self.clock_skews.extend(skews(run.seconds, self.num_tasks))
                return run.done
            except WorkersUnavailable as e:
                if self.kind == "served":
                    raise
                log.warning("%s; falling back to one Spark job per pass, each "
                            "clock bulk-synchronous", e)
                moved = self._store.last_bytes
                self.aggregator.count_driver(moved["driver_out"] + moved["driver_in"])
                self._rejected_pushes += self.rejected_pushes
                self._store.close_session()
                self.kind = "jobs"
        done = getattr(server, "clock", 0)
        server.abandon_partial()
        while done < max_clock:
            clock = done + 1
            theta = np.array(server.theta())
            total = self._store.pass_sums(theta, loss, layout, server.sample(None, clock),
                                          self.aggregator)
            server.push(None, clock, total, theta, None)
            done = clock
            if server.clock_done(clock):
                break
        return done

    def rows_per_task(self):
        """Rows each serving task holds (the pace of a pass is the largest's)."""
        return self._store.rows_per_task()

    @property
    def rejected_pushes(self):
        """mode=async pushes the server did not apply (duplicates, unasked for)."""
        hub = getattr(self._store, "hub", None)
        return self._rejected_pushes + (0 if hub is None else hub.rejected_pushes)

    def task_weights(self):
        """Total row weight each serving task holds (None when not known per task)."""
        return self._store.task_weights()

    def task_skews(self):
        """Per pass (mode=async: per clock), slowest task time / median task time, over
        the passes every serving task timed (none with one Spark job per pass)."""
        hub = getattr(self._store, "hub", None)
        passes = [] if hub is None else skews(hub.task_seconds, self.num_tasks)
        return passes + self.clock_skews

    def moments(self, d):
        """(mean, std) of every feature (Spark ML's weighted unbiased std). Moments do
        not add up like gradients, so each block's or task's (W, mean, M2) comes to the
        driver, which merges them; blocks whose facts carry them need no pass."""
        parts = self.facts.moment_parts()
        if parts is None:
            parts = jobs.moment_parts(self._store, d)
        self.aggregator.count_driver(8 * (2 + 2 * d) * len(parts))
        return moments_from_parts(parts, d)

    @property
    def certified(self):
        """After :meth:`close`: False when the passes cannot be vouched for and the fit
        must start over (a served task was lost)."""
        return self._store.certified

    def close(self):
        self._store.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run(dataset, spec, train, *, source="the DataFrame", dtype="float64",
        aggregation_depth=2, topology="tree", parse_work=gradient_work):
    """``train(engine)`` on an engine over ``dataset``; its result once the engine
    vouches for every pass.

    A task holding served blocks lost mid-fit means its passes are not vouched for:
    ``train`` runs again on blocks built anew (on the slots the cluster has now), and
    goes on from the iteration the lost attempt had reached -- the fit keeps what it
    computed in memory (:class:`sparkgd.checkpoint.Recovery`): sync replays its logged
    evaluations to the optimizer, local and async take their last model. The same
    objective, so the same model up to rounding (bit for bit on the same slots).
    After repeated losses the file store is used, which recovers lost blocks through
    lineage instead. :data:`STORE_CONF` chooses the store."""
    store, per_pass = store_setting(dataset.sparkSession.sparkContext)
    for attempt in range(1, MAX_SERVED_ATTEMPTS + 2):
        try:
            with Engine.open(dataset, spec, source=source, store=store, dtype=dtype,
                             aggregation_depth=aggregation_depth, topology=topology,
                             parse_work=parse_work, per_pass=per_pass) as engine:
                result = train(engine)
            if not engine.certified:
                raise TaskLost("the serving job did not end cleanly")
            return result
        except TaskLost as e:
            log.warning("%s; building the blocks again (attempt %d): the fit goes "
                        "on from where it was", str(e).splitlines()[0], attempt + 1)
            if attempt >= MAX_SERVED_ATTEMPTS:
                store = "files"
    raise SparkgdError("the fit could not complete")  # pragma: no cover - files never lose


def _served_too_big(sc, frame, spec, dtype, paths):
    """:func:`~.files.served_too_big` with the rows counted (from the Parquet footers
    when the tasks read the files, else by a count job -- only when a memory budget is
    set)."""
    from .files import block_budget, served_too_big

    if block_budget(sc)[0] is None:
        return None
    if paths:
        _parts, rows = direct.row_parts(paths, 1)
    else:
        with jobs.described(sc, "sparkgd: count rows"):
            rows = frame.count()
    return served_too_big(sc, frame, spec, dtype, rows, task_slots(sc))


def store_setting(sc):
    """:data:`STORE_CONF` -> ``(store, per_pass)`` for :meth:`Engine.open`."""
    text = str(jobs.Settings(sc.getConf()).get(STORE_CONF, "auto")).strip().lower()
    if text not in STORE_SETTINGS:
        raise SparkgdError(f"{STORE_CONF} must be one of {', '.join(STORE_SETTINGS)} "
                           f"(got {text!r})")
    return ("files", "jobs") if text == "jobs" else (text, "auto")


def direct_files(dataset, spec):
    """The Parquet files the serving tasks may read themselves (:mod:`sparkgd.data.direct`),
    or None: Spark reads the rows."""
    paths = direct.plain_parquet_files(dataset)
    if not paths:
        return None
    try:
        import pyarrow.parquet as pq

        if all(direct.readable_as(pq.read_schema(p), spec) for p in paths):
            return paths
    except Exception as e:     # a footer pyarrow cannot read: Spark's read will say
        log.debug("reading the Parquet files through Spark: %s", e)
    return None
