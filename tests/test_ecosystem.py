"""A first-class pyspark.ml citizen: Pipeline/CrossValidator persistence through Spark ML's
own machinery, model setters and single-row predictions, and training summaries whose
metrics (Spark ML's names) equal Spark's own evaluators on the same predictions."""
import json
import os

import numpy as np
import pytest

import sparkgd
from conftest import logistic_data, regression_data, to_df


def _columns_frame(spark, X, y, w=None):
    """x0..x{d-1}, label[, weight] as plain double columns (for VectorAssembler)."""
    rows = [tuple(float(v) for v in x) + (float(t),) + (() if w is None else (float(u),))
            for x, t, u in zip(X, y, w if w is not None else [None] * len(y))]
    cols = [f"x{j}" for j in range(X.shape[1])] + ["label"] + ([] if w is None else ["weight"])
    return spark.createDataFrame(rows, cols).repartition(2)


@pytest.fixture(scope="module")
def frames(spark):
    Xb, yb, wb = logistic_data(n=400, d=3, seed=11, weights=True)
    Xr, yr, wr = regression_data(n=400, d=3, seed=12, weights=True)
    rng = np.random.default_rng(13)
    Xm = rng.normal(size=(450, 3))
    ym = np.argmax(Xm @ rng.normal(size=(3, 3)) + rng.gumbel(size=(450, 3)), axis=1).astype(float)
    return {"binary": _columns_frame(spark, Xb, yb, wb),
            "regression": _columns_frame(spark, Xr, yr, wr),
            "multiclass": _columns_frame(spark, Xm, ym)}


def _pipeline(estimator):
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import VectorAssembler

    return Pipeline(stages=[VectorAssembler(inputCols=["x0", "x1", "x2"], outputCol="features"),
                            estimator])


CASES = [
    ("binary", lambda: sparkgd.LogisticRegression(regParam=0.01, weightCol="weight")),
    ("regression", lambda: sparkgd.LinearRegression(regParam=0.01, weightCol="weight")),
    ("binary", lambda: sparkgd.LinearSVC(regParam=0.01, maxIter=50)),
    ("multiclass", lambda: sparkgd.LogisticRegression(regParam=0.01)),
]


@pytest.mark.parametrize("kind,make", CASES, ids=["logistic", "linear", "svc", "multinomial"])
def test_pipeline_fits_saves_loads_and_scores_like_spark(spark, frames, tmp_path, kind, make):
    from pyspark.ml import PipelineModel
    from pyspark.ml.evaluation import (BinaryClassificationEvaluator,
                                       MulticlassClassificationEvaluator, RegressionEvaluator)

    df = frames[kind]
    model = _pipeline(make()).fit(df)
    fitted = model.stages[-1]
    uri = "file://" + str(tmp_path / "pipeline")
    model.save(uri)
    loaded = PipelineModel.load(uri)
    again = loaded.stages[-1]
    assert type(again) is type(fitted) and again.uid == fitted.uid
    np.testing.assert_array_equal(again.coefficients, fitted.coefficients)
    # the stage directory is also a sparkgd model (DESIGN section 4), readable without Spark
    stage_dir = os.path.join(str(tmp_path / "pipeline"), "stages",
                             sorted(os.listdir(tmp_path / "pipeline" / "stages"))[-1])
    assert json.load(open(os.path.join(stage_dir, "metadata.json")))["numFeatures"] == 3
    np.testing.assert_array_equal(sparkgd.load_model(stage_dir).coefficients,
                                  fitted.coefficients)

    scored = loaded.transform(df)
    a = [r.prediction for r in model.transform(df).orderBy("x0").collect()]
    b = [r.prediction for r in scored.orderBy("x0").collect()]
    assert a == b

    # The training summary's metrics are Spark's evaluators' on the same predictions.
    s = fitted.summary
    if kind == "regression":
        ev = RegressionEvaluator(weightCol="weight")     # Spark's weighted SStot too
        for name, attr in [("rmse", "rootMeanSquaredError"), ("mse", "meanSquaredError"),
                           ("mae", "meanAbsoluteError"), ("r2", "r2"),
                           ("var", "explainedVariance")]:
            assert getattr(s, attr) == pytest.approx(ev.setMetricName(name).evaluate(scored),
                                                     rel=1e-9), name
        assert s.numInstances == 400 and s.degreesOfFreedom == 400 - 3 - 1
        assert s.r2adj == pytest.approx(1 - (1 - s.r2) * 399 / 396, rel=1e-12)
        assert s.residuals.count() == 400
        return
    weight = {"weightCol": "weight"} if fitted.isSet(fitted.weightCol) else {}
    ev = MulticlassClassificationEvaluator(**weight)
    assert s.accuracy == pytest.approx(ev.setMetricName("accuracy").evaluate(scored), rel=1e-9)
    assert s.weightedPrecision == pytest.approx(
        ev.setMetricName("weightedPrecision").evaluate(scored), rel=1e-9)
    assert s.weightedRecall == pytest.approx(
        ev.setMetricName("weightedRecall").evaluate(scored), rel=1e-9)
    assert s.weightedFMeasure() == pytest.approx(ev.setMetricName("f1").evaluate(scored),
                                                 rel=1e-9)
    for i, label in enumerate(s.labels):
        ev.setMetricLabel(label)
        assert s.precisionByLabel[i] == pytest.approx(
            ev.setMetricName("precisionByLabel").evaluate(scored), rel=1e-9)
        assert s.recallByLabel[i] == pytest.approx(
            ev.setMetricName("recallByLabel").evaluate(scored), rel=1e-9)
    if isinstance(fitted, sparkgd.LogisticRegressionModel):
        assert s.logLoss == pytest.approx(ev.setMetricName("logLoss").evaluate(scored),
                                          rel=1e-9)
    else:
        assert s.logLoss is None
    if kind == "binary":
        auc = BinaryClassificationEvaluator(numBins=0, **weight).evaluate(scored)
        assert s.areaUnderROC == pytest.approx(auc, abs=1e-4)
    # evaluate(df) on other data is the same computation
    assert fitted.evaluate(fitted.transform(model.stages[0].transform(df))).accuracy == \
        pytest.approx(s.accuracy, rel=1e-12)
    # a saved model keeps its training metrics
    assert again.summary.accuracy == pytest.approx(s.accuracy, rel=1e-12)


def test_cross_validator_with_parallelism_saves_and_loads(spark, frames, tmp_path):
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, CrossValidatorModel, ParamGridBuilder

    lr = sparkgd.LogisticRegression(maxIter=30)
    grid = ParamGridBuilder().addGrid(lr.regParam, [0.001, 0.1]).build()
    cv = CrossValidator(estimator=_pipeline(lr), estimatorParamMaps=grid,
                        evaluator=BinaryClassificationEvaluator(), numFolds=2, parallelism=2,
                        seed=1)
    model = cv.fit(frames["binary"])
    path = str(tmp_path / "cv")
    model.save(path)
    loaded = CrossValidatorModel.load(path)
    best = loaded.bestModel.stages[-1]
    assert isinstance(best, sparkgd.LogisticRegressionModel)
    np.testing.assert_array_equal(best.coefficients, model.bestModel.stages[-1].coefficients)
    assert len(loaded.avgMetrics) == 2
    # the unfitted estimator round-trips too (Spark ML's params writer)
    cv.save(str(tmp_path / "cv-estimator"))
    again = CrossValidator.load(str(tmp_path / "cv-estimator"))
    assert again.getEstimator().getStages()[-1].getMaxIter() == 30


def test_thresholds_follow_spark_ml(spark, frames):
    from pyspark.ml.feature import VectorAssembler

    with pytest.raises(ValueError, match="inconsistent values for threshold"):
        sparkgd.LogisticRegression(threshold=0.42, thresholds=[0.5, 0.5])
    lr = sparkgd.LogisticRegression(threshold=0.5, thresholds=[0.5, 0.5])
    assert lr.getThreshold() == 0.5
    lr.setThreshold(0.3)
    assert not lr.isSet(lr.thresholds) and lr.getThresholds() == [0.7, 0.3]
    lr.setThresholds([0.2, 0.8])
    assert not lr.isSet(lr.threshold) and lr.getThreshold() == pytest.approx(0.8)

    df = VectorAssembler(inputCols=["x0", "x1", "x2"], outputCol="features").transform(
        frames["binary"])
    model = sparkgd.LogisticRegression(regParam=0.01).fit(df)
    p1 = np.array([r.probability[1] for r in model.transform(df).collect()])
    for t in (0.0, 0.3, 1.0):
        pred = np.array([r.prediction for r in model.setThreshold(t).transform(df).collect()])
        np.testing.assert_array_equal(pred, (p1 > t).astype(float))
    model.setThresholds([0.25, 0.75])      # binary: the same as threshold 0.75
    pred = np.array([r.prediction for r in model.transform(df).collect()])
    np.testing.assert_array_equal(pred, (p1 > 0.75).astype(float))

    dfm = VectorAssembler(inputCols=["x0", "x1", "x2"], outputCol="features").transform(
        frames["multiclass"])
    mm = sparkgd.LogisticRegression(regParam=0.01).fit(dfm)
    rows = mm.setThresholds([1.0, 0.01, 1.0]).transform(dfm).collect()
    prob = np.array([r.probability.toArray() for r in rows])
    expect = np.argmax(prob / np.array([1.0, 0.01, 1.0]), axis=1)
    np.testing.assert_array_equal([r.prediction for r in rows], expect)


def test_single_row_predictions_and_setters(spark, frames):
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.linalg import DenseVector, Vectors

    df = VectorAssembler(inputCols=["x0", "x1", "x2"], outputCol="features").transform(
        frames["binary"])
    model = sparkgd.LogisticRegression(regParam=0.01).fit(df)
    assert model.numFeatures == 3 and model.numClasses == 2 and model.hasSummary
    model.setPredictionCol("p").setProbabilityCol("prob").setRawPredictionCol("raw")
    model.setFeaturesCol("features")
    rows = model.transform(df).limit(20).collect()
    for r in rows:
        assert model.predict(r.features) == r.p
        prob = model.predictProbability(r.features)
        assert isinstance(prob, DenseVector)
        np.testing.assert_allclose(prob.toArray(), r.prob.toArray(), rtol=1e-12)
        np.testing.assert_allclose(model.predictRaw(r.features).toArray(), r.raw.toArray(),
                                   rtol=1e-12)
    assert model.predict(Vectors.sparse(3, [0], [1.0])) == model.predict([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="3 features"):
        model.predict([1.0, 2.0])
    lin = sparkgd.LinearRegression().fit(df)
    x = rows[0].features
    assert lin.predict(x) == pytest.approx(float(lin.coefficients @ x.toArray() + lin.intercept))
    est = sparkgd.LinearSVC().setRegParam(0.5).setMaxIter(7)
    assert (est.getRegParam(), est.getMaxIter()) == (0.5, 7)


def test_spark_ml_regression_summary_expectations(spark):
    """pyspark.ml's own test of the linear regression summary, on our estimator."""
    from pyspark.ml.linalg import Vectors

    df = spark.createDataFrame([(1.0, 2.0, Vectors.dense(1.0)),
                                (0.0, 2.0, Vectors.sparse(1, [], []))],
                               ["label", "weight", "features"])
    model = sparkgd.LinearRegression(maxIter=50, regParam=0.0, weightCol="weight",
                                     fitIntercept=False).fit(df)
    s = model.summary
    assert s.predictionCol == "prediction" and s.labelCol == "label"
    assert s.featuresCol == "features"
    assert s.predictions.count() == 2
    assert s.explainedVariance == pytest.approx(0.25, abs=5e-3)
    assert s.meanAbsoluteError == pytest.approx(0.0, abs=1e-6)
    assert s.meanSquaredError == pytest.approx(0.0, abs=1e-6)
    assert s.rootMeanSquaredError == pytest.approx(0.0, abs=1e-6)
    assert s.r2 == pytest.approx(1.0, abs=5e-3)
    assert s.r2adj == pytest.approx(1.0, abs=5e-3)
    assert s.numInstances == 2 and s.degreesOfFreedom == 1
    assert [r.residuals for r in s.residuals.collect()] == pytest.approx([0.0, 0.0], abs=1e-6)
    same = model.evaluate(df)
    assert same.explainedVariance == pytest.approx(s.explainedVariance)


def test_roc_area_counts_ties_as_half():
    from sparkgd.metrics import roc_area

    assert roc_area([(2, 1, 0), (1, 0, 1)]) == 1.0
    assert roc_area([(1, 1, 1)]) == 0.5
    assert roc_area([(3, 1, 0), (2, 0, 1), (1, 1, 0), (0, 0, 1)]) == 0.75
    assert np.isnan(roc_area([(1, 2, 0)]))


def test_score_bins_keep_the_order_whatever_the_scale(spark):
    from pyspark.sql import functions as F

    from sparkgd.metrics import _score_bin

    values = [-1e10, -3.0, -1e-8, 0.0, 1e-300, 1e-6, 1.01e-6, 2.0, 1e10]
    df = spark.createDataFrame([(v,) for v in values], ["s"])
    keys = [r.k for r in df.select(_score_bin(F.col("s")).alias("k")).collect()]
    assert keys == sorted(keys) and len(set(keys)) == len(values)


def test_saved_thresholds_load_back(spark, frames, tmp_path):
    from pyspark.ml.feature import VectorAssembler

    va = VectorAssembler(inputCols=["x0", "x1", "x2"], outputCol="features")
    dfm = va.transform(frames["multiclass"])
    m = sparkgd.LogisticRegression(thresholds=[0.3, 0.3, 0.4], maxIter=20).fit(dfm)
    m.save(str(tmp_path / "m"))
    assert sparkgd.load_model(str(tmp_path / "m")).getThresholds() == [0.3, 0.3, 0.4]
    b = sparkgd.LogisticRegression(maxIter=20).fit(va.transform(frames["binary"]))
    b.setThresholds([0.4, 0.6])
    b.save(str(tmp_path / "b"))
    assert sparkgd.load_model(str(tmp_path / "b")).getThreshold() == pytest.approx(0.6)
    # Spark's labels are those in the data: a test set without class 1
    ev = m.evaluate(dfm.where("label != 1"))
    assert ev.labels == [0.0, 2.0] and len(ev.precisionByLabel) == 2
