"""One shared local SparkSession for the whole run (local[2], no task retries)."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests/connect runs in a pytest process of its own (test.sh runs both): a Spark
# Connect session switches pyspark into Connect mode for the whole process
# (SPARK_CONNECT_MODE_ENABLED), which a classic session's tests must not see.
collect_ignore = [] if os.environ.get("SPARKGD_CONNECT_TESTS") else ["connect"]


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    log4j = os.path.join(ROOT, "sparkgd", "conf", "log4j2.properties")
    builder = (
        SparkSession.builder.master("local[2]")
        .appName("sparkgd-tests")
        .config("spark.task.maxFailures", "1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.driver.memory", "2g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
    )
    if os.path.exists(log4j):
        builder = builder.config("spark.driver.extraJavaOptions",
                                 f"-Dlog4j.configurationFile=file:{log4j}")
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def logistic_data(n=600, d=5, seed=0, weights=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    beta = rng.normal(size=d)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ beta + 0.3)))).astype(float)
    w = rng.uniform(0.5, 2.0, size=n) if weights else None
    return X, y, w


def regression_data(n=600, d=5, seed=0, weights=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.7 + 0.3 * rng.normal(size=n)
    w = rng.uniform(0.5, 2.0, size=n) if weights else None
    return X, y, w


def to_df(spark, X, y, w=None, partitions=2, kind="array"):
    """A DataFrame with features (array<double> or vector), label[, weight]."""
    import pyarrow as pa

    cols = {"features": pa.array(X.tolist(), type=pa.list_(pa.float64())),
            "label": pa.array(y)}
    if w is not None:
        cols["weight"] = pa.array(w)
    df = spark.createDataFrame(pa.table(cols).to_pandas())
    if kind == "vector":
        from pyspark.ml.functions import array_to_vector

        df = df.withColumn("features", array_to_vector("features"))
    return df.repartition(partitions)


@pytest.fixture(scope="session")
def cancer(spark):
    """The breast-cancer data (real: 569 x 30, features in units 1e-3 to 1e3) as a
    DataFrame, and as NumPy arrays."""
    import pyarrow.parquet as pq

    path = os.path.join(ROOT, "data", "breast_cancer")
    table = pq.read_table(path)
    X = np.array(table.column("features").to_pylist())
    y = table.column("label").to_numpy()
    return spark.read.parquet(path), X, y
