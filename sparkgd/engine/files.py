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

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid

import numpy as np
import scipy.sparse as sp

from .. import codecs, kernels
from ..errors import SparkgdError
from ..data.arrow import BadInput, stored_dense, xyw_batches
from ..data.facts import block_info, block_key, merge_infos
from . import jobs, task, wire
from .jobs import MEMORY_MARKER, memory_guard
from .keys import for_task as fit_key_for_task
from .hub import WorkersFailed
from .slots import coalesced_parents, local_cores, task_layout


log = logging.getLogger("sparkgd")

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
    with memory_guard("writing the block files"):
        yield from _write_partition(batches, spec, directory, dtype, row)


def _write_partition(batches, spec, directory, dtype, row):
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


def _map(path, dtype, shape, offset=0):
    try:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)
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


#: What a streamed pass holds mapped of a block at once: a window of about this many bytes
#: of its rows (features, labels, weights).
WINDOW_BYTES = 32 << 20


def block_bytes(handle):
    """The bytes of one block's files (what mapping it whole adds to a process)."""
    n = int(handle["n"])
    rows = 8 * n * (2 if handle.get("w") else 1)
    if handle["fmt"] == "dense":
        return rows + n * int(handle["d"]) * np.dtype(handle.get("x_dtype", "float64")).itemsize
    nnz = int(handle["nnz"])
    return (rows + nnz * (8 + np.dtype(handle.get("index_dtype", "int64")).itemsize)
            + (n + 1) * np.dtype(handle.get("indptr_dtype", "int64")).itemsize)


def block_windows(handle, window_bytes=WINDOW_BYTES):
    """One block's rows as ``(X, y, w)`` windows of about ``window_bytes``, each mapping
    only its own rows of the files (unmapped when dropped): what a streamed pass reads."""
    n, d = int(handle["n"]), int(handle["d"])
    if n == 0:
        return
    step = max(1, int(window_bytes * n // max(block_bytes(handle), 1)))
    weighted = handle.get("w") is not None
    if handle["fmt"] == "dense":
        dtype = np.dtype(handle.get("x_dtype", "float64"))
        # whole row chunks of the kernels (kernels.row_chunks): the same chunks as the
        # block mapped whole, so the same sums
        chunk = kernels.chunk_rows(d, dtype.itemsize)
        step = max(chunk, step // chunk * chunk)
        if n * d * dtype.itemsize <= 2 * kernels.CHUNK_BYTES:
            step = n                             # one chunk in the kernels: one window
        for s in range(0, n, step):
            r = min(step, n - s)
            X = _map(handle["X"], dtype, (r, d), s * d * dtype.itemsize) if d else \
                np.zeros((r, 0), dtype)
            yield Window((X, _map(handle["y"], np.float64, (r,), 8 * s),
                          _map(handle["w"], np.float64, (r,), 8 * s) if weighted else None),
                         s, n)
        return
    idx = np.dtype(handle.get("index_dtype", "int64"))
    ptr_dtype = np.dtype(handle.get("indptr_dtype", "int64"))
    for s in range(0, n, step):
        r = min(step, n - s)
        ptr = np.array(_map(handle["indptr"], ptr_dtype, (r + 1,), s * ptr_dtype.itemsize))
        a, b = int(ptr[0]), int(ptr[-1])
        if b > a:
            data = _map(handle["data"], np.float64, (b - a,), 8 * a)
            indices = _map(handle["indices"], idx, (b - a,), idx.itemsize * a)
        else:
            data, indices = np.zeros(0), np.zeros(0, idx)
        X = sp.csr_matrix((data, indices, ptr - a), shape=(r, d), copy=False)
        yield Window((X, _map(handle["y"], np.float64, (r,), 8 * s),
                      _map(handle["w"], np.float64, (r,), 8 * s) if weighted else None), s, n)


class Window(tuple):
    """``(X, y, w)`` of rows ``start ..`` of a block of ``block_rows`` rows (a kernel
    that samples rows draws the block's sample and takes the window's part of it)."""

    def __new__(cls, xyw, start, block_rows):
        out = super().__new__(cls, xyw)
        out.start, out.block_rows = int(start), int(block_rows)
        return out


#: Spark conf (also at run time): the memory a task's blocks may take in its Python worker
#: (``512m``, ``2g``; MiB without a unit, as Spark's memory settings). Above it, the file
#: store's passes stream the blocks. Unset: half of what ``spark.executor.pyspark.memory``
#: gives each Python worker (that setting over ``spark.executor.cores``), else no limit.
BLOCK_MEMORY_CONF = "spark.sparkgd.blockMemory"


def memory_bytes(text):
    """A Spark memory setting (``700m``, ``2g``, ``1024``: MiB without a unit) -> bytes."""
    text = str(text).strip().lower()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if text.endswith("b") and text[-2:-1] in units:
        text = text[:-1]
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    value = float(number) * (scale or (1 << 20))
    if not value > 0:
        raise ValueError(text)
    return int(value)


def worker_memory(sc):
    """-> (bytes each Python worker may use, or None; how that was set, for messages)."""
    conf = jobs.Settings(sc.getConf())
    text = conf.get("spark.executor.pyspark.memory")
    if not text:
        return None, None
    cores = 1 if local_cores(sc.master) is not None else \
        int(conf.get("spark.executor.cores", "1") or 1)
    try:
        limit = memory_bytes(text) // max(cores, 1)
    except ValueError:
        return None, None
    how = f"spark.executor.pyspark.memory={text}" + (f" over {cores} cores" if cores > 1
                                                      else "")
    return limit, how


def block_budget(sc):
    """-> (the bytes a task's blocks may take in its Python worker, or None: no limit
    known; what set it, for messages): :data:`BLOCK_MEMORY_CONF`, else half of what
    ``spark.executor.pyspark.memory`` gives each Python worker."""
    text = jobs.Settings(sc.getConf()).get(BLOCK_MEMORY_CONF)
    if text:
        try:
            return memory_bytes(text), f"{BLOCK_MEMORY_CONF}={text}"
        except ValueError:
            raise SparkgdError(f"{BLOCK_MEMORY_CONF} must be a size such as 512m or 2g "
                               f"(got {text!r})") from None
    limit, how = worker_memory(sc)
    return (None, None) if limit is None else (limit // 2, how)


def served_too_big(sc, frame, spec, dtype, rows, slots):
    """Why the served store would not fit a task's share in its Python worker (a note),
    or None: with a memory budget (:func:`block_budget`) set, ``rows`` over ``slots``
    tasks, a row's bytes from the first row's features (numbers stored as ``dtype``)."""
    budget, how = block_budget(sc)
    if budget is None or not rows:
        return None
    if spec.kind == "columns":
        values = len(spec.features)
    else:
        from pyspark.sql import functions as F

        from ..data.schema import _quote

        first = frame.select(F.col(_quote(spec.features[0]))).head()
        value = None if first is None else first[0]
        if value is None or isinstance(value, str):
            return None                          # LIBSVM text: not known before parsing
        values = (value.numNonzeros() * 1.5 if hasattr(value, "numNonzeros") and
                  type(value).__name__ == "SparseVector" else len(value))
    share = rows / max(slots, 1) * (values * np.dtype(dtype).itemsize + 16)
    if share <= budget:
        return None
    return (f"a serving task would hold ~{share / 2**20:.0f} MiB of blocks in memory; "
            f"they may take {budget / 2**20:.0f} MiB ({how})")


def stream_choice(sc, infos, parents, dtype="float64"):
    """-> (the window a streamed pass maps, in bytes, or 0: the blocks are mapped whole;
    a note for messages). The passes stream when the largest task's blocks exceed
    :data:`BLOCK_MEMORY_CONF`, or half of each Python worker's
    ``spark.executor.pyspark.memory``; a window is a quarter of that budget, at most
    :data:`WINDOW_BYTES`."""
    budget, how = block_budget(sc)
    if budget is None:
        return 0, None
    itemsize = np.dtype(dtype).itemsize
    by_part = {}
    for info in infos:
        if "part" not in info:
            continue
        n, d, nnz = int(info["n"]), int(info["d"]), int(info["nnz"])
        values = nnz * itemsize if nnz == n * d else nnz * 12
        by_part[int(info["part"])] = by_part.get(int(info["part"]), 0) + values + 16 * n
    largest = max((sum(by_part.get(p, 0) for p in ps) for ps in parents), default=0)
    note = (f"a task's blocks take {largest / 2**20:.0f} MiB; they may take "
            f"{budget / 2**20:.0f} MiB ({how})")
    if largest <= budget:
        return 0, note
    return int(min(WINDOW_BYTES, max(budget // 4, 1 << 16))), note


#: What a task's failure says when its Python worker ran out of memory without the
#: guard seeing it (a native library's allocation failing, or the worker killed).
MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "Unable to allocate",
                "Python worker exited unexpectedly (crashed)")


def memory_error(error, sc):
    """The one-line SparkgdError for a task out of memory -- its :func:`memory_guard`
    error, or, with a memory limit set, a MemoryError or a crashed worker -- or None."""
    import re

    text = str(error)
    limit_bytes, how = worker_memory(sc)
    m = re.search(MEMORY_MARKER + r" (.*?): vm=(\d+) limit=(\d+|None)", text)
    if m is None:
        if how is None or not any(sign in text for sign in MEMORY_SIGNS):
            return None
        return SparkgdError(
            f"a Python worker crashed or ran out of memory building or reading the "
            f"blocks with {limit_bytes / 2**20:.0f} MiB of address space ({how}); it needs the "
            f"interpreter with NumPy, BLAS and Arrow (some 350 MiB), a batch of rows and a "
            f"{WINDOW_BYTES >> 20} MiB window of block files: raise "
            f"spark.executor.pyspark.memory")
    what, vm, limit = m.group(1), int(m.group(2)), m.group(3)
    had = (f"its limit of {int(limit) / 2**20:.0f} MiB ({how or 'RLIMIT_AS'})"
           if limit != "None" else "what its machine or container gives it")
    return SparkgdError(
        f"a Python worker ran out of memory {what}: it held {vm / 2**20:.0f} MiB of address "
        f"space against {had}; the interpreter, a batch of rows and a "
        f"{WINDOW_BYTES >> 20} MiB window of block files must fit: raise "
        f"spark.executor.pyspark.memory")


class Streamed:
    """A task's blocks read as windows (:func:`block_windows`) every time they are
    iterated -- once a pass -- so a few windows of them are mapped at once (one a kernel
    thread, and one read ahead), whatever their size. The kernels take it where they take
    a list of blocks. A window holds whole kernel chunks (at least 256 rows): dense rows
    wider than ~16,000 float64 values make it larger than the budget's quarter."""

    streamed = True

    def __init__(self, handles, window_bytes=WINDOW_BYTES):
        self.handles = list(handles)
        self.window_bytes = int(window_bytes)

    def __iter__(self):
        for j, handle in enumerate(self.handles):
            for window in block_windows(handle, self.window_bytes):
                window.block = j
                yield window

    @classmethod
    def join(cls, parts):
        return cls([h for p in parts for h in p.handles],
                   min((p.window_bytes for p in parts), default=WINDOW_BYTES))


def _mapped_or_streamed(handles, window):
    """The blocks of ``handles``: mapped whole, or :class:`Streamed` in windows of
    ``window`` bytes when that is not 0, or when mapping them whole fails for want of
    memory (a worker's limit the driver did not know of)."""
    if window:
        return Streamed(handles, window)
    try:
        return [open_block(h) for h in handles]
    except (MemoryError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ENOMEM:
            raise
        return Streamed(handles)


def _open_partition(pairs, window=0):
    """A task's blocks for one Spark job per pass (``window``: :func:`stream_choice`)."""
    return _mapped_or_streamed([h for _info, h in pairs if h is not None], window)


def _open_keyed(pairs, window=0):
    """A serving task's (key, block) pairs (``window``: :func:`stream_choice`)."""
    pairs = [(block_key(info), h) for info, h in pairs if h is not None]
    blocks = _mapped_or_streamed([h for _k, h in pairs], window)
    if isinstance(blocks, Streamed):
        return [(k, Streamed([h], blocks.window_bytes)) for k, h in pairs]
    return [(k, b) for (k, _h), b in zip(pairs, blocks)]


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
        self.dtype = dtype
        self.stream = False         # passes read the blocks as windows (stream_choice)
        self.memory_note = None
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
        from .jobs import described

        with described(handles.context, "sparkgd: build blocks"):
            infos = handles.map(lambda p: p[0]).collect()
        self.task_keys = keys_by_task(infos, parents)
        window, self.memory_note = stream_choice(handles.context, infos, parents,
                                                 self.dtype)
        self.stream = bool(window)
        if window:
            log.info("the passes stream the block files, windows of %.1f MiB of rows: %s",
                     window / 2**20, self.memory_note)
        self.rdd = tasks.mapPartitions(lambda it: _open_partition(it, window),
                                       preservesPartitioning=True)
        self.serving_rdd = tasks.mapPartitions(lambda it: _open_keyed(it, window),
                                               preservesPartitioning=True)
        return infos

    def run(self, job, serving=False):
        """Run ``job(rdd)`` (``serving``: over (key, block) pairs, for serving tasks);
        if a task found its files gone, rebuild once and rerun."""
        pick = (lambda: self.serving_rdd) if serving else (lambda: self.rdd)
        try:
            return job(pick())
        except Exception as e:  # Py4J / PythonException carry the task's message
            if MISSING_MARKER not in str(e):
                memory = memory_error(e, self.context)
                if memory is not None:
                    raise memory from None
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
    pairs = list(items)           # blocks memory-mapped (or streamed)
    keys = [k for k, _ in pairs]
    blocks = [b for _, b in pairs]
    if any(isinstance(b, Streamed) for b in blocks):
        blocks = Streamed.join(blocks)
    ctx = TaskContext.get()
    attempt = ctx.attemptNumber() if ctx is not None else 0
    chan = wire.connect(address, secret, index, attempt, keys, timeout=timeout)
    if chan is None:
        raise IncompleteInput(
            f"sparkgd: serving task {index} (attempt {attempt}) got {len(keys)} "
            f"block(s), not the ones it must hold: its input ended early")
    try:
        with memory_guard("serving passes over the block files"):
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
