"""Where cached blocks live between iterations.

Three stores:

* :class:`ServedBlocks` (the default, dense or sparse features): the tasks that
  read the DataFrame keep its Arrow batches (dense) or CSR blocks (sparse) in their
  Python workers' memory and serve the fit's passes themselves; nothing is written,
  no second job runs. A lost task means the fit starts over (see
  :mod:`sparkgd.workers`);
* :class:`FileBlocks` (with dynamic allocation, or when the served store cannot get
  a slot per task): memory-mapped files on executors, described below;
* :class:`MemoryBlocks`: pickled blocks in Spark's cache, the plain path, kept
  for comparison.

Caching NumPy blocks in Spark's cache means the JVM streams every cached byte
to the Python worker again each iteration; that copy costs more than the
arithmetic. The file store writes each block once, as raw binary files, into the
executor's own Spark local directory (``SPARK_LOCAL_DIRS``, which Spark deletes
when the executor exits), and the cached RDD holds only small *handles*. A task
maps its files (``np.memmap``): the OS page cache serves them, no
copy, no deserialization. The files are written straight from the Arrow batches
inside ``mapInArrow``, so the data never travels back through the JVM.

Recovery:

* a lost executor loses its cached handles too; Spark recomputes them through
  lineage (re-reading the input), which writes the files again on whichever
  executor runs the task;
* a handle whose files are gone (deleted, or the task ran on another host than
  the one that wrote them) raises :class:`BlockMissing` in the task; the driver
  (:meth:`FileBlocks.run`) then drops the handles, rebuilds them through lineage
  and runs the job again. A fit never goes on with different data.

:meth:`FileBlocks.release` unpersists the handles and deletes the files the fit
wrote (a job on every executor slot); whatever it cannot reach is inside the
executor's local directory, which Spark removes at exit.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid

import numpy as np
import scipy.sparse as sp

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


def merge_infos(a, b):
    """Combine the facts of two row sets (see ``data.block_info``)."""
    from .data import merge_label_weights
    from .stats import merge_moments

    return {"n": a["n"] + b["n"], "d": max(a["d"], b["d"]), "wsum": a["wsum"] + b["wsum"],
            "ymin": min(a["ymin"], b["ymin"]), "ymax": max(a["ymax"], b["ymax"]),
            "yint": a["yint"] and b["yint"], "nnz": a["nnz"] + b["nnz"],
            "yw": merge_label_weights(a.get("yw"), b.get("yw")),
            "moments": None if a.get("moments") is None or b.get("moments") is None
            else merge_moments(np.asarray(a["moments"]), np.asarray(b["moments"])).tolist()}


def write_arrow_partition(batches, spec, fit_id, dtype="float64"):
    """mapInArrow body: Arrow batches of one partition -> block files, and one small
    row per block: ``info`` (facts, or the bad-input message) and ``handle`` (JSON).

    ``dtype``: how dense features are stored. With float32 the facts (moments) are
    computed from the rounded values, so they describe exactly what the passes read."""
    import json

    import pyarrow as pa

    from .data import BadInput, block_info, stored_dense, xyw_batches

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
    from .data import block_key

    for info, handle in pairs:
        if handle is not None:
            yield block_key(info), open_block(handle)


def _keyed_in_memory(pairs):
    from .data import block_key

    for info, block in pairs:
        if block is not None:
            yield block_key(info), block


def keys_by_task(infos, parents):
    """The block keys each task must hold: ``parents[i]`` lists the data partitions
    task i reads (a coalesce groups several)."""
    from .data import block_key

    by_part = {}
    for info in infos:
        if "part" in info:
            by_part.setdefault(int(info["part"]), []).append(block_key(info))
    return [sorted(k for p in ps for k in by_part.get(p, [])) for ps in parents]


def coalesced_parents(rdd):
    """Data partitions behind each partition of ``rdd``, a ``coalesce`` of them, as
    Spark's own CoalescedRDD grouped them."""
    return [[int(i) for i in part.parentsIndices()] for part in rdd._jrdd.rdd().partitions()]


def _remove_fit_dir(fit_id):
    shutil.rmtree(fit_dir(fit_id), ignore_errors=True)
    yield 0


class MemoryBlocks:
    """Blocks pickled into Spark's own cache (the plain path, kept for comparison:
    every iteration streams the cached bytes from the JVM to Python again)."""

    kind = "memory"

    def __init__(self, pairs):
        self._pairs = pairs
        self.rdd = None
        self.rebuilds = 0

    def materialize(self):
        from pyspark import StorageLevel

        self._pairs.persist(StorageLevel.MEMORY_ONLY)
        self._pairs.setName("sparkgd blocks")
        self.rdd = self._pairs.mapPartitions(_open_in_memory, preservesPartitioning=True)
        self.serving_rdd = self._pairs.mapPartitions(_keyed_in_memory,
                                                     preservesPartitioning=True)
        infos = self._pairs.map(lambda p: p[0]).collect()
        self.task_keys = keys_by_task(infos, [[i] for i in range(self.num_partitions)])
        return infos

    @property
    def num_partitions(self):
        return self._pairs.getNumPartitions()

    def run(self, job, serving=False):
        """``job(rdd)``; ``serving``: over (key, block) pairs, for serving tasks."""
        return job(self.serving_rdd if serving else self.rdd)

    def release(self):
        self._pairs.unpersist(blocking=False)


def _open_in_memory(pairs):
    for _info, block in pairs:
        if block is not None:
            yield block


def local_cores(master):
    """Task slots of a ``local``/``local[N]``/``local[*]``/``local[N,F]`` master;
    None for any other master (a cluster: its slots are not known up front)."""
    import re

    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master.strip())
    if m is None:
        return None
    n = m.group(1)
    if n is None:
        return 1
    return max(1, os.cpu_count() or 1) if n == "*" else max(1, int(n))


def task_layout(sc):
    """-> (tasks per pass, threads per task): one task per executor using its cores.

    ``local[N]`` is one executor with N cores; elsewhere ``spark.executor.cores``
    (default 1) says how many cores each executor has.
    """
    cores = local_cores(sc.master)
    if cores is not None:
        return 1, cores
    slots = max(1, sc.defaultParallelism)
    cores = int(sc.getConf().get("spark.executor.cores", "1") or 1)
    cores = max(1, min(cores, slots))
    return max(1, slots // cores), cores


class FileBlocks:
    """Handles to memory-mapped block files; the fast block store.

    ``handles`` is an uncached RDD of (info, handle) whose computation writes the
    files (:func:`write_arrow_partition` under ``mapInArrow``): recomputing it
    through lineage rewrites them. ``self.rdd`` yields (X, y, w) like the
    in-memory store, so kernels do not know which store they read.
    """

    kind = "files"

    def __init__(self, handles, fit_id):
        self._handles = handles
        self.fit_id = fit_id
        self.rebuilds = 0
        self._cached = False
        self.rdd = None
        self.threads_per_task = 1

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

    def release(self):
        """Unpersist the handles and delete this fit's files on every executor slot."""
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


def coalesced_input_partitions(rdd):
    """Partitions of the data under the ``coalesce`` in ``rdd``'s lineage (None if
    there is none, or Spark's internals do not say)."""
    try:
        todo, seen = [rdd._jrdd.rdd()], 0
        while todo and seen < 100:
            r = todo.pop()
            seen += 1
            if r.getClass().getSimpleName() == "CoalescedRDD":
                return int(r.prev().getNumPartitions())
            deps = r.dependencies()
            todo.extend(deps.apply(j).rdd() for j in range(deps.size()))
    except Exception:  # pragma: no cover - internals of another Spark version
        pass
    return None


def task_cpus(sc):
    """``spark.task.cpus``: the cores each task gets."""
    return max(1, int(sc.getConf().get("spark.task.cpus", "1") or 1))


def task_slots(sc):
    """Tasks that can run at once: the slots of the executors registered now (what
    Spark's barrier mode checks against; in local mode the cores Spark itself counted,
    which respects a container's CPU limit), else the master's ``local[N]``, else
    ``defaultParallelism`` over ``spark.task.cpus``."""
    try:
        jsc = sc._jsc.sc()
        slots = int(jsc.maxNumConcurrentTasks(
            jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # an internal method: if a Spark version lacks it, estimate
        slots = 0
    if slots > 0:
        return slots
    cores = local_cores(sc.master)
    if cores is not None:
        return cores
    conf, cpus = sc.getConf(), task_cpus(sc)
    instances = conf.get("spark.executor.instances", None)
    per = conf.get("spark.executor.cores", None)
    if instances and per:   # no executor has registered yet: what was asked for
        return max(1, int(instances) * int(per) // cpus)
    return max(1, sc.defaultParallelism // cpus)


#: How long the served store waits for all its tasks to run before using files instead.
SERVED_WAIT_SECONDS = 30.0


class ServedBlocks:
    """Blocks built and served by the same tasks (:class:`sparkgd.workers.ServedJob`):
    the fast path.

    One task per task slot reads its share of the DataFrame (a ``coalesce``, no
    shuffle) and keeps the Arrow batches in its Python worker's memory; the passes of
    the fit go to those tasks over sockets. Nothing is written to disk, and there is
    no second job to start. Every task must run at once, so the job uses at most one
    task per slot; when that many cannot start, :meth:`materialize` raises
    :class:`~sparkgd.workers.WorkersUnavailable` and the caller uses
    :class:`FileBlocks`. A lost task cannot be recomputed behind the fit's back: the
    fit is started over (see ``certified``).
    """

    kind = "served"

    def __init__(self, frame, spec, dtype, num_partitions, wait_seconds=None, threads=1):
        self._frame, self._spec, self._dtype = frame, spec, dtype
        self.num_partitions = num_partitions
        self.wait_seconds = SERVED_WAIT_SECONDS if wait_seconds is None else wait_seconds
        self.threads_per_task = max(1, int(threads))   # spark.task.cpus
        self.rebuilds = 0
        self.job = None

    @property
    def num_tasks(self):
        return self.job.num_tasks if self.job is not None else None

    def materialize(self):
        from .workers import ServedJob, WorkersFailed, WorkersUnavailable

        try:
            self.job = ServedJob(self._frame, self._spec, self._dtype, self.wait_seconds,
                                 self.threads_per_task)
        except WorkersFailed as e:
            # e.g. a Python worker out of memory: the file store may well manage (and
            # reports the input's own errors as well as this store would)
            raise WorkersUnavailable(f"the served build failed ({str(e).splitlines()[0]})") \
                from None
        if self.num_partitions is None:
            self.num_partitions = coalesced_input_partitions(self.job.rdd) or self.num_tasks
        return [f for f in self.job.facts if f]

    @property
    def certified(self):
        """After release: every pass came from tasks that Spark then saw succeed."""
        return self.job is not None and self.job.certified

    def release(self):
        if self.job is not None:
            self.job.close()
