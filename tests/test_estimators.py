"""Models: transform, save/load, Spark ML habits (Pipeline, params, copy)."""
import json
import os

import numpy as np
import pytest

import sparkgd
from sparkgd.errors import SparkgdError

from conftest import logistic_data, regression_data, to_df


@pytest.fixture(scope="module")
def binary(spark):
    X, y, _ = logistic_data(n=200, d=3, seed=31)
    return X, y, to_df(spark, X, y, partitions=2)


@pytest.fixture(scope="module")
def logistic_model(binary):
    return sparkgd.LogisticRegression(regParam=0.01).fit(binary[2])


def test_transform_matches_numpy(binary, logistic_model):
    X, _, df = binary
    m = logistic_model
    rows = m.transform(df).select("features", "rawPrediction", "probability",
                                  "prediction").collect()
    Xr = np.array([r.features for r in rows])
    z = Xr @ m.coefficients + m.intercept
    p1 = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose([r.rawPrediction[1] for r in rows], z, rtol=1e-12)
    np.testing.assert_allclose([r.rawPrediction[0] for r in rows], -z, rtol=1e-12)
    np.testing.assert_allclose([r.probability[1] for r in rows], p1, rtol=1e-12)
    np.testing.assert_allclose([r.probability[0] for r in rows], 1 - p1, rtol=1e-10, atol=1e-15)
    assert [r.prediction for r in rows] == (p1 > 0.5).astype(float).tolist()
    np.testing.assert_allclose(m.predictProbability(Xr)[:, 1], p1, rtol=1e-12)


def test_transform_on_vectors_and_feature_columns(spark, binary, logistic_model):
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    m = logistic_model
    df = binary[2].cache()
    vec = df.withColumn("features", array_to_vector("features"))
    rows = m.transform(vec).select("features", "prediction").collect()
    X = np.array([r.features.toArray() for r in rows])
    expected = ((X @ m.coefficients + m.intercept) > 0).astype(float).tolist()
    assert [r.prediction for r in rows] == expected
    cols = df.select(*[F.col("features")[i].alias(f"x{i}") for i in range(3)])
    mc = m.copy()
    mc.set(mc.featureCols, ["x0", "x1", "x2"])
    rows = mc.transform(cols).collect()
    X = np.array([[r.x0, r.x1, r.x2] for r in rows])
    expected = ((X @ m.coefficients + m.intercept) > 0).astype(float).tolist()
    assert [r.prediction for r in rows] == expected
    df.unpersist()


def test_linear_regression_transform_and_params(spark):
    X, y, _ = regression_data(n=100, d=2, seed=3)
    df = to_df(spark, X, y, partitions=2)
    m = sparkgd.LinearRegression(predictionCol="yhat", tol=1e-12).fit(df)
    rows = m.transform(df).select("features", "yhat").collect()
    Xr = np.array([r.features for r in rows])
    np.testing.assert_allclose([r.yhat for r in rows], Xr @ m.coefficients + m.intercept,
                               rtol=1e-12)
    assert m.getPredictionCol() == "yhat" and m.numFeatures == 2


def test_pipeline(spark, binary):
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F

    df = binary[2].select(*[F.col("features")[i].alias(f"x{i}") for i in range(3)], "label")
    pipe = Pipeline(stages=[VectorAssembler(inputCols=["x0", "x1", "x2"], outputCol="features"),
                            sparkgd.LogisticRegression()])
    model = pipe.fit(df)
    out = model.transform(df)
    assert {"features", "probability", "prediction"} <= set(out.columns)


def test_save_load_roundtrip(tmp_path, binary, logistic_model):
    path = str(tmp_path / "model")
    logistic_model.save(path)
    meta = json.load(open(os.path.join(path, "metadata.json")))
    assert meta["loss"] == "logistic" and meta["numFeatures"] == 3 and meta["numClasses"] == 2
    assert meta["params"]["regParam"] == 0.01 and meta["params"]["optimizer"] == "lbfgs"
    s = meta["summary"]
    assert s["totalIterations"] == logistic_model.summary.totalIterations
    assert s["objectiveHistory"] == logistic_model.summary.objectiveHistory
    assert s["bytesCommunicated"] > 0 and s["trainingSeconds"] > 0
    # readable without sparkgd
    np.testing.assert_array_equal(np.load(os.path.join(path, "coefficients.npy")),
                                  logistic_model.coefficients)
    loaded = sparkgd.load_model(path)
    assert type(loaded) is sparkgd.LogisticRegressionModel
    np.testing.assert_array_equal(loaded.coefficients, logistic_model.coefficients)
    assert loaded.intercept == logistic_model.intercept
    assert loaded.summary.objectiveHistory == logistic_model.summary.objectiveHistory
    assert loaded.getRegParam() == 0.01
    a = [r.probability for r in loaded.transform(binary[2]).collect()]
    b = [r.probability for r in logistic_model.transform(binary[2]).collect()]
    assert a == b
    assert not [p for p in os.listdir(tmp_path) if p != "model"]  # no temp dirs left


def test_save_does_not_replace_without_overwrite(tmp_path, logistic_model):
    path = str(tmp_path / "model")
    logistic_model.save(path)
    before = open(os.path.join(path, "metadata.json")).read()
    with pytest.raises(SparkgdError, match="already exists"):
        logistic_model.save(path)
    assert open(os.path.join(path, "metadata.json")).read() == before
    logistic_model.save(path, overwrite=True)


def test_failed_save_leaves_the_old_model(tmp_path, logistic_model, monkeypatch):
    path = str(tmp_path / "model")
    logistic_model.save(path)
    before = open(os.path.join(path, "metadata.json")).read()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("sparkgd.persist.spark_metadata", boom)
    with pytest.raises(OSError):
        logistic_model.save(path, overwrite=True)
    assert open(os.path.join(path, "metadata.json")).read() == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_load_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(SparkgdError, match="not a saved sparkgd model"):
        sparkgd.load_model(str(tmp_path))


def test_bad_params_are_clear_errors(binary):
    df = binary[2]
    with pytest.raises(SparkgdError, match="unknown optimizer 'newton'"):
        sparkgd.LogisticRegression(optimizer="newton").fit(df)
    with pytest.raises(SparkgdError, match="regParam must be >= 0"):
        sparkgd.LogisticRegression(regParam=-1.0).fit(df)
    with pytest.raises(SparkgdError, match="aggregationDepth must be >= 2"):
        sparkgd.LogisticRegression(aggregationDepth=1).fit(df)


def test_weights_equal_duplicated_rows(spark):
    X, y, _ = logistic_data(n=80, d=2, seed=5)
    counts = np.random.default_rng(0).integers(1, 4, size=80).astype(float)
    weighted = to_df(spark, X, y, counts, partitions=2)
    dup = to_df(spark, np.repeat(X, counts.astype(int), axis=0),
                np.repeat(y, counts.astype(int)), partitions=2)
    a = sparkgd.LogisticRegression(weightCol="weight", tol=1e-12).fit(weighted)
    b = sparkgd.LogisticRegression(tol=1e-12).fit(dup)
    np.testing.assert_allclose(a.coefficients, b.coefficients, rtol=1e-6)
    np.testing.assert_allclose(a.intercept, b.intercept, rtol=1e-6)


@pytest.mark.parametrize("meta", [{"class": "LogisticRegressionModel"}, [1, 2],
                                  {"class": "Nope", "numFeatures": 3, "loss": "logistic"}])
def test_corrupt_saved_models_are_clear_errors(tmp_path, meta):
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    np.save(tmp_path / "coefficients.npy", np.zeros(3))
    np.save(tmp_path / "intercept.npy", np.zeros(2))
    with pytest.raises(SparkgdError, match="cannot read model"):
        sparkgd.load_model(str(tmp_path))


def test_mini_batches_need_a_stochastic_optimizer(binary):
    with pytest.raises(SparkgdError, match="miniBatchFraction < 1 needs a stochastic optimizer"):
        sparkgd.LogisticRegression(miniBatchFraction=0.5).fit(binary[2])


def test_non_binary_labels_are_named(spark):
    df = spark.createDataFrame([([1.0], 0.0), ([2.0], 1.0), ([3.0], 0.5)],
                               "features array<double>, label double").coalesce(1)
    with pytest.raises(SparkgdError, match="holds values other than 0 and 1"):
        sparkgd.LinearSVC().fit(df)


def test_classifiers_start_at_spark_mls_intercepts():
    """Binomial: log-odds of the weighted label counts; multinomial: centred log(count+1);
    no change when the labels give no histogram or a class is missing (binomial)."""
    from sparkgd import kernels
    from sparkgd.coordinator import label_start

    class Facts:
        def __init__(self, counts):
            self.counts = counts

        def label_weights(self):
            return None if self.counts is None else np.asarray(self.counts, dtype=float)

    lay = kernels.Layout(2, 1, True)
    x0 = label_start(lay.zeros(), lay, Facts([30.0, 10.0]), "logistic")
    np.testing.assert_allclose(x0, [0, 0, np.log(10 / 30)])
    assert not label_start(lay.zeros(), lay, Facts([30.0]), "logistic").any()
    assert not label_start(lay.zeros(), lay, Facts(None), "logistic").any()
    lay3 = kernels.Layout(2, 3, True)
    x0 = label_start(lay3.zeros(), lay3, Facts([5.0, 0.0, 20.0]), "multinomial")
    raw = np.log1p([5.0, 0.0, 20.0])
    np.testing.assert_allclose(x0[6:], raw - raw.mean())
    assert not x0[:6].any()
