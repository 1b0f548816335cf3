"""Long-lived executor tasks that serve gradient passes: no Spark job per iteration.

A Spark job costs a fixed ~0.07-0.1 s from PySpark (scheduling, closure and
broadcast shipping, result collection) however little it computes; on warm
blocks that is more than the arithmetic of a whole pass. So for the passes of
one fit, one Spark job runs long-lived tasks that hold blocks and connect back
to the driver over TCP; per evaluation the driver sends theta to every task,
each task returns its partition sums, and the driver adds them in task order::

    driver --theta--> task i: kernels.partition_sums(blocks_i, theta) --sums--> driver

Two kinds of job (:class:`Hub` is the driver's end of both):

* :class:`ServedJob` (dense data, the default): the tasks build their blocks
  from the DataFrame's Arrow batches and keep them in memory
  (:func:`serve_arrow_partition`), one task per slot; the facts of the blocks
  come in the task's hello (JSON), the loss and layout go out in OP_CONFIG;
* :class:`WorkerSession` (the file store): one task per executor over the
  cached block handles, mapping the block files (:func:`serve_partition`).

Wire format: fixed ``struct`` headers followed by raw little-endian float64 or
JSON, both length-checked; nothing received is unpickled or eval'd. A task
proves it belongs to this fit with a random per-session secret it got in its
closure.

Faults. When a task's input fails upstream (say a shuffle fetch after a lost
executor), Spark 4 fails the task at once, but its Python side only sees the
input end, and carries on as a zombie with what it got. Hence:

* file store: the driver knows the blocks each task index must hold (from the
  build job, which Spark completed) and refuses a task that reports others. A
  task whose executor is lost is rerun by Spark (the handles are recomputed
  through lineage, which rewrites the files) and the new attempt reconnects and
  gets the evaluation in progress; each task's sums do not depend on where it
  ran, so the fit is the same;
* served store: nothing vouches for a task's blocks until Spark sees the task
  succeed, at the end of the fit. So a lost task, or a second attempt of one,
  raises :class:`TaskLost`, and a fit whose job did not end cleanly is not
  certified; the estimator starts the fit over;
* the job failing (``spark.task.maxFailures`` reached, or a task found its
  block files gone): :class:`WorkersFailed` with the job's error;
* not enough free task slots to run every task at once (a busy cluster): after
  ``wait_seconds`` with fewer tasks running than needed the hub gives up with
  :class:`WorkersUnavailable`; the caller falls back to the file store / to
  one Spark job per pass, which never needs all tasks at once.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
import uuid

import numpy as np

log = logging.getLogger("sparkgd")

MAGIC = b"SGDW"
_HELLO = struct.Struct("<4s32siiQQQ")    # magic, secret, task index, attempt, blocks, facts,
# floats; then (partition, position, rows) as 3 int64 per block, the facts (JSON bytes)
# and an array of float64 (the feature moments: as JSON they would cost ~20 bytes a value);
# the driver answers one byte
ACCEPT, REJECT = b"\x01", b"\x00"
_REQUEST = struct.Struct("<BqdqQ")       # op, iteration, fraction, seed, len(theta)
_REPLY = struct.Struct("<Q")             # len(sums)
OP_STOP, OP_SUMS, OP_CONFIG = 0, 1, 2    # OP_CONFIG: len = bytes of JSON, no reply
#: refuse absurd lengths before allocating (2**31 float64 = 16 GiB)
_MAX_FLOATS = 1 << 31
_MAX_JSON = 1 << 26


class WorkersUnavailable(RuntimeError):
    """The cluster could not run every serving task at once."""


class WorkersFailed(RuntimeError):
    """The serving job ended with an error (its message is the job's)."""


class TaskLost(RuntimeError):
    """A serving task that holds its own blocks went away (or a new attempt of it
    appeared) during the fit: what it contributed can no longer be vouched for."""


# ----------------------------------------------------------------- wire format

def recv_exact(sock, n):
    """Exactly ``n`` bytes, or EOFError if the peer closed first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def pack_hello(secret, index, attempt, keys=(), facts=b"", floats=None):
    """The hello as a list of buffers (for ``sendall`` each: no copy of ``floats``)."""
    keys = np.asarray(list(keys), dtype="<i8").reshape(-1, 3)
    floats = np.zeros(0) if floats is None else np.ascontiguousarray(floats, dtype="<f8")
    return [_HELLO.pack(MAGIC, secret, int(index), int(attempt), keys.shape[0], len(facts),
                        floats.size) + keys.tobytes() + facts, memoryview(floats).cast("B")]


def send_hello(sock, *args, **kwargs):
    for part in pack_hello(*args, **kwargs):
        sock.sendall(part)


def read_hello(sock, secret):
    """-> (index, attempt, sorted block keys, facts bytes, floats); ValueError unless magic
    and secret match."""
    magic, got, index, attempt, count, nfacts, nfloats = _HELLO.unpack(
        recv_exact(sock, _HELLO.size))
    if magic != MAGIC or not hmac.compare_digest(got, secret):
        raise ValueError("not a sparkgd task of this session")
    if count > _MAX_FLOATS // 3 or nfacts > _MAX_JSON or nfloats > _MAX_FLOATS:
        raise ValueError(f"hello with {count} blocks, {nfacts} bytes of facts and "
                         f"{nfloats} values")
    keys = np.frombuffer(recv_exact(sock, 24 * count), dtype="<i8").reshape(-1, 3)
    facts = bytes(recv_exact(sock, nfacts)) if nfacts else b""
    floats = np.frombuffer(recv_exact(sock, 8 * nfloats), dtype="<f8") if nfloats \
        else np.zeros(0)
    return index, attempt, sorted(tuple(int(v) for v in k) for k in keys), facts, floats


def pack_request(op, theta=None, sample=None):
    """``sample``: None (full pass) or (fraction, seed, iteration)."""
    fraction, seed, iteration = (1.0, 0, 0) if sample is None else sample
    theta = np.zeros(0) if theta is None else np.ascontiguousarray(theta, dtype="<f8")
    return _REQUEST.pack(op, int(iteration), float(fraction), int(seed), theta.size) \
        + theta.tobytes()


def pack_config(config):
    """What a serving task that built its own blocks computes: loss and layout (JSON)."""
    body = json.dumps(config).encode()
    return _REQUEST.pack(OP_CONFIG, 0, 1.0, 0, len(body)) + body


def read_request(sock):
    """-> (op, theta, sample or None); for OP_CONFIG, (op, config dict, None)."""
    op, iteration, fraction, seed, size = _REQUEST.unpack(recv_exact(sock, _REQUEST.size))
    if op == OP_CONFIG and size <= _MAX_JSON:
        return op, json.loads(bytes(recv_exact(sock, size))), None
    if op not in (OP_STOP, OP_SUMS) or size > _MAX_FLOATS:
        raise ValueError(f"bad request header (op {op}, {size} values)")
    theta = np.frombuffer(recv_exact(sock, 8 * size), dtype="<f8") if size else np.zeros(0)
    sample = None if fraction >= 1.0 else (fraction, seed, iteration)
    return op, theta, sample


def pack_reply(sums):
    sums = np.ascontiguousarray(sums, dtype="<f8")
    return _REPLY.pack(sums.size) + sums.tobytes()


def read_reply(sock, size):
    (n,) = _REPLY.unpack(recv_exact(sock, _REPLY.size))
    if n != size:
        raise ValueError(f"reply of {n} values, expected {size}")
    return np.frombuffer(recv_exact(sock, 8 * n), dtype="<f8")


# --------------------------------------------------------------- executor side

class IncompleteInput(RuntimeError):
    """The driver refused a serving task: it did not get the blocks it should have."""


def serve_partition(index, items, address, secret, loss, layout, threads):
    """The body of one serving task: open the blocks once, then answer the driver
    until it says stop (or goes away). Captures plain values only.

    ``items``: (key, (X, y, w)) pairs. The task tells the driver which blocks it
    got; the driver refuses it unless they are exactly the blocks this task index
    must hold. That matters: when a task's input fails upstream (e.g. a shuffle
    fetch after a lost executor), Spark fails the task, but its Python side only
    sees the input end early and would serve what it got. A refused task raises
    (and ends)."""
    from pyspark import TaskContext

    pairs = list(items)           # blocks memory-mapped with the file store
    keys = [k for k, _ in pairs]
    blocks = [b for _, b in pairs]
    ctx = TaskContext.get()
    attempt = ctx.attemptNumber() if ctx is not None else 0
    sock = socket.create_connection(tuple(address), timeout=60)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_hello(sock, secret, index, attempt, keys)
        if recv_exact(sock, 1) != ACCEPT:
            raise IncompleteInput(
                f"sparkgd: serving task {index} (attempt {attempt}) got {len(keys)} "
                f"block(s), not the ones it must hold: its input ended early")
        sock.settimeout(None)
        _serve(sock, blocks, index, loss, layout, threads)
    finally:
        sock.close()
    yield index


def _serve(sock, blocks, index, loss, layout, threads):
    """Answer the driver until it says stop (or goes away)."""
    from . import kernels

    while True:
        try:
            op, theta, sample = read_request(sock)
        except EOFError:      # the driver ended the session (or died)
            return
        if op == OP_STOP:
            return
        if op == OP_CONFIG:
            loss = kernels.make_loss(theta["loss"], **theta["params"])
            layout = kernels.Layout(*theta["layout"])
            continue
        if sample is not None:
            sample = sample + (index,)
        sums = kernels.partition_sums(blocks, theta, loss, layout, sample=sample,
                                      threads=threads)
        sock.sendall(pack_reply(sums))


#: CSR batches of a serving task are stacked into blocks of up to this many non-zeros:
#: a pass then makes one gradient-sized vector per block, not one per Arrow batch (at
#: 10^6 features that vector is 8 MB), and the Arrow batches are freed.
CSR_BLOCK_NNZ = 1 << 24


def stack_csr(blocks, max_nnz=CSR_BLOCK_NNZ):
    """Consecutive CSR blocks ``(X, y, w)`` stacked into as few as ``max_nnz`` allows
    (dense blocks are kept as they are); the rows keep their order."""
    import scipy.sparse as sp

    from .data import concat_xyw

    out, run, nnz = [], [], 0

    def flush():
        if run:
            X, y, w = concat_xyw(run)
            out.append((X.tocsr(), y, w))
            run.clear()

    for block in blocks:
        if not sp.issparse(block[0]):
            flush()
            nnz = 0
            out.append(block)
            continue
        if run and nnz + block[0].nnz > max_nnz:
            flush()
            nnz = 0
        run.append(block)
        nnz += block[0].nnz
    flush()
    return out


def serve_arrow_partition(batches, spec, dtype, address, secret, threads=1):
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
    import scipy.sparse as sp
    from pyspark import TaskContext

    from .blockstore import merge_infos
    from .data import BadInput, block_info, stored_dense, xyw_batches
    from .stats import block_moments, merge_moments

    ctx = TaskContext.get()
    index = ctx.partitionId() if ctx is not None else 0
    attempt = ctx.attemptNumber() if ctx is not None else 0
    blocks, info = [], None
    moments = None
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
            m = block_moments(X, w, X.shape[1])
            moments = m if moments is None else merge_moments(moments, m)
            blocks.append((X, y, w))
        blocks = stack_csr(blocks)
        facts = {} if info is None else dict(info, part=index, seq=0, pid=os.getpid())
    except BadInput as e:
        blocks, facts, moments = [], {"error": str(e)}, None
    sock = socket.create_connection(tuple(address), timeout=60)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_hello(sock, secret, index, attempt, facts=json.dumps(facts).encode(),
                   floats=moments)
        if recv_exact(sock, 1) != ACCEPT:
            raise TaskLost(f"sparkgd: serving task {index} (attempt {attempt}) was refused")
        sock.settimeout(None)
        # with bad input too: stay until the driver has everyone's facts and says stop
        # (leaving early would look like a lost task)
        _serve(sock, blocks, index, None, None, threads)
    finally:
        sock.close()
    yield pa.RecordBatch.from_pydict({"rows": [facts.get("n", 0)]})


# ----------------------------------------------------------------- driver side

def _driver_address(sc):
    conf = sc.getConf()
    host = conf.get("spark.driver.host", None) or socket.gethostname()
    bind = conf.get("spark.driver.bindAddress", None) or host
    return bind, host


class Hub:
    """The driver's end of the sockets: accepts tasks, hands out requests, reads
    replies. Knows nothing of Spark: ``ended()`` raises if the tasks' job is over,
    ``running()`` says how many tasks are running (both asked only while waiting).
    """

    def __init__(self, num_tasks, size, bind, ended, running, wait_seconds=30.0,
                 expected=None, strict=False, failed=None):
        self.num_tasks, self.size = int(num_tasks), int(size)
        #: strict: a lost task or a second attempt of one raises TaskLost instead of
        #: being waited for (tasks that built their own blocks: see ServedJob)
        self.strict = strict
        self._failed = failed         # -> number of failed task attempts so far
        self.facts = {}               # task index -> the facts bytes of its hello
        self.floats = {}              # task index -> the float64 array of its hello
        #: per task index, the sorted block keys it must report (None: not checked)
        self.expected = expected
        self.refused = 0
        self.wait_seconds = float(wait_seconds)
        self.secret = os.urandom(16).hex().encode()
        self.reconnects = 0
        self.short = False            # gave up waiting for task slots
        self._ended, self._running = ended, running
        self._listener = socket.create_server((bind, 0), backlog=socket.SOMAXCONN)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._conns = {}
        self._seen = set()            # task indices that have ever been accepted

    def wait_for_tasks(self):
        self._wait(lambda: len(self._conns) < self.num_tasks, None, set())
        if self.strict:
            # a task Spark failed (its input broke upstream) may still have connected,
            # its Python side unaware: if the driver already knows, stop here
            self._ended()
            if self._failed is not None and self._failed() > 0:
                raise WorkersFailed("a task failed while the blocks were built")

    def evaluate(self, theta, sample=None):
        """Every task's sums for ``theta``, in task order."""
        request = pack_request(OP_SUMS, theta, sample)
        pending = set(range(self.num_tasks))
        for i in sorted(self._conns):
            self._send(i, request)
        replies = {}
        self._wait(lambda: bool(pending), request, pending, replies)
        return [replies[i] for i in range(self.num_tasks)]

    def _send(self, i, request):
        try:
            self._conns[i].sendall(request)
        except OSError:
            self._drop(i)
            self._lost(i)

    def _lost(self, i, attempt=None):
        if self.strict and self._listener is not None:
            again = "" if attempt is None else f" (a new attempt, {attempt}, connected)"
            raise TaskLost(f"serving task {i} was lost{again}")

    def configure(self, config):
        """Send every task the loss and layout to compute with (OP_CONFIG)."""
        request = pack_config(config)
        for i in sorted(self._conns):
            self._send(i, request)

    def _drop(self, i):
        conn = self._conns.pop(i, None)
        if conn is not None:
            self._sel.unregister(conn)
            conn.close()

    def _wait(self, waiting, request, pending, replies=None):
        """Serve the selector until ``waiting()`` is false: accept (re)connecting
        tasks, hand them the request in progress, read replies."""
        short_since = None
        while waiting():
            for key, _ in self._sel.select(timeout=0.25):
                if key.data is None:
                    self._accept(request, pending)
                    continue
                i = key.data
                try:
                    reply = read_reply(key.fileobj, self.size)
                except (OSError, EOFError, ValueError):
                    self._drop(i)   # its task is gone; a new attempt will connect
                    self._lost(i)
                    continue
                if replies is not None and i in pending:
                    replies[i] = reply
                    pending.discard(i)
            if not waiting():
                break
            self._ended()
            if len(self._conns) < self.num_tasks:
                running = self._running()
                # strict (served) jobs compute their input first, and upstream stages
                # count as running tasks too: until a served task connects, only a job
                # with nothing running at all is short of slots
                enough = running > 0 if self.strict and not self._seen else \
                    running >= self.num_tasks
                if enough:
                    short_since = None
                elif short_since is None:
                    short_since = time.monotonic()
                elif time.monotonic() - short_since > self.wait_seconds:
                    self.short = True
                    raise WorkersUnavailable(
                        f"only {running} of {self.num_tasks} serving tasks could run at "
                        f"once for {self.wait_seconds:g}s")

    def _accept(self, request, pending):
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            conn.setblocking(True)
            conn.settimeout(30)
            index, attempt, keys, facts, floats = read_hello(conn, self.secret)
            if not 0 <= index < self.num_tasks:
                raise ValueError(f"task index {index} out of range")
            if self.strict and index in self._seen:
                conn.sendall(REJECT)
                conn.close()
                self._lost(index, attempt)
            if self.expected is not None and keys != self.expected[index]:
                self.refused += 1
                log.info("serving task %d (attempt %d) refused: %d of %d blocks as expected",
                         index, attempt, len(set(keys) & set(self.expected[index])),
                         len(self.expected[index]))
                conn.sendall(REJECT)
                raise ValueError("incomplete input")
            conn.sendall(ACCEPT)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, EOFError, ValueError, struct.error):
            conn.close()
            return
        if index in self._conns:    # a newer attempt of a task we still had
            self._drop(index)
        if index in self._seen:
            self.reconnects += 1
            log.info("serving task %d reconnected (attempt %d)", index, attempt)
        self._seen.add(index)
        self.facts[index] = facts
        self.floats[index] = floats
        self._conns[index] = conn
        self._sel.register(conn, selectors.EVENT_READ, index)
        if request is not None and index in pending:
            self._send(index, request)

    def close(self):
        """Tell every connected task to stop; close the sockets."""
        stop = pack_request(OP_STOP)
        listener, self._listener = self._listener, None   # no TaskLost while stopping
        if listener is None:
            return
        for i in list(self._conns):
            self._send(i, stop)
            self._drop(i)
        self._sel.close()
        listener.close()


class _ServingJob:
    """A Spark job that runs in a driver thread for the length of a fit, under its own
    job group, while :class:`Hub` talks to its tasks."""

    def __init__(self, sc, kind):
        self._sc = sc
        self._group = f"sparkgd-{kind}-{uuid.uuid4().hex[:12]}"
        self._error = None
        self._done = threading.Event()
        self._thread = None
        self.hub = None

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


class WorkerSession(_ServingJob):
    """One serving job over ``rdd`` (one long-lived task per partition).

    ``evaluate(theta, sample)`` -> the per-task sums, in task order.
    ``close()`` stops the tasks and waits for the job; always call it.
    """

    def __init__(self, rdd, loss, layout, threads=1, wait_seconds=30.0, expected=None):
        super().__init__(rdd.context, "workers")
        self.rdd = rdd
        self.num_tasks = rdd.getNumPartitions()
        bind, host = _driver_address(self._sc)
        self.hub = hub = Hub(self.num_tasks, 2 + layout.size, bind, self._raise_if_ended,
                             self._running_tasks, wait_seconds, expected)
        address, secret = (host, hub.port), hub.secret

        def body(i, it):
            return serve_partition(i, it, address, secret, loss, layout, threads)

        self._start(lambda: rdd.mapPartitionsWithIndex(body).collect(),
                    "sparkgd: serving gradient passes")
        try:
            hub.wait_for_tasks()
        except BaseException:
            self.close()
            raise


class ServedJob(_ServingJob):
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

    def __init__(self, frame, spec, dtype="float64", wait_seconds=30.0, threads=1):
        sc = frame.sparkSession.sparkContext
        super().__init__(sc, "served")
        self.certified = False
        self.lost = False
        self.config = None
        bind, host = _driver_address(sc)
        self.hub = hub = Hub(0, 0, bind, self._raise_if_ended, self._running_tasks,
                             wait_seconds, strict=True, failed=self._failed_tasks)
        address, secret = (host, hub.port), hub.secret

        def body(it, _spec=spec, _dtype=dtype, _threads=threads):
            return serve_arrow_partition(it, _spec, _dtype, address, secret, _threads)

        try:
            # One RDD, counted and run: with adaptive execution, planning the query
            # (``.rdd``) runs its upstream stages, so a second query would run them again.
            self.rdd = frame.mapInArrow(body, "rows long").rdd
            self.num_tasks = hub.num_tasks = self.rdd.getNumPartitions()
            log.info("sparkgd: %d task(s) build and serve the blocks", self.num_tasks)
            self._start(self.rdd.collect, "sparkgd: blocks built and served by the same tasks")
            hub.wait_for_tasks()
        except BaseException:
            self.lost = True
            self.close()
            raise
        self.facts = []
        for i in range(self.num_tasks):
            facts = json.loads(hub.facts[i] or b"{}")
            if facts and "error" not in facts:
                facts["moments"] = hub.floats[i]
            self.facts.append(facts)

    def configure(self, loss, layout):
        """Tell the tasks what to compute (again only when it changed)."""
        config = {"loss": loss.name, "params": loss.params(),
                  "layout": [layout.d, layout.k, layout.fit_intercept]}
        if config == self.config:
            return
        self.hub.size = 2 + layout.size
        try:
            self.hub.configure(config)
        except TaskLost:
            self.lost = True
            raise
        self.config = config

    def evaluate(self, theta, sample=None):
        try:
            return self.hub.evaluate(theta, sample)
        except TaskLost:
            self.lost = True
            raise
        except WorkersFailed as e:  # the job ended under the fit: its blocks are gone
            self.lost = True
            log.info("sparkgd: the serving job failed: %s", e)
            raise TaskLost(f"the serving job failed: {str(e).splitlines()[0]}") from None

    def close(self):
        if self.lost and self._thread is not None and self._thread.is_alive():
            # its passes are void: do not wait for Spark's retries of a lost task
            self.hub.close()
            self._sc.cancelJobGroup(self._group)
        super().close()
        self.certified = not self.lost and self._done.is_set() and self._error is None
