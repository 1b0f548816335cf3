"""Where cached blocks live between iterations: memory-mapped files on executors.

Caching NumPy blocks in Spark's cache means the JVM streams every cached byte
to the Python worker again each iteration; that copy costs more than the
arithmetic. Instead each block is written once, as raw ``.npy`` files, into the
executor's own Spark local directory (``SPARK_LOCAL_DIRS``, which Spark deletes
when the executor exits), and the cached RDD holds only small *handles*. A task
maps its files (``np.load(mmap_mode="r")``): the OS page cache serves them, no
copy, no deserialization.

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


def _save(path, array):
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return path


def write_block(directory, name, X, y, w):
    """Write one block as .npy files; return its handle (a small dict)."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, name)
    handle = {"host": socket.gethostname(), "n": int(y.shape[0]), "d": int(X.shape[1]),
              "y": _save(base + ".y.npy", y),
              "w": None if w is None else _save(base + ".w.npy", w)}
    if sp.issparse(X):
        X = X.tocsr()
        handle.update(fmt="csr", data=_save(base + ".data.npy", X.data),
                      indices=_save(base + ".indices.npy", X.indices),
                      indptr=_save(base + ".indptr.npy", X.indptr))
    else:
        handle.update(fmt="dense", X=_save(base + ".X.npy", X))
    return handle


def _load(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise BlockMissing(f"{MISSING_MARKER}: {path} is gone on {socket.gethostname()}") \
            from None


def open_block(handle):
    """A handle -> (X, y, w) backed by the memory-mapped files."""
    y = _load(handle["y"])
    w = None if handle["w"] is None else _load(handle["w"])
    if handle["fmt"] == "dense":
        X = _load(handle["X"])
    else:
        X = sp.csr_matrix((_load(handle["data"]), _load(handle["indices"]),
                           _load(handle["indptr"])), shape=(handle["n"], handle["d"]))
    return X, y, w


def _write_partition(index, pairs, fit_id, generation):
    directory = fit_dir(fit_id)
    for j, (info, block) in enumerate(pairs):
        if block is None:
            yield info, None
            continue
        X, y, w = block
        yield info, write_block(directory, f"g{generation}-p{index}-b{j}", X, y, w)


def _open_partition(pairs):
    for _info, handle in pairs:
        if handle is not None:
            yield open_block(handle)


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
        return self._pairs.map(lambda p: p[0]).collect()

    def run(self, job):
        return job(self.rdd)

    def release(self):
        self._pairs.unpersist(blocking=False)


def _open_in_memory(pairs):
    for _info, block in pairs:
        if block is not None:
            yield block


class FileBlocks:
    """Handles to memory-mapped block files; the fast block store.

    ``self.rdd`` yields (X, y, w) like the in-memory store, so kernels do not
    know which store they read.
    """

    kind = "files"

    def __init__(self, pairs, fit_id=None):
        self._pairs = pairs  # uncached: (info, block) straight from the input's lineage
        self.fit_id = fit_id or uuid.uuid4().hex[:12]
        self.generation = 0
        self.rebuilds = 0
        self._handles = None
        self.rdd = None

    def materialize(self):
        """Write the files (one pass over the input); return the block infos."""
        from pyspark import StorageLevel

        fit_id, gen = self.fit_id, self.generation
        handles = self._pairs.mapPartitionsWithIndex(
            lambda i, it: _write_partition(i, it, fit_id, gen), preservesPartitioning=True)
        handles.persist(StorageLevel.MEMORY_ONLY)
        handles.setName(f"sparkgd block handles {fit_id} g{gen}")
        self._handles = handles
        self.rdd = handles.mapPartitions(_open_partition, preservesPartitioning=True)
        return handles.map(lambda p: p[0]).collect()

    def run(self, job):
        """Run ``job(rdd)``; if a task found its files gone, rebuild once and rerun."""
        try:
            return job(self.rdd)
        except Exception as e:  # Py4J / PythonException carry the task's message
            if MISSING_MARKER not in str(e):
                raise
        self.rebuilds += 1
        self._drop()
        self.generation += 1
        self.materialize()
        return job(self.rdd)

    def _drop(self):
        if self._handles is not None:
            self._handles.unpersist(blocking=True)
            self._handles = None

    def release(self):
        """Unpersist the handles and delete this fit's files on every executor slot."""
        self._drop()
        sc = self._pairs.context
        slots = max(sc.defaultParallelism, self._pairs.getNumPartitions(), 1)
        fit_id = self.fit_id
        try:
            sc.parallelize(range(slots), slots).mapPartitions(
                lambda _it: _remove_fit_dir(fit_id)).collect()
        except Exception:  # pragma: no cover - cleanup is best effort; Spark removes the
            pass           # local dirs when executors exit
