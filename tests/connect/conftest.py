"""One shared Spark Connect session for tests/connect (a local Connect server on
local[2], started by pyspark itself). test.sh runs this directory in a pytest process
of its own: a Connect session puts pyspark into Connect mode for its whole process."""
import os
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    log4j = os.path.join(ROOT, "sparkgd", "conf", "log4j2.properties")
    builder = (
        SparkSession.builder.remote("local[2]")
        .appName("sparkgd-connect-tests")
        .config("spark.task.maxFailures", "1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.memory", "2g")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.connect.grpc.binding.address", "127.0.0.1")
    )
    if os.path.exists(log4j):
        builder = builder.config("spark.driver.extraJavaOptions",
                                 f"-Dlog4j.configurationFile=file:{log4j}")
    with warnings.catch_warnings():
        # the server takes the static confs when it starts; the client then tries to set
        # them on its session too, and warns that it cannot
        warnings.filterwarnings("ignore", message="Failed to set")
        session = builder.getOrCreate()
    yield session
    session.stop()


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


def to_df(spark, X, y, w=None, partitions=2):
    """A DataFrame with features (array<double>), label[, weight] (rows in order)."""
    import pyarrow as pa

    cols = {"features": pa.array(X.tolist(), type=pa.list_(pa.float64())),
            "label": pa.array(y)}
    if w is not None:
        cols["weight"] = pa.array(w)
    return spark.createDataFrame(pa.table(cols).to_pandas()).repartition(partitions)
