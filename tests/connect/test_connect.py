"""Every fit from a Spark Connect session: the coordinator inside the cluster.

References are independent of sparkgd: SciPy's L-BFGS on the same arrays, NumPy
objectives written from DESIGN.md, Spark ML's evaluators, and a classic session's fit
of the same plan in a process of its own.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import sparkgd
from sparkgd.errors import SparkgdError

from conftest import ROOT, to_df
from references import full_objective, model_theta, reference_optimum


def test_the_session_is_connect(spark):
    from pyspark.sql.utils import is_remote

    assert is_remote() and type(spark).__module__.startswith("pyspark.sql.connect")
    with pytest.raises(Exception, match="sparkContext"):
        spark.sparkContext  # noqa: B018   (what sparkgd must never touch here)


def test_logistic_reaches_the_optimum_on_real_data(spark, cancer, caplog):
    """Breast cancer (569 x 30, features in units 1e-3 to 1e3): lbfgs from a Connect
    session ends within 1e-6 of SciPy's optimum; the passes were served by tasks that
    held the blocks (the coordinator ran in one of them), and its iterations are logged
    here after the fit."""
    df, X, y = cancer
    want, f_star = reference_optimum(X, y, None, "logistic", reg=0.01)
    with caplog.at_level(logging.INFO, logger="sparkgd"):
        model = sparkgd.LogisticRegression(regParam=0.01, tol=1e-10, maxIter=500).fit(df)
    s = model.summary
    got = full_objective(model_theta(model), X, y, None, "logistic", 1, 0.01, 0.0)
    assert got - f_star < 1e-6 * max(1.0, abs(f_star))
    assert abs(s.objectiveHistory[-1] - got) < 1e-12
    assert s.engine == "served, sealed" and s.numRows == 569
    assert "[cluster] iter" in caplog.text
    # the training metrics came from the blocks, with Spark ML's names
    assert 0.9 < s.accuracy <= 1 and 0.9 < s.areaUnderROC <= 1


@pytest.mark.parametrize("case", [
    dict(cls="LinearRegression", loss="squared", reg=0.1, alpha=0.5),
    dict(cls="LinearRegression", loss="huber", reg=0.01, alpha=0.0),
    dict(cls="LinearSVC", loss="hinge", reg=0.01, alpha=0.0),
    dict(cls="LogisticRegression", loss="multinomial", reg=0.01, alpha=0.3, k=3),
    dict(cls="LogisticRegression", loss="logistic", reg=0.01, alpha=0.0, topology="ring",
         weights=True),
    dict(cls="LogisticRegression", loss="logistic", reg=0.01, alpha=0.0, topology="star",
         standardization=True),
])
def test_every_estimator_reaches_its_optimum(spark, case):
    rng = np.random.default_rng(3)
    n, d, k = 1200, 6, case.get("k", 1)
    X = rng.normal(size=(n, d)) * [1, 5, 0.2, 1, 2, 1]
    z = X @ rng.normal(size=(d, max(k, 1)))
    if case["loss"] in ("squared", "huber"):
        y = z[:, 0] + 0.5 * rng.standard_t(3, size=n)
    elif case["loss"] == "multinomial":
        y = np.argmax(z + rng.gumbel(size=z.shape), axis=1).astype(float)
    else:
        y = (rng.random(n) < 1 / (1 + np.exp(-z[:, 0]))).astype(float)
    w = rng.uniform(0.5, 2, size=n) if case.get("weights") else None
    df = to_df(spark, X, y, w, partitions=3)
    kw = dict(regParam=case["reg"], elasticNetParam=case["alpha"], tol=1e-12, maxIter=1000,
              topology=case.get("topology", "tree"),
              standardization=case.get("standardization", False))
    if w is not None:
        kw["weightCol"] = "weight"
    if case["cls"] == "LinearRegression":
        kw["loss"] = case["loss"]
    est = getattr(sparkgd, case["cls"])(**kw)
    model = est.fit(df)
    assert model.summary.engine == "served, sealed"
    theta = model_theta(model)
    kk = k if case["loss"] == "multinomial" else 1
    if case.get("standardization"):
        s = X.std(axis=0, ddof=1) if w is None else None
        Xs = X / s
        want, f_star = reference_optimum(Xs, y, w, case["loss"], kk, case["reg"], case["alpha"])
        theta = np.r_[theta[:d] * s, theta[d:]]
        got = full_objective(theta, Xs, y, w, case["loss"], kk, case["reg"], case["alpha"])
    else:
        want, f_star = reference_optimum(X, y, w, case["loss"], kk, case["reg"], case["alpha"])
        got = full_objective(theta, X, y, w, case["loss"], kk, case["reg"], case["alpha"])
    tol = 1e-5 if case["loss"] == "hinge" else 1e-8
    assert got - f_star < tol * max(1.0, abs(f_star)), (got, f_star)


@pytest.fixture(scope="module")
def binary(spark):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(4000, 8))
    y = (rng.random(4000) < 1 / (1 + np.exp(-(X @ rng.normal(size=8) + 0.3)))).astype(float)
    return to_df(spark, X, y, partitions=2).cache(), X, y


def test_local_async_dp_and_codecs_run_in_the_cluster(spark, binary):
    """mode local, async (staleness 0 is sync sgd, to 1e-10), DP-SGD and a lossy codec
    over the ring: every mode runs from a Connect session."""
    df, X, y = binary
    base = dict(regParam=0.01, optimizer="sgd", stepSize=0.5, maxIter=30, tol=0.0)
    sync = sparkgd.LogisticRegression(**base).fit(df)
    asyn = sparkgd.LogisticRegression(mode="async", staleness=0, **base).fit(df)
    np.testing.assert_allclose(model_theta(asyn), model_theta(sync), rtol=1e-10, atol=1e-12)
    assert asyn.summary.mode == "async"
    local = sparkgd.LogisticRegression(mode="local", localSteps=3, **base).fit(df)
    f_local = full_objective(model_theta(local), X, y, None, "logistic", 1, 0.01, 0.0)
    assert abs(local.summary.objectiveHistory[-1] - f_local) < 1e-10
    assert f_local < sync.summary.objectiveHistory[0]
    private = sparkgd.LogisticRegression(optimizer="sgd", stepSize=0.5, maxIter=20,
                                         miniBatchFraction=0.2, dpEpsilon=2.0).fit(df)
    p = private.summary.privacy
    assert p["steps"] == 20 and 0 < p["epsilon"] <= 2.0 + 1e-9 and p["noiseMultiplier"] > 0
    with pytest.raises(AttributeError, match="private fit computes no training metrics"):
        private.summary.accuracy  # noqa: B018
    fp16 = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=200,
                                      compression="fp16", topology="ring",
                                      regParam=0.01).fit(df)
    exact, _ = reference_optimum(X, y, None, "logistic", reg=0.01)
    f_star = full_objective(exact, X, y, None, "logistic", 1, 0.01, 0.0)
    assert fp16.summary.objectiveHistory[-1] - f_star < 1e-4


def test_transform_evaluate_and_metrics_equal_spark_evaluators(spark, binary):
    from pyspark.ml.evaluation import BinaryClassificationEvaluator, \
        MulticlassClassificationEvaluator
    from pyspark.sql import functions as F

    df, X, y = binary
    model = sparkgd.LogisticRegression(regParam=0.01).fit(df)
    scored = model.transform(df)
    rows = scored.select("probability", "prediction").collect()
    assert len(rows) == X.shape[0]
    z = X @ model.coefficients + model.intercept
    p1 = np.array([r["probability"][1] for r in rows])
    np.testing.assert_allclose(np.sort(p1), np.sort(1 / (1 + np.exp(-z))), rtol=1e-12)
    s = model.summary
    auc = BinaryClassificationEvaluator(numBins=0).evaluate(scored)
    acc = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(scored)
    assert abs(s.areaUnderROC - auc) < 1e-4 and abs(s.accuracy - acc) < 1e-9
    ev = model.evaluate(df.where(F.col("label") == 1.0).union(df.limit(200)))
    assert 0 < ev.accuracy <= 1


def test_pipeline_saves_loads_and_scores_every_row(spark, binary, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.feature import SQLTransformer

    df, X, _ = binary
    pipe = Pipeline(stages=[SQLTransformer(statement="SELECT * FROM __THIS__"),
                            sparkgd.LogisticRegression(regParam=0.01)])
    model = pipe.fit(df)
    path = str(tmp_path / "pipeline")
    model.save(path)
    again = PipelineModel.load(path)
    a = model.transform(df).select("prediction", "probability").collect()
    b = again.transform(df).select("prediction", "probability").collect()
    assert len(b) == X.shape[0] == len(a)
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    # the stage's directory is DESIGN's layout, readable without Spark
    stage = next(p for p in (tmp_path / "pipeline" / "stages").iterdir()
                 if p.name.startswith("1_"))    # the second stage: ours
    meta = json.loads((stage / "metadata.json").read_text())
    coef = np.load(stage / "coefficients.npy", allow_pickle=False)
    np.testing.assert_array_equal(coef, model.stages[-1].coefficients)
    assert meta["class"] == "LogisticRegressionModel" and meta["numFeatures"] == 8


def test_cross_validator_picks_the_best_param_map(spark, binary):
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder

    df, _, _ = binary
    lr = sparkgd.LogisticRegression()
    grid = ParamGridBuilder().addGrid(lr.regParam, [0.001, 1.0]).build()
    cv = CrossValidator(estimator=lr, estimatorParamMaps=grid, numFolds=2, seed=1,
                        evaluator=BinaryClassificationEvaluator())
    fitted = cv.fit(df)
    assert fitted.avgMetrics[0] > fitted.avgMetrics[1]
    assert fitted.bestModel.getRegParam() == 0.001


CLASSIC = r"""
import json, os, sys
import numpy as np
os.environ["PYSPARK_PYTHON"] = sys.executable
from pyspark.sql import SparkSession
import sparkgd
spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .getOrCreate())
data, connect_model, out = sys.argv[1:4]
theirs = sparkgd.load_model(connect_model)
df = spark.read.parquet(data)
m = sparkgd.LogisticRegression(regParam=0.01, tol=1e-12, maxIter=300).fit(df)
m.save(out)
print(json.dumps({"theirs": np.r_[np.ravel(theirs.coefficients), theirs.intercept].tolist(),
                  "engine": m.summary.engine}))
"""


def test_classic_and_connect_give_the_same_model_and_read_each_others(spark, cancer,
                                                                      tmp_path):
    """The same plan, fitted from this Connect session and from a classic session in a
    process of its own: the same objective to 1e-9 (the classic session's tasks read the
    Parquet files themselves, the Connect job's get them from Spark: other row groups,
    other roundings, and on this ill-conditioned data (units 1e-3 to 1e3) L-BFGS ends 300
    iterations within 4e-10 of each other, coefficients within 1e-3); each session loads
    what the other saved."""
    df, _, _ = cancer
    model = sparkgd.LogisticRegression(regParam=0.01, tol=1e-12, maxIter=300).fit(df)
    saved = str(tmp_path / "from_connect")
    model.save(saved)
    out = str(tmp_path / "from_classic")
    env = dict(os.environ)
    for k in ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE", "SPARK_LOCAL_REMOTE",
              "SPARKGD_CONNECT_TESTS"):
        env.pop(k, None)
    run = subprocess.run([sys.executable, "-c", CLASSIC, os.path.join(ROOT, "data",
                          "breast_cancer"), saved, out], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    told = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(told["theirs"], model_theta(model))
    classic = sparkgd.load_model(out)
    assert told["engine"] == "served, sealed"
    f_classic = classic.summary.objectiveHistory[-1]
    f_connect = model.summary.objectiveHistory[-1]
    assert abs(f_classic - f_connect) <= 1e-9 * f_connect, (f_classic, f_connect)
    np.testing.assert_allclose(model_theta(classic), model_theta(model), rtol=1e-3, atol=1e-5)
    assert classic.summary.numRows == 569


def test_saving_where_connect_cannot_write_says_so(spark, binary):
    df, _, _ = binary
    model = sparkgd.LinearSVC(maxIter=5).fit(df)
    with pytest.raises(SparkgdError, match="cannot write a Hadoop-FS path"):
        model.save("hdfs://nowhere:8020/models/m")
    with pytest.raises(SparkgdError, match="not a saved sparkgd model"):
        sparkgd.load_model("/nonexistent/sparkgd-model")


def test_bad_input_is_one_line(spark):
    df = to_df(spark, np.ones((10, 2)), np.arange(10.0))
    with pytest.raises(SparkgdError, match="label column 'label' holds 9; the logistic loss "
                       "needs labels 0 or 1"):
        sparkgd.LogisticRegression(family="binomial").fit(df)


def test_too_few_slots_take_the_slower_path_to_the_same_model(spark, binary):
    """More serving tasks than the cluster can run at once (barrier mode holds the job):
    after spark.sparkgd.slotWait the client runs the coordinator itself, one Spark job
    per pass; the model is the served fit's."""
    df, _, _ = binary
    served = sparkgd.LogisticRegression(regParam=0.01, tol=1e-10).fit(df)
    spark.conf.set("spark.sparkgd.tasks", "3")
    spark.conf.set("spark.sparkgd.slotWait", "4")
    try:
        slow = sparkgd.LogisticRegression(regParam=0.01, tol=1e-10).fit(df)
    finally:
        spark.conf.unset("spark.sparkgd.tasks")
        spark.conf.unset("spark.sparkgd.slotWait")
    assert slow.summary.engine == "jobs"
    np.testing.assert_allclose(model_theta(slow), model_theta(served), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------- recovery


@pytest.fixture(scope="module")
def slow_fit(spark, binary):
    """A fixed-step gd fit that takes a few seconds (task 1 computes 30x slower), its
    undisturbed model, and a way to kill one of its tasks' Python worker once the
    coordinator has checkpointed iteration 10."""
    df, _, _ = binary

    def fit(tmp, kill=None):
        ck = tmp / "ck"
        pids = tmp / "pids"
        pids.mkdir()
        spark.conf.set("spark.sparkgd.testing.slowTask", "1:30")
        spark.conf.set("spark.sparkgd.testing.pidDir", str(pids))
        est = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=120, tol=0.0,
                                         regParam=0.01, checkpointDir=str(ck),
                                         checkpointInterval=5)
        killed = {}

        def killer():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    meta = json.loads((ck / "checkpoint.json").read_text())
                except (OSError, ValueError):
                    meta = {}
                if meta.get("iteration", 0) >= 10:
                    pid = int((pids / f"task-{kill}.pid").read_text())
                    os.kill(pid, signal.SIGKILL)
                    killed["at"] = meta["iteration"]
                    return
                time.sleep(0.02)

        t = threading.Thread(target=killer, daemon=True) if kill is not None else None
        try:
            if t is not None:
                t.start()
            model = est.fit(df)
        finally:
            spark.conf.unset("spark.sparkgd.testing.slowTask")
            spark.conf.unset("spark.sparkgd.testing.pidDir")
        if t is not None:
            t.join(5)
        return model, killed

    return fit


@pytest.fixture(scope="module")
def undisturbed(slow_fit, tmp_path_factory):
    return slow_fit(tmp_path_factory.mktemp("undisturbed"))[0]


@pytest.mark.parametrize("kill", [1, 0], ids=["serving task", "coordinator's task"])
def test_a_killed_task_ends_in_the_undisturbed_model(slow_fit, undisturbed, tmp_path, kill,
                                                     caplog):
    """SIGKILL the Python worker of serving task 1, or of task 0 (which runs the
    coordinator), after the checkpoint of iteration 10: barrier mode ends the job, the
    client runs it again, and the new coordinator resumes from the checkpoint on the
    shared path -- the undisturbed model to 1e-9."""
    with caplog.at_level(logging.INFO, logger="sparkgd"):
        model, killed = slow_fit(tmp_path, kill=kill)
    assert killed.get("at", 0) >= 10
    assert "running it again (attempt 2), from its last checkpoint" in caplog.text
    assert "[cluster] resumed from iteration" in caplog.text
    np.testing.assert_allclose(model_theta(model), model_theta(undisturbed), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(model.summary.objectiveHistory,
                               undisturbed.summary.objectiveHistory, rtol=1e-9)
    assert not (tmp_path / "ck" / "checkpoint.json").exists()   # removed after success
