"""Arrow -> blocks (pure) and the input kinds a fit accepts (Spark)."""
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from sparkgd import data
from sparkgd.data import arrow, facts
from sparkgd.errors import SparkgdError

ARRAY = data.InputSpec("array", ("features",), "label", None)
WEIGHTED = data.InputSpec("array", ("features",), "label", "weight")


def batch(features, label, weight=None, ftype=pa.list_(pa.float64())):
    cols = [pa.array(features, type=ftype), pa.array(label, type=pa.float64())]
    names = ["features", "label"]
    if weight is not None:
        cols.append(pa.array(weight, type=pa.float64()))
        names.append("weight")
    return pa.RecordBatch.from_arrays(cols, names=names)


def vector_array(rows, d):
    """Spark ML VectorUDT as Arrow: struct<type, size, indices, values>."""
    types, sizes, indices, values = [], [], [], []
    for r in rows:
        if isinstance(r, dict):  # sparse {index: value}
            types.append(0)
            sizes.append(d)
            indices.append(sorted(r))
            values.append([r[k] for k in sorted(r)])
        else:
            types.append(1)
            sizes.append(None)
            indices.append(None)
            values.append(list(r))
    return pa.StructArray.from_arrays(
        [pa.array(types, pa.int8()), pa.array(sizes, pa.int32()),
         pa.array(indices, pa.list_(pa.int32())), pa.array(values, pa.list_(pa.float64()))],
        names=["type", "size", "indices", "values"])


def test_array_column_becomes_c_contiguous_float64():
    X, y, w = arrow.arrow_to_xyw(batch([[1, 2, 3], [4, 5, 6]], [0, 1]), ARRAY)
    assert X.flags["C_CONTIGUOUS"] and X.dtype == np.float64
    np.testing.assert_array_equal(X, [[1, 2, 3], [4, 5, 6]])
    assert y.tolist() == [0.0, 1.0] and w is None


def test_weights_are_read():
    _, _, w = arrow.arrow_to_xyw(batch([[1.0], [2.0]], [0, 1], [0.5, 2.0]), WEIGHTED)
    assert w.tolist() == [0.5, 2.0]


def test_sliced_batches_are_read_from_their_offset():
    b = batch([[1, 2], [3, 4], [5, 6]], [0, 1, 0]).slice(1, 2)
    X, y, _ = arrow.arrow_to_xyw(b, ARRAY)
    np.testing.assert_array_equal(X, [[3, 4], [5, 6]])
    assert y.tolist() == [1.0, 0.0]


def test_numeric_columns_are_stacked():
    spec = data.InputSpec("columns", ("a", "b"), "label", None)
    b = pa.RecordBatch.from_arrays([pa.array([1.0, 2.0]), pa.array([3.0, 4.0]),
                                    pa.array([1.0, 0.0])], names=["f0", "f1", "label"])
    X, _, _ = arrow.arrow_to_xyw(b, spec)
    np.testing.assert_array_equal(X, [[1, 3], [2, 4]])


def test_dense_vectors_give_a_dense_block():
    arr = vector_array([[1, 2, 3], [4, 5, 6]], 3)
    X = data.features_from_arrow(arr, "vector", "column 'features'")
    assert isinstance(X, np.ndarray)
    np.testing.assert_array_equal(X, [[1, 2, 3], [4, 5, 6]])


def test_mixed_sparse_and_dense_vectors():
    d = 50
    rows = [{3: 1.5, 40: -2.0}, [float(i) for i in range(d)], {}, {49: 7.0}]
    X = data.features_from_arrow(vector_array(rows, d), "vector", "column 'features'")
    expected = np.zeros((4, d))
    expected[0, [3, 40]] = [1.5, -2.0]
    expected[1] = np.arange(d)
    expected[3, 49] = 7.0
    dense = X.toarray() if sp.issparse(X) else X
    np.testing.assert_array_equal(dense, expected)


def test_sparse_vectors_stay_csr():
    d = 1000
    rows = [{i * 7 % d: 1.0, (i * 13 + 1) % d: 2.0} for i in range(20)]
    X = data.features_from_arrow(vector_array(rows, d), "vector", "column 'features'")
    assert sp.isspmatrix_csr(X) and X.shape == (20, d) and X.nnz == 40


@pytest.mark.parametrize("features,label,weight,message", [
    ([[1.0, 2.0], [1.0]], [0, 1], None, "row 1 has 1 elements but row 0 has 2"),
    ([[1.0, 2.0], None], [0, 1], None, "null row"),
    ([[1.0, float("nan")], [1.0, 2.0]], [0, 1], None, "NaN or infinite"),
    ([[1.0], [2.0]], [0, float("inf")], None, "label column 'label' holds NaN"),
    ([[1.0], [2.0]], [0, None], None, "label column 'label' has 1 null"),
    ([[1.0], [2.0]], [0, 1], [1.0, -1.0], "weight column 'weight' holds negative"),
])
def test_bad_rows_are_named(features, label, weight, message):
    spec = WEIGHTED if weight is not None else ARRAY
    with pytest.raises(arrow.BadInput, match=message):
        arrow.arrow_to_xyw(batch(features, label, weight), spec)


def test_label_weights_are_a_weighted_histogram_that_merges():
    y = np.array([0.0, 2.0, 2.0, 1.0])
    w = np.array([1.0, 0.5, 2.0, 3.0])
    assert facts.label_weights(y, w) == [1.0, 3.0, 2.5]
    assert facts.label_weights(y, None) == [1.0, 1.0, 2.0]
    assert facts.label_weights(np.array([0.5, 1.0]), None) is None
    assert facts.label_weights(np.array([-1.0, 1.0]), None) is None
    assert facts.merge_label_weights([1.0, 3.0, 2.5], [2.0]) == [3.0, 3.0, 2.5]
    assert facts.merge_label_weights([], [2.0]) == [2.0]
    assert facts.merge_label_weights([1.0], None) is None


# ---------------------------------------------------------------------------- Spark


def fit_coefficients(df, **kw):
    import sparkgd

    m = sparkgd.LinearRegression(tol=1e-12, **kw).fit(df)
    return np.r_[m.coefficients, m.intercept]


@pytest.fixture(scope="module")
def small(spark):
    from conftest import regression_data, to_df

    X, y, _ = regression_data(n=120, d=3, seed=4)
    return X, y, to_df(spark, X, y, partitions=2)


def test_vector_float_array_and_numeric_columns_give_the_same_fit(spark, small):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    X, y, df = small
    ref = fit_coefficients(df)
    as_vector = df.withColumn("features", array_to_vector("features"))
    as_float = df.withColumn("features", F.col("features").cast("array<float>"))
    as_cols = df.select(*[F.col("features")[i].alias(f"x{i}") for i in range(3)], "label")
    np.testing.assert_allclose(fit_coefficients(as_vector), ref, rtol=1e-10)
    np.testing.assert_allclose(fit_coefficients(as_cols, featureCols=["x0", "x1", "x2"]), ref,
                               rtol=1e-10)
    np.testing.assert_allclose(fit_coefficients(as_float), ref, rtol=1e-5)
    lstsq = np.linalg.lstsq(np.c_[X, np.ones(len(y))], y, rcond=None)[0]
    np.testing.assert_allclose(ref, lstsq, rtol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"featuresCol": "nope"}, "features column 'nope' not found"),
    ({"labelCol": "nope"}, "label column 'nope' not found"),
    ({"weightCol": "nope"}, "weight column 'nope' not found"),
    ({"featureCols": ["label", "s"]}, "feature column 's' in the DataFrame has type string"),
    ({"labelCol": "s"}, "label column 's' in the DataFrame has type string"),
    ({"featuresCol": "s"}, "features column 's' in the DataFrame has type string"),
])
def test_schema_errors_say_which_column(spark, small, kwargs, message):
    from pyspark.sql import functions as F

    df = small[2].withColumn("s", F.lit("x"))
    with pytest.raises(SparkgdError, match=message):
        fit_coefficients(df, **kwargs)


def test_bad_values_found_on_executors_become_one_error(spark):
    import sparkgd

    schema = "features array<double>, label double"
    rows = [([1.0, 2.0], 0.0), ([1.0], 1.0), ([3.0, 4.0], 0.0), ([5.0, 6.0], 1.0)]
    # one partition, which the fit splits into two tasks of two rows (in order): the
    # first task finds the short row among its own
    with pytest.raises(SparkgdError, match="row 1 has 1 elements"):
        sparkgd.LinearRegression().fit(spark.createDataFrame(rows, schema).repartition(1))
    df = spark.createDataFrame(rows[:2], schema)
    with pytest.raises(SparkgdError, match="rows have different lengths"):
        sparkgd.LinearRegression().fit(df.repartition(2, "label"))
    df = spark.createDataFrame([([1.0], 0.0), ([2.0], 2.0)], schema)
    with pytest.raises(SparkgdError, match="holds 2; the logistic loss needs labels 0 or 1"):
        sparkgd.LogisticRegression(family="binomial").fit(df)
    half = spark.createDataFrame([([1.0], 0.0), ([2.0], 0.5)], schema)
    with pytest.raises(SparkgdError, match="holds 0.5; the logistic loss needs labels 0 or 1"):
        sparkgd.LogisticRegression().fit(half)
    with pytest.raises(SparkgdError, match="not class indices"):
        sparkgd.LogisticRegression(family="multinomial").fit(half)
    with pytest.raises(SparkgdError, match="no rows"):
        sparkgd.LinearRegression().fit(df.limit(0))


def test_blocks_are_released_after_fit(spark, small):
    before = {r.id() for r in spark.sparkContext._jsc.getPersistentRDDs().values()}
    fit_coefficients(small[2])
    after = {r.id() for r in spark.sparkContext._jsc.getPersistentRDDs().values()}
    assert after <= before
