"""A fit from a Spark Connect session: the coordinator runs inside the cluster.

A Connect client has no SparkContext, no RDDs, no broadcasts, no py4j, and often no
route from the executors back to it. So the whole fit is one DataFrame job::

    client:  the input's projection, balanced into P partitions (DataFrame API only)
             frame.mapInArrow(fit_task, RESULT, barrier=True).collect()
    task i:  builds its blocks from its Arrow batches (as a served task does)
    task 0:  opens the hub on its executor; BarrierTaskContext.allGather tells every
             task where it is; runs the coordinator (sparkgd.coordinator.train) over
             the other tasks' passes and its own; yields the outcome as rows
    task i:  meets the hub and answers its passes until it says stop; yields nothing
    client:  the outcome (JSON and raw float64: nothing unpickled) -> the model

Barrier mode runs the P tasks at once or not at all, and a task lost mid-fit ends
the stage: the client runs the job again (up to :data:`MAX_ATTEMPTS` times), and with
``checkpointDir`` on a path every executor reaches, the new coordinator resumes from
the lost one's last checkpoint (a fit is deterministic: either way the model is the
undisturbed one).

When the P tasks cannot run at once -- dynamic allocation, fewer slots than the
estimate (:func:`sparkgd.engine.slots.session_slots`; nothing runs for
``wait`` seconds), or Spark encrypts its traffic -- the coordinator runs here in the
client instead, over one Spark job per pass (:class:`FrameStore`: theta inside the
job's closure, each partition's sums in its output rows): slower, never wrong.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
import uuid

import numpy as np

from . import coordinator, work
from .comm import Aggregator
from .data import facts as _facts
from .data.schema import project
from .engine import Engine, balance, jobs
from .engine.hub import DEADLINE_SECONDS, HELLO_SECONDS, PORTS_CONF, Hub, parse_ports
from .engine.served import InTaskStore, build_blocks, serve_blocks
from .engine import keys
from .engine.slots import TASKS_CONF, conf_flag, local_cores, session_slots
from .errors import SparkgdError, first_line

log = logging.getLogger("sparkgd")

#: Times the client runs the fit's job when a task was lost (barrier mode restarts all).
MAX_ATTEMPTS = 3
#: The job's output: one row from task 0 (``outcome`` or ``error``).
RESULT = "kind string, text string, data binary"
#: Seconds the fit's job may have no task running before the client gives up on it
#: (too few slots for barrier mode) and runs one Spark job per pass instead.
WAIT_SECONDS = 30.0
#: Spark conf (seconds): that wait.
WAIT_CONF = "spark.sparkgd.slotWait"
#: Spark conf, for tests: a directory where every task of the fit's job writes its
#: process id (``task-<index>.pid``), so a test can kill one mid-fit.
PID_DIR_CONF = "spark.sparkgd.testing.pidDir"
#: Lines of the coordinator's log the outcome brings back to the client.
MAX_LOG_LINES = 20000


#: What a task lost to the cluster looks like (a job that failed so is run again).
_LOST = re.compile(r"Python worker exited unexpectedly[^\n]*|ExecutorLostFailure[^\n]*|"
                   r"[Tt]ask[^\n]{0,80}(?:killed|lost)[^\n]*|Connection reset[^\n]*|"
                   r"a serving task was lost[^\n]*|TaskLost[^\n]*")
_PY_ERROR = re.compile(r"^\s*(\w+(?:Error|Exception)): (.+)$", re.M)


class BarrierUnavailable(RuntimeError):
    """The cluster cannot run the fit's tasks at once (dynamic allocation, too few
    slots): the client runs one job per pass instead."""


def _conf(spark):
    def get(key):
        try:
            value = spark.conf.get(key, None)
        except Exception:   # a static conf the server will not show
            return None
        return None if value is None else str(value)
    return get


def settings(spark):
    """What the tasks need to know of the session's conf (plain values)."""
    get = _conf(spark)
    try:
        ports = parse_ports(get(PORTS_CONF) or "")
    except ValueError as e:
        raise SparkgdError(str(e)) from None
    deadline = jobs.conf_seconds({jobs.DEADLINE_CONF: get(jobs.DEADLINE_CONF)},
                                 jobs.DEADLINE_CONF, DEADLINE_SECONDS)
    hello = jobs.conf_seconds({jobs.HELLO_CONF: get(jobs.HELLO_CONF)}, jobs.HELLO_CONF,
                              HELLO_SECONDS)
    wait = jobs.conf_seconds({WAIT_CONF: get(WAIT_CONF)}, WAIT_CONF, WAIT_SECONDS)
    slow = jobs.slow_task({jobs.SLOW_TASK_CONF: get(jobs.SLOW_TASK_CONF)})
    return {"ports": ports, "deadline": deadline, "hello": hello, "slow": slow,
            "wait": wait, "fail_first": conf_flag(get, jobs.FAIL_FIRST_CONF),
            "threads": max(1, int(get("spark.task.cpus") or 1)),
            "pid_dir": get(PID_DIR_CONF)}


def fit(dataset, plan):
    """``plan`` on ``dataset`` from a Spark Connect session -> the Outcome."""
    spark = dataset.sparkSession
    get = _conf(spark)
    try:
        frame, read_spec = project(dataset, plan.spec)
    except Exception as e:
        raise SparkgdError(f"cannot read {plan.source}: {first_line(e)}") from None
    conf = settings(spark)
    why = None
    if conf_flag(get, "spark.dynamicAllocation.enabled"):
        why = "dynamic allocation is on: barrier mode cannot run the fit's tasks at once"
    if why is None:
        slots = session_slots(get)
        if slots is None:
            slots = 2
            log.warning("the number of task slots is not known from this session's conf: "
                        "the fit runs %d serving tasks (set %s to use more)", slots,
                        TASKS_CONF)
        try:
            counts = balance.partition_counts(frame)
            tasks_frame, how = balance.balanced(frame, slots, counts=counts)
        except Exception as e:  # the count job: the input's own errors show first
            raise SparkgdError(f"cannot read {plan.source}: {first_line(e)}") from None
        tasks = max(1, min(slots, sum(counts)))
        log.info("%d rows in %d partitions -> %d serving tasks (%s), the coordinator in "
                 "one of them", sum(counts), len(counts), tasks, how)
        try:
            return _in_cluster(spark, tasks_frame, plan, read_spec, tasks, len(counts), conf)
        except BarrierUnavailable as e:
            why = str(e)
    log.warning("%s; the coordinator runs in this client, one Spark job per pass", why)
    return _from_client(frame, plan, read_spec, conf)


# --------------------------------------------------------------- in the cluster


def _in_cluster(spark, frame, plan, read_spec, tasks, partitions, conf):
    attempt_plan = plan
    get = _conf(spark)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        fit_key = keys.choose(get, local_cores(get("spark.master") or "") is not None,
                              hub_in_task=True)
        secret = fit_key.for_tasks

        def body(batches, _plan=attempt_plan, _spec=read_spec, _secret=secret,
                 _conf=conf, _tasks=tasks, _parts=partitions):
            return fit_task(batches, _plan, _spec, _secret, _conf, _tasks, _parts)

        job = frame.mapInArrow(body, RESULT, barrier=True)
        try:
            rows = _collect(spark, job, conf["wait"])
        except BarrierUnavailable:
            raise
        except Exception as e:
            full, text = str(e), first_line(e)
            if "dynamic resource allocation" in full or "BARRIER_" in full and "slots" in full:
                raise BarrierUnavailable(f"barrier mode cannot run here ({text})") from None
            if keys.NO_KEY_MARKER in full:
                raise BarrierUnavailable("the fit's tasks cannot make its key: " +
                                         full.split(keys.NO_KEY_MARKER + ":", 1)[-1]
                                         .strip().splitlines()[0]) from None
            lost = _LOST.search(full)
            if lost is None:
                # the input's or the code's own error: running it again would not help
                cause = _PY_ERROR.findall(full)
                raise SparkgdError("the fit's job failed: " + (
                    f"{cause[-1][0]}: {cause[-1][1].strip()}" if cause else text)) from None
            text = lost.group(0)
            if attempt >= MAX_ATTEMPTS:
                raise SparkgdError(f"the fit's job failed {attempt} times; last: {text}") \
                    from None
            resume = bool(plan.checkpoint_dir)
            log.warning("the fit's job failed (%s): running it again (attempt %d)%s", text,
                        attempt + 1, ", from its last checkpoint" if resume else "")
            attempt_plan = dataclasses.replace(plan, resume=resume or plan.resume)
            continue
        return decode(rows)
    raise SparkgdError("the fit could not complete")   # pragma: no cover


def _collect(spark, job, wait):
    """``job.collect()``, given up on (interrupted) when no task of it runs for
    ``wait`` seconds: barrier mode holds a job whose tasks cannot all run at once."""
    tag = f"sparkgd-fit-{uuid.uuid4().hex[:12]}"
    state = {"running": 0, "since": time.monotonic(), "gave_up": False}
    done = threading.Event()

    def progress(stages=None, inflight_tasks=0, operation_id=None, done_=False, **_):
        state["running"] = int(inflight_tasks or 0)
        if state["running"] > 0:
            state["since"] = None

    def watch():
        while not done.wait(1.0):
            since = state["since"]
            if state["running"] == 0 and since is None:
                state["since"] = time.monotonic()
            elif since is not None and time.monotonic() - since > wait:
                state["gave_up"] = True
                try:
                    spark.interruptTag(tag)
                except Exception:   # pragma: no cover - interrupting is best effort
                    pass
                return

    handler = _Progress(progress)
    spark.registerProgressHandler(handler)
    spark.addTag(tag)
    watcher = threading.Thread(target=watch, name=tag, daemon=True)
    watcher.start()
    try:
        return job.collect()
    except Exception:
        if state["gave_up"]:
            raise BarrierUnavailable(f"no task of the fit's job ran for {wait:g}s (fewer "
                                     f"task slots than its tasks? set {TASKS_CONF})") \
                from None
        raise
    finally:
        done.set()
        spark.removeTag(tag)
        spark.removeProgressHandler(handler)


class _Progress:
    """A Connect progress handler calling ``fn`` (keyword arguments)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, stages=None, inflight_tasks=0, operation_id=None, done=False):
        self.fn(stages=stages, inflight_tasks=inflight_tasks, operation_id=operation_id,
                done_=done)


def fit_task(batches, plan, read_spec, secret, conf, num_tasks, partitions):
    """The body of every task of the fit's job (see the module). Captures plain values
    only."""
    import pyarrow as pa
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    index, attempt = ctx.partitionId(), ctx.attemptNumber()
    jobs.failing_first(conf["fail_first"])
    secret = keys.for_task(secret)        # the fit's key, from what the closure carried
    if conf.get("pid_dir"):
        with open(os.path.join(conf["pid_dir"], f"task-{index}.pid"), "w") as f:
            f.write(str(os.getpid()))
    blocks, facts, moments, cols = build_blocks(batches, read_spec, plan.dtype, index)
    host = _executor_host(ctx, index)
    hub = None
    if index == 0:
        own = _OwnTask()
        started = time.monotonic()
        hub = Hub(num_tasks, 0, host, own.raise_if_failed,
                  lambda: num_tasks if time.monotonic() - started < 2 * conf["hello"] else 0,
                  conf["hello"], strict=True, deadline=conf["deadline"],
                  hello_seconds=conf["hello"], ports=conf["ports"], secret=secret)
        note = json.dumps({"host": host, "port": hub.port})
    else:
        note = ""
    try:
        notes = ctx.allGather(note)
    except BaseException:
        if hub is not None:
            hub.close()
        raise
    where = json.loads(notes[0])
    address = (where["host"], int(where["port"]))
    timeout, threads = conf["hello"], conf["threads"]
    if index != 0:
        serve_blocks(address, secret, index, attempt, blocks, facts, moments, threads,
                     timeout, work.parse, cols)
        return
    own.start(address, secret, attempt, blocks, facts, moments, threads, timeout, cols)
    lines = _LogLines()
    try:
        store = InTaskStore(hub, partitions, threads, work.parse, conf["slow"])
        aggregator = Aggregator(plan.engine_topology, plan.aggregation_depth)
        attempts = coordinator.Attempts()
        try:
            engine = Engine._materialize(store, plan.spec, plan.source, aggregator, "served")
            with engine:
                outcome = coordinator.train(plan, engine, attempts)
            if not engine.certified:
                raise RuntimeError("sparkgd: a serving task was lost")
        except SparkgdError as e:
            yield pa.RecordBatch.from_pydict({"kind": ["error"], "text": [str(e)],
                                              "data": [lines.text().encode()]},
                                             schema=_schema())
            return
        attempts.done()
        yield encode(outcome, lines.text())
    finally:
        lines.close()
        hub.close()
        own.join()


class _LogLines(logging.Handler):
    """The coordinator's log lines (sparkgd's logger, INFO and up), kept to send back
    with the outcome: the client logs them as its own (a Connect user sees the fit's
    iterations, after it)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []
        self.logger = logging.getLogger("sparkgd")
        self.level_before = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record):
        if len(self.lines) < MAX_LOG_LINES:
            self.lines.append(f"{record.levelname} {record.getMessage()}")

    def text(self):
        return "\n".join(self.lines)

    def close(self):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        super().close()


def replay_log(text):
    """The coordinator's lines, logged here (prefixed: they happened in the cluster)."""
    for line in (text or "").splitlines():
        level, _, message = line.partition(" ")
        log.log(getattr(logging, level, logging.INFO), "[cluster] %s", message)


class _OwnTask:
    """Task 0's own blocks, served from a thread of its own (to the hub beside it)."""

    def __init__(self):
        self.thread = None
        self.error = None

    def start(self, address, secret, attempt, blocks, facts, moments, threads, timeout,
              cols):
        def run():
            try:
                serve_blocks(address, secret, 0, attempt, blocks, facts, moments, threads,
                             timeout, work.parse, cols)
            except BaseException as e:   # reported by the hub's next wait
                self.error = e

        self.thread = threading.Thread(target=run, name="sparkgd-task-0", daemon=True)
        self.thread.start()

    def raise_if_failed(self):
        from .engine.hub import WorkersFailed

        if self.error is not None:
            raise WorkersFailed(f"serving task 0: {first_line(self.error)}")

    def join(self):
        if self.thread is not None:
            self.thread.join(timeout=30)


def _executor_host(ctx, index):
    """The host this task's executor is reached at (as Spark's own block transfers
    reach it)."""
    try:
        address = ctx.getTaskInfos()[index].address
        host = address.rsplit(":", 1)[0].strip("[]")
        if host:
            return host
    except Exception:   # pragma: no cover - an older Spark without task infos
        pass
    import socket

    return socket.gethostname()


def _schema():
    import pyarrow as pa

    return pa.schema([("kind", pa.string()), ("text", pa.string()), ("data", pa.binary())])


def encode(outcome, log_text=""):
    """The outcome as one Arrow batch: JSON for the plain fields (and the coordinator's
    log), the coefficients and intercepts as raw little-endian float64 (the client
    unpickles nothing)."""
    import pyarrow as pa

    coef = np.ascontiguousarray(outcome.coef, dtype="<f8")
    intercept = np.ascontiguousarray(outcome.intercept, dtype="<f8")
    columns = np.zeros(0, dtype="<i8") if outcome.columns is None else \
        np.ascontiguousarray(outcome.columns, dtype="<i8")
    text = json.dumps({"coef": list(coef.shape), "intercept": list(intercept.shape),
                       "columns": None if outcome.columns is None else int(columns.size),
                       "width": outcome.width,
                       "loss_name": outcome.loss_name, "loss_params": outcome.loss_params,
                       "num_classes": outcome.num_classes, "summary": outcome.summary,
                       "metrics": outcome.metrics, "no_metrics": outcome.no_metrics,
                       "log": log_text}, default=_plain)
    return pa.RecordBatch.from_pydict(
        {"kind": ["outcome"], "text": [text],
         "data": [coef.tobytes() + intercept.tobytes() + columns.tobytes()]},
        schema=_schema())


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON-able: {type(v).__name__}")


def decode(rows):
    """The job's output rows -> the Outcome (or the coordinator's one-line error)."""
    for row in rows:
        if row["kind"] == "error":
            replay_log(bytes(row["data"] or b"").decode("utf-8", "replace"))
            raise SparkgdError(row["text"])
        if row["kind"] != "outcome":
            continue
        meta = json.loads(row["text"])
        replay_log(meta.get("log"))
        data = bytes(row["data"])
        n, k = int(np.prod(meta["coef"])), int(np.prod(meta["intercept"]))
        m = meta.get("columns") or 0
        if len(data) != 8 * (n + k + m):
            raise SparkgdError("the fit's job returned a malformed model")
        values = np.frombuffer(data[:8 * (n + k)], dtype="<f8")
        coef = values[:n].reshape(meta["coef"]).copy()
        intercept = values[n:].reshape(meta["intercept"]).copy()
        columns = None if meta.get("columns") is None else \
            np.frombuffer(data[8 * (n + k):], dtype="<i8").copy()
        return coordinator.Outcome(coef, intercept, meta["loss_name"], meta["loss_params"],
                                   meta["num_classes"], meta["summary"], meta["metrics"],
                                   meta["no_metrics"], columns=columns,
                                   width=meta.get("width"))
    raise SparkgdError("the fit's job returned no model")


# --------------------------------------------------------------- from the client


def _from_client(frame, plan, read_spec, conf):
    """The coordinator in this client, over one Spark job per pass."""
    from .engine.frames import FrameStore

    store = FrameStore(frame, read_spec, plan.dtype, work.parse, conf["threads"])
    aggregator = Aggregator("star" if plan.engine_topology == "ring" else
                            plan.engine_topology, plan.aggregation_depth)
    attempts = coordinator.Attempts()
    engine = Engine._materialize(store, plan.spec, plan.source, aggregator, "jobs")
    with engine:
        outcome = coordinator.train(plan, engine, attempts)
    attempts.done()
    return outcome
