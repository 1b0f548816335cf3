"""The file store: blocks as memory-mapped files on executors.

Used with dynamic allocation, or when the served store cannot get a slot per task.
Caching NumPy blocks in Spark's cache would make the JVM stream every cached byte
to the Python worker again each iteration; that copy costs more than the
arithmetic. This store writes each block once, as raw binary files, into the
executor's own Spark local directory (``SPARK_LOCAL_DIRS``, which Spark deletes
when the executor exits), and the cached RDD holds only small *handles*. A task
maps its files (``np.memmap``): the OS page cache serves them, no
copy, no deserialization. The files are written straight from the Arrow batches
inside ``mapInArrow``, so the data never travels back through the JVM.

Passes reach the files either through one long-lived serving job
(:class:`WorkerSession`: one task per executor, theta and sums over the hub's
sockets) or, when the cluster cannot run every such task at once, through one Spark
job per pass (:func:`sparkgd.engine.jobs.pass_sums`); the engine decides.

Recovery:

* a lost executor loses its cached handles too; Spark recomputes them through
  lineage (re-reading the input), which writes the files again on whichever
  executor runs the task;
* a handle whose files are gone (deleted, or the task ran on another host than
  the one that wrote them) raises :class:`BlockMissing` in the task; the driver
  (:meth:`FileStore.run`) then drops the handles, rebuilds them through lineage
  and runs the job again. A fit never goes on with different data;
* a serving task whose input ended early (a lost shuffle fetch) is refused: the
  driver knows which blocks each task index must hold (:func:`keys_by_task`), and
  a new attempt of a lost task reconnects and gets the evaluation in progress.

:meth:`FileStore.release` unpersists the handles and deletes the files the fit
wrote (a job on every executor slot); whatever it cannot reach is inside the
executor's local directory, which Spark removes at exit.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid

import numpy as np
import scipy.sparse as sp

from .. import codecs
from ..data.arrow import BadInput, stored_dense, xyw_batches
from ..data.facts import block_info, block_key, merge_infos
from . import jobs, task, wire
from .keys import for_task as fit_key_for_task
from .hub import WorkersFailed
from .slots import coalesced_parents, local_cores, task_layout


MISSING_MARKER = "sparkgd-block-missing"


class BlockMissing(RuntimeError):
    """A task found a handle whose files are gone."""


def local_root():
    """This executor's first Spark local directory (a temp dir outside Spark)."""
    dirs = os.environ.get("SPARK_LOCAL_DIRS", "")
    first = dirs.split(",")[0] if dirs else ""
    return first or tempfile.gettempdir()


def fit_dir(fit_id):
    return os.path.join(local_root(), f"sparkgd-{fit_id}")


def _write(fh, a, dtype):
    """Append an array's bytes straight from its buffer: no ``tobytes`` copy, whose
    fresh allocation per batch cost more than the write itself."""
    a = np.ascontiguousarray(a, dtype=dtype)
    fh.write(memoryview(a).cast("B") if a.size else b"")


class _BlockFile:
    """Streams one block to raw files: rows are appended batch by batch, so a
    partition of any size is written with one Arrow batch in memory."""

    def __init__(self, directory, fmt, d, weighted, dtype="float64"):
        os.makedirs(directory, exist_ok=True)
        # Dense features are stored as ``dtype`` (float32 halves what a pass reads);
        # CSR values, labels and weights stay float64.
        self.x_dtype = np.dtype(dtype) if fmt == "dense" else np.dtype(np.float64)
        self.base = os.path.join(directory, uuid.uuid4().hex)
        self.fmt, self.d, self.n, self.nnz = fmt, int(d), 0, 0
        self.index_dtype = np.int32 if self.d < 2**31 else np.int64
        self.paths = {"y": self.base + ".y"}
        if weighted:
            self.paths["w"] = self.base + ".w"
        if fmt == "dense":
            self.paths["X"] = self.base + ".X"
        else:
            self.paths.update(data=self.base + ".data", indices=self.base + ".indices",
                              indptr=self.base + ".indptr")
        self.files = {k: open(v, "wb") for k, v in self.paths.items()}
        if fmt == "csr":
            self.files["indptr"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.info = None

    def add(self, X, y, w, info):
        f = self.files
        if self.fmt == "dense":
            _write(f["X"], X, self.x_dtype)
        else:
            X = X.tocsr()
            _write(f["data"], X.data, np.float64)
            _write(f["indices"], X.indices, self.index_dtype)
            _write(f["indptr"], X.indptr[1:].astype(np.int64) + self.nnz, np.int64)
            self.nnz += int(X.nnz)
        _write(f["y"], y, np.float64)
        if w is not None:
            _write(f["w"], w, np.float64)
        self.n += int(y.shape[0])
        self.info = info if self.info is None else merge_infos(self.info, info)

    def close(self):
        for fh in self.files.values():
            fh.close()
        indptr_dtype = "int64"
        if self.fmt == "csr" and self.index_dtype == np.int32 and self.nnz < 2**31:
            # SciPy keeps one index dtype: int32 row pointers map without a copy.
            path = self.paths["indptr"]
            ptr = np.fromfile(path, dtype=np.int64).astype(np.int32)
            ptr.tofile(path)
            indptr_dtype = "int32"
        handle = {"host": socket.gethostname(), "fmt": self.fmt, "n": self.n, "d": self.d,
                  "nnz": self.nnz, "w": None, "x_dtype": self.x_dtype.name,
                  "index_dtype": np.dtype(self.index_dtype).name, "indptr_dtype": indptr_dtype}
        handle.update(self.paths)
        return self.info, handle


def write_arrow_partition(batches, spec, fit_id, dtype="float64"):
    """mapInArrow body: Arrow batches of one partition -> block files, and one small
    row per block: ``info`` (facts, or the bad-input message) and ``handle`` (JSON).

    ``dtype``: how dense features are stored. With float32 the facts (moments) are
    computed from the rounded values, so they describe exactly what the passes read."""
    import pyarrow as pa

    def row(info, handle):
        return pa.RecordBatch.from_pydict({"info": [json.dumps(info)],
                                           "handle": [json.dumps(handle)]})

    directory = fit_dir(fit_id)
    current = None
    try:
        for X, y, w in xyw_batches(batches, spec):
            fmt = "csr" if sp.issparse(X) else "dense"
            if fmt == "dense":  # the facts below then describe the stored values
                X = stored_dense(X, spec, dtype)
            if current is not None and spec.kind == "libsvm":
                current.d = max(current.d, X.shape[1])   # as wide as its largest index
            elif current is not None and (current.fmt != fmt or current.d != X.shape[1]):
                yield row(*current.close())
                current = None
            if current is None:
                current = _BlockFile(directory, fmt, X.shape[1], w is not None, dtype)
            current.add(X, y, w, block_info(X, y, w))
    except BadInput as e:
        if current is not None:
            current.close()
        yield row({"error": str(e)}, None)
        return
    if current is not None:
        yield row(*current.close())


def _map(path, dtype, shape):
    try:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)
    except FileNotFoundError:
        raise BlockMissing(f"{MISSING_MARKER}: {path} is gone on {socket.gethostname()}") \
            from None


def open_block(handle):
    """A handle -> (X, y, w) backed by the memory-mapped files (no copy)."""
    n, d = handle["n"], handle["d"]
    y = _map(handle["y"], np.float64, (n,))
    w = None if handle.get("w") is None else _map(handle["w"], np.float64, (n,))
    if handle["fmt"] == "dense":
        X = _map(handle["X"], np.dtype(handle.get("x_dtype", "float64")), (n, d))
    else:
        nnz = handle["nnz"]
        data = _map(handle["data"], np.float64, (nnz,)) if nnz else np.zeros(0)
        idx = np.dtype(handle.get("index_dtype", "int64"))
        indices = _map(handle["indices"], idx, (nnz,)) if nnz else np.zeros(0, idx)
        indptr = _map(handle["indptr"], np.dtype(handle.get("indptr_dtype", "int64")), (n + 1,))
        X = sp.csr_matrix((data, indices, indptr), shape=(n, d), copy=False)
    return X, y, w


def _open_partition(pairs):
    for _info, handle in pairs:
        if handle is not None:
            yield open_block(handle)


def _open_keyed(pairs):
    for info, handle in pairs:
        if handle is not None:
            yield block_key(info), open_block(handle)


def keys_by_task(infos, parents):
    """The block keys each task must hold: ``parents[i]`` lists the data partitions
    task i reads (a coalesce groups several)."""
    by_part = {}
    for info in infos:
        if "part" in info:
            by_part.setdefault(int(info["part"]), []).append(block_key(info))
    return [sorted(k for p in ps for k in by_part.get(p, [])) for ps in parents]


def _stamp(part, pairs):
    """Give each block of data partition ``part`` its identity (see :func:`block_key`).

    Stamped here, by the RDD's own partition index, not from the task context: a
    coalesced task computes several partitions, and its context names only its own."""
    seq = 0
    for info, block in pairs:
        if block is not None:
            info = dict(info, part=part, seq=seq)
            seq += 1
        yield info, block


def _parse_handles(part, rows):
    return _stamp(part, ((json.loads(r["info"]), json.loads(r["handle"])) for r in rows))


def _remove_fit_dir(fit_id):
    shutil.rmtree(fit_dir(fit_id), ignore_errors=True)
    yield 0


class FileStore:
    """Handles to memory-mapped block files.

    ``_handles`` is an uncached RDD of (info, handle) whose computation writes the
    files (:func:`write_arrow_partition` under ``mapInArrow`` of the projection
    ``frame``): recomputing it through lineage rewrites them. ``self.rdd`` yields
    (X, y, w) for one Spark job per pass; :meth:`serve` runs a pass through the
    long-lived serving tasks instead.
    """

    kind = "files"

    def __init__(self, frame, spec, dtype="float64", parse_work=task.gradient_work):
        fit_id = uuid.uuid4().hex[:16]
        self.parse_work = parse_work
        fails = jobs.fail_first(frame.sparkSession.sparkContext.getConf())

        def build(it, _s=spec, _t=dtype):
            jobs.failing_first(fails)
            return write_arrow_partition(it, _s, fit_id, _t)

        rows = frame.mapInArrow(build, "info string, handle string")
        self._handles = rows.rdd.mapPartitionsWithIndex(_parse_handles)
        self.fit_id = fit_id
        self.rebuilds = 0
        self._cached = False
        self.rdd = None
        self.threads_per_task = 1
        self.certified = True       # a file-store pass never needs vouching for
        self._session = None
        self._rejected = 0          # by the hubs of sessions already closed
        self.wait_seconds = 30.0

    @property
    def context(self):
        return self._handles.context

    @property
    def num_tasks(self):
        return self.rdd.getNumPartitions()

    @property
    def num_partitions(self):
        return self._handles.getNumPartitions()

    def materialize(self):
        """Write the files (one pass over the input); return the block infos."""
        from pyspark import StorageLevel

        handles = self._handles
        handles.persist(StorageLevel.MEMORY_ONLY)
        handles.setName(f"sparkgd block handles {self.fit_id}")
        self._cached = True
        # One task per executor, its cores as threads: a Spark task costs more than
        # mapping a file, and a pass is mostly that fixed cost. coalesce() keeps each
        # handle's partition with the executor that cached it.
        tasks_wanted, self.threads_per_task = task_layout(handles.context)
        if handles.getNumPartitions() > tasks_wanted:
            tasks = handles.coalesce(tasks_wanted)
            parents = coalesced_parents(tasks)
        else:
            tasks, parents = handles, [[i] for i in range(handles.getNumPartitions())]
        self.rdd = tasks.mapPartitions(_open_partition, preservesPartitioning=True)
        self.serving_rdd = tasks.mapPartitions(_open_keyed, preservesPartitioning=True)
        from .jobs import described

        with described(handles.context, "sparkgd: build blocks"):
            infos = handles.map(lambda p: p[0]).collect()
        self.task_keys = keys_by_task(infos, parents)
        return infos

    def run(self, job, serving=False):
        """Run ``job(rdd)`` (``serving``: over (key, block) pairs, for serving tasks);
        if a task found its files gone, rebuild once and rerun."""
        pick = (lambda: self.serving_rdd) if serving else (lambda: self.rdd)
        try:
            return job(pick())
        except Exception as e:  # Py4J / PythonException carry the task's message
            if MISSING_MARKER not in str(e):
                raise
        self.rebuilds += 1
        self._drop()
        self.materialize()
        return job(pick())

    def _drop(self):
        if self._cached:
            self._handles.unpersist(blocking=True)
            self._cached = False

    def serve(self, theta, loss, layout, sample, codec, topology="star", depth=2,
              theta_codec=None, work=None):
        """One pass through the serving tasks -> the sums (see
        :meth:`~sparkgd.engine.hub.Hub.evaluate`; the job is started on first use, and
        again when a rebuild handed over a new RDD)."""
        return self.run(lambda rdd: self._serve(
            rdd, lambda s: s.evaluate(theta, sample), loss, layout, codec, topology, depth,
            theta_codec, work), serving=True)

    def pass_sums(self, theta, loss, layout, sample, aggregator, work=None):
        """One pass as one Spark job (:func:`~.jobs.pass_sums`)."""
        return jobs.pass_sums(self, theta, loss, layout, sample, aggregator, work)

    def run_async(self, loss, layout, codec, server, staleness, max_clock, work=None):
        """mode=async over the serving tasks (:meth:`~sparkgd.engine.hub.Hub.run_async`)."""
        return self.run(lambda rdd: self._serve(
            rdd, lambda s: s.run_async(server, staleness, max_clock), loss, layout, codec,
            "star", 2, None, work), serving=True)

    @property
    def hub(self):
        return self._session.hub if self._session is not None else None

    def task_weights(self):
        return None     # blocks' weights are known per block, not per serving task

    def rows_per_task(self):
        return [sum(int(k[2]) for k in keys) for keys in (self.task_keys or [])]

    @property
    def last_bytes(self):
        return self._session.hub.last_bytes

    def _serve(self, rdd, run, loss, layout, codec, topology, depth, theta_codec, work):
        session = self._session
        if session is None or session.rdd is not rdd:
            self.close_session()
            session = self._session = WorkerSession(rdd, self.threads_per_task,
                                                    self.wait_seconds, self.task_keys,
                                                    self.parse_work)
        try:
            session.configure(loss, layout, codec, topology, depth,
                              theta_codec or codecs.NONE, work)
            return run(session)
        except WorkersFailed:
            self.close_session()
            raise

    @property
    def rejected(self):
        return self._rejected + (self._session.rejected if self._session is not None else 0)

    def close_session(self):
        session, self._session = self._session, None
        if session is not None:
            session.close()
            self._rejected += session.rejected

    def release(self):
        """Stop the serving tasks, unpersist the handles and delete this fit's files on
        every executor slot."""
        self.close_session()
        self._drop()
        sc = self._handles.context
        # local mode is one executor: one task reaches every file; elsewhere a task per
        # slot (or per data partition) so that every executor gets one
        slots = 1 if local_cores(sc.master) is not None else \
            max(sc.defaultParallelism, self._handles.getNumPartitions(), 1)
        fit_id = self.fit_id
        try:
            sc.parallelize(range(slots), slots).mapPartitions(
                lambda _it: _remove_fit_dir(fit_id)).collect()
        except Exception:  # pragma: no cover - cleanup is best effort; Spark removes the
            pass           # local dirs when executors exit


# ------------------------------------------------------------ serving the files


class IncompleteInput(RuntimeError):
    """The driver refused a serving task: it did not get the blocks it should have."""


def serve_partition(index, items, address, secret, threads, timeout=60.0,
                    parse_work=task.gradient_work):
    """The body of one serving task: open the blocks once, then answer the driver
    until it says stop (or goes away). Captures plain values only.

    ``items``: (key, (X, y, w)) pairs. The task tells the driver which blocks it
    got; the driver refuses it unless they are exactly the blocks this task index
    must hold. That matters: when a task's input fails upstream (e.g. a shuffle
    fetch after a lost executor), Spark fails the task, but its Python side only
    sees the input end early and would serve what it got. A refused task raises
    (and ends)."""
    from pyspark import TaskContext

    secret = fit_key_for_task(secret)   # the fit's key, from what the closure carried
    pairs = list(items)           # blocks memory-mapped
    keys = [k for k, _ in pairs]
    blocks = [b for _, b in pairs]
    ctx = TaskContext.get()
    attempt = ctx.attemptNumber() if ctx is not None else 0
    chan = wire.connect(address, secret, index, attempt, keys, timeout=timeout)
    if chan is None:
        raise IncompleteInput(
            f"sparkgd: serving task {index} (attempt {attempt}) got {len(keys)} "
            f"block(s), not the ones it must hold: its input ended early")
    try:
        task.serve(chan, blocks, index, threads, secret, parse_work)
    finally:
        chan.close()
    yield index


class WorkerSession(jobs.ServingJob):
    """One serving job over ``rdd`` (one long-lived task per partition).

    ``evaluate(theta, sample)`` -> the per-task sums, in task order.
    ``close()`` stops the tasks and waits for the job; always call it.
    """

    def __init__(self, rdd, threads=1, wait_seconds=30.0, expected=None,
                 parse_work=task.gradient_work):
        super().__init__(rdd.context, "workers", rdd.getNumPartitions(), 0, wait_seconds,
                         expected, parse_work=parse_work)
        self.rdd = rdd
        self.num_tasks = rdd.getNumPartitions()
        hub = self.hub
        address, secret, timeout = self.address, self.task_key, self.connect_seconds
        fails = self.fail_first

        def body(i, it, _work=parse_work):
            jobs.failing_first(fails)
            return serve_partition(i, it, address, secret, threads, timeout, _work)

        self._start(lambda: rdd.mapPartitionsWithIndex(body).collect(),
                    "sparkgd: serve passes")
        try:
            hub.wait_for_tasks()
        except BaseException:
            self.close()
            raise
