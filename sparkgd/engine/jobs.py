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

import contextlib
import errno
import itertools
import logging
import threading
import time
import uuid

import numpy as np

from .. import codecs
from ..errors import SparkgdError
from ..stats import block_moments, merge_moments
from .hub import (DEADLINE_SECONDS, HELLO_SECONDS, PORTS_CONF, Cancelled, Hub, WorkersFailed,
                  WorkersUnavailable, driver_address, parse_ports)
from . import keys
from .slots import local_cores, task_slots
from .task import gradient_work
from .wire import UNREACHABLE_MARKER

log = logging.getLogger("sparkgd")


#: Spark conf (seconds): how long a task may go silent while the hub waits on it
#: (stalled mid-reply, not reading, not answering; a computing task sends a heartbeat).
DEADLINE_CONF = "spark.sparkgd.hub.deadline"
#: Spark conf (seconds): how long a connection may take to complete its hello (and a
#: task to connect at all).
HELLO_CONF = "spark.sparkgd.hub.helloTimeout"


#: Spark conf (also settable at run time, ``spark.conf.set``), for tests and
#: benchmarks only: ``index:factor`` makes serving task ``index`` take ``factor``
#: times as long over every computation (it sleeps the rest); with one Spark job per
#: pass, the first attempt of partition ``index``'s task of every pass sleeps
#: ``factor - 1`` times its computation or 10 ms, whichever is longer (a pass's tasks
#: last milliseconds: a factor of them would be lost in Spark's own scheduling), so a
#: speculative copy of it finishes first.
SLOW_TASK_CONF = "spark.sparkgd.testing.slowTask"


#: Spark conf (also at run time), for tests only: ``true`` makes the first attempt of
#: every task sparkgd runs fail at its start, as a flaky executor would (Spark retries
#: it when ``spark.task.maxFailures`` allows: ``local[N,F]``).
FAIL_FIRST_CONF = "spark.sparkgd.testing.failFirstAttempt"


class Settings:
    """sparkgd's settings as a fit reads them: the session's runtime conf first
    (``spark.conf.set(...)``, also from a Spark Connect client), then ``conf`` (the
    SparkConf the application started with)."""

    def __init__(self, conf):
        from pyspark.sql import SparkSession

        self._conf = conf
        self._session = SparkSession.getActiveSession()

    def get(self, key, default=None):
        value = None
        if self._session is not None:
            try:
                value = self._session.conf.get(key, None)
            except Exception:   # a conf the runtime will not show
                value = None
        if value is None:
            value = self._conf.get(key, None)
        return default if value is None else value


def fail_first(conf):
    """-> whether :data:`FAIL_FIRST_CONF` is on (runtime conf first, then ``conf``)."""
    text = Settings(conf).get(FAIL_FIRST_CONF) or "false"
    return str(text).strip().lower() == "true"


def failing_first(enabled):
    """Executor side: raise in a task's first attempt when ``enabled`` (a plain bool)."""
    if not enabled:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is not None and ctx.attemptNumber() == 0:
        raise RuntimeError(f"sparkgd: a first attempt failed on purpose ({FAIL_FIRST_CONF})")


def slow_task(conf):
    """-> [index, factor] from :data:`SLOW_TASK_CONF` (the session's runtime conf
    first, then ``conf``), or None."""
    text = Settings(conf).get(SLOW_TASK_CONF)
    if not text:
        return None
    try:
        index, factor = str(text).split(":")
        index, factor = int(index), float(factor)
    except ValueError:
        raise SparkgdError(f"{SLOW_TASK_CONF} must be index:factor, got {text!r}") from None
    if index < 0 or not factor >= 1.0:
        raise SparkgdError(f"{SLOW_TASK_CONF} must be index:factor with factor >= 1, "
                           f"got {text!r}")
    return [index, factor]


def conf_seconds(conf, key, default):
    text = conf.get(key, None)
    if text is None:
        return float(default)
    try:
        value = float(str(text).strip().rstrip("s"))
    except ValueError:
        raise SparkgdError(f"{key} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise SparkgdError(f"{key} must be > 0 seconds, got {text!r}")
    return value


class HubSession:
    """A hub's serving tasks, seen from the coordinator: what they compute
    (:meth:`configure`), one pass (:meth:`evaluate`), a mode=async run. The job that
    runs the tasks is someone else's: a :class:`ServingJob` in the driver, or the fit's
    own job when the coordinator runs inside it (:mod:`sparkgd.connect`)."""

    def __init__(self, hub, parse_work=gradient_work, slow=None):
        self.hub = hub
        self.parse_work = parse_work
        self.slow = slow
        self.config = None

    def configure(self, loss, layout, codec=codecs.NONE, topology="star", depth=2,
                  theta_codec=codecs.NONE, work=None):
        """Tell the tasks what to compute and how to encode it (again only when it
        changed: a new configuration also clears the tasks' error-feedback residuals),
        and how to combine a pass (:mod:`.collective`). ``work``: what a pass computes
        when it is not the gradient (:mod:`sparkgd.work`)."""
        self.hub.set_topology(topology, depth)
        config = {"loss": loss.name, "params": loss.params(),
                  "layout": [layout.d, layout.k, layout.fit_intercept],
                  "compression": str(codec), "theta_compression": str(theta_codec),
                  "work": work, "slow": self.slow}
        if config == self.config:
            return
        self.hub.expect(self.parse_work(work, layout).size(layout), codec, theta_codec)
        self.hub.configure(config)
        self.config = config

    def evaluate(self, theta, sample=None):
        """Every task's sums for ``theta``, in task order."""
        return self.hub.evaluate(theta, sample)

    def run_async(self, server, staleness, max_clock):
        """mode=async over the serving tasks (:meth:`~sparkgd.engine.hub.Hub.run_async`)."""
        return self.hub.run_async(server, staleness, max_clock)

    @property
    def rejected(self):
        return self.hub.rejected


class ServingJob(HubSession):
    """A Spark job that runs in a driver thread for the length of a fit while
    :class:`~sparkgd.engine.hub.Hub` talks to its tasks.

    The thread is a PySpark ``InheritableThread``: the job carries the caller's job
    group and tags, so cancelling them stops the fit (:class:`Cancelled`); it also
    carries a tag of its own, which :meth:`close` cancels when tasks do not end.
    """

    def __init__(self, sc, kind, num_tasks, size, wait_seconds=30.0, expected=None,
                 strict=False, parse_work=gradient_work):
        self._sc = sc
        self._tag = f"sparkgd-{kind}-{uuid.uuid4().hex[:12]}"
        self._error = None
        self._cancelling = False
        self._done = threading.Event()
        self._thread = None
        conf = Settings(sc.getConf())
        bind, host = driver_address(sc)
        self.connect_seconds = conf_seconds(conf, HELLO_CONF, HELLO_SECONDS)
        try:
            ports = parse_ports(conf.get(PORTS_CONF, ""))
        except ValueError as e:
            raise SparkgdError(str(e)) from None
        # every setting is read before the hub binds its port (an error after would
        # leave it open)
        deadline = conf_seconds(conf, DEADLINE_CONF, DEADLINE_SECONDS)
        slow, fails = slow_task(conf), fail_first(conf)
        fit_key = keys.classic(sc)
        if local_cores(sc.master) is None:    # (on a cluster, operators want to know)
            log.info("the fit's key: %s", fit_key.source)
        hub = Hub(num_tasks, size, bind, self._raise_if_ended, self._running_tasks,
                  wait_seconds, expected, strict=strict,
                  failed=self._failed_tasks if strict else None, deadline=deadline,
                  hello_seconds=self.connect_seconds, ports=ports,
                  slots=lambda: task_slots(sc), secret=fit_key.key)
        super().__init__(hub, parse_work, slow)
        #: what the tasks' closure carries to make the fit's key (:mod:`.keys`)
        self.task_key = fit_key.for_tasks
        self.address = (host, self.hub.port)
        self.fail_first = fails

    def _start(self, action, description):
        from pyspark import InheritableThread

        sc, tag = self._sc, self._tag

        def run():
            try:
                sc.addJobTag(tag)
                sc.setInterruptOnCancel(True)
                sc.setJobDescription(description)
                action()
            except BaseException as e:  # reported by the hub's next wait
                self._error = e
            finally:
                self._done.set()

        self._thread = InheritableThread(target=run, name=tag, daemon=True)
        self._thread.start()

    def _stage_sum(self, field):
        st = self._sc.statusTracker()
        total = 0
        for job_id in self._sc._jsc.sc().statusTracker().getJobIdsForTag(self._tag):
            job = st.getJobInfo(int(job_id))
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
        text = str(e).strip() or type(e).__name__
        if UNREACHABLE_MARKER in text:
            host, port = self.address
            raise WorkersUnavailable(
                f"executors cannot reach the driver's hub at {host}:{port} (allow it on "
                f"the firewall, or pin the port with {PORTS_CONF})")
        if keys.NO_KEY_MARKER in text:
            why = text.split(keys.NO_KEY_MARKER + ":", 1)[-1].strip().splitlines()[0]
            raise WorkersUnavailable(f"the serving tasks cannot make the fit's key ({why})")
        if "cancel" in text.lower() and not self._cancelling:
            raise Cancelled(f"the fit was cancelled: {text.splitlines()[0]}")
        raise WorkersFailed(text) from None

    #: How long a lost task's job gets to show whether the caller cancelled it.
    CANCEL_GRACE_SECONDS = 3.0

    def raise_if_cancelled(self):
        """After a lost task: if the caller cancelled the job (which also kills its
        tasks), raise :class:`Cancelled` rather than let the fit start over."""
        if self._done.wait(self.CANCEL_GRACE_SECONDS) and self._error is not None and \
                "cancel" in str(self._error).lower() and not self._cancelling:
            raise Cancelled(f"the fit was cancelled: {str(self._error).strip().splitlines()[0]}")

    def cancel(self):
        self._cancelling = True
        self._sc.cancelJobsWithTag(self._tag)

    def close(self):
        """Stop every task, wait for the job (cancel it if it does not end)."""
        self.hub.close()
        if self._thread is None:
            return
        if not self.hub.short:
            self._thread.join(timeout=30)
        if self._thread.is_alive():   # tasks that never got a slot, or hung ones
            self.cancel()
            self._thread.join(timeout=30)


#: What a task's out-of-memory error starts with (:func:`memory_guard`), for the driver.
MEMORY_MARKER = "sparkgd-out-of-memory"


def address_space():
    """-> (this process's address space in bytes, its limit (RLIMIT_AS, what
    ``spark.executor.pyspark.memory`` sets) or None)."""
    import resource

    vm = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    vm = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return vm, (None if soft == resource.RLIM_INFINITY else int(soft))


@contextlib.contextmanager
def memory_guard(what):
    """In a task: a MemoryError (or a map refused for memory) becomes one that says what
    the task was doing, the address space it held and its limit (:func:`memory_error`
    reads them on the driver)."""
    try:
        yield
    except (MemoryError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ENOMEM:
            raise
        vm, limit = address_space()
        raise MemoryError(f"{MEMORY_MARKER} {what}: vm={vm} limit={limit}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def _first_attempt():
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return ctx is None or ctx.attemptNumber() == 0


def _kernel_task(index, blocks, bc, loss, layout, sample, threads, worker, fails=False,
                 slow=None):
    """Executor side: one partition's vector for the pass (``worker``: what the pass's
    work computes, :func:`sparkgd.work.parse`; ``slow``: :data:`SLOW_TASK_CONF`).

    Captures only the broadcast and small plain values (never an estimator).
    """
    failing_first(fails)
    started = time.perf_counter()
    with memory_guard("computing a pass over the block files"):
        out = worker.compute(blocks, bc.value, loss, layout, sample, index, threads)
    if slow and int(slow[0]) == index and _first_attempt():
        time.sleep((float(slow[1]) - 1.0) * max(time.perf_counter() - started, 0.01))
    yield out


@contextlib.contextmanager
def described(sc, text):
    """Spark UI job description ``text`` for the jobs this thread starts meanwhile."""
    old = sc.getLocalProperty("spark.job.description")
    sc.setJobDescription(text)
    try:
        yield
    finally:
        sc.setLocalProperty("spark.job.description", old)


def described_in(session, text):
    """:func:`described` for the jobs of ``session`` (a Spark Connect session has no
    job descriptions to set: nothing)."""
    if type(session).__module__.startswith("pyspark.sql.connect"):
        return contextlib.nullcontext()
    return described(session.sparkContext, text)


_PASSES = itertools.count(1)


def pass_sums(store, theta, loss, layout, sample, aggregator, work=None):
    """One pass as one Spark job over ``store``'s blocks -> the summed vector."""
    worker = store.parse_work(work, layout)
    bc = store.context.broadcast(theta)
    threads = store.threads_per_task
    fails = fail_first(store.context.getConf())
    slow = slow_task(store.context.getConf())

    def job(rdd):
        partials = rdd.mapPartitionsWithIndex(
            lambda i, it: _kernel_task(i, it, bc, loss, layout, sample, threads, worker,
                                       fails, slow))
        return aggregator.sum(partials, worker.size(layout))

    try:
        with described(store.context, f"sparkgd pass {next(_PASSES)}"):
            total = store.run(job)
    finally:
        bc.destroy()
    aggregator.count_out(theta.size, store.num_tasks)   # the broadcast, once per task
    return total


def _moments_task(blocks, d):
    total = np.zeros(2 + 2 * d)
    for X, _y, w in blocks:
        total = merge_moments(total, block_moments(X, w, d))
    yield total


def moment_parts(store, d):
    """Each task's merged :func:`~sparkgd.stats.block_moments` over ``store``'s blocks."""
    return store.run(lambda rdd: rdd.mapPartitions(lambda it: _moments_task(it, d)).collect())
