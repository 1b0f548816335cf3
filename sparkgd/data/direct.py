"""Parquet files read where the blocks are built, without the JVM in the way.

A served build normally gets its rows from Spark: the JVM decodes the Parquet pages,
turns the columns into rows and the rows into Arrow batches for the Python worker --
for a ``list<double>`` column about 90 ns a value (1M x 100 on two cores: 7.4-9.9 s),
while pyarrow decodes the same file in ~10 ns a value (1.0 s for half of it on one
core). When the input is a plain scan of Parquet files that every task can open, the
tasks read their rows themselves:

* :func:`plain_parquet_files` says whether ``df`` is such a scan: its optimized plan
  is a file relation in Parquet format, under nothing but a projection of its own
  columns (no filter, no partition columns, no computed column), the files on the local
  file system, and a local master (the tasks run on this machine, so they see the same
  paths). Anything else -- a cluster, HDFS/S3, a join, a filter, a cast -- keeps Spark's
  read.
* :func:`readable_as` checks the file's Arrow types against what the projection would
  give (numeric labels and weights, a ``list`` of numbers or numeric columns): anything
  Spark would cast otherwise (strings, decimals, vectors) keeps Spark's read.
* :func:`row_parts` splits the files' rows into contiguous, equal shares from the
  footers alone (no count job); :func:`part_batches` reads a share as the projection's
  Arrow batches (``features``/``f0..``, ``label``, ``weight``), which the build reads
  as it reads Spark's (:func:`sparkgd.data.arrow.xyw_batches`).
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

#: Rows a batch (as Spark's Arrow batches: ``spark.sql.execution.arrow.maxRecordsPerBatch``).
BATCH_ROWS = 10_000


def plain_parquet_files(df):
    """Local paths of the Parquet files ``df`` scans, in the order of the files' names;
    None where ``df`` is anything else or where the tasks may not see those paths."""
    try:
        jdf = df._jdf
        sc = df.sparkSession.sparkContext
    except Exception:      # Spark Connect: no JVM objects here
        return None
    try:
        if not str(sc.master).startswith("local"):
            return None
        plan = jdf.queryExecution().optimizedPlan()
        while plan.nodeName() == "Project":
            exprs = plan.projectList()
            for i in range(exprs.size()):
                if exprs.apply(i).nodeName() != "AttributeReference":
                    return None
            plan = plan.child()
        if plan.nodeName() != "LogicalRelation":
            return None
        relation = plan.relation()
        if relation.getClass().getSimpleName() != "HadoopFsRelation":
            return None
        if relation.fileFormat().getClass().getSimpleName() != "ParquetFileFormat":
            return None
        if relation.partitionSchema().length() != 0 or not relation.bucketSpec().isEmpty():
            return None
        files = list(df.inputFiles())
    except Exception:
        return None
    paths = []
    for uri in files:
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            return None
        path = unquote(parsed.path)
        if not os.path.isfile(path):
            return None
        paths.append(path)
    return sorted(paths) or None


class Shares:
    """What a served build reads when its tasks read the files: ``parts[i]`` is task
    i's share (:func:`row_parts`); the tasks' closure carries ``parts`` (plain values)."""

    def __init__(self, parts, spark):
        self.parts = [list(p) for p in parts]
        self.sparkSession = spark

    def frame(self):
        """One row, one partition a task: what starts the job's tasks."""
        n = len(self.parts)
        return self.sparkSession.range(0, n, 1, n)


def _numeric(t):
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t)


def readable_as(schema, spec):
    """True when the Arrow ``schema`` of the files holds the spec's columns under their
    names, in types the projection reads as they are (numbers; a list of numbers)."""
    import pyarrow as pa

    names = set(schema.names)
    wanted = [spec.label] + ([spec.weight] if spec.weight else [])
    if spec.kind == "columns":
        wanted += list(spec.features)
    elif spec.kind != "array":
        return False
    if any(c not in names for c in wanted) or (
            spec.kind == "array" and spec.features[0] not in names):
        return False
    if not all(_numeric(schema.field(c).type) for c in wanted):
        return False
    if spec.kind == "array":
        t = schema.field(spec.features[0]).type
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _numeric(t.value_type)
    return True


def row_parts(paths, tasks):
    """``[[(path, row_group, start, stop), ...], ...]``: per task, the row-group slices
    that are its share of the rows in file order (contiguous; shares differ by at most
    one row), from the files' footers."""
    import pyarrow.parquet as pq

    groups = []
    for path in paths:
        meta = pq.read_metadata(path)
        for g in range(meta.num_row_groups):
            groups.append((path, g, meta.row_group(g).num_rows))
    total = sum(n for _, _, n in groups)
    tasks = max(1, min(int(tasks), max(total, 1)))
    cuts = [-(-g * total // tasks) for g in range(tasks + 1)]    # ceil(g * total / tasks)
    shares = list(zip(cuts[:-1], cuts[1:]))
    parts = []
    for lo, hi in shares:
        mine, offset = [], 0
        for path, g, n in groups:
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                mine.append((path, g, a - offset, b - offset))
            offset += n
        parts.append(mine)
    return parts, total


def part_batches(part, spec):
    """The Arrow batches of one task's share, as the projection has them: the feature
    column (or columns), ``label`` and ``weight``, under the projection's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if spec.kind == "columns":
        cols = list(spec.features)
    else:
        cols = [spec.features[0]]
    cols.append(spec.label)
    if spec.weight:
        cols.append(spec.weight)
    opened = {}
    for path, group, start, stop in part:
        pf = opened.get(path)
        if pf is None:
            pf = opened[path] = pq.ParquetFile(path)
        offset = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group],
                                     columns=cols, use_threads=False):
            n = batch.num_rows
            a, b = max(start, offset), min(stop, offset + n)
            offset += n
            if a >= b:
                if offset >= stop:
                    break
                continue
            batch = batch.slice(a - (offset - n), b - a)
            yield pa.RecordBatch.from_arrays([batch.column(c) for c in cols],
                                             names=[f"c{i}" for i in range(len(cols))])
            if offset >= stop:
                break
