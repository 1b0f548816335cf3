"""Rows per serving task balanced (sparkgd.engine.balance): the pure rules, then Spark."""
import math

import pytest

from sparkgd.engine.balance import (balanced, coalesce_groups, coalesce_is_balanced,
                                    contiguous_groups, partition_counts, partition_keys,
                                    spread)


def test_spread():
    assert spread([]) == 1.0
    assert spread([7]) == 1.0
    assert spread([0, 0, 0]) == 1.0
    assert spread([0, 3]) == math.inf
    assert spread([2, 3, 3]) == 1.5
    assert spread(iter([4, 5])) == 1.25


@pytest.mark.parametrize("counts, tasks, expected", [
    ([100] * 8, 4, True),             # 2 partitions each
    ([100] * 10, 4, False),           # 3, 3, 2, 2: 1.5
    ([100] * 40, 4, True),
    ([100] * 56, 5, True),            # 12 vs 11 partitions: 1.09
    ([100] * 12, 5, False),           # 3 vs 2
    ([900] + [11] * 9, 4, False),     # the one big file
    ([10, 11, 12, 11], 4, True),      # as many partitions as tasks: 12 / 10 = 1.2
    ([10, 13, 12, 11], 4, False),
    ([100, 100], 4, False),           # coalesce cannot make more partitions
    ([100] * 3, 4, False),
    ([0] + [100] * 39, 4, False),     # an empty partition: any group could be short
    ([5, 900, 0], 1, True),           # one task takes everything
    ([0, 0, 0], 4, True),             # no rows: nothing to balance
    ([], 4, True),
])
def test_coalesce_is_balanced(counts, tasks, expected):
    assert coalesce_is_balanced(counts, tasks) is expected


def test_coalesce_is_balanced_limit():
    assert not coalesce_is_balanced([100] * 10, 4, limit=1.49)
    assert coalesce_is_balanced([100] * 10, 4, limit=1.5)
    with pytest.raises(ValueError):
        coalesce_is_balanced([1], 0)


@pytest.mark.parametrize("counts, tasks", [
    ([900] + [11] * 9 + [1], 4), ([3, 0, 4], 3), ([1, 1], 5), ([0, 0], 3), ([17], 1),
    ([5] * 7, 7), ([2, 9, 0, 1], 4),
])
def test_contiguous_groups(counts, tasks):
    groups = contiguous_groups(counts, tasks)
    total = sum(counts)
    assert len(groups) == tasks
    assert groups[0][0] == 0 and groups[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    sizes = [end - start for start, end in groups]
    assert max(sizes) - min(sizes) <= 1
    for g, (start, end) in enumerate(groups):   # the rule: row r goes to r * tasks // total
        assert all(r * tasks // total == g for r in range(start, end))
    with pytest.raises(ValueError):
        contiguous_groups(counts, 0)


# -- with Spark ---------------------------------------------------------------------

def contents(frame):
    """[(partition, row), ...]: every row with its partition, in partition order and
    in order within each partition (no Python on executors)."""
    from pyspark.sql import functions as F

    p = "__test_partition"
    return [(r[p], tuple(r[c] for c in frame.columns))
            for r in frame.withColumn(p, F.spark_partition_id()).collect()]


def sizes(parts, n):
    out = [0] * n
    for p, _ in parts:
        out[p] += 1
    return out


@pytest.fixture
def file_per_partition(spark):
    """One input partition per file (Spark otherwise packs small files together)."""
    key = "spark.sql.files.openCostInBytes"
    old = spark.conf.get(key)
    spark.conf.set(key, str(1 << 30))
    yield
    spark.conf.set(key, old)


def write_skewed(path):
    """One Parquet file of 900 rows and nine of 100 rows in all (12, then 11 each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes_ = [900, 12] + [11] * 8
    start = 0
    for i, n in enumerate(sizes_):
        ids = list(range(start, start + n))
        pq.write_table(pa.table({
            "id": pa.array(ids, pa.int64()),
            "features": pa.array([[float(j), -float(j)] for j in ids], pa.list_(pa.float64())),
            "label": pa.array([float(j % 2) for j in ids])}), str(path / f"part-{i:02d}.parquet"))
        start += n
    return start


def test_one_big_file_and_nine_small_ones(spark, tmp_path, file_per_partition):
    total = write_skewed(tmp_path)
    frame = spark.read.parquet(str(tmp_path))
    counts = partition_counts(frame)
    assert sorted(counts) == sorted([900, 12] + [11] * 8) and sum(counts) == total
    assert coalesce_is_balanced(counts, 4) is False

    out, how = balanced(frame, 4)
    assert how == "balanced shuffle"
    assert out.schema == frame.schema and out.columns == frame.columns
    assert out.rdd.getNumPartitions() == 4
    parts = contents(out)
    rows = sizes(parts, 4)
    assert rows == [250] * 4 and spread(rows) <= 1.2
    # partition g holds exactly the g-th slice of the rows in their global order
    # (partition after partition of the input, each in its own order)
    original = [row for _, row in contents(frame)]
    assert [row for _, row in parts] == original
    bounds = contiguous_groups(counts, 4)
    assert [p for p, _ in parts] == [g for g, (a, b) in enumerate(bounds) for _ in range(a, b)]
    # the same rows in the same places, run after run, and built again
    assert contents(out) == parts
    assert contents(balanced(frame, 4, counts=counts)[0]) == parts


def test_coalesce_kept_when_whole_partitions_balance(spark):
    frame = spark.range(800, numPartitions=8)
    assert coalesce_groups(frame, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    out, how = balanced(frame, 4)
    assert how == "coalesce"
    assert sizes(contents(out), 4) == [200] * 4


def test_ten_equal_partitions_into_four_without_adaptive_execution(spark):
    from pyspark.sql import functions as F

    key = "spark.sql.adaptive.enabled"
    old = spark.conf.get(key)
    spark.conf.set(key, "false")
    try:
        # a column named like the helper column: it stays as it was
        frame = spark.range(1000, numPartitions=10).withColumn("__SPARKGD_row", F.col("id") * 2)
        assert partition_counts(frame) == [100] * 10
        out, how = balanced(frame, 4)
        assert how == "balanced shuffle"
        assert out.columns == ["id", "__SPARKGD_row"]
        parts = contents(out)
        assert sizes(parts, 4) == [250] * 4
        assert [row for _, row in parts] == [(i, 2 * i) for i in range(1000)]
    finally:
        spark.conf.set(key, old)


def test_a_shuffled_input_with_adaptive_execution(spark):
    # the input's own shuffle: adaptive execution runs it to plan; counted from that plan
    frame = spark.range(999, numPartitions=3).repartition(5)
    counts = partition_counts(frame)
    assert len(counts) == 5 and sum(counts) == 999
    out, how = balanced(frame, 4)
    assert how == "balanced shuffle"
    parts = contents(out)
    assert sorted(sizes(parts, 4)) == [249, 250, 250, 250]
    assert sorted(row for _, row in parts) == [(i,) for i in range(999)]
    assert contents(out) == parts


def test_as_is_few_rows_and_none(spark):
    frame = spark.range(400, numPartitions=4)
    out, how = balanced(frame, 4)
    assert out is frame and how == "as is"
    # never more tasks than rows
    out, how = balanced(spark.range(3, numPartitions=1), 4)
    assert how == "balanced shuffle" and sizes(contents(out), 3) == [1, 1, 1]
    out, how = balanced(spark.range(0), 4)
    assert how == "coalesce" and out.count() == 0


def test_partition_keys(spark):
    from pyspark.sql import functions as F

    for tasks in (1, 4, 7):
        keys = partition_keys(spark, tasks)
        assert len(set(keys)) == tasks
        got = spark.range(1).select(*[F.pmod(F.hash(F.lit(k).cast("bigint")), F.lit(tasks))
                                      for k in keys]).head()
        assert list(got) == list(range(tasks))
