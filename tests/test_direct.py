"""Serving tasks that read the Parquet files themselves (sparkgd.data.direct): which
inputs qualify, the shares of the rows, and a served build that reads them -- against
the same rows as Spark reads them and as NumPy sums them."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkgd import kernels
from sparkgd.data import direct, resolve_input
from sparkgd.data.schema import InputSpec
from sparkgd.engine import Engine
from sparkgd.errors import SparkgdError
from sparkgd.modes.sync import DistributedObjective
from sparkgd.penalties import Penalty

from conftest import logistic_data

ARRAY = InputSpec(kind="array", features=("features",), label="label", weight=None)


def write_parts(path, X, y, files=3, row_group=7, w=None, list_type=pa.float64()):
    """The rows in ``files`` Parquet files of row groups of ``row_group`` rows."""
    path.mkdir()
    cuts = np.linspace(0, len(y), files + 1).astype(int)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        cols = {"features": pa.array([list(r) for r in X[a:b]], pa.list_(list_type)),
                "label": pa.array(y[a:b])}
        if w is not None:
            cols["weight"] = pa.array(w[a:b])
        pq.write_table(pa.table(cols), path / f"part-{i:05d}.parquet", row_group_size=row_group)
    return sorted(str(p) for p in path.iterdir())


@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
def test_shares_are_contiguous_equal_and_cover_every_row_once(tmp_path, tasks):
    X, y, _ = logistic_data(n=101, d=3, seed=1)
    paths = write_parts(tmp_path / "d", X, y)
    parts, total = direct.row_parts(paths, tasks)
    assert total == 101 and len(parts) == tasks
    sizes = [sum(b - a for _, _, a, b in p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 101
    got = []
    for p in parts:
        for batch in direct.part_batches(p, ARRAY):
            assert batch.num_rows <= direct.BATCH_ROWS
            got.append(np.array(batch.column(0).to_pylist()))
            np.testing.assert_array_equal(batch.column(1).to_numpy(),
                                          y[len(np.vstack(got)) - batch.num_rows:
                                            len(np.vstack(got))])
    np.testing.assert_array_equal(np.vstack(got), X)        # in file order, once each


def test_batches_slice_within_row_groups_and_batches(tmp_path, monkeypatch):
    """Shares that start and end inside row groups larger than a batch."""
    monkeypatch.setattr(direct, "BATCH_ROWS", 4)
    X, y, w = logistic_data(n=60, d=2, seed=2, weights=True)
    paths = write_parts(tmp_path / "d", X, y, files=2, row_group=25, w=w)
    spec = InputSpec(kind="array", features=("features",), label="label", weight="weight")
    parts, _ = direct.row_parts(paths, 7)
    rows = [np.array(b.column(2).to_numpy()) for p in parts for b in direct.part_batches(p, spec)]
    np.testing.assert_array_equal(np.concatenate(rows), w)


def test_only_types_read_as_they_are_qualify():
    schema = pa.schema([("features", pa.list_(pa.float32())), ("label", pa.int32()),
                        ("w", pa.float64()), ("s", pa.string()), ("x0", pa.int64()),
                        ("vec", pa.struct([("type", pa.int8())]))])
    assert direct.readable_as(schema, ARRAY)
    assert direct.readable_as(schema, InputSpec("array", ("features",), "label", "w"))
    assert not direct.readable_as(schema, InputSpec("array", ("features",), "s", None))
    assert not direct.readable_as(schema, InputSpec("array", ("features",), "label", "s"))
    assert not direct.readable_as(schema, InputSpec("array", ("Features",), "label", None))
    assert not direct.readable_as(schema, InputSpec("vector", ("vec",), "label", None))
    assert direct.readable_as(schema, InputSpec("columns", ("x0", "w"), "label", None))
    assert not direct.readable_as(schema, InputSpec("columns", ("x0", "s"), "label", None))
    strings = pa.schema([("features", pa.list_(pa.string())), ("label", pa.float64())])
    assert not direct.readable_as(strings, ARRAY)


def test_only_plain_local_scans_qualify(spark, tmp_path):
    from pyspark.sql import functions as F

    X, y, _ = logistic_data(n=50, d=3, seed=3)
    paths = write_parts(tmp_path / "d", X, y)
    df = spark.read.parquet(str(tmp_path / "d"))
    assert direct.plain_parquet_files(df) == paths
    assert direct.plain_parquet_files(df.select("label", "features")) == paths
    for other in (df.where(F.col("label") > 0), df.withColumn("label", F.col("label") * 2),
                  df.limit(10), df.repartition(3), df.union(df)):
        assert direct.plain_parquet_files(other) is None
    spark.createDataFrame(df.toPandas().assign(day=1)).write.partitionBy("day").parquet(
        str(tmp_path / "parted"))
    assert direct.plain_parquet_files(spark.read.parquet(str(tmp_path / "parted"))) is None


def test_a_served_build_from_the_files_equals_spark_read_and_numpy(spark, tmp_path):
    """The same sums, to 1e-12, whether the tasks read the files or Spark does; the
    files' rows in files of several row groups, float32 list values and weights."""
    from test_distributed import numpy_objective

    X, y, w = logistic_data(n=700, d=4, seed=4, weights=True)
    X = np.round(X * 100)
    write_parts(tmp_path / "d", X.astype(np.float32), y, files=3, row_group=64, w=w,
                list_type=pa.float32())
    df = spark.read.parquet(str(tmp_path / "d"))
    spec = resolve_input(df.schema, weight_col="weight")
    layout = kernels.Layout(4, 1, True)
    theta = np.random.default_rng(5).normal(size=layout.size) * 0.01
    f_ref, g_ref = numpy_objective(theta, X, y, w, "logistic", True, 0.1)
    shares = []
    for frame in (df, df.where("label >= 0")):           # tasks read / Spark reads
        with Engine.open(frame, spec) as engine:
            shares.append(isinstance(engine._store._frame, direct.Shares))
            assert engine.facts.num_rows == 700
            obj = DistributedObjective(engine, kernels.make_loss("logistic"), layout,
                                       Penalty(layout, reg_param=0.1))
            f, g = obj(theta)
        assert abs(f - f_ref) <= 1e-12 * abs(f_ref)
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-13)
    assert shares == [True, False]


def test_bad_rows_in_the_files_give_the_same_error(spark, tmp_path):
    X, y, _ = logistic_data(n=40, d=3, seed=6)
    y[17] = np.nan
    write_parts(tmp_path / "d", X, y)
    df = spark.read.parquet(str(tmp_path / "d"))
    assert direct.plain_parquet_files(df)
    with pytest.raises(SparkgdError, match="label column 'label' holds NaN"):
        Engine.open(df, resolve_input(df.schema))
