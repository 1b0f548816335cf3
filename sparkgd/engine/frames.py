"""One Spark job per pass over a cached DataFrame, with the DataFrame API alone.

The slow path of a fit from a Spark Connect session (no RDDs, no broadcasts): when
the cluster cannot run the fit's serving tasks at once, the coordinator runs in the
client and every pass is one job::

    client: theta inside the job's closure
        -> task p: its cached rows -> NumPy blocks -> the work's vector
        -> one output row per partition (p, raw float64) -> summed here in partition
           order (as ``star``)

The projected input is persisted once (Spark keeps it, as Spark ML caches its
instances); the blocks are made again from its Arrow batches every pass, the same
blocks (the same batches), so mini-batches and sums repeat bit for bit. Nothing
coming back is unpickled: facts are JSON, vectors raw float64.
"""
from __future__ import annotations

import json

import numpy as np
import scipy.sparse as sp

from ..data.arrow import stack_csr, stored_dense, xyw_batches
from ..stats import spread_moments
from .served import build_blocks
from .task import gradient_work


def _blocks(batches, spec, dtype):
    blocks = []
    for X, y, w in xyw_batches(batches, spec):
        if not sp.issparse(X):
            X = stored_dense(X, spec, dtype)
        blocks.append((X, y, w))
    return stack_csr(blocks)


def _facts_task(batches, spec, dtype):
    import pyarrow as pa
    from pyspark import TaskContext

    p = TaskContext.get().partitionId()
    _, facts, moments, cols = build_blocks(batches, spec, dtype, p)
    if cols is not None:      # one job per pass works at the data's width: its moments
        moments = spread_moments(moments, cols, int(facts["d"]))
    data = b"" if moments is None else np.ascontiguousarray(moments, dtype="<f8").tobytes()
    yield pa.RecordBatch.from_pydict({"p": [p], "facts": [json.dumps(facts)],
                                      "moments": [data]})


def _pass_task(batches, spec, dtype, theta, loss, layout, sample, work, parse_work,
               threads):
    import pyarrow as pa
    from pyspark import TaskContext

    p = TaskContext.get().partitionId()
    worker = parse_work(work, layout)
    v = worker.compute(_blocks(batches, spec, dtype), theta, loss, layout, sample, p, threads)
    yield pa.RecordBatch.from_pydict(
        {"p": [p], "v": [np.ascontiguousarray(v, dtype="<f8").tobytes()]})


class FrameStore:
    """The blocks of a cached DataFrame, one Spark job (DataFrame API) per pass."""

    kind = "frames"

    def __init__(self, frame, spec, dtype="float64", parse_work=gradient_work, threads=1):
        self._frame = frame.persist()
        self._spec, self._dtype = spec, dtype
        self.parse_work = parse_work
        self.threads_per_task = max(1, int(threads))
        self.num_tasks = self.num_partitions = 0
        self._rows = []
        self._weights = []
        self.certified = True
        self.rejected = 0
        self.hub = None

    def materialize(self):
        """One job: every partition's facts (and feature moments) -> the block infos."""
        spec, dtype = self._spec, self._dtype
        rows = self._frame.mapInArrow(lambda it: _facts_task(it, spec, dtype),
                                      "p long, facts string, moments binary").collect()
        rows = sorted(rows, key=lambda r: r["p"])
        self.num_tasks = self.num_partitions = len(rows)
        infos = []
        for r in rows:
            facts = json.loads(r["facts"])
            self._rows.append(int(facts.get("n", 0)))
            self._weights.append(float(facts.get("wsum", 0.0)))
            if facts and "error" not in facts:
                facts["moments"] = np.frombuffer(bytes(r["moments"]), dtype="<f8").copy()
            if facts:
                infos.append(facts)
        return infos

    def pass_sums(self, theta, loss, layout, sample, aggregator, work=None):
        """One pass as one job -> the summed vector (partition order)."""
        size = self.parse_work(work, layout).size(layout)
        theta = np.array(theta, dtype=np.float64)
        spec, dtype, parse, threads = self._spec, self._dtype, self.parse_work, \
            self.threads_per_task

        def body(it, _theta=theta):
            return _pass_task(it, spec, dtype, _theta, loss, layout, sample, work, parse,
                              threads)

        rows = self._frame.mapInArrow(body, "p long, v binary").collect()
        total = np.zeros(size)
        for r in sorted(rows, key=lambda r: r["p"]):
            part = np.frombuffer(bytes(r["v"]), dtype="<f8")
            if part.size != size:
                raise ValueError(f"partition {r['p']} sent {part.size} values, not {size}")
            total += part
        aggregator.count_out(theta.size, len(rows))
        aggregator.count_driver(8 * size * len(rows))
        return total

    def rows_per_task(self):
        return list(self._rows)

    def task_weights(self):
        return list(self._weights)

    def close_session(self):
        pass

    def release(self):
        try:
            self._frame.unpersist()
        except Exception:   # pragma: no cover - the session may be gone already
            pass
