"""Rows per serving task balanced, whatever the input files look like.

Why: the served store runs one long-lived task per task slot, and each task keeps its
share of the rows and computes every pass over them. A pass ends when the slowest
task has, so the task with the most rows sets the pace (and the memory). ``coalesce``
groups whole input partitions without splitting them: one Parquet file holding 90% of
the rows and nine small ones, read into 4 tasks, give one task ~90% of the rows, and
even 10 equal partitions give 3, 3, 2, 2 (1.5 times the rows of the smallest).

What: :func:`balanced` counts the rows of each partition (:func:`partition_counts`),
keeps ``coalesce`` (or the frame as is) when the tasks' rows are bound to be within
``limit`` of one another (:func:`coalesce_is_balanced`, and the grouping Spark plans),
and otherwise shuffles the rows once so that task ``g`` holds exactly the ``g``-th
contiguous slice of the rows in their global order (:func:`contiguous_groups`): the
tasks' rows then differ by at most one.

Cost: the count is one Spark job that needs no column data (for Parquet the scan
reads only the footers' row counts; a text input is read through, to find its lines).
Deciding on ``coalesce`` plans it, and runs nothing. The shuffle, when needed, moves
every row once and sorts each task's rows in the JVM (spilling if need be), plus, once
per number of tasks, a one-row query for the keys below. A frame with shuffles of its
own runs them once more under adaptive execution, to be planned and counted.

Determinism: a row's global index is its partition's offset (from the count) plus
``monotonically_increasing_id``'s position within the partition, so a retried task
sees the same rows in the same order as long as the input is deterministic (files
are; Spark's round-robin ``repartition(n)`` sorts first to be). A shuffle delivers
blocks in any order, so each task's rows are sorted by that index. Spark's hash
partitioning picks a row's target (``pmod(hash(key), n)``): each slice carries a key
whose hash lands on the slice's own partition, found once per ``n`` by a tiny query
and checked to be one-to-one. Nothing is pickled; no Python runs on executors.
"""
from __future__ import annotations

import math

__all__ = ["LIMIT", "balanced", "partition_counts", "coalesce_is_balanced", "spread",
           "contiguous_groups", "coalesce_groups", "partition_keys"]

#: Largest rows per task over fewest rows per task that still counts as balanced.
LIMIT = 1.2

#: The helper column of the shuffle (dropped again before the frame is returned).
_IDX = "__sparkgd_row"

_KEYS = {}  # tasks -> partition keys (Spark's hash does not change within a process)


def spread(rows_per_task):
    """max/min of the rows per task: 1.0 for none, one, or only empty tasks; inf when a
    task is empty and another is not."""
    rows = list(rows_per_task)
    if not rows or max(rows) == 0:
        return 1.0
    return math.inf if min(rows) == 0 else max(rows) / min(rows)


def coalesce_is_balanced(counts, tasks, limit=LIMIT):
    """Whether ``coalesce(tasks)`` over partitions of ``counts`` rows is bound to give
    tasks within ``limit`` of one another, whichever way Spark groups the partitions
    into ``floor`` or ``ceil(P / tasks)`` each (what it does without locality
    preferences): ``ceil * max(counts) <= limit * floor * min(counts)``.

    No rows, or one task: balanced. Fewer partitions than tasks: not (coalesce cannot
    make more); as many: when the partitions themselves are."""
    tasks = int(tasks)
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, not {tasks}")
    counts = list(counts)
    if sum(counts) == 0 or tasks == 1:
        return True
    P = len(counts)
    if P < tasks:
        return False
    fewest, most = P // tasks, -(-P // tasks)
    return most * max(counts) <= limit * fewest * min(counts)


def contiguous_groups(counts, tasks):
    """``[(start, end), ...]``, one per task: the rows (global order: partition by
    partition, and in order within each) whose index ``r`` has ``r * tasks // total``
    equal to the task's number. End exclusive; sizes differ by at most one."""
    tasks = int(tasks)
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, not {tasks}")
    total = sum(int(c) for c in counts)
    starts = [-(-g * total // tasks) for g in range(tasks + 1)]  # ceil(g * total / tasks)
    return list(zip(starts[:-1], starts[1:]))


def partition_counts(frame):
    """Rows of each partition of ``frame``, in partition order (0 for empty ones): one
    Spark job that reads no column data (a count by ``spark_partition_id``)."""
    return _counted(_Plan.of(frame))


class _Plan:
    """``frame``'s partition ids, planned: ``rdd`` (a JVM RDD: how many partitions, and
    their locality) and ``adaptive`` (adaptive execution runs the plan: it does when
    the plan has shuffles, and then planning runs their stages -- for a scan, planning
    runs no job)."""

    def __init__(self, ids, rdd, adaptive):
        self.ids, self.rdd, self.adaptive = ids, rdd, adaptive

    @classmethod
    def of(cls, frame):
        from pyspark.sql import functions as F

        ids = frame.select(F.spark_partition_id().alias("p"))
        if not hasattr(ids, "_jdf"):
            # a Spark Connect frame: no JVM objects to plan with. The count query says
            # how many rows each partition holds (not how many empty ones trail the
            # last), and nothing says how coalesce would group them: it is judged on
            # the counts alone (coalesce_is_balanced), as under adaptive execution
            return cls(ids, None, True)
        rdd = ids._jdf.rdd()
        try:
            adaptive = ids._jdf.queryExecution().executedPlan().getClass().getSimpleName() \
                == "AdaptiveSparkPlanExec"
        except Exception:  # pragma: no cover - internals of another Spark version
            adaptive = False
        return cls(ids, rdd, adaptive)


def _counted(plan):
    """:func:`partition_counts` of a :class:`_Plan`. Adaptive: counts the planned RDD,
    whose shuffles ran already and do not run again (for a scan, the plain count
    query is quicker: it needs no rows made for an RDD)."""
    from pyspark.sql import DataFrame

    ids = plan.ids
    if plan.rdd is None:
        counts = {}
        for p, n in ids.groupBy("p").count().collect():
            counts[int(p)] = int(n)
        return [counts.get(p, 0) for p in range(max(counts, default=-1) + 1)]
    if plan.adaptive:
        spark = ids.sparkSession
        ids = DataFrame(spark._jsparkSession.createDataFrame(plan.rdd.toJavaRDD(),
                                                             ids._jdf.schema()), spark)
    counts = [0] * int(plan.rdd.getNumPartitions())
    for p, n in ids.groupBy("p").count().collect():
        if p >= len(counts):     # not the partitions just planned: the input is not stable
            raise RuntimeError(f"partition {p} of a frame planned with {len(counts)}")
        counts[p] = int(n)
    return counts


def coalesce_groups(frame, tasks):
    """The partitions of ``frame`` that each task of ``frame.coalesce(tasks)`` reads, as
    Spark groups them; None if its internals do not say. Spark's grouping depends only
    on the partitions and their locality preferences, and is only roughly even when
    there are some (files on HDFS, say), hence this look at the real one."""
    return _groups(_Plan.of(frame), tasks)


def _groups(plan, tasks):
    if plan.rdd is None:
        return None
    try:   # what CoalesceExec does with the same partitions: child.coalesce(tasks)
        rdd = plan.rdd.toJavaRDD().coalesce(int(tasks), False).rdd()
        return [[int(i) for i in part.parentsIndices()] for part in rdd.partitions()]
    except Exception:  # pragma: no cover - internals of another Spark version
        return None


def partition_keys(spark, tasks):
    """``keys[g]``: a bigint whose Spark hash partition among ``tasks`` is ``g``
    (``pmod(hash(key), tasks)``, what ``repartition(tasks, key)`` computes), one per
    partition, all different: found with one tiny query (one task, one row), then kept."""
    from pyspark.sql import functions as F

    tasks = int(tasks)
    if tasks not in _KEYS:
        n = 16 * tasks + 64     # all partitions hit, but for a chance of ~tasks * e**-16
        while True:
            ks = F.sequence(F.lit(0).cast("bigint"), F.lit(n - 1).cast("bigint"))
            row = spark.range(1, numPartitions=1).select(
                F.transform(ks, lambda k: F.pmod(F.hash(k), F.lit(tasks))).alias("g")).head()
            keys = {}
            for k, g in enumerate(row.g):
                keys.setdefault(int(g), k)
            if len(keys) >= tasks:
                break
            n *= 4
        if sorted(keys) != list(range(tasks)):
            raise RuntimeError(f"Spark's hash partitions of {tasks}: {sorted(keys)}")
        _KEYS[tasks] = [keys[g] for g in range(tasks)]
    return _KEYS[tasks]


def balanced(frame, tasks, counts=None, limit=LIMIT, info=None):
    """``(frame2, how)``: ``frame`` read by ``tasks`` tasks whose rows are within
    ``limit`` of one another (or as near as ``tasks`` > rows allows: never more tasks
    than rows).

    ``how``: ``"as is"`` (``frame`` already has ``tasks`` such partitions),
    ``"coalesce"`` (``frame.coalesce(tasks)``, as Spark groups the partitions
    (:func:`coalesce_groups`) and, when that grouping may change, whatever the grouping
    (:func:`coalesce_is_balanced`); also with no rows at all), or ``"balanced shuffle"``:
    ``tasks`` partitions, partition ``g`` holding the rows of
    :func:`contiguous_groups` ``g`` in their global order, with ``frame``'s schema.
    ``counts``: :func:`partition_counts` of ``frame``, if known; ``info`` (a dict, if
    given) gets them as ``info["counts"]``."""
    plan = None
    if counts is None:
        plan = _Plan.of(frame)
        counts = _counted(plan)
    counts = [int(c) for c in counts]
    if info is not None:
        info["counts"] = counts
    total = sum(counts)
    if total == 0:
        return frame.coalesce(max(1, int(tasks))), "coalesce"
    tasks = max(1, min(int(tasks), total))
    if len(counts) == tasks and spread(counts) <= limit:
        return frame, "as is"
    plan = plan or _Plan.of(frame)
    groups = _groups(plan, tasks)
    fits = groups is None or (len(groups) == tasks and
                              spread(sum(counts[i] for i in g) for g in groups) <= limit)
    if groups is None or plan.adaptive:
        # the frame's own coalesce may group otherwise (with adaptive execution, its
        # partitions' locality is that of shuffle outputs, which may move from run to run)
        fits = fits and coalesce_is_balanced(counts, tasks, limit)
    if fits:
        return frame.coalesce(tasks), "coalesce"
    return _shuffled(frame, counts, tasks), "balanced shuffle"


def _shuffled(frame, counts, tasks):
    """``frame`` in ``tasks`` partitions of the contiguous slices of its rows."""
    from pyspark.sql import functions as F

    total = sum(counts)
    offsets, at = [], 0
    for c in counts:
        offsets.append(at)
        at += c
    keys = partition_keys(frame.sparkSession, tasks)
    idx, taken = _IDX, {c.lower() for c in frame.columns}
    while idx in taken:          # Spark resolves names without regard to case
        idx += "_"
    pid = F.spark_partition_id()
    # a partition that was not counted (an unstable input) goes last rather than nowhere
    offset = F.coalesce(F.try_element_at(_bigints(offsets), pid + 1), F.lit(total))
    within = F.monotonically_increasing_id() - F.shiftleft(pid.cast("bigint"), 33)
    group = F.least(F.expr(f"(`{idx}` * {tasks}L) div {total}L"), F.lit(tasks - 1))
    key = F.element_at(_bigints(keys), group.cast("int") + 1)
    return (frame.withColumn(idx, offset + within)
            .repartition(tasks, key)
            .sortWithinPartitions(idx)
            .drop(idx))


def _bigints(values):
    """An array<bigint> literal: one string, split and cast, which Spark's optimizer
    folds into a constant (a ``lit`` per value costs a py4j call each: ~30 s for
    100,000 partitions)."""
    from pyspark.sql import functions as F

    return F.split(F.lit(",".join(str(int(v)) for v in values)), ",").cast("array<bigint>")
